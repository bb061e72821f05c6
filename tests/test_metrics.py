"""Agreement metrics against scipy.stats, and the linear datamodeling score on digits."""

import pytest
import scipy.stats
import torch

import tinfluence as ti


@pytest.fixture
def rows(generator):
    x = torch.randn(4, 30, generator=generator)
    y = 0.5 * x + torch.randn(4, 30, generator=generator)
    return x, y


def test_pearson_matches_scipy_per_row(rows):
    x, y = rows
    expected = torch.tensor([scipy.stats.pearsonr(a.numpy(), b.numpy())[0] for a, b in zip(x, y)])
    torch.testing.assert_close(ti.pearson(x, y), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ti.pearson(x[0], y[0]), expected[0], rtol=1e-12, atol=1e-12)


def test_pearson_ignores_scale_and_offset(rows):
    x, y = rows
    torch.testing.assert_close(ti.pearson(3.0 * x - 7.0, y), ti.pearson(x, y), rtol=1e-12, atol=1e-12)


def test_spearman_matches_scipy_with_ties(generator):
    x = torch.randint(0, 5, (3, 40), generator=generator).to(torch.float64)   # many ties
    y = x + torch.randint(0, 3, (3, 40), generator=generator)
    expected = torch.tensor([scipy.stats.spearmanr(a.numpy(), b.numpy())[0] for a, b in zip(x, y)])
    torch.testing.assert_close(ti.spearman(x, y), expected, rtol=1e-12, atol=1e-12)


def test_spearman_matches_scipy_without_ties(rows):
    x, y = rows
    expected = torch.tensor([scipy.stats.spearmanr(a.numpy(), b.numpy())[0] for a, b in zip(x, y)])
    torch.testing.assert_close(ti.spearman(x, y), expected, rtol=1e-12, atol=1e-12)


def test_topk_overlap_counts_shared_top_magnitudes():
    scores = torch.tensor([5.0, -4.0, 3.0, 0.1, 0.2])
    actual = torch.tensor([-9.0, 0.0, 8.0, 7.0, 0.1])    # top-3 by magnitude: ids 0, 2, 3
    assert ti.topk_overlap(scores, actual, 3).item() == pytest.approx(2 / 3)   # scores' top-3: 0, 1, 2
    assert ti.topk_overlap(scores, actual, 5).item() == 1.0


def test_sign_agreement_overall_and_top_k():
    scores = torch.tensor([[5.0, -4.0, 3.0, 0.1]])
    actual = torch.tensor([[2.0, -1.0, -3.0, -0.2]])
    torch.testing.assert_close(ti.sign_agreement(scores, actual), torch.tensor([0.5]))
    torch.testing.assert_close(ti.sign_agreement(scores, actual, k=2), torch.tensor([1.0]))
    torch.testing.assert_close(ti.sign_agreement(scores, actual, k=3), torch.tensor([2 / 3]))


@pytest.mark.parametrize("call, match", [
    (lambda: ti.pearson(torch.zeros(3), torch.zeros(4)), r"ti.pearson: `scores` and `actual` must have the same shape; got \[3\] and \[4\]"),
    (lambda: ti.spearman(torch.zeros(1), torch.zeros(1)), r"ti.spearman: needs at least 2 values along the last axis; got shape \[1\]"),
    (lambda: ti.pearson(torch.tensor([1.0, float("nan")]), torch.zeros(2)), r"ti.pearson: `scores` has non-finite values"),
    (lambda: ti.topk_overlap(torch.zeros(4), torch.zeros(4), 5), r"ti.topk_overlap: `k` must be an int in \[1, 4\]; got 5. \(the number of values per row is 4.\)"),
    (lambda: ti.sign_agreement(torch.zeros(4), torch.zeros(4), k=0), r"ti.sign_agreement: `k` must be an int in \[1, 4\]; got 0"),
])
def test_metric_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _small_lr(digits_lr, n_train=200):
    """The digits model on a 200-point training subset (cheap retraining for LDS)."""
    train = ti.take(digits_lr.train, slice(0, n_train))
    test = ti.take(digits_lr.test, slice(0, 40))
    params = ti.minimize(digits_lr.objective(train), digits_lr.params, gtol=1e-9)
    return train, test, params


def _exact_influence(digits_lr, params, train, test):
    """(1/n) g_testᵀ H⁻¹ g_z from the dense Hessian: [n_test, n_train]."""
    H = ti.hessian(digits_lr.objective(train), params)
    G_train = ti.ravel(ti.per_example_grads(digits_lr.loss, params, train), batch_ndim=1)
    G_test = ti.ravel(ti.per_example_grads(digits_lr.loss, params, test), batch_ndim=1)
    return G_test @ torch.linalg.solve(H, G_train.T) / G_train.shape[0]


def test_lds_of_exact_influence_beats_random_scores(digits_lr, generator):
    train, test, params = _small_lr(digits_lr)
    train_fn = ti.lbfgs_trainer(digits_lr.loss, l2=digits_lr.l2, gtol=1e-7)
    exact = _exact_influence(digits_lr, params, train, test)
    noise = torch.randn(exact.shape, generator=torch.Generator().manual_seed(1))
    kw = dict(measure=digits_lr.loss, subsets=8, fraction=0.5, generator=generator, progress=False)
    good = ti.lds(train_fn, params, train, test, exact, **kw)
    rand = ti.lds(train_fn, params, train, test, noise, **kw)
    print(f"LDS exact influence {good.mean:.3f} [{good.low:.3f}, {good.high:.3f}]; "
          f"random scores {rand.mean:.3f} [{rand.low:.3f}, {rand.high:.3f}]")
    assert good.per_test.shape == (40,)
    assert good.low <= good.mean <= good.high
    assert good.low > rand.high + 0.2


def test_lds_same_generator_same_result_and_generator_untouched(digits_lr, generator):
    train, test, params = _small_lr(digits_lr, n_train=100)
    train_fn = ti.lbfgs_trainer(digits_lr.loss, l2=digits_lr.l2, gtol=1e-7)
    scores = _exact_influence(digits_lr, params, train, test)
    state = generator.get_state()
    kw = dict(measure=digits_lr.loss, subsets=3, generator=generator, progress=False)
    a = ti.lds(train_fn, params, train, test, scores, **kw)
    b = ti.lds(train_fn, params, train, test, scores, **kw)
    assert torch.equal(a.per_test, b.per_test)
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("kw, match", [
    (dict(subsets=2), r"ti.lds: `subsets` must be an int >= 3; got 2. \(at least 3 to rank subsets against each other\)"),
    (dict(fraction=1.0), r"ti.lds: `fraction` must be in \(0, 1\); got 1.0"),
    (dict(confidence=0.0), r"ti.lds: `confidence` must be in \(0, 1\); got 0.0"),
    (dict(scores=torch.zeros(3, 3)), r"ti.lds: `scores` must be \[n_test, n_train\] = \[5, 10\]; got \[3, 3\]"),
])
def test_lds_errors(digits_lr, generator, kw, match):
    train, test = ti.take(digits_lr.train, slice(0, 10)), ti.take(digits_lr.test, slice(0, 5))
    args = dict(scores=torch.zeros(5, 10), measure=digits_lr.loss, generator=generator, progress=False) | kw
    scores = args.pop("scores")
    with pytest.raises(ValueError, match=match):
        ti.lds(lambda p, d: p, digits_lr.params, train, test, scores, **args)
