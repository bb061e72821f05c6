"""The accuracy ladder's harness (benchmarks/ladder.py) on a tiny convex task.

Ground truth for the checks: the closed-form logistic-regression Hessian and gradients of
benchmarks/tasks.py (no tinfluence kernel), scipy's L-BFGS retraining and scipy.stats.spearmanr.
"""

import json
import os
import sys
from dataclasses import replace

import numpy as np
import pytest
import scipy.optimize
import scipy.stats
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import ladder as L
import tasks as T

TINY = replace(L.SPECS["digits-lr"], n_train=60, n_test=20, subsets=6, loo=4, epochs=2, every=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("ladder"))
    task, path = L.build_task(TINY, folder)
    records = L.ground_truth(TINY, folder, path, workers=1, progress=False)
    return task, records


def _exact_influence(task):
    """(1/n) g_test (H + l2 I)⁻¹ g_trainᵀ from the closed forms of tasks.py."""
    H = T.lr_hessian(task.state, task.train[0], task.l2)
    return T.solve_dense(H, T.lr_grads(task.state, task.test)) @ T.lr_grads(task.state, task.train).T / task.n_train


def _scipy_optimum(task, kept):
    """Test losses of the regularized optimum on the kept ids, by scipy's L-BFGS on the closed-form objective."""
    X, y = task.train[0][kept].numpy(), task.train[1][kept].numpy()
    c, d = 10, X.shape[1]
    Xb = np.hstack([X, np.ones((len(X), 1))])
    onehot = np.eye(c)[y]

    def f(theta):
        W = theta.reshape(c, d + 1)
        z = Xb @ W.T
        z -= z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        value = -(onehot * logp).sum() / len(X) + task.l2 / 2 * theta @ theta
        grad = ((np.exp(logp) - onehot).T @ Xb) / len(X) + task.l2 * W
        return value, grad.ravel()

    theta = scipy.optimize.minimize(f, np.zeros(c * (d + 1)), jac=True, method="L-BFGS-B",
                                    options={"gtol": 1e-12, "ftol": 1e-16, "maxiter": 10000}).x
    W = torch.tensor(theta.reshape(c, d + 1))
    state = {"weight": W[:, :d].contiguous(), "bias": W[:, d].contiguous()}
    p, _ = T._lr_parts(state, task.test[0])
    return -torch.log(p.gather(1, task.test[1][:, None])[:, 0])


