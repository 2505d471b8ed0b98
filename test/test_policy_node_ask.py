"""Questions to the policy node's Left Brain over ROS: answers, refusals, the control rate."""

from __future__ import annotations

import json
import time

import pytest
from helpers import observation, reference_answer, save_policy_checkpoint, talkative_backbone
from ros_harness import RobotSide, ServerProcess, policy_node_process, wait_until

from twinbrain_ros.model.checkpoint import read_checkpoint_config
from twinbrain_ros.robot.embodiment import Embodiment
from twinbrain_ros.ros import diagnostic_keys as keys

pytestmark = [pytest.mark.ros, pytest.mark.slow]

WIDOWX = Embodiment.load("widowx")
QUESTION = "What is the robot holding?"


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny WidowX policy on a backbone whose greedy answers vary token by token."""
    root = tmp_path_factory.mktemp("ask_node")
    backbone = talkative_backbone(root / "backbone", "qwen2_5_vl")
    return {"backbone": backbone,
            "checkpoint": save_policy_checkpoint(backbone, root / "policy", WIDOWX)}


class Asker:
    """Publishes questions on /policy_node/ask and keeps the answers."""

    def __init__(self, robot: RobotSide):
        from std_msgs.msg import String

        self.String = String
        self.publisher = robot.node.create_publisher(String, "/policy_node/ask", 10)
        self.answers: list[dict] = robot.listen(String, "/policy_node/answer", 10,
                                                convert=lambda m: json.loads(m.data))

    def ask(self, text: str) -> None:
        self.publisher.publish(self.String(data=text))

    def matched(self) -> bool:
        """Whether the node's ~/ask subscription is there (a question is not lost)."""
        return self.publisher.get_subscription_count() > 0


@pytest.fixture
def robot(ros_env):
    side = RobotSide("widowx")
    yield side
    side.close()


def _expected_text(policy, robot, max_new_tokens):
    from transformers import AutoTokenizer

    config, _ = read_checkpoint_config(policy["checkpoint"])
    ids = reference_answer(policy["backbone"], [robot.frame], QUESTION,
                           config.image_size, max_new_tokens)
    return AutoTokenizer.from_pretrained(policy["backbone"]).decode(
        ids, skip_special_tokens=True).strip(), len(ids)


def test_the_node_answers_as_transformers_generate_does_and_refuses_bad_questions(
        robot, policy, tmp_path):
    asker = Asker(robot)
    with robot.watch(policy_node_process(tmp_path / "node.log", "widowx",
                                         checkpoint=policy["checkpoint"],
                                         ask_max_new_tokens=10)) as node:
        robot.spin_until(lambda: robot.dry_run and asker.matched(), 120,
                         "a plan and the ~/ask subscription", feed=True)
        asked = time.monotonic()
        asker.ask(QUESTION)
        robot.spin_until(lambda: asker.answers, 60, "the answer", feed=True)
        answer = asker.answers[0]
        text, count = _expected_text(policy, robot, 10)
        assert answer["ok"] and answer["error"] is None
        assert answer["question"] == QUESTION
        assert answer["answer"] == text and answer["tokens"] == count == 10
        assert answer["finish"] == "length"
        assert 0 < answer["generation_s"] <= answer["time_s"] <= time.monotonic() - asked
        assert answer["image_stamp"] > 0
        assert list(answer["image_stamps"]) == WIDOWX.image_topics
        assert 0 <= answer["image_age_s"] < 2.0
        # Unusable questions get an error answer naming the cause; the node goes on planning.
        for bad in ("", "   ", "describe it<|im_end|>", "x" * 3000):
            asker.ask(bad)
        robot.spin_until(lambda: len(asker.answers) >= 5, 30, "four refusals", feed=True)
        # Length and emptiness are refused on receipt, tokens by the model's tokenizer.
        causes = sorted(a["error"]["cause"] for a in asker.answers[1:])
        assert causes == ["empty_question", "empty_question", "question_special_tokens",
                          "question_too_long"]
        assert not any(a["ok"] for a in asker.answers[1:])
        planned = len(robot.dry_run)
        robot.spin_until(lambda: len(robot.dry_run) > planned + 2, 30, "more plans", feed=True)
        # Diagnostics sent after the refusals were counted.
        robot.spin_until(lambda: robot.values().get(keys.ask_refused("empty_question")) == "2",
                         10, "the refusals in the diagnostics", feed=True)
        values = robot.values()
        assert values[keys.ASK_ANSWERED_TOTAL] == "1"
        assert values[keys.ASK_ROUTE] == "between cycles"
    assert "Traceback" not in node.text()


