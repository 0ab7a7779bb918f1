"""Named stretches of a DP step, for profiles (`python -m dp.breakdown`), and free when no profiler records.

dp/bench.py (the non-private step), dp/step.py and dp/bookkeeping.py wrap their phases in `phase(name)`; under
`torch.profiler.profile` each becomes a `record_function` range, whose time the profile sums by name. The names
are fixed strings: no data value, batch size or norm enters a profile through them. A profile's timings of a
private run are another matter (a step's time grows with its sampled batch size; the threat model leaves timing
out): profile benchmarks, never release a profile of a private run.
"""

import contextlib

import torch
from torch.profiler import record_function


def phase(name):
    """`torch.profiler.record_function(name)` while a profiler records, else a no-op context. An idle range is not
    free: the ~190 ranges of one book-keeping micro-batch of 128 cost about 15 ms there (quick preset, 1 thread)."""
    if torch.autograd.profiler._is_profiler_enabled:
        return record_function(name)
    return contextlib.nullcontext()
