"""The fork-server that runs inside the sandbox: one warm Python that forks a child per program.

This file is executed as `python -I -S -c <source>` inside the sandbox, so it may use the
standard library only. It is deliberately NOT trusted with verdicts: the child reports the
values of the test expressions that need the program ("holes"), and the service compares them
with the expected values, which never enter the sandbox. A program that tampers with this code,
the result pipe or this process can only make its own tests fail.

Protocol on stdin/stdout: 4-byte big-endian length + JSON, one frame per message.
"""
import builtins
import collections
import ctypes
import gc
import json
import os
import resource
import select
import shutil
import signal
import struct
import sys
import time

OUTPUT_POLL_S = 0.05
# What generated programs import most; a fork inherits them already imported.
PRELOADED_MODULES = ("re", "math", "heapq", "itertools", "functools", "bisect", "string", "copy", "operator",
                     "random", "datetime", "decimal", "fractions", "statistics", "array", "cmath", "typing")
# Compared like dict (Counter({"a": 1}) == {"a": 1} in Python too).
DICT_TYPES = (dict, collections.Counter, collections.OrderedDict, collections.defaultdict)
# Grace period for the child's last frames after its deadline has passed.
DRAIN_S = 0.05


def read_frame(stream):
    header = stream.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    return json.loads(stream.read(size))


def write_frame(stream, message):
    body = json.dumps(message).encode()
    stream.write(struct.pack(">I", len(body)) + body)
    stream.flush()


def encode(value, budget):
    """Tagged JSON form of a builtin data value; exact types only, so subclasses with a rigged
    __eq__ (or anything else the service could not compare safely) are refused."""
    budget[0] -= 1
    if budget[0] < 0:
        raise OverflowError("result too large to report")
    kind = type(value)
    if value is None:
        return ["n"]
    if kind is bool:
        return ["B", value]
    if kind is int:
        return ["i", format(value, "x")]
    if kind is float:
        return ["f", value.hex()]
    if kind is complex:
        return ["c", value.real.hex(), value.imag.hex()]
    if kind is str:
        budget[0] -= len(value) // 64
        return ["s", value]
    if kind is bytes:
        budget[0] -= len(value) // 32
        return ["b", value.hex()]
    if kind in (list, tuple, set, frozenset):
        tag = {list: "l", tuple: "t", set: "S", frozenset: "F"}[kind]
        return [tag, [encode(item, budget) for item in list(value)]]
    if kind in DICT_TYPES:
        return ["d", [[encode(k, budget), encode(v, budget)] for k, v in list(value.items())]]
    if kind is range:
        return ["r", value.start, value.stop, value.step]
    raise TypeError(f"a {kind.__name__} object cannot be compared by the harness "
                    "(only builtin data types: None, bool, int, float, complex, str, bytes, "
                    "list, tuple, set, frozenset, range, dict and its collections subclasses)")


def describe(error):
    return [type(error).__name__, str(error)[:2000]]


def seccomp_installer(bpf):
    """Prepares, in the checker, everything a child needs to load the seccomp filter (a classic-BPF
    program built by the service with libseccomp), so each child only makes two prctl calls."""
    libc = ctypes.CDLL(None, use_errno=True)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    program = SockFprog(len(bpf) // 8, bpf)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2

    def install():
        if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0 or \
                libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(program), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "seccomp filter not loaded")
    return install


def run_child(job, config, channel):
    """Runs in the forked child; never returns."""
    try:
        limits = [
            (resource.RLIMIT_AS, job["memory_mb"] << 20),
            (resource.RLIMIT_CPU, int(job["timeout_s"]) + 1),
            (resource.RLIMIT_FSIZE, config["max_file_bytes"]),
            (resource.RLIMIT_NOFILE, config["max_open_files"]),
            (resource.RLIMIT_NPROC, config["max_processes"]),
            (resource.RLIMIT_CORE, 0),
        ]
        for which, value in limits:
            resource.setrlimit(which, (value, value))
        if config["install_seccomp"]:
            config["install_seccomp"]()
        os.chdir(config["scratch"])
    except Exception as error:  # the sandbox is broken: never run the program unconfined
        channel.write(json.dumps({"setup_error": describe(error)}) + "\n")
        channel.flush()
        os._exit(70)
    # Compiled before the program runs, so the program cannot swap the test code.
    try:
        holes = [[compile(source, f"<test {index}>", "eval") for source in test]
                 for index, test in enumerate(job["holes"])]
    except SyntaxError as error:
        channel.write(json.dumps({"load_error": describe(error)}) + "\n")
        channel.flush()
        os._exit(0)
    send = channel.write
    flush = channel.flush
    dumps = json.dumps
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    for source, name in ((job["program"], "<program>"), (job["setup"], "<test_setup_code>")):
        try:
            exec(compile(source, name, "exec"), namespace)
        except BaseException as error:  # noqa: BLE001 - SystemExit included: it is a load failure
            send(dumps({"load_error": describe(error)}) + "\n")
            flush()
            os._exit(0)
    for index, expressions in enumerate(holes):
        budget = [config["max_result_items"]]
        try:
            values = [encode(eval(code, namespace), budget) for code in expressions]
            message = {"test": index, "values": values}
        except BaseException as error:  # noqa: BLE001
            message = {"test": index, "error": describe(error)}
        send(dumps(message) + "\n")
        flush()
    os._exit(0)


