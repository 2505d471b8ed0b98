"""The policy server: a TwinBrainVLA checkpoint on a GPU machine, serving robots over a websocket.

    ros2 run twinbrain_ros policy_server --checkpoint DIR [--host 127.0.0.1] [--port 8765] ...
    python -m twinbrain_ros.serving.server --checkpoint DIR ...   (--help: every option)

Robots connect with `policy.launch.py server:=HOST:PORT` (the policy node as a client, see
`twinbrain_ros.serving.client`). The wire format is `twinbrain_ros.serving.protocol`.

- Released starVLA checkpoints (`twinbrain_ros.policy.release_runtime`) are served for the
  robot `--embodiment` names, one request at a time, with their authors' protocol in the contract.
- Handshake: a client says hello with the protocol version (and the token when the server has
  one); the server answers with its identity and one contract per embodiment of the checkpoint,
  which the client checks against its robot before it sends anything.
- Batching: requests that arrive within `max_wait_ms` of each other (up to `max_batch`; the
  wait is spent only while more robots are connected than the batch holds) and are for the
  same embodiment and camera count run in one forward pass; each sample gets exactly
  the noise of its own seed, so a robot gets the chunk it would get alone. Requests are served
  first come, first served: none waits behind more than one batch. A lone request runs on the
  compiled engine when there is one.
- Questions: an ask message (images, a question, a token limit) is answered by the frozen Left
  Brain (`twinbrain_ros.model.ask`) while no inference request waits: the prompt pass, then one
  token at a time (up to `ask_tokens_per_slice` per slice), so a request waits at most one
  token, or one prompt pass, behind a question. Robots ask over a second connection (one
  connection serves one message at a time), which does not count as a robot for batching; a
  question whose client stopped waiting (`timeout_s`) is dropped.
- Real-time chunking: an infer message may carry the previous plan's overlap (`prefix`:
  actions in raw units, how many are frozen, the schedule); the sampler inpaints it
  (`twinbrain_ros.transforms.rtc`). Requests with and without one batch together.
- Faults and security: the server binds to the loopback address unless told otherwise; with a
  token file every client must present the token (compared in constant time), or it is refused
  and logged. A message larger than `max_message_mb`, a malformed frame, an unknown type, a
  wrong dtype, shape or camera count, a bad image or instruction get an error reply naming the
  cause; the connection and every other client go on. Frames over twice the limit close that
  client's connection (websocket code 1009).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import CausedError, shorten
from ..robot.observation import Observation
from ..transforms.rtc import ChunkPrefix
from .protocol import (
    IMAGE_FORMATS,
    PROTOCOL_VERSION,
    ProtocolError,
    decode_image,
    pack,
    read_prefix,
    read_token,
    unpack,
)

DEFAULT_PORT = 8765
HELLO_TIMEOUT_S = 10.0


@dataclass
class _Question:
    """A question to the Left Brain (answered in slices between inference batches)."""

    images: list[np.ndarray]
    question: str
    max_new_tokens: int
    id: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    deadline: float            # perf_counter time after which the client no longer waits
    generation: object = None
    received: float = field(default_factory=time.perf_counter)


@dataclass
class _Request:
    """One decoded inference request waiting for the model."""

    embodiment: str
    images: list[np.ndarray]
    state: np.ndarray
    instruction: str
    seed: int | None
    id: int
    loop: asyncio.AbstractEventLoop
    prefix: ChunkPrefix | None
    future: asyncio.Future
    received: float = field(default_factory=time.perf_counter)


class PolicyServer:
    """Loads a checkpoint and serves its action chunks (see the module docstring)."""

    def __init__(self, checkpoint: str, device: str = "auto", host: str = "127.0.0.1",
                 port: int = DEFAULT_PORT, token: str | None = None, max_batch: int = 8,
                 max_wait_ms: float = 5.0, max_message_mb: float = 16.0,
                 inference: str = "auto", backbone_path: str | None = None,
                 max_instruction_tokens: int = 128, max_question_tokens: int = 256,
                 max_answer_tokens: int = 512, ask_tokens_per_slice: int = 8, log=None,
                 embodiment: str = "widowx"):
        """Load the model (and warm up the compiled engine when it is used).

        `embodiment`: the robot a released starVLA checkpoint is served for (ours name theirs).
        """
        from ..model.release.starvla import is_release_checkpoint
        from ..policy.contract import spec_dict
        from ..policy.runtime import load_model, resolve_inference
        from ..robot.embodiment import Embodiment

        self.log = log or (lambda text: print(text, flush=True))
        if max_batch < 1 or max_wait_ms < 0 or max_message_mb <= 0:
            raise ValueError("max_batch must be >= 1, max_wait_ms >= 0, max_message_mb > 0")
        self.host, self.port, self.token = host, int(port), token or None
        self.max_batch, self.max_wait_s = int(max_batch), float(max_wait_ms) / 1000.0
        self.max_bytes = int(max_message_mb * 2**20)
        self.max_instruction_tokens = int(max_instruction_tokens)
        if min(max_question_tokens, max_answer_tokens, ask_tokens_per_slice) < 1:
            raise ValueError("max_question_tokens, max_answer_tokens and ask_tokens_per_slice "
                             "must be >= 1")
        self.max_answer_tokens = int(max_answer_tokens)
        self.ask_tokens_per_slice = int(ask_tokens_per_slice)
        self.release = None   # a released starVLA run, served for one robot
        if is_release_checkpoint(checkpoint):
            from ..policy.release_runtime import ReleaseRuntime

            self.release = ReleaseRuntime(checkpoint, Embodiment.resolve(embodiment), device,
                                          backbone_path, log=self.log)
            self.model, self.device, self.answerer = self.release.model, self.release.device, None
            self.contracts = {self.release.embodiment.normalization_key:
                              self.release.contract(self.max_instruction_tokens)}
        else:
            self.model, self.device = load_model(checkpoint, device, backbone_path)
            config = self.model.config
            processor = self.model.processor
            self.contracts = {}
            for key, spec in config.embodiments.items():
                self.contracts[key] = {
                    "embodiment_key": key, **spec_dict(spec),
                    "horizon": config.action_expert.horizon,
                    "image_size": list(config.image_size),
                    "backbone": config.backbone_path, "backbone_type": self.model.right.model_type,
                    "brain_mode": config.brain_mode,
                    "max_instruction_tokens": self.max_instruction_tokens,
                    "special_tokens": processor._special_tokens(),
                }
            self.answerer = None   # the Left Brain's answers (twin checkpoints only)
            if config.brain_mode == "twin":
                from ..model.ask import LeftBrainAnswerer

                self.answerer = LeftBrainAnswerer(self.model, int(max_question_tokens))
                # An untied LM head is read now, not while robots wait for chunks.
                self.answerer.head  # noqa: B018
        cameras = [c["num_cameras"] for c in self.contracts.values()]
        self.max_question_images = max(cameras) if all(cameras) else 16
        self._questions: list[_Question] = []   # being answered, first come first served
        self.inference = "eager" if self.release else resolve_inference(inference, self.device)
        self.engines = {}
        if self.inference == "compiled" and self.release is None:
            self._build_engines()
        self.identity = {"name": "twinbrain_ros policy_server", "host": socket.gethostname(),
                         "checkpoint": str(checkpoint), "device": str(self.device),
                         "inference": self.inference, "protocol": PROTOCOL_VERSION}
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self.batches: list[int] = []   # sizes of the batches run (the benchmark reads them)
        self._stopping = threading.Event()
        self.bound_port: int | None = None
        self.connections = 0   # clients past the handshake

    def _build_engines(self) -> None:
        """A compiled engine per embodiment (its camera count), as a local policy builds it."""
        from ..policy.runtime import compiled_engine

        for key, contract in self.contracts.items():
            cameras = contract["num_cameras"] or 1
            engine, _, _ = compiled_engine(self.model, key, cameras,
                                           self.max_instruction_tokens, self.log)
            if engine is not None:
                self.engines[(key, cameras)] = engine

    # -- model thread ------------------------------------------------------------------------

    def _serve_model(self) -> None:
        while not self._stopping.is_set():
            if self._questions:
                # Inference first: a slice of an answer only when no request waits.
                try:
                    first = self._queue.get_nowait()
                except queue.Empty:
                    self._answer_slice()
                    continue
            else:
                first = self._queue.get()
            if first is None:
                return
            if isinstance(first, _Question):
                self._questions.append(first)
                continue
            batch = [first]
            deadline = time.perf_counter() + self.max_wait_s
            # Waiting for company only pays when other robots are connected.
            while len(batch) < min(self.max_batch, max(1, self.connections)):
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if item is None:
                    self._stopping.set()
                    break
                if isinstance(item, _Question):
                    self._questions.append(item)
                    continue
                batch.append(item)
            groups: dict[tuple, list[_Request]] = {}
            for request in batch:
                groups.setdefault((request.embodiment, len(request.images)), []).append(request)
            for (key, cameras), requests in groups.items():
                self._run_group(key, cameras, requests)

    def _run_group(self, key: str, cameras: int, requests: list[_Request]) -> None:
        started = time.perf_counter()
        try:
            engine = self.engines.get((key, cameras))
            if self.release is not None:
                chunks = [self.release.infer(Observation(r.images, r.state, r.instruction),
                                             seed=r.seed).actions for r in requests]
            elif len(requests) == 1 and engine is not None:
                r = requests[0]
                chunks = [engine.predict_action(r.images, r.instruction, r.state, key,
                                                seed=r.seed, prefix=r.prefix)]
            else:
                chunks = self.model.predict_action_batch(
                    [r.images for r in requests], [r.instruction for r in requests],
                    [r.state for r in requests], key, [r.seed for r in requests],
                    prefixes=[r.prefix for r in requests])
        except Exception as error:  # noqa: BLE001 - one bad request must not fail the batch
            if len(requests) > 1:
                for request in requests:
                    self._run_group(key, cameras, [request])
                return
            cause = getattr(error, "cause", "inference_error")
            self._reply(requests[0], {"type": "error", "id": requests[0].id, "cause": cause,
                                      "message": shorten(str(error), 500)})
            return
        seconds = time.perf_counter() - started
        self.batches.append(len(requests))
        for request, chunk in zip(requests, chunks, strict=True):
            self._reply(request, {"type": "actions", "id": request.id,
                                  "actions": np.asarray(chunk, dtype=np.float64),
                                  "server_s": seconds, "batch": len(requests)})

    def _answer_slice(self) -> None:
        """One slice of the oldest question's answer.

        The prompt pass is a slice of its own; then one token at a time, up to
        `ask_tokens_per_slice`, while no inference request waits. A question whose client no
        longer waits is dropped.
        """
        question = self._questions[0]
        if time.perf_counter() > question.deadline:
            self._questions.pop(0)
            return
        try:
            if question.generation is None:
                question.generation = self.answerer.start(question.images, question.question,
                                                      question.max_new_tokens)
                question.generation.step(1)
            else:
                for _ in range(self.ask_tokens_per_slice):
                    if question.generation.done or not self._queue.empty():
                        break
                    question.generation.step(1)
        except Exception as error:  # noqa: BLE001 - one bad question must not stop serving
            self._questions.pop(0)
            self._reply(question, {"type": "error", "id": question.id,
                                   "cause": getattr(error, "cause", "answer_failed"),
                                   "message": shorten(str(error), 500)})
            return
        if question.generation.done:
            self._questions.pop(0)
            answer = question.generation.result()
            self._reply(question, {"type": "answer", "id": question.id, "answer": answer.text,
                                   "tokens": len(answer.token_ids), "finish": answer.finish,
                                   "server_s": answer.prefill_s + answer.decode_s})

    @staticmethod
    def _reply(request: _Request | _Question, message: dict) -> None:
        def deliver():
            if not request.future.done():
                request.future.set_result(message)

        request.loop.call_soon_threadsafe(deliver)

    # -- connections -----------------------------------------------------------------------------

    async def _handle(self, connection) -> None:
        peer = connection.remote_address
        try:
            if not await self._handshake(connection, peer):
                return
        except Exception as error:  # noqa: BLE001 - a client going away must not stop others
            self.log(f"client {peer}: {type(error).__name__}: {shorten(str(error), 200)}")
            return
        robot = False  # counted once it asks for chunks (a connection for questions is not)
        try:
            async for raw in connection:
                reply = await self._answer(raw)
                if not robot and reply.get("type") == "actions":
                    robot = True
                    self.connections += 1
                await connection.send(pack(reply))
        except Exception as error:  # noqa: BLE001 - a client going away must not stop others
            name = type(error).__name__
            if "ConnectionClosed" not in name:
                self.log(f"client {peer}: {name}: {shorten(str(error), 200)}")
        finally:
            if robot:
                self.connections -= 1

    async def _handshake(self, connection, peer) -> bool:
        try:
            raw = await asyncio.wait_for(connection.recv(), HELLO_TIMEOUT_S)
            hello = unpack(raw, self.max_bytes)
        except (TimeoutError, ProtocolError) as error:
            cause = getattr(error, "cause", "timeout")
            await self._refuse(connection, peer, cause, f"expected a hello message ({error})")
            return False
        if hello["type"] != "hello" or hello.get("version") != PROTOCOL_VERSION:
            await self._refuse(connection, peer, "bad_version",
                               f"expected hello with protocol version {PROTOCOL_VERSION}, got "
                               f"{shorten(repr({k: hello.get(k) for k in ('type', 'version')}))}")
            return False
        if self.token is not None:
            given = hello.get("token")
            if not isinstance(given, str) or not hmac.compare_digest(
                    given.encode("utf-8"), self.token.encode("utf-8")):
                await self._refuse(connection, peer, "unauthorized",
                                   "missing or wrong token")
                return False
        await connection.send(pack({"type": "welcome", "version": PROTOCOL_VERSION,
                                    "server": self.identity, "contracts": self.contracts}))
        self.log(f"client {shorten(str(hello.get('client', '?')), 60)} connected from {peer}")
        return True

    async def _refuse(self, connection, peer, cause: str, message: str) -> None:
        self.log(f"refused a client from {peer}: {message} [{cause}]")
        try:
            await connection.send(pack({"type": "error", "id": None, "cause": cause,
                                        "message": message}))
        finally:
            await connection.close(code=1008, reason=cause)

    async def _answer(self, raw) -> dict:
        request_id = None
        try:
            message = unpack(raw, self.max_bytes)
            request_id = message.get("id") if isinstance(message.get("id"), int) else None
            if message["type"] == "ping":
                return {"type": "pong", "id": request_id}
            loop = asyncio.get_running_loop()
            if message["type"] == "ask":
                request = self._question(message, loop)
            elif message["type"] == "infer":
                request = self._request(message, loop)
            else:
                raise ProtocolError("unknown_type", f"unknown message type "
                                                    f"{shorten(repr(message['type']), 40)}")
        except CausedError as error:
            return {"type": "error", "id": request_id, "cause": error.cause,
                    "message": shorten(str(error), 500)}
        self._queue.put(request)
        return await request.future

    def _request(self, message: dict, loop) -> _Request:
        if not isinstance(message.get("id"), int):
            raise ProtocolError("malformed", "an infer message needs an integer id")
        key = message.get("embodiment")
        contract = self.contracts.get(key) if isinstance(key, str) else None
        if contract is None:
            raise ProtocolError("unknown_embodiment", f"this checkpoint serves "
                                                      f"{sorted(self.contracts)}, not "
                                                      f"{shorten(repr(key), 40)}")
        images = message.get("images")
        cameras = contract["num_cameras"]
        if not isinstance(images, list) or not images or (cameras and len(images) != cameras):
            got = len(images) if isinstance(images, list) else shorten(repr(images), 40)
            raise ProtocolError("bad_images", f"expected {cameras or 'at least 1'} image(s), "
                                              f"got {got}")
        if message.get("image_format") not in IMAGE_FORMATS:
            raise ProtocolError("bad_images", f"image_format must be one of {IMAGE_FORMATS}")
        decoded = [decode_image(image) for image in images]
        state = message.get("state")
        if not isinstance(state, np.ndarray) or state.dtype.kind != "f" \
                or state.shape != (contract["state_dim"],):
            shape = getattr(state, "shape", None)
            raise ProtocolError("bad_state", f"state must be a float array of shape "
                                             f"({contract['state_dim']},), got "
                                             f"{getattr(state, 'dtype', type(state).__name__)} "
                                             f"{shape}")
        if not np.isfinite(state).all():
            raise ProtocolError("bad_state", "state has non-finite values")
        instruction = message.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ProtocolError("bad_instruction", "instruction must be a non-empty string")
        self.model.processor.check_instruction(instruction, self.max_instruction_tokens)
        seed = message.get("seed")
        if seed is not None and (not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ProtocolError("bad_seed", "seed must be a non-negative integer or null")
        prefix = read_prefix(message.get("prefix"), contract)
        return _Request(embodiment=key, images=decoded, state=np.array(state, np.float32),
                        instruction=instruction, seed=seed, id=message["id"], loop=loop,
                        prefix=prefix, future=loop.create_future())

    def _question(self, message: dict, loop) -> _Question:
        """A checked ask message (the question's tokens are checked by the model thread)."""
        if not isinstance(message.get("id"), int):
            raise ProtocolError("malformed", "an ask message needs an integer id")
        if self.answerer is None:
            raise ProtocolError("no_left_brain", "this checkpoint has brain_mode 'single': "
                                                 "there is no frozen Left Brain to answer "
                                                 "questions")
        images = message.get("images")
        limit = self.max_question_images
        if not isinstance(images, list) or not 1 <= len(images) <= limit:
            raise ProtocolError("bad_images", f"an ask message holds 1 to {limit} images")
        if message.get("image_format") not in IMAGE_FORMATS:
            raise ProtocolError("bad_images", f"image_format must be one of {IMAGE_FORMATS}")
        decoded = [decode_image(image) for image in images]
        question = message.get("question")
        if not isinstance(question, str):
            raise ProtocolError("bad_question", "question must be a string")
        self.answerer.check_question(question)
        max_new_tokens = message.get("max_new_tokens")
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens:
            raise ProtocolError("bad_max_new_tokens", "max_new_tokens must be a positive "
                                                      "integer")
        timeout = message.get("timeout_s", 3600.0)
        if not isinstance(timeout, int | float) or not 0 < timeout <= 86400:
            raise ProtocolError("bad_timeout", "timeout_s must be a positive number of seconds")
        return _Question(images=decoded, question=question,
                         max_new_tokens=min(max_new_tokens, self.max_answer_tokens),
                         id=message["id"], loop=loop, future=loop.create_future(),
                         deadline=time.perf_counter() + float(timeout))

    # -- running -------------------------------------------------------------------------------

    def run(self, ready: threading.Event | None = None) -> None:
        """Serve until `stop()`: connections in a background thread, the model in this one.

        The model runs in the calling thread because torch's CPU thread pool is markedly
        slower when driven from a secondary thread (a tiny policy: 11 ms from the main thread,
        18-20 ms from another, on two cores).
        """
        started = threading.Event()
        errors: list[BaseException] = []

        def network():
            try:
                asyncio.run(self._serve_network(started))
            except BaseException as error:  # noqa: BLE001 - reported by run()
                errors.append(error)
                started.set()
                self._queue.put(None)

        thread = threading.Thread(target=network, name="network", daemon=True)
        thread.start()
        started.wait()
        if errors:
            raise errors[0]
        if ready is not None:
            ready.set()
        try:
            self._serve_model()
        finally:
            self.stop()
            thread.join(timeout=10)
        if errors:
            raise errors[0]

    async def _serve_network(self, started: threading.Event) -> None:
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        async with serve(self._handle, self.host, self.port, max_size=2 * self.max_bytes,
                         compression=None, ping_interval=None) as server:
            self.bound_port = server.sockets[0].getsockname()[1]
            self.log(f"policy server on ws://{self.host}:{self.bound_port} "
                     f"({self.identity['device']}, {self.inference}, embodiments "
                     f"{sorted(self.contracts)}, max batch {self.max_batch}, "
                     f"{'token required' if self.token else 'no token'})")
            started.set()
            await self._done.wait()

    def stop(self) -> None:
        """End `run()` from any thread (a signal handler included)."""
        self._stopping.set()
        self._queue.put(None)
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._done.set)
            except RuntimeError:  # the loop closed meanwhile
                pass


