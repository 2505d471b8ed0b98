r"""The policy server on the loopback interface: round-trip overhead and throughput.

A tiny random-weight checkpoint (written to a temporary directory) is served by
`python -m twinbrain_ros.serving.server` in its own process; the robots are `RemoteRuntime`
clients (the policy node's, torch-free) in threads of this process, each sending one 224x224
camera frame (resized to the model's input and JPEG- or PNG-encoded on the robot side), a joint
state and an instruction, with its own noise seed.

1. Overhead: the same observation through `PolicyRuntime.infer` in this process and through the
   server, in alternating blocks of back-to-back requests; the overhead of a request is its
   round trip minus the model time the server measured for it (resizing and encoding the
   frame, the websocket both ways, decoding and checks on the server): p50 and p95.
2. Throughput: chunks per second for 1, 2, 4 and 8 robots asking back to back, with batching
   (`--max-batch 8`) and without (`--max-batch 1`): two server processes side by side, each
   cell measured on one then the other.

Usage:
  python benchmarks/bench_server.py
  python benchmarks/bench_server.py --rounds 100 --seconds 10 --device cuda
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def start_server(checkpoint: Path, log: Path, device: str, *extra: str):
    """The server process and its address, once it listens."""
    handle = open(log, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "twinbrain_ros.serving.server",
                             "--checkpoint", str(checkpoint), "--device", device, "--port", "0",
                             *extra], stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text().splitlines():
            if "policy server on ws://" in line:
                return proc, handle, line.split("ws://")[1].split()[0]
        time.sleep(0.1)
    raise RuntimeError(f"the server did not start:\n{log.read_text()[-2000:]}")


def stop_server(proc, handle) -> None:
    """Stop a server process."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    handle.close()


def percentiles(values) -> str:
    """'p50 / p95' in milliseconds."""
    ms = np.asarray(values) * 1000.0
    return f"{np.median(ms):7.2f} / {np.percentile(ms, 95):7.2f}"


def main(argv=None) -> int:
    """Run both measurements and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60, help="rounds of the overhead test")
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput cell")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-transport", default="jpeg", choices=("jpeg", "png"))
    args = parser.parse_args(argv)

    from twinbrain_ros.model.tiny import make_tiny_checkpoint, make_tiny_policy_checkpoint
    from twinbrain_ros.policy.runtime import PolicyRuntime
    from twinbrain_ros.robot.embodiment import Embodiment
    from twinbrain_ros.robot.observation import Observation
    from twinbrain_ros.serving.client import RemoteRuntime

    emb = Embodiment.load("gr1")
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    state = np.clip(0.1 * np.sin(np.arange(emb.state_dim)), emb.lower, emb.upper)
    observation = Observation(images=[frame], state=state, instruction="pick up the red can")
    with tempfile.TemporaryDirectory(prefix="twinbrain_bench_server_") as tmp:
        tmp = Path(tmp)
        backbone = make_tiny_checkpoint("qwen2_5_vl", tmp / "backbone")
        checkpoint = make_tiny_policy_checkpoint(backbone, tmp / "policy",
                                                 emb.normalization_key, emb.spec())
        local = PolicyRuntime(str(checkpoint), emb, device=args.device, seed=0)
        print(f"policy server on the loopback interface: tiny checkpoint, device "
              f"{args.device}, one 224x224 camera sent as {args.image_transport}, GR1 "
              f"({emb.state_dim} joints)", flush=True)

        proc, handle, address = start_server(checkpoint, tmp / "server.log", args.device)
        try:
            remote = RemoteRuntime(address, emb, seed=0, image_format=args.image_transport)
            for _ in range(5):
                local.infer(observation)
                remote.infer(observation)
            # Blocks of back-to-back requests, alternating: a CPU that idles between requests
            # slows down (clock and thread wake-ups), which would blur both paths.
            inproc, trips, model = [], [], []
            block = max(5, args.rounds // 4)
            for _ in range(4):
                for _ in range(block):
                    tick = time.perf_counter()
                    local.infer(observation)
                    inproc.append(time.perf_counter() - tick)
                for _ in range(block):
                    trips.append(remote.infer(observation).latency_s)
                    model.append(remote.last_server_s)
            overhead = np.asarray(trips) - np.asarray(model)
            print("\n| | p50 ms | p95 ms |\n|---|---|---|")
            for name, values in (("in-process inference (PolicyRuntime.infer)", inproc),
                                 ("round trip through the server", trips),
                                 ("of which the server's model time", model),
                                 ("overhead: round trip - model time, per request", overhead)):
                p50, p95 = percentiles(values).split(" / ")
                print(f"| {name} | {p50.strip()} | {p95.strip()} |")
            remote.close()
        finally:
            stop_server(proc, handle)

        print("\n| robots | chunks/s, batching (max 8) | mean batch | chunks/s, no batching |")
        print("|---|---|---|---|")
        rows = {}
        servers = {batching: start_server(checkpoint, tmp / f"server_{batching}.log", args.device,
                                          "--max-batch", "8" if batching else "1",
                                          "--max-wait-ms", "5")
                   for batching in (False, True)}
        try:
            # Both servers run side by side; each cell alternates between them.
            for robots in (1, 2, 4, 8):
                for batching in (False, True):
                    address = servers[batching][2]
                    clients = [RemoteRuntime(address, emb, seed=k,
                                             image_format=args.image_transport, timeout_s=30.0)
                               for k in range(robots)]
                    for _ in range(10):  # warm: the first chunks of a process are slower
                        for client in clients:
                            client.infer(observation)
                    counts = [0] * robots
                    batches: list[int] = []
                    stop = time.perf_counter() + args.seconds

                    def ask(k, clients=clients, counts=counts, batches=batches, stop=stop):
                        while time.perf_counter() < stop:
                            clients[k].infer(observation)
                            counts[k] += 1
                            batches.append(clients[k].last_batch)

                    threads = [threading.Thread(target=ask, args=(k,)) for k in range(robots)]
                    start = time.perf_counter()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    rate = sum(counts) / (time.perf_counter() - start)
                    rows.setdefault(robots, {})[batching] = (rate, batches)
                    for client in clients:
                        client.close()
        finally:
            for proc, handle, _ in servers.values():
                stop_server(proc, handle)
        for robots, cells in rows.items():
            print(f"| {robots} | {cells[True][0]:.1f} | {np.mean(cells[True][1]):.2f} | "
                  f"{cells[False][0]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