def test_a_client_node_forwards_questions_to_the_policy_server(robot, policy, tmp_path):
    asker = Asker(robot)
    with robot.watch(ServerProcess(policy["checkpoint"], tmp_path / "server.log")) as server, \
            robot.watch(policy_node_process(tmp_path / "node.log", "widowx",
                                            server=server.address, image_transport="png",
                                            ask_max_new_tokens=10)):
        robot.spin_until(lambda: robot.dry_run and asker.matched(), 120,
                         "a plan and the ~/ask subscription", feed=True)
        asker.ask(QUESTION)
        robot.spin_until(lambda: asker.answers, 60, "the answer", feed=True)
        answer = asker.answers[0]
        text, _ = _expected_text(policy, robot, 10)
        assert answer["ok"], answer
        assert answer["answer"] == text and answer["tokens"] == 10
        # The server's own checks reach the asker with their cause.
        asker.ask("a question with <|vision_start|> in it")
        robot.spin_until(lambda: len(asker.answers) >= 2, 30, "the refusal", feed=True)
        assert asker.answers[1]["error"]["cause"] == "question_special_tokens"
        robot.spin_until(lambda: keys.ASK_ROUTE in robot.values(), 10, "the route")
        assert robot.values()[keys.ASK_ROUTE] == "policy server"


@pytest.mark.serial
def test_the_control_loop_keeps_its_rate_while_questions_arrive_back_to_back(
        robot, policy, tmp_path):
    # One chunk per control period (0.2 s). An answer of 160 tokens takes longer than a period
    # on this CPU, and a slice may hold all of them: only sizing slices to the gap between
    # cycles keeps the rate.
    asker = Asker(robot)
    asked = [0]

    def rate(seconds, ask=False):
        """Plans per second over an observation window of `seconds`."""
        def feed():
            robot.publish()
            if ask and len(asker.answers) + 2 > asked[0]:
                asker.ask(QUESTION)  # two in the queue at all times
                asked[0] += 1
        start_count = len(robot.dry_run)
        robot.spin_for(seconds, feed=feed)
        return (len(robot.dry_run) - start_count) / seconds

    with robot.watch(policy_node_process(tmp_path / "node.log", "widowx",
                                         checkpoint=policy["checkpoint"],
                                         actions_per_inference=1, ask_max_new_tokens=160,
                                         ask_tokens_per_slice=4096)):
        robot.spin_until(lambda: len(robot.dry_run) >= 3 and asker.matched(), 120,
                         "plans and the ~/ask subscription", feed=True)
        quiet = rate(8.0)
        busy = rate(12.0, ask=True)
        assert len(asker.answers) >= 2 and all(a["ok"] for a in asker.answers), asker.answers
        assert all(a["tokens"] == 160 for a in asker.answers)
        assert busy >= 0.8 * quiet, (quiet, busy)
        period = keys.ask_cycle_period_median_ms(answering=True)
        robot.spin_until(lambda: period in robot.values(), 10, "the period while answering",
                         feed=True)
        values = robot.values()
        assert values.number(period) < 1.3 * 200.0
        assert values.number(keys.ASK_SLICE_MEDIAN_MS) < 0.8 * 200.0
    print(f"chunks/s without questions {quiet:.2f}, with questions {busy:.2f}; "
          f"{len(asker.answers)} answers")


@pytest.mark.serial
def test_the_server_answers_between_batches_and_a_question_connection_is_not_a_robot(policy):
    import threading

    from twinbrain_ros.serving.client import RemoteRuntime
    from twinbrain_ros.serving.server import PolicyServer

    # A long batching window: were the question connection counted as a second robot, every
    # lone request would wait all of it for company.
    server = PolicyServer(str(policy["checkpoint"]), device="cpu", port=0, max_wait_ms=400.0,
                          log=lambda text: None)
    ready = threading.Event()
    thread = threading.Thread(target=server.run, args=(ready,), daemon=True)
    thread.start()
    assert ready.wait(60)
    try:
        robot = RemoteRuntime(f"127.0.0.1:{server.bound_port}", WIDOWX, seed=0,
                              image_format="png")
        obs = observation(WIDOWX)
        alone = [robot.infer(obs).latency_s for _ in range(5)]
        reply = robot.ask(obs.images, QUESTION, 8)
        assert reply["tokens"] == 8 and reply["finish"] == "length"
        after = [robot.infer(obs).latency_s for _ in range(5)]
        assert max(after) < 0.4, (alone, after)
        # A long answer generated meanwhile delays a request by a token or a prompt pass at
        # most, not by the answer (400 tokens: seconds on this CPU).
        answer = {}
        asking = threading.Thread(target=lambda: answer.update(
            robot.ask(obs.images, QUESTION, 400)))
        asking.start()
        wait_until(lambda: answer or any(q.generation is not None for q in server._questions),
                   30, "the server to start answering")
        during = [robot.infer(obs).latency_s for _ in range(10)]
        asking.join(timeout=120)
        assert answer["tokens"] == 400
        assert max(during) < max(alone) + 0.3, (alone, during)
        # Questions the server cannot take get its error with the cause.
        from twinbrain_ros.serving.client import ServerError

        with pytest.raises(ServerError) as caught:
            robot.ask(obs.images * 2, QUESTION, 8)  # more images than cameras
        assert caught.value.cause == "bad_images"
        robot.close()
    finally:
        server.stop()
        thread.join(timeout=30)
