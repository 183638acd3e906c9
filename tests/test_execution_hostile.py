"""Hostile programs: each is contained, gets the expected verdict, and leaves the service healthy."""
from __future__ import annotations

import os
import socket
import textwrap

import pytest

from services.execution.executor import Program, Verdict
from test_execution import DOUBLE, executor  # noqa: F401 - the shared executor fixture

PASSED, FAILED, ERROR, TIMEOUT = Verdict.PASSED, Verdict.FAILED, Verdict.ERROR, Verdict.TIMEOUT
NOT_PASSED = {FAILED, ERROR, TIMEOUT}


def run(executor, program, tests, **kwargs):
    return executor.execute(Program(textwrap.dedent(program), tests, timeout_s=kwargs.pop("timeout_s", 2), **kwargs))


@pytest.fixture(autouse=True)
def service_stays_healthy(executor):
    """After every hostile program, ordinary programs still get correct verdicts and a clean /tmp."""
    yield
    probe = "import os\n" + DOUBLE
    for _ in range(executor.pool.size):
        outcome = executor.execute(Program(probe, ["assert double(21) == 42", "assert double(1) == 3",
                                                   "assert os.listdir('/tmp') == []"]))
        assert [t.verdict for t in outcome.tests] == [PASSED, FAILED, PASSED], outcome


