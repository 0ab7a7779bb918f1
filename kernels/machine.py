"""What a timing was measured on, for the first line and the JSON of every benchmark (`python -m kernels.bench`,
`python -m dp.bench`, `python -m dp.breakdown`): the device, torch's CPU threads, and the environment variables
that change how fast the same code runs.

Those variables are inherited by a benchmark's subprocesses, so they act on every method of one run, but not
necessarily on every method alike: a reader of a ratio must see them (README, Speed of the DP step, has a measured
case: THP_MEM_ALLOC_ENABLE=1 slowed the non-private step of `python -m dp.bench` and not ours).

Only names and values of the variables in TIMING_VARIABLES are recorded; library paths (LD_PRELOAD) are reduced
to file names, so no path of the machine enters a results file.
"""

import os

import torch

TIMING_VARIABLES = (
    "THP_MEM_ALLOC_ENABLE",  # torch's CPU allocator: transparent huge pages for buffers >= 2 MiB
    "LD_PRELOAD",  # another malloc (jemalloc, tcmalloc) or an OpenMP runtime
    "GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES", "KMP_AFFINITY", "KMP_BLOCKTIME",
    "ATEN_CPU_CAPABILITY",  # torch's vector instruction set (default, avx2, avx512)
    "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA",
    "PYTORCH_CUDA_ALLOC_CONF", "CUDA_LAUNCH_BLOCKING",
)


def timing_environment(environ=None):
    """{name: value} of the TIMING_VARIABLES set in `environ` (default os.environ), in TIMING_VARIABLES order;
    LD_PRELOAD's entries as their file names."""
    environ = os.environ if environ is None else environ
    found = {}
    for name in TIMING_VARIABLES:
        if name in environ:
            value = environ[name]
            if name == "LD_PRELOAD":
                value = " ".join(os.path.basename(p) for p in value.replace(":", " ").split())
            found[name] = value
    return found


def device_name(device):
    """'NVIDIA H100 ...' for a CUDA device, else 'CPU (n cores, t torch threads)' (t as set at the call)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def environment_line(environ=None):
    """'environment: NAME=value, ...' or 'environment: none of the timing variables set' (kernels/machine.py)."""
    found = timing_environment(environ)
    if not found:
        return "environment: none of the timing variables set (kernels/machine.py TIMING_VARIABLES)"
    return "environment: " + ", ".join(f"{k}={v}" for k, v in found.items())
