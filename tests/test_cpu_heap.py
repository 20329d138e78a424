"""glibc's malloc thresholds fixed by nanoseek.cpu_heap: a repeated pattern of multi-MB tensors
(a prefill's activations, layer after layer) stops touching fresh pages every round."""

import os
import subprocess
import sys

import pytest

from nanoseek.cpu_heap import glibc

PATTERN = """
import resource, sys, torch
from nanoseek.cpu_heap import keep_freed_memory
print(keep_freed_memory())
def one_step():  # tensors of 4-13 MiB, a dozen alive at once, all freed at the end
    ts = []
    for i in range(12):
        t = torch.empty((4 + 3 * (i % 4)) << 20, dtype=torch.uint8)
        t.fill_(1)
        ts.append(t)
one_step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    one_step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def faults(keep: bool) -> tuple[str, int]:
    env = dict(os.environ, NANOSEEK_KEEP_HEAP="1" if keep else "0")
    out = subprocess.run([sys.executable, "-c", PATTERN], env=env, capture_output=True, text=True, check=True)
    applied, count = out.stdout.split()
    return applied, int(count)


@pytest.mark.skipif(glibc() is None, reason="glibc's malloc only")
def test_fixed_thresholds_stop_the_page_faults():
    (off, base), (on, kept) = faults(False), faults(True)
    assert (off, on) == ("False", "True")
    # 4 rounds of ~100 MiB: glibc's defaults re-fault tens of thousands of pages; kept, a few
    assert base > 10_000 and kept * 3 < base, (base, kept)
