"""Which isolation layers this host offers, and the command that starts one sandboxed worker.

Every layer is probed at start-up and reported (log + GetSandboxInfo); a missing layer is said
out loud instead of silently running with less isolation.
"""
from __future__ import annotations

import logging
import os
import shutil
import itertools
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from services.execution.checks import MAX_INT_BITS, MAX_RESULT_DEPTH, MAX_RESULT_ITEMS

log = logging.getLogger(__name__)

HARNESS = Path(__file__).with_name("harness.py")
# Run as root, each worker gets a uid of its own from here (4096 processes of 1024 workers each), so RLIMIT_NPROC,
# which counts all processes of a uid, is counted per sandbox: one program's children cannot exhaust another's.
SANDBOX_UIDS = 1 << 30
# The only environment a sandbox ever sees.
SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}
# What one program's result channel may carry (the rest is dropped and the program gets ResultTooLarge).
MAX_RESULT_BYTES = 8 << 20
# The sandbox's own copy of the harness must not inherit the service's site-packages or env.
PYTHON_FLAGS = ["-I", "-S", "-B", "-X", "utf8"]


@dataclass(frozen=True)
class Layer:
    name: str
    active: bool
    detail: str


@dataclass(frozen=True)
class Limits:
    timeout_s: float
    memory_mb: int
    scratch_mb: int
    max_processes: int
    max_open_files: int
    max_file_mb: int
    max_output_bytes: int


