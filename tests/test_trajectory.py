"""Trajectory influence: pure optimizer steps against torch.optim, the run against a plain torch loop, the
w-gradient against central finite differences in w, checkpointed against stored replay, group effects,
resumption after SIGKILL, and scores against actual same-schedule retraining (w_z = 0 replays)."""

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tinfluence as ti
from tinfluence.demo import load_digits_split
from tinfluence.methods import trajectory as T

HERE = Path(__file__).parent


def tiny_problem(n=23, n_test=4, seed=0):
    """A 3-5-3 tanh MLP, float64: `(module, loss, params0, train, test)`."""
    g = torch.Generator().manual_seed(seed)
    train = (torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
    test = (torch.randn(n_test, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n_test,), generator=g))
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    apply, params0 = ti.functionalize(module)

    def loss(p, batch):
        return F.cross_entropy(apply(p, batch[0]), batch[1], reduction="none")

    return module, loss, params0, train, test


def scaled_sign_free_step(lr):
    """A user's own pure step: gradient descent with a per-leaf step lr / (1 + ‖g‖²) and no state."""
    def step(params, state, grads):
        return ti.tree.map(lambda p, g: p - lr * g / (1 + (g * g).sum()), params, grads), state

    return ti.optim.Optimizer(init=lambda params: (), step=step)


OPTIMIZERS = {
    "sgd": (lambda: ti.optim.sgd(0.3), lambda ps: torch.optim.SGD(ps, lr=0.3, foreach=False)),
    "sgd_momentum": (lambda: ti.optim.sgd(0.2, momentum=0.9, weight_decay=1e-2),
                     lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9, weight_decay=1e-2, foreach=False)),
    "nesterov": (lambda: ti.optim.sgd(0.2, momentum=0.9, weight_decay=1e-2, nesterov=True),
                 lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9, weight_decay=1e-2, nesterov=True, foreach=False)),
    "adam": (lambda: ti.optim.adam(0.05, weight_decay=1e-2),
             lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=1e-2, foreach=False)),
    "adamw": (lambda: ti.optim.adamw(0.05, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.1),
              lambda ps: torch.optim.AdamW(ps, lr=0.05, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1, foreach=False)),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_steps_equal_torch_optim_bit_for_bit(name):
    ours, theirs = OPTIMIZERS[name]
    opt = ours()
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    grads = [ti.tree.random_like(params, generator=g) for _ in range(6)]
    grads[0]["b"][1] = 0.0          # an exactly zero gradient coordinate (zero second moment for Adam)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    reference = theirs(list(leaves.values()))
    state = opt.init(params)
    before = copy.deepcopy(params)
    for G in grads:
        new, state = opt.step(params, state, G)
        assert all(torch.equal(params[k], before[k]) for k in params)      # pure: inputs untouched
        params, before = new, copy.deepcopy(new)
        for k, leaf in leaves.items():
            leaf.grad = G[k].clone()
        reference.step()
        for k in params:
            assert torch.equal(params[k], leaves[k].detach()), k


def test_optimizer_hyperparameters_are_checked():
    with pytest.raises(ValueError, match=r"ti.optim.sgd: `lr` must be > 0"):
        ti.optim.sgd(0.0)
    with pytest.raises(ValueError, match="ti.optim.sgd: `nesterov=True` needs `momentum` > 0"):
        ti.optim.sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"ti.optim.adam: `b2` must be in \[0, 1\)"):
        ti.optim.adam(b2=1.0)
    with pytest.raises(TypeError, match="ti.optim.adamw: `eps` must be a finite number > 0"):
        ti.optim.adamw(eps="1e-8")


def plain_loop(module, make_optimizer, train, epochs, batch_size, seed, keep=None):
    """The ordinary torch training loop (mean cross entropy, loss.backward(), opt.step()); `keep` a 0/1 mask
    that multiplies each example's loss while the batch divisor stays |B|."""
    model = copy.deepcopy(module)
    opt = make_optimizer(list(model.parameters()))
    x, y = train
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for ids in torch.randperm(x.shape[0], generator=g).split(batch_size):
            opt.zero_grad()
            if keep is None:
                F.cross_entropy(model(x[ids]), y[ids]).backward()
            else:
                (F.cross_entropy(model(x[ids]), y[ids], reduction="none") * keep[ids]).sum().div(len(ids)).backward()
            opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("name", ["sgd", "sgd_momentum", "adam", "adamw"])
