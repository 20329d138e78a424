"""The native decode loop (csrc/decode.cpp), compiled on first use with torch's C++ extension
builder and cached by it (~/.cache/torch_extensions, rebuilt when the source changes).

`module()` is the compiled module, or None where it cannot be had: no C++ compiler, a failed
build, or NANOSEEK_NATIVE=0 in the environment. Everything then runs in Python
(engine/flat_decode.py), with the same results up to float rounding.
"""

import os
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "decode.cpp"
NAME = "nanoseek_decode"
_state: dict = {}


def _cflags() -> list[str]:
    # vector units the running CPU has, as torch itself detected them (not -march=native: on some
    # VMs the compiler's view of the host enables instructions the hypervisor traps)
    cap = torch.backends.cpu.get_cpu_capability()
    # -fopenmp: at::parallel_for is inline OpenMP, serial without it
    return ["-O3", "-fopenmp"] + (["-mavx2", "-mfma", "-mf16c"] if cap in ("AVX2", "AVX512") else [])


def _build_directory() -> Path | None:
    try:
        from torch.utils import cpp_extension
        return Path(cpp_extension._get_build_directory(NAME, verbose=False))  # made if missing
    except Exception:
        return None


def claim_build(build: Path):
    """Hold an flock on the build directory for this process's build (waiting while another
    process builds), and drop torch's `lock` file if one is there: the flock is released by the
    kernel when its holder dies, so once we hold it, any torch lock left is a killed build's,
    which torch's builder would otherwise wait on forever. Returns the held file (or None where
    flock does not exist); closing it releases the claim."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock alone
        return None
    held = open(build / "nanoseek.flock", "a")
    fcntl.flock(held, fcntl.LOCK_EX)
    (build / "lock").unlink(missing_ok=True)
    return held


def module():
    if "module" in _state:
        return _state["module"]
    mod = None
    if os.environ.get("NANOSEEK_NATIVE", "1") != "0":
        try:
            from torch.utils import cpp_extension
            build = _build_directory()
            held = claim_build(build) if build is not None else None
            try:
                if build is not None and not (build / f"{NAME}.so").exists():
                    print("nanoseek: building the native decode loop (once, ~30-70 s)", file=sys.stderr)
                mod = cpp_extension.load(name=NAME, sources=[str(SOURCE)], extra_cflags=_cflags(),
                                         extra_ldflags=["-fopenmp"], verbose=False)
            finally:
                if held is not None:
                    held.close()
        except Exception as e:  # no compiler, no headers, a build error: Python runs it instead
            print(f"nanoseek: native decode unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''});"
                  " decoding in Python", file=sys.stderr)
    _state["module"] = mod
    return mod
