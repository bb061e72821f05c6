"""CUDA float64 gives CPU float64's numbers (skipped without a GPU)."""

import pytest
import torch

import tinfluence as ti

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _to(tree, device):
    return ti.tree.map(lambda t: t.to(device), tree)


@pytest.fixture(scope="module")
def problem(digits_lr):
    train, test = ti.take(digits_lr.train, slice(0, 300)), ti.take(digits_lr.test, slice(0, 5))
    return digits_lr, train, test


def _run(lr, params, train, test):
    R = lr.objective(train)
    v = ti.tree.map(torch.ones_like, params)
    ihvp = ti.cg(ti.hvp(R, params), damping=1e-3, tol=1e-12, maxiter=500)
    return {
        "grads": ti.ravel(ti.per_example_grads(lr.loss, params, train), batch_ndim=1),
        "hvp": ti.ravel(ti.hvp(R, params)(v)),
        "cg_influence": ti.influence(lr.loss, params, train, test, ihvp=ihvp),
        "tracin": ti.tracin(lr.loss, [(params, 0.5)], train, test),
    }


def test_cuda_float64_equals_cpu(problem):
    lr, train, test = problem
    cpu = _run(lr, lr.params, train, test)
    cuda = _run(lr, _to(lr.params, "cuda"), _to(train, "cuda"), _to(test, "cuda"))
    for name, value in cpu.items():
        assert cuda[name].device.type == "cuda" and cuda[name].dtype == torch.float64
        torch.testing.assert_close(cuda[name].cpu(), value, rtol=1e-9, atol=1e-12 * float(value.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")
