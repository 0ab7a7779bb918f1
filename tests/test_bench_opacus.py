"""dp/bench_opacus.py, the parts that do not need Opacus (the bench's own smoke run, tests/test_bench.py, compares
Opacus's clipped sums with ours when Opacus is installed): which selected tensors Opacus is given, that the others
are frozen only while it runs, and the zero gradient of a tensor no backward reached."""

import argparse
import importlib.util

import pytest
import torch

from dp.bench import CROSS_ATTENTION_QK, SIGMA, build_setup
from dp.bench_opacus import on_forward_path, opacus_clipped_sum, opacus_params, opacus_step, thaw, zero_if_none

HAS_OPACUS = importlib.util.find_spec("opacus") is not None


@pytest.fixture
def setup():
    args = argparse.Namespace(preset="smoke", batch=4, physical_batch=2, dp_blocks=None, dp_lora=0)
    return build_setup(args, torch.device("cpu"))


def off_path(names):
    return [n for n in names if n.split(".", 2)[-1] in CROSS_ATTENTION_QK]


def test_the_forward_path_is_every_selected_tensor_but_the_cross_attention_queries_and_keys(setup):
    names = list(setup.task.params)
    reached = on_forward_path(setup)
    assert off_path(names)  # the smoke preset has transformer blocks, so the case is exercised
    assert reached == [n for n in names if n not in off_path(names)]


def test_opacus_gets_the_reached_tensors_and_thaw_restores_the_rest(setup):
    reached = on_forward_path(setup)
    given = opacus_params(setup)
    assert list(given) == reached
    frozen = [n for n, p in setup.task.params.items() if not p.requires_grad]
    assert frozen == off_path(list(setup.task.params)) and not set(frozen) & set(given)
    thaw(setup)
    assert all(p.requires_grad for p in setup.task.params.values())


def test_a_tensor_no_backward_reached_counts_as_zero():
    p = torch.nn.Parameter(torch.ones(3))
    assert torch.equal(zero_if_none(p), torch.zeros(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    copy = zero_if_none(p)
    assert torch.equal(copy, p.grad) and copy.data_ptr() != p.grad.data_ptr()


@pytest.mark.skipif(not HAS_OPACUS, reason="opacus is a benchmark-only dependency")
@pytest.mark.parametrize("method", ["c", "g"])
def test_opacus_steps_change_only_the_reached_tensors(setup, method):
    reached = set(on_forward_path(setup))
    before = {n: p.detach().clone() for n, p in setup.task.params.items()}
    opacus_step(setup, method, SIGMA)()
    changed = {n for n, p in setup.task.params.items() if not torch.equal(p, before[n])}
    assert changed == reached


@pytest.mark.skipif(not HAS_OPACUS, reason="opacus is a benchmark-only dependency")
def test_opacus_clipped_sums_of_both_modes_agree(setup):
    names = list(setup.task.params)
    hook, ghost = (opacus_clipped_sum(setup, m, 1e-3, names) for m in "cg")
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-9) for a, b in zip(hook, ghost))
    assert all(p.requires_grad for p in setup.task.params.values())  # thawed after each