def test_run_at_unit_weights_equals_plain_torch_loop_bit_for_bit(name):
    module, loss, params0, train, _ = tiny_problem()
    ours, theirs = OPTIMIZERS[name]
    run = ti.training_run(loss, params0, train, ours(), epochs=3, batch_size=5, generator=torch.Generator().manual_seed(7))
    expected = plain_loop(module, theirs, train, 3, 5, seed=7)
    assert run.steps == 3 * 5
    for k, v in expected.items():
        assert torch.equal(run.final_params()[k], v), k


def test_replay_with_zero_weight_equals_plain_loop_that_masks_the_example():
    module, loss, params0, train, test = tiny_problem()
    ours, theirs = OPTIMIZERS["sgd_momentum"]
    run = ti.training_run(loss, params0, train, ours(), epochs=3, batch_size=5, generator=torch.Generator().manual_seed(7))
    keep = torch.ones(23)
    keep[[4, 11]] = 0.0
    expected = plain_loop(module, theirs, train, 3, 5, seed=7, keep=keep)
    got = run.replay(keep).final_params()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-14)
    effect = ti.replay_effect(run, test, [[4, 11]])
    torch.testing.assert_close(effect[:, 0], loss(expected, test) - loss(run.final_params(), test), rtol=0, atol=1e-13)


def test_generator_is_not_advanced_and_fixes_the_schedule():
    _, loss, params0, train, _ = tiny_problem()
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    a = ti.training_run(loss, params0, train, ti.optim.sgd(0.1), epochs=2, batch_size=4, generator=g)
    assert torch.equal(g.get_state(), state)
    b = ti.training_run(loss, params0, train, ti.optim.sgd(0.1), epochs=2, batch_size=4, generator=g)
    assert all(torch.equal(x, y) for x, y in zip(a.batches, b.batches))
    assert sorted(torch.cat(a.batches[:6]).tolist()) == list(range(23))     # one epoch: every example once


FD_OPTIMIZERS = {
    "sgd": lambda: ti.optim.sgd(0.3),
    "sgd_momentum": lambda: ti.optim.sgd(0.2, momentum=0.9, weight_decay=1e-2),
    "adam": lambda: ti.optim.adam(0.05, weight_decay=1e-2),
    "user_step": lambda: scaled_sign_free_step(0.5),
}


@pytest.mark.parametrize("name", sorted(FD_OPTIMIZERS))
def test_weight_gradient_equals_central_differences(name):
    _, loss, params0, train, test = tiny_problem()
    run = ti.training_run(loss, params0, train, FD_OPTIMIZERS[name](), epochs=3, batch_size=5,
                          generator=torch.Generator().manual_seed(2))
    scores = ti.trajectory_influence(run, test)                     # [n_test, n_train] = −∂m/∂w
    assert scores.shape == (4, 23)

    def measure(w):
        return loss(run.replay(w).final_params(), test)

    h = 1e-4
    g = torch.Generator().manual_seed(5)
    directions = [torch.randn(23, generator=g, dtype=torch.float64)] + [torch.eye(23, dtype=torch.float64)[i]
                                                                      for i in (0, 9, 22)]
    for v in directions:
        fd = (measure(run.weights + h * v) - measure(run.weights - h * v)) / (2 * h)
        torch.testing.assert_close(-(scores @ v), fd, rtol=1e-7, atol=1e-7 * float(fd.abs().max()))


def test_custom_measure_and_its_sign():
    """A measure that only rewards a higher logit: its score is the first-order replay effect of each removal."""
    module, loss, params0, train, test = tiny_problem()
    apply, _ = ti.functionalize(module)

    def margin(p, batch):
        return apply(p, batch[0]).gather(1, batch[1][:, None])[:, 0]

    run = ti.training_run(loss, params0, train, ti.optim.sgd(0.02), epochs=2, batch_size=5,
                          generator=torch.Generator().manual_seed(0))
    scores = ti.trajectory_influence(run, test, measure=margin)
    actual = ti.replay_effect(run, test, [[i] for i in range(23)], measure=margin)
    torch.testing.assert_close(scores, actual, rtol=0, atol=2e-2 * float(actual.abs().max()))
    assert float(ti.pearson(scores, actual).min()) > 0.999


