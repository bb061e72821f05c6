"""Kernels against independent references: autograd loops, finite differences, dense matrices."""

import pytest
import torch
import torch.nn.functional as F
from models import build, cases
from torch import nn

import tinfluence as ti
from tinfluence import tree as tr
from tinfluence.testing import loop_grads


@pytest.mark.parametrize("case", cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_per_example_grads_equal_autograd_loop(case, chunk_size):
    _, params, loss, data = build(case)
    G = ti.per_example_grads(loss, params, data, chunk_size=chunk_size)
    expected = loop_grads(loss, params, data)
    for k in params:
        assert G[k].shape == (ti.num_examples(data), *params[k].shape)
        torch.testing.assert_close(G[k], expected[k], rtol=0, atol=1e-10)


def _mlp_objective(chunk_size=None, l2=1e-2):
    _, params, loss, data = build(cases()[1])
    return ti.objective(loss, data, l2=l2, chunk_size=chunk_size), params


@pytest.mark.parametrize("cache", [True, False])
def test_hvp_equals_dense_hessian_columns_and_finite_differences(cache, generator):
    R, params = _mlp_objective(chunk_size=5)
    Hv = ti.hvp(R, params, cache=cache)
    H = ti.hessian(R, params)
    v = tr.random_like(params, generator=generator)
    torch.testing.assert_close(tr.ravel(Hv(v)), H @ tr.ravel(v), rtol=1e-10, atol=1e-12)
    # a column of the dense Hessian, computed independently by torch.autograd.functional
    flat = tr.ravel(params)
    H_ref = torch.autograd.functional.hessian(lambda x: R(tr.unravel(x, params)), flat)
    torch.testing.assert_close(H, H_ref, rtol=1e-10, atol=1e-12)
    e3 = tr.unravel(torch.eye(flat.numel())[3], params)
    torch.testing.assert_close(tr.ravel(Hv(e3)), H_ref[:, 3], rtol=1e-10, atol=1e-12)
    # central differences of the gradient along v
    grad = torch.func.grad(R)
    eps = 1e-5
    fd = tr.scale(1 / (2 * eps), tr.sub(grad(tr.add_scaled(params, eps, v)), grad(tr.add_scaled(params, -eps, v))))
    torch.testing.assert_close(tr.ravel(Hv(v)), tr.ravel(fd), rtol=1e-7, atol=1e-9)
    # symmetry <u, Hv> = <Hu, v>
    u = tr.random_like(params, generator=generator)
    torch.testing.assert_close(tr.vdot(u, Hv(v)), tr.vdot(Hv(u), v), rtol=1e-12, atol=1e-14)


def test_batched_hvp_equals_loop_and_is_independent_of_chunk_size(generator):
    R5, params = _mlp_objective(chunk_size=5)
    R_all, _ = _mlp_objective(chunk_size=None)
    V = tr.random_like(params, generator=generator, batch=(4,))
    batched = ti.hvp(R5, params)(V)
    looped = tr.stack([ti.hvp(R5, params)(v) for v in tr.unstack(V)])
    torch.testing.assert_close(tr.ravel(batched, batch_ndim=1), tr.ravel(looped, batch_ndim=1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(tr.ravel(ti.hvp(R_all, params)(V), batch_ndim=1), tr.ravel(batched, batch_ndim=1), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(R5(params), R_all(params), rtol=1e-13, atol=0)


def test_hvp_of_plain_function(generator):
    A = torch.randn(5, 5, generator=generator)
    A = A @ A.T
    f = lambda p: 0.5 * p["x"] @ A @ p["x"] + p["x"].sin().sum()  # noqa: E731
    params = {"x": torch.randn(5, generator=generator)}
    v = {"x": torch.randn(5, generator=generator)}
    expected = A @ v["x"] - params["x"].sin() * v["x"]
    torch.testing.assert_close(ti.hvp(f, params)(v)["x"], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ti.hessian(f, params), A - torch.diag(params["x"].sin()), rtol=1e-12, atol=1e-12)


def _ggn_setup(model, chunk_size=None):
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    apply, params = ti.functionalize(model.double())
    predict = lambda p, b: apply(p, b[0])  # noqa: E731
    out_loss = lambda o, b: F.cross_entropy(o, b[1], reduction="none")  # noqa: E731
    return apply, params, (X, y), predict, out_loss


def test_ggn_equals_dense_jacobian_form():
    apply, params, data, predict, out_loss = _ggn_setup(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)))
    GN = ti.to_dense(ti.ggn_vp(predict, params, data, output_loss=out_loss, l2=0.1, chunk_size=7), params)
    flat = tr.ravel(params)
    X, y = data
    J = torch.autograd.functional.jacobian(lambda x: apply(tr.unravel(x, params), X), flat)  # [n, C, P]
    probs = apply(params, X).softmax(-1)
    H_out = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]                # [n, C, C]
    dense = torch.einsum("ncp,ncd,ndq->pq", J, H_out, J) / X.shape[0] + 0.1 * torch.eye(flat.numel())
    torch.testing.assert_close(GN, dense, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(GN).min() > 0


@pytest.mark.parametrize("cache", [True, False])
def test_ggn_equals_hessian_for_linear_model(cache, generator):
    _, params, data, predict, out_loss = _ggn_setup(nn.Linear(4, 3))
    loss = lambda p, b: out_loss(predict(p, b), b)  # noqa: E731
    GNv = ti.ggn_vp(predict, params, data, output_loss=out_loss, l2=1e-2, chunk_size=6, cache=cache)
    H = ti.hessian(ti.objective(loss, data, l2=1e-2), params)
    V = tr.random_like(params, generator=generator, batch=(3,))
    torch.testing.assert_close(tr.ravel(GNv(V), batch_ndim=1), tr.ravel(V, batch_ndim=1) @ H.T, rtol=1e-10, atol=1e-12)


def test_scalar_loss_is_rejected_with_advice():
    _, params, loss, data = build(cases()[0])
    mean_loss = lambda p, b: loss(p, b).mean()  # noqa: E731
    with pytest.raises(ValueError, match=r"ti.objective: `loss` must return one value per example, shape \[12\].*returned shape \[\]"):
        ti.objective(mean_loss, data)(params)
    with pytest.raises(ValueError, match=r"ti.per_example_grads: `loss` must return one value per example"):
        ti.per_example_grads(mean_loss, params, data)


def test_bad_data_and_params_are_rejected():
    _, params, loss, (X, y) = build(cases()[0])
    with pytest.raises(ValueError, match=r"`data` leaves must share one leading \(example\) axis; got \(0,\): 12, \(1,\): 11"):
        ti.objective(loss, (X, y[:-1]))
    with pytest.raises(ValueError, match="`data` is empty"):
        ti.objective(loss, (X[:0], y[:0]))
    with pytest.raises(ValueError, match="`l2` must be >= 0"):
        ti.objective(loss, (X, y), l2=-1.0)
    with pytest.raises(TypeError, match=r"`params` leaf \('bias',\) must be floating point"):
        ti.hvp(ti.objective(loss, (X, y)), dict(params, bias=torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="non-finite"):
        ti.per_example_grads(loss, dict(params, bias=torch.full((3,), float("inf"))), (X, y))


def test_objective_is_mean_loss_plus_half_l2():
    _, params, loss, data = build(cases()[0])
    R = ti.objective(loss, data, l2=0.3, chunk_size=5)
    expected = loss(params, data).mean() + 0.15 * sum((p ** 2).sum() for p in params.values())
    torch.testing.assert_close(R(params), expected, rtol=1e-13, atol=0)


def test_from_loader_and_chunks():
    X, y = torch.randn(10, 2), torch.arange(10)
    ds = torch.utils.data.TensorDataset(X, y)
    data = ti.from_loader(torch.utils.data.DataLoader(ds, batch_size=3))
    assert torch.equal(data[0], X) and torch.equal(data[1], y)
    assert torch.equal(ti.from_loader(ds)[1], y)
    sizes = [ti.num_examples(c) for c in ti.chunks((X, y), 4)]
    assert sizes == [4, 4, 2]
    with pytest.raises(ValueError, match="`size` must be None or an int >= 1"):
        next(ti.chunks((X, y), 0))
