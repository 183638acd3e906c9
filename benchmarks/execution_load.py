"""Load test of the execution service: 16 concurrent clients send 2,000 Execute calls over loopback.

Reports errors (must be zero), p50/p99 latency, throughput and the service's peak RSS (with its
sandboxes), and gives up after --deadline-s so it is bounded in time.

    ILF_DATA_DIR=../shared/data .venv/bin/python -m benchmarks.execution_load
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import cycle, islice

import grpc
import psutil

from benchmarks.execution import start_service
from ilf import data
from ilf.grpc_util import channel
from ilf.v1 import execution_pb2, execution_pb2_grpc


def tree_rss_mb(process: psutil.Process) -> float:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--executions", type=int, default=2000)
    parser.add_argument("--deadline-s", type=float, default=300)
    args = parser.parse_args()
    # The quick gold programs (task 123 alone would dominate the tail).
    tasks = [t for task_id, t in data.mbpp().items() if task_id not in (123, 341, 596, 642)]
    requests = [execution_pb2.ExecuteRequest(program=t.code, tests=list(t.tests), test_setup_code=t.test_setup_code,
                                             request_id=str(i))
                for i, t in enumerate(islice(cycle(tasks), args.executions))]
    service, address = start_service(workers=2, timeout_s=3)
    monitor = psutil.Process(service.pid)
    peak_rss = [tree_rss_mb(monitor)]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.2):
            peak_rss.append(tree_rss_mb(monitor))
    threading.Thread(target=sample, daemon=True).start()
    latencies, errors = [], []
    deadline = time.monotonic() + args.deadline_s
    try:
        with channel(address) as ch:
            stub = execution_pb2_grpc.ExecutionStub(ch)

            def call(request):
                started = time.perf_counter()
                try:
                    reply = stub.Execute(request, timeout=max(deadline - time.monotonic(), 0.1))
                    if not reply.passed:
                        errors.append(f"{request.request_id}: wrong verdict")
                except grpc.RpcError as error:
                    errors.append(f"{request.request_id}: {error.code().name}")
                latencies.append(time.perf_counter() - started)
            started = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as clients:
                list(clients.map(call, requests))
            elapsed = time.perf_counter() - started
    finally:
        stop.set()
        service.terminate()
        service.wait(30)
    quantiles = statistics.quantiles(latencies, n=100)
    print(f"{len(latencies)} executions from {args.clients} clients in {elapsed:.1f} s "
          f"({len(latencies) / elapsed:.1f}/s), errors: {len(errors)}")
    print(f"latency p50 {quantiles[49] * 1000:.0f} ms, p99 {quantiles[98] * 1000:.0f} ms")
    print(f"service memory (with sandboxes): start {peak_rss[0]:.0f} MB, peak {max(peak_rss):.0f} MB")
    if errors:
        print("first errors:", errors[:5])
        raise SystemExit(1)


if __name__ == "__main__":
    main()
