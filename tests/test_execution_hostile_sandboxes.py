"""Hostile programs against other sandboxes and the sandbox's own controller: one program's processes cannot
starve another program of its process limit, and no route signals a process outside the program's own tree.

Each program gets its verdict, the controller (the worker's checker) survives it (no worker restart), unrelated
calls keep their usual latency while it runs, and the next ordinary program is judged right (see
test_execution_hostile_verdicts.contained).
"""
from __future__ import annotations

import platform
import textwrap
import threading
import time

import pytest

from services.execution.executor import Program, Verdict
from test_execution import executor  # noqa: F401 - the shared executor fixture
from test_execution_hostile_verdicts import contained, ordinary_program_is_judged_right

PASSED, FAILED, ERROR = Verdict.PASSED, Verdict.FAILED, Verdict.ERROR
x86_64 = pytest.mark.skipif(platform.machine() != "x86_64", reason="raw syscall numbers of x86_64")

# Each tries one route to the checker (the program's parent); it returns 'alive' if the checker still is.
SIGNALS = {
    "tkill": "libc.syscall(200, os.getppid(), signal.SIGKILL)",
    "tgkill": "libc.syscall(234, os.getppid(), os.getppid(), signal.SIGKILL)",
    "rt_sigqueueinfo": "libc.syscall(129, os.getppid(), signal.SIGKILL, ctypes.byref(info))",
    "rt_tgsigqueueinfo": "libc.syscall(297, os.getppid(), os.getppid(), signal.SIGKILL, ctypes.byref(info))",
    "pidfd_send_signal_through_proc": (
        "libc.syscall(424, os.open(f'/proc/{os.getppid()}', os.O_RDONLY | os.O_DIRECTORY), signal.SIGKILL, 0, 0)"),
    "kill_the_checkers_group": "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
    "join_the_checkers_group_then_kill_it": "os.setpgid(0, os.getpgid(os.getppid())); os.kill(0, signal.SIGKILL)",
    "kill_with_a_32_bit_negative_pid": "libc.syscall(62, ctypes.c_long((-os.getppid()) & 0xffffffff), 9)",
    "sigio_to_the_checker": (
        "r, w = os.pipe(); fcntl.fcntl(r, fcntl.F_SETOWN, os.getppid()); "
        "fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC | os.O_NONBLOCK); os.write(w, b'x')"),
    "sigio_to_the_checkers_group": (
        "r, w = os.pipe(); fcntl.fcntl(r, fcntl.F_SETOWN, -os.getpgid(os.getppid())); "
        "fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC | os.O_NONBLOCK); os.write(w, b'x')"),
    "cpu_limit_of_the_checker": "resource.prlimit(os.getppid(), resource.RLIMIT_CPU, (0, 0))",
    "open_files_limit_of_the_checker": "resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (3, 3))",
}
SIGNAL_PROGRAM = """
    import ctypes, fcntl, os, resource, signal, time
    libc = ctypes.CDLL(None, use_errno=True)
    info = (ctypes.c_int * 32)()
    info[0], info[2] = signal.SIGKILL, -1  # si_code SI_QUEUE: what another process may send
    def attack():
        try:
            {route}
        except OSError:
            pass
        time.sleep(0.3)  # a signal (SIGIO, SIGXCPU) takes effect now
        return 'alive'
    """


@x86_64
@pytest.mark.parametrize("route", sorted(SIGNALS))
def test_no_route_signals_the_sandbox_controller(executor, route):
    program = SIGNAL_PROGRAM.format(route=SIGNALS[route])
    outcome = contained(executor, program, ["assert attack() == 'killed'", "assert attack() == 'alive'"],
                        expected=[FAILED, PASSED])
    assert not outcome.error_type


def test_signals_within_the_programs_own_tree_still_work(executor):
    program = """
        import os, signal, subprocess, sys, time
        def own_children():
            child = os.fork()
            if child == 0:
                time.sleep(30)
                os._exit(0)
            os.kill(child, signal.SIGTERM)
            _, status = os.waitpid(child, 0)
            group = subprocess.Popen(['sleep', '30'], start_new_session=True)
            os.killpg(group.pid, signal.SIGKILL)
            return os.WTERMSIG(status), group.wait()
        """
    contained(executor, program, ["assert own_children() == (15, -9)"], expected=[PASSED])


PROCESS_HOGS = {
    "forked_children": """
        import os, time
        def hog():
            for _ in range(28):
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
            time.sleep(4)
            return 'held'
        """,
    "sleeping_threads": """
        import threading, time
        threading.stack_size(1 << 19)  # 28 default 8 MB stacks would not fit the address-space limit
        def hog():
            for _ in range(28):
                threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
            time.sleep(4)
            return 'held'
        """,
}
NEEDS_PROCESSES = {
    "threads": """
        import threading
        def work():
            threads = [threading.Thread(target=sum, args=([1, 2],)) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            return len(threads)
        """,
    "subprocesses": """
        import subprocess
        def work():
            return len([subprocess.run(['true']).returncode for _ in range(8)])
        """,
}


@pytest.mark.parametrize("hog, needs", [("forked_children", "threads"), ("sleeping_threads", "subprocesses")])
def test_one_programs_processes_do_not_count_against_another(executor, hog, needs):
    """Each worker runs as its own uid with its own pids cgroup, so RLIMIT_NPROC is counted per sandbox."""
    assert executor.pool.size >= 2
    restarts = executor.pool.restarts
    held: list = []
    holder = threading.Thread(target=lambda: held.append(executor.execute(Program(
        textwrap.dedent(PROCESS_HOGS[hog]), ["assert hog() == 'held'"], timeout_s=8))))
    holder.start()
    time.sleep(1.5)  # the hog holds its processes now, in one worker
    started = time.monotonic()
    outcome = executor.execute(Program(textwrap.dedent(NEEDS_PROCESSES[needs]), ["assert work() == 8"], timeout_s=8))
    took = time.monotonic() - started
    holder.join(30)
    assert outcome.passed, outcome
    assert took < 3.0, f"the program in the other sandbox took {took:.1f} s"
    assert held and held[0].passed, held
    assert executor.pool.restarts == restarts
    ordinary_program_is_judged_right(executor)


def test_each_worker_runs_as_its_own_uid(executor):
    layer = next(layer for layer in executor.layers if layer.name == "unprivileged_user")
    assert layer.active, layer
    uids = set()
    for _ in range(4 * executor.pool.size):
        outcome = executor.execute(Program("import os\nprint(os.getuid(), os.getgid())\n", ["assert 1 == 1"]))
        uids.add(outcome.stdout)
    assert len(uids) == executor.pool.size, uids
    assert all(int(uid.split()[0]) >= 1 << 30 for uid in uids), uids