class Capture:
    """Keeps the first `cap` bytes of a stream and discards (but keeps draining) the rest."""

    def __init__(self, fd, cap):
        self.fd, self.cap, self.data, self.truncated = fd, cap, bytearray(), False

    def read(self):
        chunk = os.read(self.fd, 65536)
        room = self.cap - len(self.data)
        if len(chunk) > room:
            self.truncated = True
        self.data += chunk[:max(room, 0)]
        return bool(chunk)


def kill_everything(child, own_pid_namespace):
    """Kills the child and everything it started. In the sandbox's own PID namespace every other
    process belongs to the program, so kill(-1) reaches daemons that left the process group."""
    for _ in range(200):
        try:
            if own_pid_namespace:
                os.kill(-1, signal.SIGKILL)
            else:
                os.killpg(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            break
        try:
            os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.0002)


def wipe(folder):
    """Empties a folder the program could write to; never follows its symlinks."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                os.chmod(entry.path, 0o700)
                wipe(entry.path)
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            pass


def run_job(job, config):
    result_read, result_write = os.pipe()
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    started = time.monotonic()
    child = os.fork()
    if child == 0:
        try:
            os.setpgid(0, 0)
            set_dumpable(True)  # the program's own /proc entries stay readable to it
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out_write, 1)
            os.dup2(err_write, 2)
            os.dup2(result_write, 3)
            os.closerange(4, 1 << 16)
            channel = os.fdopen(3, "w", encoding="utf-8")
            sys.stdout = os.fdopen(1, "w", encoding="utf-8", errors="backslashreplace", buffering=1)
            sys.stderr = os.fdopen(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1)
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            run_child(job, config, channel)
        finally:
            os._exit(71)
    for fd in (result_write, out_write, err_write):
        os.close(fd)
    deadline = started + job["timeout_s"]
    cap = config["max_output_bytes"]
    stdout, stderr = Capture(out_read, cap), Capture(err_read, cap)
    results = Capture(result_read, config["max_result_bytes"])
    open_streams = {out_read: stdout, err_read: stderr, result_read: results}
    arrivals = []  # seconds since start at which each result line was complete
    timed_out = False
    while result_read in open_streams:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        ready, _, _ = select.select(list(open_streams), [], [], min(remaining, OUTPUT_POLL_S * 20))
        for fd in ready:
            before = results.data.count(b"\n") if fd == result_read else 0
            if not open_streams[fd].read():
                del open_streams[fd]
            elif fd == result_read:
                now = time.monotonic() - started
                arrivals += [now] * (results.data.count(b"\n") - before)
    kill_everything(child, config["own_pid_namespace"])
    status = 0
    try:
        _, status = os.waitpid(child, 0)
    except ChildProcessError:
        pass
    # Whatever output is still buffered in the pipes, without waiting for anyone.
    for fd, capture in list(open_streams.items()):
        while select.select([fd], [], [], 0)[0] and capture.read():
            pass
    for fd in (result_read, out_read, err_read):
        os.close(fd)
    for folder in config["wipe"]:
        wipe(folder)
    return {
        "results": results.data.decode("utf-8", "replace"),
        "arrivals": arrivals,
        "results_truncated": results.truncated,
        "timed_out": timed_out,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1,
        "duration_s": time.monotonic() - started,
        "stdout": stdout.data.decode("utf-8", "replace"),
        "stderr": stderr.data.decode("utf-8", "replace"),
        "output_truncated": stdout.truncated or stderr.truncated,
    }


def set_dumpable(dumpable):
    """A non-dumpable checker cannot be ptraced or have its /proc/<pid>/mem opened by programs."""
    pr_set_dumpable = 4
    ctypes.CDLL(None).prctl(pr_set_dumpable, int(dumpable), 0, 0, 0)


def serve():
    set_dumpable(False)
    jobs = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    # Nothing but frames may reach the service's pipe, not even a stray print.
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    # A child's first compile() is slow unless the parent has compiled once before forking, and
    # every child would otherwise import the same standard modules again: do both once here.
    compile("warm = [x for x in range(1)]", "<warm-up>", "exec")
    for module in PRELOADED_MODULES:
        try:
            __import__(module)
        except ImportError:
            pass
    write_frame(replies, {"hello": os.getpid(), "uid": os.getuid()})
    config = read_frame(jobs)
    bpf = bytes.fromhex(config["seccomp_bpf"])
    config["install_seccomp"] = seccomp_installer(bpf) if bpf else None
    # Objects that exist before the fork are never touched by the collector again, so children do
    # not copy the pages they live on.
    gc.collect()
    gc.freeze()
    write_frame(replies, {"ready": True})
    while True:
        job = read_frame(jobs)
        if job is None:
            return
        write_frame(replies, run_job(job, config))


if __name__ == "__main__":
    serve()
