"""FastIF candidates: chunked running top-k equals a brute-force sort; candidate scores equal the dense matrix."""

import pytest
import torch

import tinfluence as ti


def _inputs(params, batch):
    return batch[0]


def _penultimate(params, batch):
    return batch[0] @ params["weight"].T + params["bias"]


@pytest.mark.parametrize("features_fn", [_inputs, _penultimate])
def test_knn_matches_brute_force(digits_lr, features_fn):
    train, test = ti.take(digits_lr.train, slice(0, 300)), ti.take(digits_lr.test, slice(0, 40))
    got = ti.knn_candidates(features_fn, digits_lr.params, train, test, k=25, chunk_size=37)
    d = torch.cdist(features_fn(digits_lr.params, test), features_fn(digits_lr.params, train))
    expected = torch.sort(d, dim=1, stable=True).indices[:, :25]
    assert got.dtype == torch.long and got.shape == (40, 25)
    assert torch.equal(got, expected)


def test_knn_breaks_ties_by_lower_id():
    train = (torch.tensor([[1.0], [0.0], [1.0], [0.0], [-1.0]]),)
    test = (torch.tensor([[0.0], [1.0]]),)
    got = ti.knn_candidates(_inputs, {"w": torch.zeros(1)}, train, test, k=3, chunk_size=2)
    assert got.tolist() == [[1, 3, 0], [0, 2, 1]]


def test_candidate_scores_index_the_dense_matrix(digits_lr):
    train, test = ti.take(digits_lr.train, slice(0, 300)), ti.take(digits_lr.test, slice(0, 7))
    ihvp = ti.direct(ti.hessian(digits_lr.objective(train), digits_lr.params), damping=1e-3)
    dense = ti.influence(digits_lr.loss, digits_lr.params, train, test, ihvp=ihvp)
    cand = ti.knn_candidates(_inputs, digits_lr.params, train, test, k=30)
    cand[0, :2] = torch.tensor([299, 299])   # repeated ids and the last id
    got = ti.influence(digits_lr.loss, digits_lr.params, train, test, ihvp=ihvp, candidates=cand, chunk_size=16)
    torch.testing.assert_close(got, dense.gather(1, cand), rtol=1e-12, atol=1e-15)


def test_bad_k_features_and_candidates(digits_lr):
    train, test = ti.take(digits_lr.train, slice(0, 20)), ti.take(digits_lr.test, slice(0, 3))
    with pytest.raises(ValueError, match=r"ti.knn_candidates: `k` must be an int in \[1, 20\]; got 21"):
        ti.knn_candidates(_inputs, digits_lr.params, train, test, k=21)
    with pytest.raises(ValueError, match=r"ti.knn_candidates: `features_fn` must return a \[B, F\] tensor .* got shape \[3\]"):
        ti.knn_candidates(lambda p, b: b[1], digits_lr.params, train, test, k=2)
    ihvp = lambda v: v  # noqa: E731
    with pytest.raises(ValueError, match=r"ti.influence: `candidates` must be an integer tensor \[n_test=3, k\]"):
        ti.influence(digits_lr.loss, digits_lr.params, train, test, ihvp=ihvp, candidates=torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"ti.influence: `candidates` must hold training ids in \[0, 20\); got values in \[0, 20\]"):
        ti.influence(digits_lr.loss, digits_lr.params, train, test, ihvp=ihvp, candidates=torch.tensor([[0], [20], [1]]))
