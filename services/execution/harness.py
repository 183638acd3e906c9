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
import signal
import struct
import sys
import time

OUTPUT_POLL_S = 0.05
# What generated programs import most; a fork inherits them already imported. Every preloaded
# module makes every fork dearer (more memory to map and copy), and random even reseeds itself in
# each child, so the rarely used heavy ones (random, decimal, fractions, statistics, datetime) are
# left to the few programs that import them.
PRELOADED_MODULES = ("re", "math", "heapq", "itertools", "functools", "bisect", "string", "copy", "operator",
                     "array", "cmath", "typing")
# Compared like dict (Counter({"a": 1}) == {"a": 1} in Python too).
DICT_TYPES = (dict, collections.Counter, collections.OrderedDict, collections.defaultdict)
PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict)
COLLECTION_TAGS = {list: "l", tuple: "t", set: "S", frozenset: "Z"}
KEYS_VIEW = type({}.keys())
LIBC = ctypes.CDLL(None, use_errno=True)  # loaded once: every child calls prctl


def read_raw_frame(stream):
    header = stream.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    return stream.read(size)


def read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def read_frame(stream):
    raw = read_raw_frame(stream)
    return None if raw is None else json.loads(raw)


def write_frame(stream, message):
    body = json.dumps(message).encode()
    stream.write(struct.pack(">I", len(body)) + body)
    stream.flush()


def encode(value, budget, depth=0):
    """Tagged JSON form of a plain data value; exact types only, so subclasses with a rigged __eq__ (or anything
    else the service could not compare safely) are refused. Counter, OrderedDict and defaultdict become the
    dict they compare like; `budget` counts down the items all of one program's results may hold."""
    budget[0] -= 1
    if budget[0] < 0:
        raise OverflowError("result too large to report: more than %d items (or 64-character pieces of text) "
                            "in all" % budget[1])
    if depth > budget[2]:
        raise OverflowError("result too large to report: nested deeper than %d" % budget[2])
    kind = type(value)
    if value is None:
        return ["n"]
    if kind is bool:
        return ["T"] if value else ["F"]
    if kind is int:
        if value.bit_length() > budget[3]:
            raise OverflowError("result too large to report: an integer of more than %d bits" % budget[3])
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
    if kind in COLLECTION_TAGS:
        return [COLLECTION_TAGS[kind], [encode(item, budget, depth + 1) for item in list(value)]]
    if kind in DICT_TYPES:
        return ["d", [[encode(k, budget, depth + 1), encode(v, budget, depth + 1)] for k, v in list(value.items())]]
    if kind is KEYS_VIEW:  # compares like the set of its keys
        return ["S", [encode(item, budget, depth + 1) for item in list(value)]]
    raise TypeError(f"a {kind.__name__} object is not plain data the service can compare (only None, bool, "
                    "int, float, complex, str, bytes, list, tuple, set, frozenset and dict, exact types; a lazy "
                    "value only where the test consumes it, as in all(), sorted() or a comprehension)")


def hole_value(value, mode, budget):
    """A hole's value as reported. Where the test consumes it (mode 'iterate', 'all' or 'any'), a lazy value (a
    generator, range, map, view, ...) is consumed here into the list of its items, for all()/any() only up to
    the item that decides, as they would stop there."""
    kind = type(value)
    if mode == "value" or kind in PLAIN_TYPES or kind in DICT_TYPES:
        return encode(value, budget)
    items = []
    for item in value:
        items.append(encode(item, budget, 1))
        if (mode == "all" and not item) or (mode == "any" and item):
            break
    return ["l", items]


def describe(error):
    return [type(error).__name__, str(error)[:2000]]


def seccomp_installer(bpf):
    """Prepares, in the checker, everything needed to load a seccomp filter (a classic-BPF program
    built by the service with libseccomp), so loading it is two prctl calls: the checker loads the
    sandbox-wide filter once, each child its own small one."""
    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    program = SockFprog(len(bpf) // 8, bpf)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2

    def install():
        if LIBC.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0 or \
                LIBC.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(program), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "seccomp filter not loaded")
    return install


def report(message):
    """One result line on the result channel (fd 3); raw writes, no file object to set up per child."""
    view = memoryview((json.dumps(message) + "\n").encode())
    while view:
        view = view[os.write(3, view):]