def count_calls(monkeypatch, name):
    calls = []
    original = getattr(T, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(T, name, counted)
    return calls


def test_checkpointed_replay_gives_identical_scores(monkeypatch):
    _, loss, params0, train, test = tiny_problem(n=30)
    run = ti.training_run(loss, params0, train, ti.optim.adam(0.05), epochs=3, batch_size=4,
                          generator=torch.Generator().manual_seed(0))
    per_state = T._state_bytes(run.final_params(), run.final_state())
    steps = run.steps                                           # 24: checkpoints every 5 steps
    advances = count_calls(monkeypatch, "_advance")
    stored = ti.trajectory_influence(run, test, memory_budget=steps * per_state)
    assert len(advances) == steps                               # one forward replay, every state kept
    advances.clear()
    budget = (5 + 5) * per_state
    checkpointed = ti.trajectory_influence(run, test, memory_budget=budget)
    assert len(advances) == 2 * steps                           # the replay, then every segment once more
    assert torch.equal(stored, checkpointed)
    with pytest.raises(ValueError, match="ti.trajectory_influence: `memory_budget`.*raise memory_budget to at least"):
        ti.trajectory_influence(run, test, memory_budget=budget - 1)


def test_test_chunks_agree_with_one_sweep():
    _, loss, params0, train, test = tiny_problem(n_test=5)
    run = ti.training_run(loss, params0, train, ti.optim.sgd(0.2, momentum=0.9), epochs=2, batch_size=5,
                          generator=torch.Generator().manual_seed(0))
    whole = ti.trajectory_influence(run, test)
    torch.testing.assert_close(ti.trajectory_influence(run, test, chunk_size=2, progress=True), whole, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_large_stacks_in_row_blocks_agree_with_the_batched_graph(name, monkeypatch):
    """A large cotangent stack goes through vmap(torch.func.vjp) in blocks of rows (the last one partial): the same
    scores as the one batched autograd backward of a small stack, whose w-gradient is checked by differences."""
    _, loss, params0, train, test = tiny_problem(n_test=5)
    run = ti.training_run(loss, params0, train, OPTIMIZERS[name][0](), epochs=2, batch_size=5,
                          generator=torch.Generator().manual_seed(0))
    graph = count_calls(monkeypatch, "_pullback_graph")
    whole = ti.trajectory_influence(run, test)
    assert len(graph) == run.steps                              # the tiny stack: one batched backward per step
    monkeypatch.setattr(T, "LARGE_STACK", 0)                    # every stack is large
    monkeypatch.setattr(T, "ROW_BLOCK", 2)                      # blocks of 2, 2, 1 rows
    blocks = count_calls(monkeypatch, "_pullback_blocks")
    blocked = ti.trajectory_influence(run, test)
    assert len(blocks) == run.steps
    torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=1e-15)


def test_group_influence_is_the_directional_derivative_along_the_group():
    _, loss, params0, train, test = tiny_problem()
    run = ti.training_run(loss, params0, train, ti.optim.sgd(0.2, momentum=0.9), epochs=3, batch_size=5,
                          generator=torch.Generator().manual_seed(4))
    scores = ti.trajectory_influence(run, test)
    groups = [[0, 5, 6], [17], list(range(10, 20))]
    mask = torch.zeros(3, 23, dtype=torch.bool)
    for g, ids in enumerate(groups):
        mask[g, ids] = True
    first_order = ti.group_influence(scores, groups)
    assert torch.equal(first_order, ti.group_influence(scores, mask))
    h = 1e-4
    for g in range(3):
        v = mask[g].double()
        fd = (loss(run.replay(run.weights + h * v).final_params(), test)
              - loss(run.replay(run.weights - h * v).final_params(), test)) / (2 * h)
        torch.testing.assert_close(first_order[:, g], -fd, rtol=1e-7, atol=1e-7 * float(fd.abs().max()))
    exact = ti.replay_effect(run, test, groups)
    assert exact.shape == (4, 3)
    torch.testing.assert_close(exact[:, 1], ti.replay_effect(run, test, [[17]])[:, 0], rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors(tmp_path):
    _, loss, params0, train, test = tiny_problem()
    g = torch.Generator().manual_seed(0)
    with pytest.raises(TypeError, match="ti.training_run: `step` must be a pure optimizer"):
        ti.training_run(loss, params0, train, torch.optim.SGD, epochs=1, batch_size=5, generator=g)
    with pytest.raises(TypeError, match="ti.training_run: `generator` must be a torch.Generator"):
        ti.training_run(loss, params0, train, ti.optim.sgd(0.1), epochs=1, batch_size=5, generator=0)
    with pytest.raises(ValueError, match="ti.training_run: `batch_size` must be an int >= 1"):
        ti.training_run(loss, params0, train, ti.optim.sgd(0.1), epochs=1, batch_size=0, generator=g)
    with pytest.raises(ValueError, match=r"ti.training_run: `weights` must have shape \[23\]"):
        ti.training_run(loss, params0, train, ti.optim.sgd(0.1), epochs=1, batch_size=5, generator=g,
                        weights=torch.ones(22))
    with pytest.raises(ValueError, match="ti.training_run: `loss` must return one value per example"):
        ti.training_run(lambda p, b: loss(p, b).mean(), params0, train, ti.optim.sgd(0.1), epochs=1, batch_size=5,
                        generator=g)
    run = ti.training_run(loss, params0, train, ti.optim.sgd(0.1), epochs=1, batch_size=5, generator=g)
    with pytest.raises(TypeError, match="ti.TrainingRun.replay: `weights` must be a floating tensor"):
        run.replay(torch.ones(23, dtype=torch.long))
    with pytest.raises(ValueError, match="ti.group_influence: group 0 has ids outside"):
        ti.group_influence(torch.zeros(4, 23), [[23]])
    ti.trajectory_influence(run, test, out=tmp_path)
    with pytest.raises(ValueError, match="ti.trajectory_influence: `out` folder .* holds the progress of another"):
        ti.trajectory_influence(run, ti.take(test, slice(0, 2)), out=tmp_path)


def test_a_non_replayable_run_is_refused():
    """A loss that draws fresh noise on every call is not a pure function: its replay cannot reproduce the run."""
    _, loss, params0, train, test = tiny_problem()
    run = ti.training_run(lambda p, b: (1 + torch.rand(())) * loss(p, b), params0, train, ti.optim.sgd(0.1),
                          epochs=1, batch_size=5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="ti.trajectory_influence: replaying the run did not reproduce"):
        ti.trajectory_influence(run, test)


RESUME_CHILD = """
import sys, time
import torch
sys.path.insert(0, {here!r})
import tinfluence as ti
from tinfluence.methods import trajectory as T
from test_trajectory import resume_setting
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)   # as tests/conftest.py
run, test, kw = resume_setting()
original, saves = T._save, []
def save_then_stall(folder, progress):
    original(folder, progress)
    saves.append(1)
    print("saved", flush=True)
    if len(saves) == 3:
        time.sleep(600)
T._save = save_then_stall
ti.trajectory_influence(run, test, out={out!r}, **kw)
"""


def resume_setting():
    """The run of the resumption test: 30 steps, checkpoints every 6, test points in two chunks."""
    _, loss, params0, train, test = tiny_problem(n=40)
    run = ti.training_run(loss, params0, train, ti.optim.sgd(0.2, momentum=0.9), epochs=3, batch_size=4,
                          generator=torch.Generator().manual_seed(0))
    per_state = T._state_bytes(run.final_params(), run.final_state())
    return run, test, {"chunk_size": 2, "memory_budget": 12 * per_state}


@pytest.mark.slow
def test_a_killed_run_resumes_with_identical_results(tmp_path, monkeypatch):
    out = tmp_path / "progress"
    child = subprocess.Popen([sys.executable, "-c", RESUME_CHILD.format(here=str(HERE), out=str(out))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for _ in range(3):
            line = child.stdout.readline()
            assert line == "saved\n", child.stderr.read()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    saved = torch.load(out / T.PROGRESS, weights_only=False)
    assert saved["position"] is not None and saved["position"] > 0     # killed in the middle of a sweep
    run, test, kw = resume_setting()
    expected = ti.trajectory_influence(run, test, **kw)
    pullbacks = count_calls(monkeypatch, "_pullback")
    resumed = ti.trajectory_influence(run, test, out=out, **kw)
    assert len(pullbacks) < 2 * run.steps                              # it went on from the saved progress
    assert torch.equal(resumed, expected)
    assert torch.equal(ti.trajectory_influence(run, test, out=out, **kw), expected)   # finished: read back


@pytest.mark.slow
def test_scores_agree_with_same_schedule_retraining_on_digits_logistic_regression():
    train, test, _ = load_digits_split()
    test = ti.take(test, slice(0, 5))
    apply, params = ti.functionalize(nn.Linear(64, 10).double())

    def loss(p, batch):
        return F.cross_entropy(apply(p, batch[0]), batch[1], reduction="none")

    run = ti.training_run(loss, ti.tree.zeros_like(params), train, ti.optim.sgd(0.1), epochs=10, batch_size=100,
                          generator=torch.Generator().manual_seed(0))
    scores = ti.trajectory_influence(run, test)
    top = scores.abs().topk(30, dim=1).indices                          # [5, 30] largest |score| per test point
    ids = top.unique()
    actual = ti.replay_effect(run, test, [[int(i)] for i in ids])        # [5, |ids|]
    column = {int(i): c for c, i in enumerate(ids)}
    cols = torch.tensor([[column[int(i)] for i in row] for row in top])
    predicted, retrained = scores.gather(1, top), actual.gather(1, cols)
    rho, r = ti.spearman(predicted, retrained), ti.pearson(predicted, retrained)
    assert bool((rho >= 0.95).all()), rho                    # the goal, on every test point
    assert int((r >= 0.99).sum()) >= 4 and bool((r >= 0.95).all()), r     # Pearson >= 0.99 on most


def test_params_at_are_the_states_of_shorter_runs():
    _, loss, params0, train, _ = tiny_problem()
    make = lambda epochs: ti.training_run(loss, params0, train, ti.optim.sgd(0.2, momentum=0.9), epochs=epochs,  # noqa: E731
                                          batch_size=5, generator=torch.Generator().manual_seed(0))
    run = make(3)
    at = run.params_at([0, 5, 10, 15])                       # 5 steps per epoch
    assert _same(at[0], params0) and _same(at[3], run.final_params())
    assert _same(at[1], make(1).final_params()) and _same(at[2], make(2).final_params())
    with pytest.raises(ValueError, match=r"ti.TrainingRun.params_at: `steps` must be .* ints in \[0, 15\]"):
        run.params_at([16])


def _same(x, y):
    return all(torch.equal(x[k], y[k]) for k in x)


def test_adam_with_a_constant_input_feature_has_finite_exact_scores():
    """A feature that is 0 for every example gives exactly zero gradient coordinates, so Adam's second moment
    stays 0 there; the derivative through √ν must not turn into 0·∞ = nan."""
    _, loss, params0, (x, y), test = tiny_problem()
    x = x.clone()
    x[:, 1] = 0.0
    run = ti.training_run(loss, params0, (x, y), ti.optim.adam(0.05), epochs=2, batch_size=5,
                          generator=torch.Generator().manual_seed(0))
    assert bool((run.final_state().nu["0.weight"][:, 1] == 0).all())
    scores = ti.trajectory_influence(run, test)
    assert bool(torch.isfinite(scores).all())
    v = torch.randn(23, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-4
    fd = (loss(run.replay(run.weights + h * v).final_params(), test)
          - loss(run.replay(run.weights - h * v).final_params(), test)) / (2 * h)
    torch.testing.assert_close(-(scores @ v), fd, rtol=1e-7, atol=1e-7 * float(fd.abs().max()))