@dataclass
class Isolation:
    """The probed layers and how to start a worker with all the active ones."""
    limits: Limits
    layers: list[Layer] = field(default_factory=list)
    bwrap: str | None = None
    uids: "SandboxUids | None" = None  # a uid per worker (when run as root)
    cgroup_roots: dict[str, Path] = field(default_factory=dict)
    seccomp_available: bool = False

    @classmethod
    def probe(cls, limits: Limits, *, use_bwrap: bool = True) -> "Isolation":
        isolation = cls(limits)
        isolation.bwrap = shutil.which("bwrap") if use_bwrap else None
        if isolation.bwrap and not _bwrap_works(isolation.bwrap):
            log.warning("bwrap is installed but cannot create namespaces here")
            isolation.bwrap = None
        if os.geteuid() == 0 and shutil.which("setpriv") is not None:
            uids = SandboxUids(SANDBOX_UIDS + ((os.getpid() & 0xFFF) << 10))
            isolation.uids = uids if _uid_works(uids.first) else None
        isolation.cgroup_roots = _writable_cgroups()
        isolation.seccomp_available = _seccomp_filters([2]) is not None
        isolation.layers = isolation._describe()
        return isolation

    def _describe(self) -> list[Layer]:
        sandboxed = self.bwrap is not None
        limits = self.limits
        unprivileged = self.uids is not None or os.geteuid() != 0
        if self.uids:
            user = f"each worker runs as a uid of its own ({self.uids.first} and up): process limits are per sandbox"
        elif os.geteuid() != 0 and sandboxed:
            user = f"uid {os.geteuid()} in a user namespace of its own per worker: process limits are per sandbox"
        else:
            user = f"runs as uid {os.geteuid()}" + (": every sandbox shares its process limit" if not sandboxed else "")
        return [
            Layer("network_namespace", sandboxed, "own empty network namespace (bwrap)" if sandboxed
                  else "bwrap unavailable: programs share the host network"),
            Layer("pid_namespace", sandboxed, "own PID namespace; leftovers killed after each run"
                  if sandboxed else "bwrap unavailable: leftovers killed by process group only"),
            Layer("read_only_filesystem", sandboxed, "read-only /usr and interpreter, nothing else"
                  if sandboxed else "bwrap unavailable: host filesystem visible"),
            Layer("private_scratch", sandboxed, f"{limits.scratch_mb} MB tmpfs /tmp, wiped after each run"
                  if sandboxed else "private temporary folder, wiped after each run (no size cap)"),
            Layer("unprivileged_user", unprivileged, user),
            Layer("clean_environment", True, "only PATH, LANG and HOME are set"),
            Layer("rlimits", True, f"AS {limits.memory_mb} MB, CPU timeout+1 s, NPROC {limits.max_processes}, "
                  f"NOFILE {limits.max_open_files}, FSIZE {limits.max_file_mb} MB, core 0"),
            Layer("seccomp", self.seccomp_available, "denies ptrace, inet/netlink sockets, mount, namespaces, and "
                  "every way to signal or limit a process outside the program's own (kill, tkill, tgkill, "
                  "sigqueue, pidfd, SIGIO owners, process groups, prlimit)" if self.seccomp_available
                  else "pyseccomp/libseccomp unavailable"),
            Layer("cgroup_memory", "memory" in self.cgroup_roots, str(self.cgroup_roots.get("memory", "not writable"))),
            Layer("cgroup_pids", "pids" in self.cgroup_roots, str(self.cgroup_roots.get("pids", "not writable"))),
        ]

    def worker_command(self, cgroups: list[Path], uid: int | None) -> list[str]:
        """argv that starts one fork-server: cgroup entry, then bwrap, then the drop to the worker's uid."""
        python = os.path.realpath(sys.executable)
        inner = [python, *PYTHON_FLAGS, "-c", HARNESS.read_text()]
        if uid is not None:
            inner = [*_drop_to(uid), *inner]
        if self.bwrap:
            inner = [self.bwrap, *self._bwrap_arguments(python), *inner]
        if cgroups:
            # A shell joins the cgroups first so bwrap and everything under it start inside them.
            joins = "; ".join(f"echo $$ > {cgroup / 'cgroup.procs'}" for cgroup in cgroups)
            inner = ["/bin/sh", "-c", f'{joins}; exec "$@"', "sh", *inner]
        return inner

    def _bwrap_arguments(self, python: str) -> list[str]:
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        if os.geteuid() != 0:
            namespaces.append("--unshare-user")
        prefix = os.path.realpath(sys.base_prefix)
        mounts = ["--ro-bind", "/usr", "/usr"]
        for top in ("lib", "lib64", "bin", "sbin"):
            path = Path("/") / top
            if path.is_symlink():
                mounts += ["--symlink", os.readlink(path), str(path)]
            elif path.exists():
                mounts += ["--ro-bind", str(path), str(path)]
        if not prefix.startswith("/usr/"):
            mounts += ["--ro-bind", prefix, prefix]
        if not python.startswith(prefix + "/") and not python.startswith("/usr/"):
            mounts += ["--ro-bind", python, python]
        scratch = ["--perms", "1777", "--size", str(self.limits.scratch_mb << 20), "--tmpfs", "/tmp"]
        return [*namespaces, "--die-with-parent", "--new-session", *mounts, "--proc", "/proc",
                "--dev", "/dev", *scratch, "--remount-ro", "/", "--chdir", "/tmp", "--clearenv",
                *[arg for key, value in SANDBOX_ENV.items() for arg in ("--setenv", key, value)]]

    def sandbox_config(self, checker_pid: int, scratch: str) -> dict:
        limits = self.limits
        # Without a PID namespace of its own the program also sees this service's processes.
        protected = [checker_pid] if self.bwrap else [checker_pid, os.getpid()]
        return {
            "scratch": scratch,
            "wipe": [scratch],
            "own_pid_namespace": self.bwrap is not None,
            "seccomp_bpf": [bpf.hex() for bpf in _seccomp_filters(protected) or ()],
            "max_processes": limits.max_processes,
            "max_open_files": limits.max_open_files,
            "max_file_bytes": limits.max_file_mb << 20,
            "max_output_bytes": limits.max_output_bytes,
            "max_result_bytes": MAX_RESULT_BYTES,
            "max_result_items": MAX_RESULT_ITEMS,
            "max_result_depth": MAX_RESULT_DEPTH,
            "max_int_bits": MAX_INT_BITS,
        }


class SandboxUids:
    """Hands each running worker a uid no other running worker of this service has (the lowest free one)."""

    def __init__(self, first: int):
        self.first = first
        self.lock = threading.Lock()
        self.taken: set[int] = set()

    def acquire(self) -> int:
        with self.lock:
            uid = next(u for u in itertools.count(self.first) if u not in self.taken)
            self.taken.add(uid)
            return uid

    def release(self, uid: int) -> None:
        with self.lock:
            self.taken.discard(uid)


def _drop_to(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]


