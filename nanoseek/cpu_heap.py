"""Keep freed tensor memory in the process heap (glibc Linux), so big CPU steps do not re-fault it.

glibc serves a large malloc by mmap (unmapped again on free), and returns the free top of its
heap to the OS once that exceeds a trim threshold; both thresholds move with what the process
has allocated so far. A 4,096-token prefill allocates and frees multi-MB activations layer after
layer, and under the moving thresholds each such step touches fresh pages again: ~580K minor
page faults (~2.3 GB) a step for SmolLM2-135M's 32 x 128-token prefill, 1-2 s of a 4-5 s step on
a 2-vCPU machine. Fixed thresholds stop that (the same prefill: ~0 faults, ~3.2 s):
  - M_MMAP_THRESHOLD 32 MiB (glibc's largest): tensors up to 32 MiB come from the heap;
  - M_TRIM_THRESHOLD 256 MiB: up to that much freed heap top is kept for the next step.
The cost is that the process may hold up to ~256 MiB more than it uses between steps. vLLM and
IPEX get the same effect on CPU by preloading tcmalloc or jemalloc; this needs no preload.

`keep_freed_memory()` is called by the engine and the trainer when they run on CPU; it is
process-wide, done once, and skipped with NANOSEEK_KEEP_HEAP=0 or off glibc.
"""

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20
_done: list = []


def glibc():
    """The process's C library where it is glibc on Linux, else None (musl's mallopt takes these
    parameters but ignores them)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Fix glibc's malloc thresholds for this process (once); True where they are set."""
    if not _done:
        libc = glibc() if os.environ.get("NANOSEEK_KEEP_HEAP", "1") != "0" else None
        _done.append(libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
                     and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    return _done[0]
