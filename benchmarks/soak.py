"""Soak: mixed traffic from concurrent clients against every service on loopback, for a bounded time.

    .venv/bin/python benchmarks/soak.py                    # 10 minutes, 16 clients, the tiny model
    .venv/bin/python benchmarks/soak.py --minutes 1 --model embedded:smollm2-135m-instruct

Prints one line per RPC (count, errors by status, p50/p99 latency) and each service's memory
(sandboxes included) sampled through the run; exits 1 on any unexpected error or memory that grows.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.execution_load import tree_rss_mb  # noqa: E402
from ilf.grpc_util import channel  # noqa: E402
from loop.local import LocalServices  # noqa: E402
from ilf.v1 import (common_pb2, execution_pb2, execution_pb2_grpc, feedback_pb2, feedback_pb2_grpc,  # noqa: E402
                    generation_pb2, generation_pb2_grpc)

PROGRAM = "def remove_Occ(s, ch):\n    return s\n"   # fails MBPP task 11's tests


def traffic(addresses: dict[str, str]):
    """(name, call) pairs; each call makes one RPC with a fresh random request."""
    generation = generation_pb2_grpc.GenerationStub(channel(addresses["generation"]))
    execution = execution_pb2_grpc.ExecutionStub(channel(addresses["execution"]))
    feedback = feedback_pb2_grpc.FeedbackStub(channel(addresses["feedback"]))
    return [
        ("Generation.Generate", lambda: generation.Generate(generation_pb2.GenerateRequest(
            prompt=f"def add_{random.randrange(1000)}(a, b):", params=common_pb2.SamplingParams(
                n=random.choice((1, 2, 4)), max_new_tokens=32, temperature=0.8)), timeout=120)),
        ("Execution.Execute", lambda: execution.Execute(execution_pb2.ExecuteRequest(
            program=f"def f(x):\n    return x + {random.randrange(9)}\n",
            tests=["assert f(1) == 2", "assert f(0) == 1"]), timeout=60)),
        ("Feedback.SubmitFeedback", lambda: feedback.SubmitFeedback(feedback_pb2.SubmitFeedbackRequest(
            task_id=11, program=PROGRAM, feedback="Only the first and last occurrence must be removed.",
            annotator_id=f"soak-{random.randrange(16)}"), timeout=60)),
    ]


def rss_mb(services: LocalServices) -> dict[str, float]:
    """Each service's resident memory, its child processes (the execution sandboxes) included."""
    return {name: tree_rss_mb(psutil.Process(process.pid)) for name, process in services.processes.items()}


def sample_rss(services: LocalServices, every_s: float, stop: threading.Event) -> list[dict[str, float]]:
    samples = [rss_mb(services)]
    while not stop.wait(every_s):
        samples.append(rss_mb(services))
    samples.append(rss_mb(services))
    return samples


def is_flat(series: list[float]) -> bool:
    """Flat: the second half's mean is within max(32 MB, 10%) of the first half's (one spike is not growth)."""
    half = len(series) // 2
    first, second = sum(series[:half]) / half, sum(series[half:]) / (len(series) - half)
    return second - first <= max(32.0, 0.10 * first)


def run(addresses, clients: int, seconds: float) -> tuple[dict, dict]:
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client():
        calls = traffic(addresses)
        while time.monotonic() < stop:
            name, call = random.choice(calls)
            started = time.perf_counter()
            try:
                call()
                with lock:
                    latencies[name].append(time.perf_counter() - started)
            except grpc.RpcError as error:
                with lock:
                    errors[name][error.code().name] += 1
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=30.0, help="traffic before the first RSS reading")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--sample-s", type=float, default=15.0, help="seconds between memory readings")
    parser.add_argument("--model", default="tiny", help="tiny (random 2-layer Llama) or any ILF_BASE_MODEL source")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="ilf-soak-"))
    model = args.model
    if model == "tiny":
        from ilf.tiny_model import build_tiny_model
        model = str(build_tiny_model(home / "tiny-model"))
    env = {"ILF_HOME": str(home), "ILF_CACHE": str(home / "cache"), "ILF_STORE": f"file://{home / 'store'}", "ILF_BASE_MODEL": model,
           "ILF_AUTH": "off"}
    from ilf.grpc_util import free_port
    ports = {name: free_port() for name in ("execution", "generation", "refinement", "training", "feedback")}
    with LocalServices(home / "logs", env=env, ports=ports) as services:
        run(services.addresses, args.clients, args.warmup_s)
        done, samples = threading.Event(), []
        sampler = threading.Thread(target=lambda: samples.extend(sample_rss(services, args.sample_s, done)))
        sampler.start()
        started = time.monotonic()
        latencies, errors = run(services.addresses, args.clients, args.minutes * 60)
        elapsed = time.monotonic() - started
        done.set()
        sampler.join()
    unexpected = 0
    for name in sorted(set(latencies) | set(errors)):
        done, failed = latencies[name], dict(errors[name])
        unexpected += sum(failed.values())
        print(f"{name:26s} ok {len(done):6d}  {len(done) / elapsed:6.1f}/s  errors {failed or 0}  "
              f"p50 {percentile(done, 0.5) * 1000:7.1f} ms  p99 {percentile(done, 0.99) * 1000:7.1f} ms")
    growing = []
    for name in samples[0]:
        series = [sample[name] for sample in samples]
        flat = is_flat(series)
        growing += [] if flat else [name]
        print(f"rss {name:11s} {series[0]:7.0f} MB after warm-up, peak {max(series):7.0f}, end {series[-1]:7.0f} "
              f"({len(series)} samples): {'flat' if flat else 'GROWING'}")
    print(f"{args.clients} clients, {elapsed:.0f} s, unexpected errors: {unexpected}, "
          f"memory growing: {', '.join(growing) or 'none'}")
    return 1 if unexpected or growing else 0


if __name__ == "__main__":
    sys.exit(main())
