"""EmpiricalIF against its small-radius limit (gradient dot products), a quadratic loss in closed
form, and the sphere average; the reverse check against the same limit."""

import math

import pytest
import torch
from models import class0_probability

import tinfluence as ti


@pytest.fixture(scope="module")
def case(digits_lr):
    """The trained digits model (P = 650) on 120 training and 4 test points."""
    return digits_lr.loss, digits_lr.params, ti.take(digits_lr.train, slice(0, 120)), ti.take(digits_lr.test, slice(0, 4))


def test_small_radius_limit_is_grad_dot_at_second_order(case):
    loss, params, train, test = case
    dot = ti.grad_dot(loss, params, train, test)
    radii = [0.02, 0.01, 0.005, 0.0025]
    errors = []
    for r in radii:
        scores = ti.empirical_if(loss, params, train, test, radius=r, chunk_size=50)
        errors.append(((scores / r**2 - dot).abs().max() / dot.abs().max()).item())
        print(f"r={r:g}: max |score/r² − grad_dot| / max |grad_dot| = {errors[-1]:.3e}")
    slopes = [math.log(errors[i] / errors[i + 1]) / math.log(radii[i] / radii[i + 1]) for i in range(len(radii) - 1)]
    print("observed orders:", [f"{s:.3f}" for s in slopes])
    assert all(1.9 <= s <= 2.1 for s in slopes)
    assert errors[-1] < 1e-3


def test_quadratic_loss_closed_form(generator):
    # ℓ_i(θ) = ½ (x̃_iᵀθ − y_i)² is exactly quadratic: with u_j = g_j/‖g_j‖, ΔL±_j = ±r a_j + r² b_j/2 and
    # Δℓ±_i = ±r α_ij + r² β_ij/2, so the ascent and descent products differ only in the sign of their
    # odd (r³) term and their mean is exactly r² a_j α_ij + r⁴ b_j β_ij / 4.
    X = torch.randn(30, 5, generator=generator)
    y = torch.randn(30, generator=generator)
    params = {"w": torch.randn(5, generator=generator), "c": torch.randn(1, generator=generator)}

    def loss(p, batch):
        return 0.5 * (batch[0] @ p["w"] + p["c"] - batch[1]) ** 2

    train, test = (X[:24], y[:24]), (X[24:], y[24:])
    Xt = lambda x: torch.cat([torch.ones(len(x), 1), x], 1)  # noqa: E731  x̃ in ravel order (c, w)
    theta = torch.cat([params["c"], params["w"]])
    G = lambda data: (Xt(data[0]) @ theta - data[1])[:, None] * Xt(data[0])  # noqa: E731
    U = G(test) / G(test).norm(dim=1, keepdim=True)  # [n_test, P]
    a = G(test).norm(dim=1)[:, None]
    b = ((Xt(test[0]) * U).sum(1) ** 2)[:, None]
    alpha = U @ G(train).T
    beta = (U @ Xt(train[0]).T) ** 2
    r = 0.7
    expected = r**2 * a * alpha + r**4 * b * beta / 4
    torch.testing.assert_close(ti.empirical_if(loss, params, train, test, radius=r), expected, rtol=1e-10, atol=1e-12)


def test_sphere_average_approaches_grad_dot_over_P(case, generator):
    loss, params, train, test = case
    P = ti.tree.size(params)
    r = 1e-3
    dot = ti.grad_dot(loss, params, train, test)
    scale = ti.grad_dot(loss, params, test, test).diagonal().sqrt()[:, None] * \
        ti.grad_dot(loss, params, train, train).diagonal().sqrt()[None, :]  # ‖g_test‖‖g_z‖
    errors = {}
    for m in (64, 512, 4096):
        scores = ti.empirical_if(loss, params, train, test, radius=r, directions=m, generator=generator)
        errors[m] = ((scores * P / r**2 - dot) / scale).abs().max().item()
        print(f"m={m}: max |P·score/r² − grad_dot| / (‖g_test‖‖g_z‖) = {errors[m]:.4f}   (1/sqrt(m) = {m ** -0.5:.4f})")
    # One direction's product (P/r²)·ΔL·Δℓ has standard deviation ≈ ‖g_test‖‖g_z‖ (≤ √2 of it),
    # so the mean of m errs by about 1/√m; the max over 480 entries stays below 5/√m.
    assert errors[4096] < 5 / math.sqrt(4096)
    assert errors[4096] < errors[64]


def test_sphere_same_generator_same_scores_and_not_advanced(case):
    loss, params, train, test = case
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    a = ti.empirical_if(loss, params, train, test, directions=8, generator=g)
    b = ti.empirical_if(loss, params, train, test, directions=8, generator=g, chunk_size=33)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * a.abs().max().item())
    assert torch.equal(a, ti.empirical_if(loss, params, train, test, directions=8, generator=g))
    assert torch.equal(g.get_state(), state)


def test_chunk_size_does_not_change_scores(case):
    loss, params, train, test = case
    whole = ti.empirical_if(loss, params, train, test)
    # Loss differences are exact to rounding of the losses (~1e-16 relative); entries near 0 get that absolutely.
    torch.testing.assert_close(ti.empirical_if(loss, params, train, test, chunk_size=17), whole,
                               rtol=1e-10, atol=1e-12 * whole.abs().max().item())


