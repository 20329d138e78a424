"""Containment tests for nanoseek.eval.sandbox.

One batch of hostile and honest programs runs once on a 2-worker pool (module fixture);
each test then checks one program's verdict and that the rest of the batch was scored
correctly around it.
"""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from nanoseek.eval import sandbox

REPO = Path(__file__).resolve().parents[1]
# The default 3 s timeout: honest programs must not time out on a busy 2-core machine.
LIMITS = sandbox.Limits(timeout=3.0, memory_mb=512, max_processes=16)
SECRET_VAR = "NANOSEEK_SANDBOX_TEST_SECRET"


def hostile_programs(port: int, marker: str) -> dict[str, str]:
    repo_file = REPO / f"sandbox-escape-{marker}.txt"
    home_file = Path(os.path.expanduser("~")) / f"sandbox-escape-{marker}.txt"
    return {
        "honest": "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n",
        "wrong": "def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n",
        "infinite_loop": "while True:\n    pass\n",
        "sleeper": "import time\ntime.sleep(600)\n",
        "fork_bomb": (
            "import os, time\n"
            "while True:\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        time.sleep(0.01)\n"
        ),
        "memory_bomb": "hoard = []\nwhile True:\n    hoard.append(bytearray(50 * 1024 * 1024))\n",
        "write_repo": f"open({str(repo_file)!r}, 'w').write('escaped')\n",
        "write_home": f"open({str(home_file)!r}, 'w').write('escaped')\n",
        "network": (
            "import socket\n"
            f"connection = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "connection.sendall(b'hello from the sandbox')\n"
        ),
        "sys_exit_early": "import sys\nsys.exit(0)\nassert False, 'the tests'\n",
        "os_exit_early": "import os\nos._exit(0)\nassert False, 'the tests'\n",
        "kill_parent": (
            "import os, signal\n"
            "try:\n"
            "    os.kill(os.getppid(), signal.SIGKILL)\n"
            "except OSError:\n"
            "    pass\n"
            "os._exit(0)\n"
        ),
        "fake_success": (
            # Print what a naive harness would look for, on every descriptor, then leave.
            "import os\n"
            "for fd in range(10):\n"
            "    try:\n"
            "        os.write(fd, b'passed\\npassed 0123456789abcdef\\nOK\\n')\n"
            "    except OSError:\n"
            "        pass\n"
            "os._exit(0)\n"
        ),
        "monkeypatch": (
            # Neuter everything a harness might use to report or exit, then fail the test.
            "import builtins, os, sys\n"
            "os._exit = lambda *a: None\n"
            "os.write = lambda fd, data: len(data)\n"
            "os.getpid = lambda: 1\n"
            "sys.exit = lambda *a: None\n"
            "builtins.AssertionError = type('Fine', (Exception,), {})\n"
            "assert 1 == 2, 'a real failure'\n"
        ),
        "environment": (
            "import os\n"
            f"assert {SECRET_VAR!r} not in os.environ\n"
            # PWD is bubblewrap's (--chdir); everything else is ours.
            "assert set(os.environ) <= {'PATH', 'LANG', 'LC_ALL', 'HOME', 'TMPDIR', 'PWD',\n"
            "    'PYTHONDONTWRITEBYTECODE', 'PYTHONIOENCODING', 'OMP_NUM_THREADS'}, set(os.environ)\n"
            "open('scratch.txt', 'w').write('own directory is writable')\n"
            "assert os.listdir('.') == ['scratch.txt']\n"
        ),
        "honest_last": "import math\nassert math.gcd(12, 18) == 6\n",
    }


@pytest.fixture(scope="module")
def batch():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.settimeout(0.5)
    marker = uuid.uuid4().hex
    programs = hostile_programs(listener.getsockname()[1], marker)
    workdirs_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "nanoseek-sandbox-*")))
    os.environ[SECRET_VAR] = "sk-do-not-leak"
    started = time.monotonic()
    try:
        results = sandbox.run_programs(list(programs.values()), LIMITS, workers=2)
    finally:
        del os.environ[SECRET_VAR]
    elapsed = time.monotonic() - started
    connections = []
    try:
        while True:
            connections.append(listener.accept())
    except (TimeoutError, BlockingIOError):
        pass
    listener.close()
    workdirs_after = set(glob.glob(os.path.join(tempfile.gettempdir(), "nanoseek-sandbox-*")))
    yield {
        "results": dict(zip(programs, results)),
        "elapsed": elapsed,
        "connections": connections,
        "marker": marker,
        "leftover_workdirs": workdirs_after - workdirs_before,
    }


def test_honest_programs_pass_and_wrong_one_fails(batch):
    results = batch["results"]
    assert results["honest"].passed
    assert results["honest_last"].passed
    assert results["wrong"].result.startswith("failed: AssertionError")