def _uid_works(uid: int) -> bool:
    """Whether this host maps the uid (a container's user namespace may map only a few)."""
    try:
        return subprocess.run([*_drop_to(uid), "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _bwrap_works(bwrap: str) -> bool:
    namespaces = ["--unshare-all"] if os.geteuid() != 0 else ["--unshare-net", "--unshare-pid"]
    try:
        probe = subprocess.run([bwrap, *namespaces, "--ro-bind", "/", "/", "--dev", "/dev", "true"],
                               env=SANDBOX_ENV, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _own_cgroup(controller: str) -> str | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    return None


def _writable_cgroups() -> dict[str, Path]:
    """cgroup v1 controllers under which this process may create child groups."""
    roots = {}
    for controller in ("memory", "pids"):
        own = _own_cgroup(controller)
        if own is None:
            continue
        root = Path("/sys/fs/cgroup") / controller / own.lstrip("/")
        probe = root / f"ilf-execution-probe-{os.getpid()}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError:
            continue
        roots[controller] = root
    return roots


def _seccomp_filters(protected: list[int]) -> tuple[bytes, bytes] | None:
    """BPF for the sandbox: everything allowed except the escape and tamper routes.

    Two filters, so a child pays only for a tiny one: the first is loaded by the checker itself and every
    child inherits it; the second, loaded by each child, keeps the program away from the processes it did
    not start: `protected` (the checker, which must itself kill the child's leftovers, and the service
    when there is no PID namespace), pid 1 and their process groups. Every way to signal a process by its
    id is covered (kill, tkill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo; pidfds are denied outright),
    and so are the indirect ones: joining the checker's process group, making it the owner of SIGIO
    (F_SETOWN, FIOSETOWN, SIOCSPGRP) and lowering its resource limits (prlimit: RLIMIT_CPU kills). Pids
    are compared on their low 32 bits, as the kernel reads them, so a sign-extended or a zero-extended
    negative pid is the same.
    """
    try:
        import pyseccomp as seccomp
    except ImportError:
        return None
    try:
        deny = seccomp.ERRNO(1)  # EPERM
        sandbox = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        for name in ("ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root",
                     "unshare", "setns", "bpf", "perf_event_open", "keyctl", "add_key", "request_key",
                     "userfaultfd", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "process_madvise",
                     "process_mrelease", "io_uring_setup", "kexec_load", "init_module", "finit_module", "chroot",
                     "syslog", "acct", "swapon", "swapoff", "reboot", "quotactl", "name_to_handle_at",
                     "open_by_handle_at"):
            sandbox.add_rule(deny, name)
        for family in (2, 10, 16, 17):  # AF_INET, AF_INET6, AF_NETLINK, AF_PACKET
            sandbox.add_rule(deny, "socket", seccomp.Arg(0, seccomp.EQ, family))
        child = seccomp.SyscallFilter(defaction=seccomp.ALLOW)

        def pid(argument: int, value: int):
            return seccomp.Arg(argument, seccomp.MASKED_EQ, 0xFFFFFFFF, value & 0xFFFFFFFF)
        targets = {value for p in (*protected, 1) for value in (p, -p)} | {-1}
        for target in targets:
            for name in ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
                child.add_rule(deny, name, pid(0, target))
            for name in ("tgkill", "rt_tgsigqueueinfo"):
                child.add_rule(deny, name, pid(1, target))
            child.add_rule(deny, "setpgid", pid(1, abs(target)))
        f_setown, f_setown_ex, fiosetown, siocspgrp = 8, 15, 0x8901, 0x8902
        for command in (f_setown, f_setown_ex):
            child.add_rule(deny, "fcntl", seccomp.Arg(1, seccomp.EQ, command))
        for request in (fiosetown, siocspgrp):
            child.add_rule(deny, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, request))
        # Another process's limits and scheduling (0 is the caller itself).
        child.add_rule(deny, "prlimit64", seccomp.Arg(0, seccomp.NE, 0), seccomp.Arg(2, seccomp.NE, 0))
        for name, argument in (("setpriority", 1), ("sched_setaffinity", 0), ("sched_setscheduler", 0),
                               ("sched_setparam", 0), ("sched_setattr", 0), ("ioprio_set", 1)):
            child.add_rule(deny, name, seccomp.Arg(argument, seccomp.NE, 0))
        return _bpf(sandbox), _bpf(child)
    except Exception:  # noqa: BLE001 - libseccomp missing or too old: reported as inactive
        log.exception("cannot build the seccomp filter")
        return None


def _bpf(rules) -> bytes:
    with tempfile.TemporaryFile() as buffer:  # libseccomp writes to a file descriptor
        rules.export_bpf(buffer)
        buffer.seek(0)
        return buffer.read()
