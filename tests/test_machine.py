"""kernels/machine.py: what the benchmarks record about the machine and the environment their timings ran in."""

import pytest
import torch

from kernels.machine import TIMING_VARIABLES, device_name, environment_line, timing_environment


def test_only_the_timing_variables_are_recorded_in_their_order():
    environ = {"OMP_NUM_THREADS": "1", "HOME": "/root", "THP_MEM_ALLOC_ENABLE": "1", "SECRET_TOKEN": "x",
               "PATH": "/usr/bin"}
    assert list(timing_environment(environ).items()) == [("THP_MEM_ALLOC_ENABLE", "1"), ("OMP_NUM_THREADS", "1")]
    assert environment_line(environ) == "environment: THP_MEM_ALLOC_ENABLE=1, OMP_NUM_THREADS=1"


def test_preloaded_libraries_are_named_without_their_paths():
    environ = {"LD_PRELOAD": "/opt/x/lib/libjemalloc.so.2:/usr/lib/libiomp5.so /tmp/libtcmalloc.so"}
    assert timing_environment(environ) == {"LD_PRELOAD": "libjemalloc.so.2 libiomp5.so libtcmalloc.so"}


def test_an_empty_environment_says_so():
    assert timing_environment({}) == {}
    assert environment_line({}).startswith("environment: none of the timing variables set")


def test_every_variable_is_named_once():
    assert len(set(TIMING_VARIABLES)) == len(TIMING_VARIABLES)
    assert all(name == name.strip() and " " not in name for name in TIMING_VARIABLES)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_cpu_is_named_with_the_threads_torch_uses(threads):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert device_name("cpu").endswith(f"cores, {threads} torch threads)")
        assert device_name(torch.device("cpu")).startswith("CPU (")
    finally:
        torch.set_num_threads(before)