def build_parser() -> argparse.ArgumentParser:
    """The command line of `ros2 run twinbrain_ros policy_server`."""
    parser = argparse.ArgumentParser(prog="policy_server",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory: TwinBrainVLA, or a released starVLA run")
    parser.add_argument("--embodiment", default="widowx",
                        help="the robot a released starVLA checkpoint is served for")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: loopback only; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0: any free)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--token-file", default="",
                        help="file holding the token every client must present")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="most requests run in one forward pass")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="longest wait for more requests to join a batch")
    parser.add_argument("--max-message-mb", type=float, default=16.0,
                        help="larger messages get an error reply")
    parser.add_argument("--inference", default="auto", choices=("auto", "eager", "compiled"),
                        help="auto: compiled on CUDA, eager on the CPU")
    parser.add_argument("--max-instruction-tokens", type=int, default=128)
    parser.add_argument("--max-question-tokens", type=int, default=256,
                        help="longest question to the Left Brain")
    parser.add_argument("--max-answer-tokens", type=int, default=512,
                        help="longest answer (a client asking for more gets this many)")
    parser.add_argument("--ask-tokens-per-slice", type=int, default=8,
                        help="answer tokens generated between two inference batches")
    parser.add_argument("--backbone-path", default="",
                        help="override of the base Qwen-VL directory stored in the checkpoint")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ros2 run twinbrain_ros policy_server`."""
    import signal

    args = build_parser().parse_args(argv)
    try:
        token = read_token(args.token_file) if args.token_file else None
        server = PolicyServer(args.checkpoint, device=args.device, host=args.host,
                              port=args.port, token=token, max_batch=args.max_batch,
                              max_wait_ms=args.max_wait_ms, max_message_mb=args.max_message_mb,
                              inference=args.inference,
                              backbone_path=args.backbone_path or None,
                              max_instruction_tokens=args.max_instruction_tokens,
                              max_question_tokens=args.max_question_tokens,
                              max_answer_tokens=args.max_answer_tokens,
                              ask_tokens_per_slice=args.ask_tokens_per_slice,
                              embodiment=args.embodiment)
    except (ValueError, RuntimeError, OSError) as error:
        print(f"policy_server: {error}", file=sys.stderr, flush=True)
        return 1

    def stop(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        server.run()
    except OSError as error:  # the port is taken, the address is not local
        print(f"policy_server: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