def test_reverse_check_matches_its_limit_and_the_forward_scores(digits_lr):
    loss, params, train = digits_lr.loss, digits_lr.params, digits_lr.train
    point = ti.take(digits_lr.test, slice(3, 4))
    r = 1e-3
    scores = ti.empirical_if(loss, params, train, point, radius=r)[0]  # [n_train]
    report = ti.reverse_check(loss, params, train, point, scores, ratio=0.01, radius=r)
    k = 10
    order = torch.argsort(scores, descending=True)
    assert torch.equal(report.indices, torch.cat([order[:k], order.flip(0)[:k]]))
    torch.testing.assert_close(report.scores, scores[report.indices])
    dot = ti.grad_dot(loss, params, ti.take(train, report.indices), point)[0]
    torch.testing.assert_close(report.reverse_scores / r**2, dot, rtol=1e-4, atol=1e-8)
    print(f"reverse check: correlation {report.correlation:.6f}, sign agreement {report.sign_agreement:.2f}")
    assert report.correlation > 0.999
    assert report.sign_agreement == 1.0


def test_errors(case):
    loss, params, train, test = case
    with pytest.raises(ValueError, match=r"ti.empirical_if: `radius` must be > 0; got 0"):
        ti.empirical_if(loss, params, train, test, radius=0)
    with pytest.raises(ValueError, match=r"ti.empirical_if: `directions` needs an explicit `generator`"):
        ti.empirical_if(loss, params, train, test, directions=4)
    with pytest.raises(ValueError, match=r"ti.empirical_if: `directions` must be an int >= 1"):
        ti.empirical_if(loss, params, train, test, directions=0, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"ti.empirical_if: `generator` is only used with `directions`"):
        ti.empirical_if(loss, params, train, test, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"ti.empirical_if: `loss` must return one value per example"):
        ti.empirical_if(lambda p, b: loss(p, b).sum(), params, train, test)
    scores = torch.zeros(120)
    with pytest.raises(ValueError, match=r"ti.reverse_check: `test_point` must hold exactly one example .* got 4"):
        ti.reverse_check(loss, params, train, test, scores)
    one = ti.take(test, slice(0, 1))
    with pytest.raises(ValueError, match=r"ti.reverse_check: `scores` must have shape \[n_train\] = \[120\] .* got \(4, 120\)"):
        ti.reverse_check(loss, params, train, one, torch.zeros(4, 120))
    with pytest.raises(ValueError, match=r"ti.reverse_check: `ratio` must be in \(0, 0.5\]; got 0.7"):
        ti.reverse_check(loss, params, train, one, scores, ratio=0.7)


# --- a test measure of its own: the test side perturbs along ∇m and measures m's change --------------------

@pytest.fixture(scope="module")
def measured(digits_lr, case):
    _, _, _, test = case
    return class0_probability(digits_lr.apply), {"x": test[0], "w": torch.linspace(0.5, 2.0, ti.num_examples(test))}


def test_measure_ascent_descent_equals_a_loop_over_test_points(case, measured):
    """Reference, one test point at a time: u = ∇m/‖∇m‖ (torch.func.grad), θ± = θ ± r·u,
    score = ½ Σ_± (m(θ±) − m(θ))·(ℓ(z; θ±) − ℓ(z; θ))."""
    loss, params, train, _ = case
    measure, test = measured
    r = 0.05
    rows = []
    for j in range(ti.num_examples(test)):
        point = ti.take(test, slice(j, j + 1))
        one = lambda p, point=point: measure(p, point)[0]  # noqa: E731
        g = torch.func.grad(one)(params)
        u = ti.tree.scale(1 / ti.ravel(g).norm(), g)
        row = 0
        for sign in (1.0, -1.0):
            moved = ti.tree.add_scaled(params, sign * r, u)
            row = row + 0.5 * (one(moved) - one(params)) * (loss(moved, train) - loss(params, train))
        rows.append(row)
    expected = torch.stack(rows)
    got = ti.empirical_if(loss, params, train, test, radius=r, measure=measure, chunk_size=50)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))


def test_measure_sphere_is_linear_in_the_measure(case, measured):
    """The shared directions do not depend on the measure, so m = w·ℓ scales each row by w."""
    loss, params, train, test = case
    w = measured[1]["w"]
    weighted = lambda p, b: b["w"] * loss(p, (b["x"], b["y"]))  # noqa: E731
    dict_test = {"x": test[0], "y": test[1], "w": w}
    g = torch.Generator().manual_seed(4)
    for kw in (dict(directions=16, generator=g), {}):
        plain = ti.empirical_if(loss, params, train, test, radius=1e-2, **kw)
        got = ti.empirical_if(loss, params, train, dict_test, radius=1e-2, measure=weighted, **kw)
        torch.testing.assert_close(got, w[:, None] * plain, rtol=1e-8, atol=1e-10 * float(plain.abs().max()))


def test_measure_errors(case, measured):
    loss, params, train, test = case
    measure, dict_test = measured
    with pytest.raises(TypeError, match=r"^ti.empirical_if: `measure` must be a function \(params, batch\) -> "
                                        r"Tensor\[B\]; got 3"):
        ti.empirical_if(loss, params, train, test, measure=3)
    with pytest.raises(ValueError, match=r"^ti.empirical_if: `measure` must return one value per example"):
        ti.empirical_if(loss, params, train, dict_test, measure=lambda p, b: measure(p, b).sum())
    with pytest.raises(ValueError, match=r"^ti.empirical_if: `test` must have the structure of `train`"):
        ti.empirical_if(loss, params, train, dict_test)