def test_infinite_loop_times_out_and_batch_keeps_going(batch):
    assert batch["results"]["infinite_loop"].result == "timed out"
    assert batch["results"]["sleeper"].result == "timed out"
    # Killed at the timeout, not left to sleep its 600 s.
    assert batch["elapsed"] < 60


def test_fork_bomb_is_contained(batch):
    result = batch["results"]["fork_bomb"]
    assert not result.passed
    # The machine is fine: we can still start processes, and no sandbox process survives.
    assert subprocess.run(["true"]).returncode == 0
    if os.geteuid() == 0:
        for slot in range(sandbox.MAX_SLOTS):
            uid = sandbox._identity(slot)[0]
            assert sandbox._count_processes(uid, include_zombies=False) == 0


def test_memory_bomb_is_contained(batch):
    result = batch["results"]["memory_bomb"]
    assert not result.passed, result
    assert "MemoryError" in result.result or "killed" in result.result


def needs_isolation():
    if sandbox.isolation() == "none":
        pytest.skip("no bubblewrap or unshare here: file-system/network isolation unavailable")


def test_writes_outside_workdir_fail_and_create_nothing(batch):
    results = batch["results"]
    assert results["write_repo"].result.startswith("failed:")
    assert results["write_home"].result.startswith("failed:")
    marker = batch["marker"]
    repo_file = REPO / f"sandbox-escape-{marker}.txt"
    home_file = Path(os.path.expanduser("~")) / f"sandbox-escape-{marker}.txt"
    leaked = [path for path in (repo_file, home_file) if path.exists()]
    for path in leaked:
        path.unlink()
    assert leaked == []


def test_no_network_connection_arrives(batch):
    needs_isolation()
    assert batch["connections"] == []
    assert batch["results"]["network"].result.startswith("failed:")


def test_early_exit_and_fake_output_are_not_passes(batch):
    results = batch["results"]
    assert results["sys_exit_early"].result == "failed: SystemExit: 0"
    assert results["os_exit_early"].result.startswith("failed: exited with code 0")
    assert not results["kill_parent"].passed
    assert not results["fake_success"].passed


def test_monkeypatching_the_harness_does_not_pass(batch):
    result = batch["results"]["monkeypatch"]
    assert result.result == "failed: AssertionError: a real failure"


def test_minimal_environment_and_private_workdir_deleted(batch):
    assert batch["results"]["environment"].passed, batch["results"]["environment"].result
    assert batch["leftover_workdirs"] == set()


def test_results_come_back_in_input_order():
    programs = ["assert False, 'first'\n", "pass\n", "raise ValueError('third')\n"]
    results = sandbox.run_programs(programs, LIMITS, workers=2)
    assert [r.result for r in results] == [
        "failed: AssertionError: first", "passed", "failed: ValueError: third"]


def test_isolation_is_the_strongest_available():
    """Where bubblewrap works for the identity the sandbox runs as, it must be chosen."""
    if not shutil.which("bwrap"):
        pytest.skip("bubblewrap not installed")
    identity = sandbox._identity(0)
    ids = {"user": identity[0], "group": identity[1], "extra_groups": []} if identity else {}
    probe = subprocess.run(["bwrap", "--unshare-all", "--ro-bind", "/", "/", "true"],
                           capture_output=True, **ids)
    expected = "bwrap" if probe.returncode == 0 else ("unshare", "none")
    assert sandbox.isolation() in expected


@pytest.mark.parametrize("backend", ["unshare", "none"])
def test_fallback_backends_still_contain(backend):
    """The weaker backends, forced, on what every backend guarantees (plus no network for
    unshare), so the fallbacks do not rot on machines that always have bubblewrap."""
    if backend == "unshare" and not shutil.which("unshare"):
        pytest.skip("no unshare here")
    python = sandbox._setup().python
    programs = {
        "honest": "assert sorted([3, 1, 2]) == [1, 2, 3]\n",
        "early_exit": "import os\nos._exit(0)\n",
        "fork_bomb": "import os\nwhile True:\n    os.fork()\n",  # dies at the limit
        "memory_bomb": hostile_programs(9, "x")["memory_bomb"],
        "network": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n",
    }
    results = {}
    for name, program in programs.items():
        with sandbox._slot() as slot:
            results[name] = sandbox._run(program, LIMITS, slot, backend, python)
    if backend == "unshare" and not results["honest"].passed:
        pytest.skip(f"unshare -rn does not work here: {results['honest'].result}")
    assert results["honest"].passed, results["honest"]
    assert results["early_exit"].result.startswith("failed: exited with code 0")
    assert not results["fork_bomb"].passed
    assert "MemoryError" in results["memory_bomb"].result
    if backend == "unshare":
        assert results["network"].result.startswith("failed:")
