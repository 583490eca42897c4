"""Keep freed memory for the next batch in long batched jobs (export, calibration, verification).

PyTorch's CPU allocator takes every tensor from malloc. glibc hands out blocks above its mmap threshold (which
it raises to at most 32 MiB; one batch-16 activation of ResNet-18's stem is 51 MiB) as fresh mmaps that go back
to the OS on free, and trims the heap's free top above the trim threshold, so each batched forward pays a page
fault (and the kernel zeroing a page) for every 4 KiB of activation it writes. Raising both thresholds keeps
freed memory in the process for the next batch. `python -m export` of every format from the reference weights
(2 jobs, 2 cores): page faults 8.2-8.7 M -> 1.8 M and system time 27-34 -> 15-18 s on a Zen 4 EPYC, 28 -> 10 s on a
Zen 3; wall 161 -> 145 s on the Zen 3 (149 -> 145 s in one pair with this code), on the Zen 4 a median 137 -> 130 s
that the machine's own run-to-run spread (123-155 s) covers; peak RSS 2.5 -> 3.0 GB. Batch-1 latency does not
change (glibc's own threshold already covers batch-1 activations), and the benchmark's workers keep glibc's
defaults: their memory figures are what an app's process would see. Set CXR_DEFAULT_MALLOC=1 to keep glibc's
defaults everywhere.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks of 1 GiB and more still come from mmap
TRIM_THRESHOLD = (1 << 31) - 1  # the largest value mallopt takes: the heap's top is never trimmed below 2 GiB
OPT_OUT = "CXR_DEFAULT_MALLOC"


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process. Returns whether they were raised: False where
    the C library is not glibc (macOS, musl) or CXR_DEFAULT_MALLOC=1 asks for its defaults."""
    if os.environ.get(OPT_OUT) == "1" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
