"""The native decode loop (csrc/decode.cpp), compiled on first use with torch's C++ extension
builder and cached by it (~/.cache/torch_extensions, rebuilt when the source changes).

`module()` is the compiled module, or None where it cannot be had: no C++ compiler, a failed
build, or NANOSEEK_NATIVE=0 in the environment. Everything then runs in Python
(engine/flat_decode.py), with the same results up to float rounding.
"""

import os
import sys
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "decode.cpp"
NAME = "nanoseek_decode"
STALE_LOCK_S = 600  # a build takes ~30-60 s; a lock this old belongs to a build that died
_state: dict = {}


def _cflags() -> list[str]:
    # vector units the running CPU has, as torch itself detected them (not -march=native: on some
    # VMs the compiler's view of the host enables instructions the hypervisor traps)
    cap = torch.backends.cpu.get_cpu_capability()
    # -fopenmp: at::parallel_for is inline OpenMP, serial without it
    return ["-O3", "-fopenmp"] + (["-mavx2", "-mfma", "-mf16c"] if cap in ("AVX2", "AVX512") else [])


def _announce_or_unlock():
    """Say when a build is coming; drop a lock a killed build left behind (torch's builder would
    otherwise wait on it forever). Best effort: the build directory is torch's private layout."""
    try:
        from torch.utils import cpp_extension
        build = Path(cpp_extension._get_build_directory(NAME, verbose=False))
    except Exception:
        return
    lock = build / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    if not (build / f"{NAME}.so").exists():
        print("nanoseek: building the native decode loop (once, ~30 s)", file=sys.stderr)


def module():
    if "module" in _state:
        return _state["module"]
    mod = None
    if os.environ.get("NANOSEEK_NATIVE", "1") != "0":
        try:
            from torch.utils import cpp_extension
            _announce_or_unlock()
            mod = cpp_extension.load(name=NAME, sources=[str(SOURCE)], extra_cflags=_cflags(), extra_ldflags=["-fopenmp"],
                                     verbose=False)
        except Exception as e:  # no compiler, no headers, a build error: Python runs it instead
            print(f"nanoseek: native decode unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''});"
                  " decoding in Python", file=sys.stderr)
    _state["module"] = mod
    return mod
