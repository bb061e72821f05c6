"""Checkpoints with their own complete state: TracIn over a parameter subset against a model
rebuilt from each saved state dict (load_state_dict) and a plain autograd loop over examples."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tinfluence as ti

SUBSETS = {
    "last_layer": lambda name, p: name.startswith("5."),
    "frozen_middle": lambda name, p: not name.startswith("3."),
    "all": None,   # only the batch-norm buffers are not differentiated
}


def _model(seed):
    """Linear-BatchNorm-Tanh-Linear-Tanh-Linear in eval mode, with seeded parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    m = m.double().eval()
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5, generator=g)
        m[1].bias.uniform_(-0.5, 0.5, generator=g)
        m[1].running_mean.uniform_(-1, 1, generator=g)
        m[1].running_var.uniform_(0.3, 3, generator=g)
        m[1].num_batches_tracked.fill_(seed)
    return m


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Three checkpoints of different states (parameters and buffers), and a final model unlike all of them."""
    folder = tmp_path_factory.mktemp("ckpts")
    states, paths = [], []
    for t in range(3):
        states.append(_model(10 + t).state_dict())
        paths.append(folder / f"ckpt{t}.pt")
        torch.save(states[-1], paths[-1])
    g = torch.Generator().manual_seed(0)
    train = (torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g))
    test = (torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g))
    return _model(99), states, paths, [0.3, 0.2, 0.1], train, test


def _reference_grads(model, state, selected, data):
    """[n, P] gradients of the selected parameters of `model` rebuilt at `state`, one example at a time."""
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    chosen = [p for name, p in m.named_parameters() if selected is None or selected(name, p)]
    rows = []
    for x, y in zip(*data):
        grads = torch.autograd.grad(F.cross_entropy(m(x[None]), y[None]), chosen)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


def _reference_tracin(model, states, lrs, selected, train, test):
    return sum(lr * _reference_grads(model, s, selected, test) @ _reference_grads(model, s, selected, train).T
               for s, lr in zip(states, lrs))


def _loss(model, selected):
    apply, _ = ti.functionalize(model, trainable=selected)
    return lambda p, b: F.cross_entropy(apply(p, b[0]), b[1], reduction="none")


@pytest.mark.parametrize("subset", SUBSETS)
def test_tracin_uses_each_checkpoints_own_frozen_parameters_and_buffers(saved, subset):
    model, states, paths, lrs, train, test = saved
    selected = SUBSETS[subset]
    expected = _reference_tracin(model, states, lrs, selected, train, test)
    ckpts = ti.load_checkpoints(paths, model, lrs=lrs, trainable=selected)
    loss = _loss(model, selected)
    for factored in (False, True):
        got = ti.tracin(loss, ckpts, train, test, factored=factored, chunk_size=5)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    self_expected = sum(lr * _reference_grads(model, s, selected, train).pow(2).sum(1) for s, lr in zip(states, lrs))
    torch.testing.assert_close(ti.tracin_self_influence(loss, ckpts, train), self_expected, rtol=1e-10, atol=1e-12)


def test_checkpoint_holds_the_saved_state_and_pairs_still_work(saved):
    model, states, paths, lrs, train, test = saved
    selected = SUBSETS["last_layer"]
    ckpts = ti.load_checkpoints(paths, model, lrs=lrs, trainable=selected)
    _, reference = ti.functionalize(model, trainable=selected)
    buffers = {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    for ckpt, state, lr in zip(ckpts, states, lrs):
        assert isinstance(ckpt, ti.Checkpoint) and ckpt.lr == lr
        unpacked_params, unpacked_lr = ckpt                  # it unpacks as the (params, lr) pair
        assert unpacked_params is ckpt.params and unpacked_lr == lr
        assert list(ckpt.params) == list(reference)
        assert set(ckpt.frozen) == set(state) - set(reference) and buffers <= set(ckpt.frozen)
        for name, value in {**ckpt.params, **ckpt.frozen}.items():
            assert torch.equal(value, state[name]) and value.dtype == state[name].dtype
    # A hand-built Checkpoint without frozen state, and a plain (params, lr) pair, mean the model's own.
    loss = _loss(model, selected)
    own = [(c.params, c.lr) for c in ckpts]
    torch.testing.assert_close(ti.tracin(loss, [ti.Checkpoint(p, lr) for p, lr in own], train, test),
                               ti.tracin(loss, own, train, test), rtol=0, atol=0)


def test_checkpoint_errors(saved):
    model, _, paths, lrs, train, test = saved
    selected = SUBSETS["last_layer"]
    loss = _loss(model, selected)
    ckpts = ti.load_checkpoints(paths, model, lrs=lrs, trainable=selected)
    (params, lr), frozen = ckpts[0], ckpts[0].frozen
    with pytest.raises(ValueError, match=r"ti.tracin: checkpoint 0 has names both in `params` and in `frozen`: \['5.bias'\]"):
        ti.tracin(loss, [ti.Checkpoint(params, lr, {**frozen, "5.bias": params["5.bias"]})], train, test)
    with pytest.raises(ValueError, match=r"ti.tracin: checkpoint 1 does not have the frozen names of checkpoint 0"):
        ti.tracin(loss, [ckpts[0], ti.Checkpoint(params, lr, {"0.weight": frozen["0.weight"]})], train, test)
    with pytest.raises(TypeError, match=r"ti.tracin: the `frozen` of checkpoint 0 must be a dict name -> tensor \(the state outside `params`.*\) or None; got list"):
        ti.tracin(loss, [ti.Checkpoint(params, lr, [frozen["0.weight"]])], train, test)
    with pytest.raises(TypeError, match=r"ti.tracin: checkpoint 0: `params` must be a dict\[str, Tensor\] .*; got list"):
        ti.tracin(loss, [ti.Checkpoint(list(params.values()), lr, frozen)], train, test)
    with pytest.raises(ValueError, match=r"ti.tracin_self_influence: `checkpoints\[0\]` must be a \(params, lr\) pair or "
                                         r"a ti.Checkpoint\(params, lr, frozen\); got tuple of length 4"):
        ti.tracin_self_influence(loss, [(params, lr, frozen, None)], train)


def test_load_checkpoints_refuses_a_file_without_the_frozen_state(saved, tmp_path):
    model, states, _, _, _, _ = saved
    selected = SUBSETS["last_layer"]
    torch.save({k: v for k, v in states[0].items() if k.startswith("5.")}, tmp_path / "head.pt")
    with pytest.raises(ValueError, match=r"ti.load_checkpoints: '.*head.pt' does not match the model's names: missing "
                                         r"\['0.bias', .*\].*every checkpoint is evaluated with its own complete state"):
        ti.load_checkpoints([tmp_path / "head.pt"], model, lrs=0.1, trainable=selected)