def test_records_are_the_retrained_subsets(built):
    task, records = built
    removed = 0.5
    masks = L.draw_subsets(TINY.n_train, removed, TINY.subsets, L.subset_seed(removed))
    assert masks.sum(1).tolist() == [TINY.n_train // 2] * TINY.subsets
    for j in (0, 5):
        record = records[f"optimum/{removed:g}/{j}"]
        assert record["mask"] == L.mask_hash(masks[j])
        expected = _scipy_optimum(task, masks[j].nonzero()[:, 0])
        torch.testing.assert_close(torch.tensor(record["loss"], dtype=torch.float64), expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("removed", L.FRACTIONS)
def test_lds_of_exact_influence_matches_scipy(built, removed):
    task, records = built
    scores = _exact_influence(task)
    values = L.measured(TINY, records, "optimum", removed)                         # [n_test, m]
    result = L.lds(scores, values, removed=removed, seed=L.subset_seed(removed))
    masks = L.draw_subsets(TINY.n_train, removed, TINY.subsets, L.subset_seed(removed)).numpy()
    predicted = scores.numpy() @ (~masks).T.astype(np.float64)                      # Σ of the removed examples' scores
    per_test = np.array([scipy.stats.spearmanr(predicted[t], values[t].numpy()).statistic for t in range(TINY.n_test)])
    half = scipy.stats.norm.ppf(0.975) * per_test.std(ddof=1) / np.sqrt(TINY.n_test)
    np.testing.assert_allclose(result.per_test.numpy(), per_test, rtol=0, atol=1e-12)
    np.testing.assert_allclose([result.mean, result.low, result.high],
                               [per_test.mean(), per_test.mean() - half, per_test.mean() + half], rtol=0, atol=1e-12)
    assert float(result.mean) > 0.8          # exact influence predicts a convex model's retraining


def test_random_scores_have_an_interval_around_zero(built):
    _, records = built
    scores = torch.randn(TINY.n_test, TINY.n_train, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for removed in L.FRACTIONS:
        r = L.lds(scores, L.measured(TINY, records, "optimum", removed), removed=removed, seed=L.subset_seed(removed))
        assert float(r.low) < 0 < float(r.high)


def test_loo_correlations_match_scipy(built):
    task, records = built
    scores = _exact_influence(task)
    ids = L.loo_ids(TINY).tolist()
    base = np.array(records["loo/base"]["loss"])
    actual = np.stack([np.array(records[f"loo/{i}"]["loss"]) - base for i in ids], 1)
    p, s = L.loo_correlations(TINY, records, scores)
    np.testing.assert_allclose(p, scipy.stats.pearsonr(scores[:, ids].numpy().ravel(), actual.ravel()).statistic, atol=1e-12)
    np.testing.assert_allclose(s, scipy.stats.spearmanr(scores[:, ids].numpy().ravel(), actual.ravel()).statistic, atol=1e-12)
    assert p > 0.9


def _lines(folder):
    with open(os.path.join(folder, "ground-truth.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_cache_resumes_after_a_kill_without_duplicates(tmp_path, built):
    _, reference = built
    folder = str(tmp_path / "resumed")
    _, path = L.build_task(TINY, folder)
    L.ground_truth(TINY, folder, path, workers=2, limit=5, progress=False)
    assert len(_lines(folder)) == 1 + 5
    with open(os.path.join(folder, "ground-truth.jsonl"), "ab") as f:     # killed in the middle of a write
        f.write(b'{"job": "optimum/0.5/7", "mask": "0123')
    records = L.ground_truth(TINY, folder, path, workers=2, progress=False)
    lines = _lines(folder)
    jobs = [line["job"] for line in lines[1:]]
    assert lines[0] == {"identity": L.identity(TINY)}
    assert sorted(jobs) == sorted(name for name, _ in L.jobs(TINY))              # each model exactly once
    for name, record in records.items():                                       # the same numbers as an uninterrupted build
        np.testing.assert_allclose(record["loss"], reference[name]["loss"], rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="was written for"):
        L.ground_truth(replace(TINY, subsets=7), folder, path, workers=1, progress=False)


def _plain_sgd(task, seed, weights, pool):
    """torch.optim.SGD on the module, one model: the reference for the vmapped trainer."""
    spec = task.spec
    model = task.make_model(task.init_state(seed))
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, weight_decay=task.l2)
    g = torch.Generator().manual_seed(seed)
    X, y = task.train
    for _ in range(spec.epochs):
        for ids in pool[torch.randperm(len(pool), generator=g)].split(spec.batch):
            opt.zero_grad()
            (weights[ids] * torch.nn.functional.cross_entropy(model(X[ids]), y[ids], reduction="none")).mean().backward()
            opt.step()
    return model.state_dict()


def test_vmapped_sgd_matches_a_plain_training_loop():
    spec = replace(L.SPECS["digits-cnn"], n_train=64, n_test=8, epochs=2, batch=16)
    train, test = L.load_data(spec)
    task = L.LadderTask(spec.name, spec.kind, train, test, state={}, l2=spec.l2, info={"spec": L.asdict(spec)})
    task.state = task.init_state(0)
    n, everyone = spec.n_train, torch.arange(spec.n_train)
    weights = torch.ones(2, n, dtype=torch.float64)
    weights[1, [3, 40]] = 0                                            # same schedule, two examples weighted 0
    kept = torch.stack([torch.arange(0, n, 2), torch.arange(1, n, 2)])  # fresh seeds, half the data each
    cases = [(L.train_sgd(task, [0, 0], weights=weights), [(0, weights[0], everyone), (0, weights[1], everyone)]),
             (L.train_sgd(task, [5, 6], kept=kept), [(5, weights[0], kept[0]), (6, weights[0], kept[1])])]
    for states, references in cases:
        for state, (seed, w, pool) in zip(states, references):
            expected = _plain_sgd(task, seed, w, pool)
            for name in expected:
                torch.testing.assert_close(state[name], expected[name], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(cases[0][0][0]["5.weight"], cases[0][0][1]["5.weight"])     # the weights took effect


TINY_MLP = replace(L.SPECS["digits-mlp"], n_train=48, n_test=6, hidden=8, epochs=2, batch=16, subsets=4, loo=2)


@pytest.fixture(scope="module")
def tiny_mlp():
    train, test = L.load_data(TINY_MLP)
    task = L.LadderTask(TINY_MLP.name, TINY_MLP.kind, train, test, state={}, l2=TINY_MLP.l2, hidden=TINY_MLP.hidden,
                        info={"spec": L.asdict(TINY_MLP)})
    task.state = L.train_sgd(task, [0])[0]
    return task


def test_the_trajectory_entry_replays_the_same_schedule_ground_truth(tiny_mlp):
    """ti.training_run with the entry's settings ends where the harness's same-schedule trainer ends, for 0/1 weights."""
    import ladder_methods as LM
    task, spec = tiny_mlp, TINY_MLP
    run = LM.base_run(task)
    weights = torch.ones(spec.n_train, dtype=torch.float64)
    weights[[2, 30]] = 0
    expected = L.train_sgd(task, [0, 0], weights=torch.stack([torch.ones_like(weights), weights]))
    for got, want in zip((run.final_params(), run.replay(weights).final_params()), expected):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["kfac", "ekfac", "kfac-ggn", "ekfac-ggn", "trajectory", "compressed"])
def test_a_method_entry_runs_on_a_tiny_task(tiny_mlp, name):
    import ladder_methods as LM
    method = LM.REGISTRY[name]
    assert method.unavailable(tiny_mlp) is None
    scores = torch.as_tensor(method.fn(tiny_mlp))
    assert scores.shape == (TINY_MLP.n_test, TINY_MLP.n_train)
    assert torch.isfinite(scores).all() and scores.abs().max() > 0


@pytest.mark.slow
def test_a_partial_run_keeps_the_other_methods_rows(tmp_path):
    """--methods reruns only the named methods; the others' rows come from their cached results, unchanged."""
    import argparse
    args = argparse.Namespace(cache=str(tmp_path), workers=1, timeout=120, figures=str(tmp_path), methods="grad-dot,grad-cos")
    first = L.run_task(TINY, args, "aaaaaaaaaaaa")
    row = [line for line in first if line.startswith("| grad-cos |")]
    assert len(row) == 1 and "—" not in row[0]
    args.methods = "grad-dot"
    second = L.run_task(TINY, args, "bbbbbbbbbbbb")
    assert [line for line in second if line.startswith("| grad-cos |")] == row                # merged, the same numbers
    assert any(line.startswith("| grad-dot |") for line in second)
    assert not any(line.startswith("| TracIn |") for line in second)                           # never run: no row
    folder = os.path.join(str(tmp_path), f"{TINY.name}-{L.task_key(TINY)}")
    assert sorted(f for f in os.listdir(folder) if f.startswith("result-grad")) == [
        "result-grad-cos-aaaaaaaaaaaa.pt", "result-grad-dot-aaaaaaaaaaaa.pt", "result-grad-dot-bbbbbbbbbbbb.pt"]


def test_the_docs_show_the_benchmarks_figures():
    """docs/ladder.md embeds copies of benchmarks/ladder-<task>.png; ladder.py rewrites both, so they stay equal."""
    names = sorted(f for f in os.listdir(L.HERE) if f.startswith("ladder-") and f.endswith(".png"))
    assert names
    with open(os.path.join(L.DOCS, "ladder.md")) as f:
        page = f.read()
    assert '--8<-- "benchmarks/RESULTS-ladder.md' in page
    for name in names:
        with open(os.path.join(L.HERE, name), "rb") as a, open(os.path.join(L.DOCS, name), "rb") as b:
            assert a.read() == b.read(), f"docs/{name} differs from benchmarks/{name}: rerun benchmarks/ladder.py"
