"""grad_dot and grad_cos against gradients from an explicit per-example autograd loop."""

import pytest
import torch
from models import class0_probability, digits_mlp, loop_grad_rows

import tinfluence as ti


@pytest.fixture(scope="module")
def mlp(digits_lr):
    _, params, loss = digits_mlp(16)
    train = ti.take(digits_lr.train, slice(0, 60))
    test = ti.take(digits_lr.test, slice(0, 7))
    return loss, params, train, test


def test_grad_dot_matches_loop(mlp):
    loss, params, train, test = mlp
    expected = loop_grad_rows(loss, params, test) @ loop_grad_rows(loss, params, train).T
    torch.testing.assert_close(ti.grad_dot(loss, params, train, test), expected, rtol=1e-10, atol=1e-12)


def test_grad_cos_matches_loop(mlp):
    loss, params, train, test = mlp
    Gt, Gz = loop_grad_rows(loss, params, test), loop_grad_rows(loss, params, train)
    expected = (Gt / Gt.norm(dim=1, keepdim=True)) @ (Gz / Gz.norm(dim=1, keepdim=True)).T
    got = ti.grad_cos(loss, params, train, test)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert got.abs().max() <= 1 + 1e-12


def test_grad_cos_zero_gradient_gives_zero(mlp):
    loss, params, train, test = mlp
    weight = (torch.arange(ti.num_examples(train)) % 2).to(train[0].dtype)   # odd examples count, even have zero loss
    weighted = lambda p, b: loss(p, b[:2]) * b[2]  # noqa: E731
    cos = ti.grad_cos(weighted, params, (*train, weight), (*test, torch.ones(ti.num_examples(test))))
    assert torch.equal(cos[:, weight == 0], torch.zeros_like(cos[:, weight == 0]))
    torch.testing.assert_close(cos[:, weight == 1], ti.grad_cos(loss, params, ti.take(train, weight == 1), test), rtol=1e-12, atol=1e-14)


def test_chunk_size_does_not_change_scores(mlp):
    loss, params, train, test = mlp
    for method in (ti.grad_dot, ti.grad_cos):
        torch.testing.assert_close(method(loss, params, train, test, chunk_size=7), method(loss, params, train, test),
                                   rtol=1e-12, atol=1e-14)


def test_errors(mlp):
    loss, params, train, test = mlp
    with pytest.raises(ValueError, match=r"ti.grad_dot: `chunk_size` must be None or an int >= 1; got 0"):
        ti.grad_dot(loss, params, train, test, chunk_size=0)
    with pytest.raises(ValueError, match=r"ti.grad_cos: `test` leaves must share one leading \(example\) axis"):
        ti.grad_cos(loss, params, train, (test[0], test[1][:3]))
    with pytest.raises(TypeError, match=r"ti.grad_dot: `loss` must be a function"):
        ti.grad_dot(None, params, train, test)
    with pytest.raises(ValueError, match=r"ti.grad_dot: `loss` must return one value per example"):
        ti.grad_dot(lambda p, b: loss(p, b).mean(), params, train, test)


# --- a test measure of its own: ⟨∇m(z_test), ∇ℓ(z)⟩, with test data shaped unlike train ---------------------

@pytest.fixture(scope="module")
def measured(mlp):
    """The MLP's measure and a dict test set (x, weights w) for it."""
    apply, _, _ = digits_mlp(16)
    _, _, _, test = mlp
    return class0_probability(apply), {"x": test[0], "w": torch.linspace(0.5, 2.0, ti.num_examples(test))}


@pytest.mark.parametrize("factored", [False, True])
def test_measure_gradients_meet_training_gradients(mlp, measured, factored):
    loss, params, train, _ = mlp
    measure, test = measured
    Gm, Gz = loop_grad_rows(measure, params, test), loop_grad_rows(loss, params, train)          # reference: autograd loops
    dot = ti.grad_dot(loss, params, train, test, measure=measure, factored=factored, chunk_size=16)
    torch.testing.assert_close(dot, Gm @ Gz.T, rtol=1e-10, atol=1e-12)
    cos = ti.grad_cos(loss, params, train, test, measure=measure, factored=factored, chunk_size=16)
    expected = (Gm / Gm.norm(dim=1, keepdim=True)) @ (Gz / Gz.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(cos, expected, rtol=1e-10, atol=1e-12)


def test_measure_errors(mlp, measured):
    loss, params, train, test = mlp
    measure, dict_test = measured
    for method in (ti.grad_dot, ti.grad_cos):
        name = method.__name__
        with pytest.raises(TypeError, match=rf"^ti.{name}: `measure` must be a function \(params, batch\) -> "
                                            r"Tensor\[B\]; got 3"):
            method(loss, params, train, test, measure=3)
        with pytest.raises(ValueError, match=rf"^ti.{name}: `measure` must return one value per example"):
            method(loss, params, train, dict_test, measure=lambda p, b: measure(p, b).sum())
        with pytest.raises(ValueError, match=rf"^ti.{name}: `test` must have the structure of `train`"):
            method(loss, params, train, dict_test)                                       # no measure: test is like train