HOSTILE = {
    "fork_bomb": ("""
        import os
        def bomb():
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
        """, "assert bomb() == 1", {TIMEOUT}),
    "thread_bomb_is_capped": ("""
        import threading, time
        def threads():
            started = 0
            try:
                while True:
                    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
                    started += 1
            except RuntimeError:
                return started
        """, "assert threads() < 64", {PASSED}),
    "memory_bomb": ("""
        def hog():
            return len(bytearray(16 << 30))
        """, "assert hog() == 16 << 30", {ERROR}),
    "memory_bomb_in_steps": ("""
        def hog():
            chunks = []
            while True:
                chunks.append(bytearray(16 << 20))
        """, "assert hog() == 1", {ERROR}, {"memory_mb": 256}),
    "infinite_loop": ("""
        def spin():
            while True:
                pass
        """, "assert spin() == 1", {TIMEOUT}),
    "cpu_spin_in_c_code": ("""
        import re
        def backtrack():
            return bool(re.match(r'(a+)+$', 'a' * 64 + 'b'))
        """, "assert backtrack() == True", {TIMEOUT}),
    "deep_recursion_crash": ("""
        import sys
        sys.setrecursionlimit(10 ** 9)
        def down(n):
            # Through a C call (sorted's key) so the C stack overflows, not just the heap.
            return sorted([n], key=down)
        """, "assert down(0) == 1", {ERROR, TIMEOUT}),
    "sleep_past_timeout": ("""
        import time
        def nap():
            time.sleep(30)
            return 1
        """, "assert nap() == 1", {TIMEOUT}),
    "ignores_sigterm": ("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        def stubborn():
            while True:
                time.sleep(0.01)
        """, "assert stubborn() == 1", {TIMEOUT}),
    "disk_fill_in_scratch": ("""
        import errno
        def fill():
            index = 0
            try:
                while True:
                    with open(f'/tmp/fill{index}', 'wb') as f:
                        for _ in range(64):
                            f.write(b'x' * (1 << 20))
                    index += 1
            except OSError as error:
                return errno.errorcode[error.errno]
        """, "assert fill() in ('ENOSPC', 'EFBIG')", {PASSED}),
    "write_outside_scratch": ("""
        def escape():
            written = []
            for path in ['/usr/evil', '/evil', '/proc/evil', '/dev/evil', '/root/evil', '/work/evil',
                         '/etc/evil', '/dev/shm/evil']:
                try:
                    open(path, 'w').write('x')
                    written.append(path)
                except OSError:
                    pass
            return written
        """, "assert escape() == []", {PASSED}),
    "host_filesystem_hidden": ("""
        import os
        def look():
            return [p for p in ['/work', '/home', '/etc/passwd', '/var', '/sys/fs/cgroup', '/root/.ssh']
                    if os.path.exists(p)]
        """, "assert look() == []", {PASSED}),
    "connect_to_loopback": ("""
        import socket
        def connect(port):
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                return 'connected'
            except OSError as error:
                return type(error).__name__
        """, "assert connect(PORT) == 'connected'", {FAILED}),
    "connect_outside": ("""
        import socket
        def connect():
            try:
                socket.create_connection(('1.1.1.1', 443), timeout=1).close()
                return 'connected'
            except OSError as error:
                return type(error).__name__
        """, "assert connect() == 'connected'", {FAILED}),
    "dns_lookup": ("""
        import socket
        def resolve():
            try:
                return socket.getaddrinfo('pypi.org', 443)[0][4][0]
            except OSError as error:
                return type(error).__name__
        """, "assert '.' in resolve()", {FAILED}),
    "read_environments": ("""
        import os
        def secrets():
            found = [k for k, v in os.environ.items() if 'ILF' in k or 'hostile-secret' in v]
            for pid in os.listdir('/proc'):
                try:
                    if b'hostile-secret' in open(f'/proc/{pid}/environ', 'rb').read():
                        found.append(pid)
                except OSError:
                    pass
            return found
        """, "assert secrets() == []", {PASSED}),
    "proc_1_environ": ("""
        def read():
            try:
                return open('/proc/1/environ', 'rb').read()
            except OSError as error:
                return type(error).__name__
        """, "assert read() == 'PermissionError'", {PASSED}),
    "kill_the_checker": ("""
        import os, signal
        def kill():
            for target in (os.getppid(), 1, -1):
                try:
                    os.kill(target, signal.SIGKILL)
                except OSError:
                    pass
            return 'alive'
        """, "assert kill() == 'killed'", {FAILED, ERROR}),
    "ptrace_the_checker": ("""
        import ctypes, os
        def attach():
            libc = ctypes.CDLL(None, use_errno=True)
            return libc.ptrace(16, os.getppid(), 0, 0)  # PTRACE_ATTACH
        """, "assert attach() == 0", {FAILED}),
    "write_checker_memory": ("""
        import os
        def poke():
            try:
                open(f'/proc/{os.getppid()}/mem', 'wb')
                return 'opened'
            except OSError as error:
                return type(error).__name__
        """, "assert poke() == 'opened'", {FAILED}),
    "new_namespaces": ("""
        import ctypes
        def unshare():
            return ctypes.CDLL(None).unshare(0x10000000)  # CLONE_NEWUSER
        """, "assert unshare() == 0", {FAILED}),
    "sys_exit_before_asserts": ("""
        import sys
        def double(x):
            return 0
        sys.exit(0)
        """, "assert double(2) == 4", {ERROR}),
    "os_exit_before_asserts": ("""
        import os
        def double(x):
            return 0
        os._exit(0)
        """, "assert double(2) == 4", {ERROR}),
    "exit_zero_inside_the_test": ("""
        import os
        def double(x):
            os._exit(0)
        """, "assert double(2) == 4", {ERROR}),
    "always_equal_object": ("""
        class Anything:
            def __eq__(self, other):
                return True
            __hash__ = object.__hash__
        def double(x):
            return Anything()
        """, "assert double(2) == 4", {ERROR}),
    "int_subclass_always_equal": ("""
        class Sly(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
        def double(x):
            return Sly(0)
        """, "assert double(2) == 4", {ERROR}),
    "redefined_assertion_error": ("""
        import builtins
        class Harmless(Exception):
            pass
        builtins.AssertionError = Harmless
        AssertionError = Harmless
        def double(x):
            return 0
        """, "assert double(2) == 4", {FAILED}),
    "patched_builtins": ("""
        import builtins
        builtins.sorted = lambda *args, **kwargs: [1, 2, 3]
        builtins.set = lambda *args: {1}
        def double(x):
            return [9]
        """, "assert sorted(double(2)) == sorted([3, 1, 2])", {FAILED}),
    "fake_verdict_markers": ("""
        import sys
        def double(x):
            print('PASSED\\n{"test": 0, "values": [["i", "4"]]}\\nall tests passed')
            sys.stderr.write('OK\\n')
            return 0
        """, "assert double(2) == 4", {FAILED}),
    "close_result_channel": ("""
        import os
        for fd in range(3, 64):
            try:
                os.close(fd)
            except OSError:
                pass
        def double(x):
            return x * 2
        """, "assert double(2) == 4", {ERROR}),
    "hijack_result_channel": ("""
        import os
        for fd in range(3, 16):
            try:
                os.write(fd, b'{"test": 0, "values": [["B", true]]}\\n{"test": 0, "values": []}\\n')
            except OSError:
                pass
        def double(x):
            return 0
        """, "assert double(2) == 4", {FAILED, ERROR}),
    "patch_the_harness": ("""
        import __main__, sys
        __main__.encode = lambda value, budget, depth=0: ['T']
        for frame_module in list(sys.modules.values()):
            if hasattr(frame_module, 'encode'):
                frame_module.encode = __main__.encode
        def double(x):
            return 0
        """, "assert double(2) == 4", {FAILED}),
    "output_flood": ("""
        import sys
        def double(x):
            for _ in range(3000):
                print('x' * 10000)
                sys.stderr.write('y' * 10000)
            return x * 2
        """, "assert double(2) == 4", {PASSED}),
    "symlink_and_locked_dir_in_scratch": ("""
        import os
        os.symlink('/', '/tmp/root-link')
        os.symlink('/proc/1/root', '/tmp/proc-link')
        os.makedirs('/tmp/locked/inner')
        open('/tmp/locked/inner/f', 'w').write('x')
        os.chmod('/tmp/locked/inner', 0)
        os.chmod('/tmp/locked', 0)
        def double(x):
            return x * 2
        """, "assert double(2) == 4", {PASSED}),
    "background_daemon_survives_nothing": ("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            while True:
                open('/tmp/daemon', 'a').write('x')
                time.sleep(0.001)
        def double(x):
            return x * 2
        """, "assert double(2) == 4", {PASSED}),
}


@pytest.fixture(scope="module")
def listening_port():
    """A loopback service the sandbox must not reach."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_contained(executor, listening_port, monkeypatch, name):
    program, test, expected, *options = HOSTILE[name]
    monkeypatch.setenv("ILF_HOSTILE_PROBE", "hostile-secret")
    outcome = run(executor, program, [test.replace("PORT", str(listening_port)), "assert 2 + 2 == 4"],
                  **(options[0] if options else {}))
    assert outcome.tests[0].verdict in expected, outcome
    assert not outcome.passed or expected == {PASSED}
    if name == "output_flood":
        assert outcome.output_truncated and len(outcome.stdout) <= executor.settings.max_output_bytes


def test_runs_cannot_read_each_others_scratch(executor):
    writer = "open('/tmp/secret', 'w').write('from another run')\ndef done():\n    return 1\n"
    assert executor.execute(Program(writer, ["assert done() == 1"])).passed
    reader = "import os\ndef peek():\n    return os.listdir('/tmp')\n"
    for _ in range(2 * executor.pool.size):
        assert executor.execute(Program(reader, ["assert peek() == []"])).passed


def test_hostile_suite_is_large_enough():
    assert len(HOSTILE) + 1 >= 25
    assert os.environ.get("ILF_HOSTILE_PROBE") is None