def run_child(job, config):
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
        report({"setup_error": describe(error)})
        os._exit(70)
    # Compiled before the program runs, so the program cannot swap the test code.
    try:
        holes = [[(compile(source, f"<test {index}>", "eval"), mode) for source, mode in test]
                 for index, test in enumerate(job["holes"])]
    except SyntaxError as error:
        report({"load_error": describe(error)})
        os._exit(0)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    for source, name in ((job["program"], "<program>"), (job["setup"], "<test_setup_code>")):
        try:
            exec(compile(source, name, "exec"), namespace)
        except BaseException as error:  # noqa: BLE001 - SystemExit included: it is a load failure
            report({"load_error": describe(error)})
            os._exit(0)
    # [items left, items in all, deepest nesting, largest integer in bits]: shared by all the tests.
    budget = [config["max_result_items"], config["max_result_items"], config["max_result_depth"],
              config["max_int_bits"]]
    for index, expressions in enumerate(holes):
        values = []
        for code, mode in expressions:
            # Each hole on its own: the service raises a hole's error only where the test uses its value.
            try:
                values.append(hole_value(eval(code, namespace), mode, budget))
            except BaseException as error:  # noqa: BLE001
                values.append(["E", *describe(error)])
        report({"test": index, "values": values})
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
    """Kills the child and everything it started, and returns the child's wait status. In the
    sandbox's own PID namespace every other process belongs to the program, so kill(-1) reaches
    daemons that left the process group. Exited processes are reaped first, so a program that
    started nothing costs one kill() that finds no one."""
    status = None
    for _ in range(200):
        status = reap(child, status)
        try:
            if own_pid_namespace:
                os.kill(-1, signal.SIGKILL)
            else:
                os.killpg(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.0002)
    if status is None:
        try:
            status = os.waitpid(child, 0)[1]
        except ChildProcessError:
            status = 0
    return status


def reap(child, status):
    """Collects every exited child without waiting; returns `child`'s status once it is seen."""
    while True:
        try:
            pid, code = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == 0:
            return status
        if pid == child:
            status = code


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


class Spare:
    """A child forked before its job arrives, waiting on a pipe: the fork and the child's stdio
    set-up happen while the service is busy elsewhere, not on the job's clock."""

    def __init__(self, config):
        job_read, self.job_write = os.pipe()
        self.result_read, result_write = os.pipe()
        self.out_read, out_write = os.pipe()
        self.err_read, err_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.setpgid(0, 0)
                set_dumpable(True)  # the program's own /proc entries stay readable to it
                os.dup2(job_read, 0)
                os.dup2(out_write, 1)
                os.dup2(err_write, 2)
                os.dup2(result_write, 3)
                os.closerange(4, 1 << 16)
                sys.stdout, sys.stderr = config["stdout"], config["stderr"]
                signal.signal(signal.SIGPIPE, signal.SIG_DFL)
                job = json.loads(read_all(0))
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)  # the program reads an empty stdin, not the job
                os.close(null)
                run_child(job, config)
            finally:
                os._exit(71)
        for fd in (job_read, result_write, out_write, err_write):
            os.close(fd)

    def hand_over(self, raw_job):
        """Gives the job to the child; False if the child is gone (the caller forks another)."""
        try:
            view = memoryview(raw_job)
            while view:
                view = view[os.write(self.job_write, view):]
            return True
        except BrokenPipeError:
            return False
        finally:
            os.close(self.job_write)

    def discard(self):
        """Ends a spare that never got its job (it has run nothing but this file's code)."""
        try:
            os.close(self.job_write)
        except OSError:
            pass  # already closed by hand_over
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        for fd in (self.result_read, self.out_read, self.err_read):
            os.close(fd)


def run_job(job, raw_job, config, spare):
    """Runs one job on the spare child (forking a fresh one if the spare died)."""
    started = time.monotonic()
    while not spare.hand_over(raw_job):
        spare.discard()
        spare = Spare(config)
    child = spare.pid
    deadline = started + job["timeout_s"]
    cap = config["max_output_bytes"]
    stdout, stderr = Capture(spare.out_read, cap), Capture(spare.err_read, cap)
    results = Capture(spare.result_read, config["max_result_bytes"])
    result_read = spare.result_read
    open_streams = {spare.out_read: stdout, spare.err_read: stderr, result_read: results}
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
    status = kill_everything(child, config["own_pid_namespace"])
    # Whatever output is still buffered in the pipes, without waiting for anyone.
    for fd, capture in list(open_streams.items()):
        while select.select([fd], [], [], 0)[0] and capture.read():
            pass
    for fd in (spare.result_read, spare.out_read, spare.err_read):
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
    LIBC.prctl(pr_set_dumpable, int(dumpable), 0, 0, 0)


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
    filters = [seccomp_installer(bytes.fromhex(bpf)) for bpf in config["seccomp_bpf"]]
    if filters:
        filters[0]()  # the sandbox-wide filter, once: every child inherits it
    config["install_seccomp"] = filters[1] if filters else None
    # The program's stdout and stderr, built once here: each child only points fds 1 and 2 at its pipes.
    config["stdout"], config["stderr"] = (
        open(fd, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False) for fd in (1, 2))
    # Objects that exist before the fork are never touched by the collector again, so children do
    # not copy the pages they live on.
    gc.collect()
    gc.freeze()
    write_frame(replies, {"ready": True})
    spare = Spare(config)
    while True:
        raw_job = read_raw_frame(jobs)
        if raw_job is None:
            spare.discard()
            return
        write_frame(replies, run_job(json.loads(raw_job), raw_job, config, spare))
        # Forked only now: a spare that existed during the job would die by kill_everything.
        spare = Spare(config)


if __name__ == "__main__":
    serve()
