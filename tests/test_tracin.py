"""TracIn against an explicit per-example autograd loop; the random-projection variant against exact TracIn."""

import pytest
import torch
from models import class0_probability, digits_mlp, loop_grad_rows

import tinfluence as ti
from tinfluence.testing import loop_grads


@pytest.fixture(scope="module")
def run(digits_lr):
    """A 64-32-10 tanh MLP (P = 2410), three checkpoints from full-batch gradient descent with a
    decaying step; each checkpoint is saved where its learning rate starts to apply."""
    _, params, loss = digits_mlp(32)
    train = ti.take(digits_lr.train, slice(0, 200))
    test = ti.take(digits_lr.test, slice(0, 10))
    R = ti.objective(loss, train)
    ckpts = []
    for lr in (0.5, 0.3, 0.1):
        ckpts.append((params, lr))
        for _ in range(10):
            params = ti.tree.add_scaled(params, -lr, torch.func.grad(R)(params))
    return loss, ckpts, train, test


def test_one_checkpoint_is_lr_times_loop_dot_product(run):
    loss, ckpts, train, test = run
    params, lr = ckpts[0]
    expected = lr * loop_grad_rows(loss, params, test) @ loop_grad_rows(loss, params, ti.take(train, slice(0, 40))).T
    got = ti.tracin(loss, [(params, lr)], ti.take(train, slice(0, 40)), test)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_checkpoints_sum_with_their_learning_rates(run):
    loss, ckpts, train, test = run
    small = ti.take(train, slice(0, 30))
    expected = sum(lr * loop_grad_rows(loss, p, test) @ loop_grad_rows(loss, p, small).T for p, lr in ckpts)
    torch.testing.assert_close(ti.tracin(loss, ckpts, small, test), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ti.tracin(loss, ckpts, small, test, chunk_size=7), expected, rtol=1e-10, atol=1e-12)


def test_self_influence_is_the_diagonal(run):
    loss, ckpts, train, _ = run
    small = ti.take(train, slice(0, 30))
    expected = sum(lr * loop_grad_rows(loss, p, small).pow(2).sum(1) for p, lr in ckpts)
    torch.testing.assert_close(ti.tracin_self_influence(loss, ckpts, small, chunk_size=8), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ti.tracin(loss, ckpts, small, small).diagonal(), expected, rtol=1e-10, atol=1e-12)


def test_projection_correlates_and_is_unbiased(run):
    loss, ckpts, train, test = run
    exact = ti.tracin(loss, ckpts, train, test)
    # Each projected product errs by about ‖g_test‖‖g_z‖/√d, so the correlation is set by the
    # spread of the gradient cosines (std ≈ 0.14 here), not by P: ≈ 0.90 at d = 300, ≈ 0.94 at 500.
    correlations = []
    for d, floor in ((300, 0.85), (768, 0.95)):   # floors a few points under the estimate above
        one = ti.tracin(loss, ckpts, train, test, projection_dim=d, generator=torch.Generator().manual_seed(1), chunk_size=64)
        pearson = float(torch.corrcoef(torch.stack([one.flatten(), exact.flatten()]))[0, 1])
        print(f"projection d={d}: Pearson with exact TracIn {pearson:.4f}")
        assert pearson >= floor, (d, pearson)
        correlations.append(pearson)
    assert correlations[1] > correlations[0]      # more dimensions, less projection error
    seeds = [ti.tracin(loss, ckpts, train, test, projection_dim=100, generator=torch.Generator().manual_seed(s)) for s in range(16)]
    single = torch.stack([(s - exact).norm() for s in seeds]).mean()
    averaged = (torch.stack(seeds).mean(0) - exact).norm()
    print(f"projection d=100: error of one seed {single:.4e}, of the mean of 16 seeds {averaged:.4e} (1/sqrt(16) = 0.25 expected ratio)")
    assert averaged <= 0.4 * single


def test_projection_same_generator_same_scores_and_not_advanced(run):
    loss, ckpts, train, test = run
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    a = ti.tracin(loss, ckpts, train, test, projection_dim=50, generator=g)
    b = ti.tracin(loss, ckpts, train, test, projection_dim=50, generator=g)
    assert torch.equal(a, b)
    assert torch.equal(g.get_state(), state)
    assert not torch.equal(a, ti.tracin(loss, ckpts, train, test, projection_dim=50, generator=torch.Generator().manual_seed(4)))


def test_errors(run):
    loss, ckpts, train, test = run
    params, _ = ckpts[0]
    with pytest.raises(ValueError, match=r"ti.tracin: `checkpoints` must be a non-empty list of \(params, lr\) pairs"):
        ti.tracin(loss, [], train, test)
    with pytest.raises(ValueError, match=r"ti.tracin: `checkpoints\[0\]` must be a \(params, lr\) pair or a ti.Checkpoint\(params, lr, frozen\); got dict"):
        ti.tracin(loss, [params], train, test)
    with pytest.raises(ValueError, match=r"ti.tracin: `checkpoints\[1\] lr` must be > 0; got -0.1"):
        ti.tracin(loss, [(params, 0.1), (params, -0.1)], train, test)
    with pytest.raises(ValueError, match=r"ti.tracin: checkpoint 1 does not have the parameter names and shapes of checkpoint 0"):
        ti.tracin(loss, [(params, 0.1), ({"0.weight": params["0.weight"]}, 0.1)], train, test)
    with pytest.raises(ValueError, match=r"ti.tracin: `projection_dim` needs an explicit `generator`"):
        ti.tracin(loss, ckpts, train, test, projection_dim=10)
    with pytest.raises(ValueError, match=r"ti.tracin: `projection_dim` must be an int >= 1; got 0"):
        ti.tracin(loss, ckpts, train, test, projection_dim=0, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"ti.tracin: `generator` is only used with `projection_dim`"):
        ti.tracin(loss, ckpts, train, test, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"ti.tracin_self_influence: `chunk_size` must be None or an int >= 1"):
        ti.tracin_self_influence(loss, ckpts, train, chunk_size=-1)


def _mlp():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 10)).eval()


def test_load_checkpoints_round_trip(tmp_path):
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved, paths = [], []
    for t in range(3):
        other = _mlp()
        with torch.no_grad():
            for p in other.parameters():
                p.add_(t)
        saved.append(other.state_dict())
        paths.append(tmp_path / f"ckpt{t}.pt")
        torch.save(other.state_dict(), paths[-1])
    ckpts = ti.load_checkpoints(paths, model, lrs=[0.3, 0.2, 0.1])
    assert [lr for _, lr in ckpts] == [0.3, 0.2, 0.1]
    _, reference = ti.functionalize(model)
    for (params, _), state in zip(ckpts, saved):
        assert params.keys() == reference.keys()
        for name in params:
            assert torch.equal(params[name], state[name]) and params[name].dtype == reference[name].dtype
    last = ti.load_checkpoints([str(paths[2])], model, lrs=0.5, trainable=lambda name, p: name.startswith("3."))
    assert list(last[0][0]) == ["3.weight", "3.bias"] and last[0][1] == 0.5
    assert torch.equal(last[0][0]["3.weight"], saved[2]["3.weight"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_checkpoints_errors(tmp_path):
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrong_shape = torch.nn.Sequential(torch.nn.Linear(64, 9), torch.nn.BatchNorm1d(9), torch.nn.Tanh(), torch.nn.Linear(9, 10))
    torch.save(wrong_shape.state_dict(), tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"ti.load_checkpoints: '.*shape.pt' has parameters of other shapes than the model: "
                                         r"'0.weight': saved \(9, 64\), model \(8, 64\)"):
        ti.load_checkpoints([tmp_path / "shape.pt"], model, lrs=0.1)
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "names.pt")
    with pytest.raises(ValueError, match=r"ti.load_checkpoints: '.*names.pt' does not match the model's names: "
                                         r"missing \['0.bias', .*\], not in the model \['fc.weight'\]"):
        ti.load_checkpoints([tmp_path / "names.pt"], model, lrs=0.1)
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(TypeError, match=r"ti.load_checkpoints: '.*list.pt' must hold a state dict \(name -> tensor\)"):
        ti.load_checkpoints([tmp_path / "list.pt"], model, lrs=0.1)
    torch.save(model.state_dict(), tmp_path / "ok.pt")
    with pytest.raises(ValueError, match=r"ti.load_checkpoints: `lrs` must be one number or have one entry per path; got 2 for 1 paths"):
        ti.load_checkpoints([tmp_path / "ok.pt"], model, lrs=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"ti.load_checkpoints: `lrs\[0\]` must be > 0; got 0"):
        ti.load_checkpoints([tmp_path / "ok.pt"], model, lrs=[0])
    with pytest.raises(ValueError, match=r"ti.load_checkpoints: `paths` must be a non-empty list of file paths"):
        ti.load_checkpoints(str(tmp_path / "ok.pt"), model, lrs=0.1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- a test measure of its own: Σ_t lr_t ⟨∇m(z_test; θ_t), ∇ℓ(z; θ_t)⟩ -----------------------------------------

@pytest.fixture(scope="module")
def measured(run):
    apply, _, _ = digits_mlp(32)
    _, _, _, test = run
    return class0_probability(apply), {"x": test[0], "w": torch.linspace(0.5, 2.0, ti.num_examples(test))}


@pytest.mark.parametrize("factored", [False, True])
def test_measure_is_summed_over_checkpoints(run, measured, factored):
    loss, ckpts, train, _ = run
    measure, test = measured
    small = ti.take(train, slice(0, 30))
    expected = sum(lr * loop_grad_rows(measure, p, test) @ loop_grad_rows(loss, p, small).T for p, lr in ckpts)
    got = ti.tracin(loss, ckpts, small, test, measure=measure, factored=factored, chunk_size=7)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_measure_at_each_checkpoints_full_state(run, measured):
    """With `frozen` state, the measure sees {**frozen, **p} as the loss does; gradients over p only."""
    loss, ckpts, train, _ = run
    measure, test = measured
    small = ti.take(train, slice(0, 20))
    last = lambda p: {k: v for k, v in p.items() if k.startswith("2.")}  # noqa: E731  the attributed subset
    split = [ti.Checkpoint(last(p), lr, {k: v for k, v in p.items() if k not in last(p)}) for p, lr in ckpts]
    expected = sum(lr * ti.ravel(last(loop_grads(measure, p, test)), batch_ndim=1)
                   @ ti.ravel(last(loop_grads(loss, p, small)), batch_ndim=1).T for p, lr in ckpts)
    torch.testing.assert_close(ti.tracin(loss, split, small, test, measure=measure), expected, rtol=1e-10, atol=1e-12)


def test_measure_with_projection_is_the_projected_measure(run, measured):
    """The projection is linear and shared, so a measure that is a multiple of the loss scales the scores."""
    loss, ckpts, train, test = run
    measure = lambda p, b: 3.0 * loss(p, (b["x"], b["y"]))  # noqa: E731
    g = torch.Generator().manual_seed(2)
    plain = ti.tracin(loss, ckpts, train, test, projection_dim=20, generator=g)
    got = ti.tracin(loss, ckpts, train, {"x": test[0], "y": test[1]}, measure=measure, projection_dim=20, generator=g)
    torch.testing.assert_close(got, 3.0 * plain, rtol=1e-10, atol=1e-12 * float(plain.abs().max()))


def test_measure_errors(run, measured):
    loss, ckpts, train, test = run
    measure, dict_test = measured
    with pytest.raises(TypeError, match=r"^ti.tracin: `measure` must be a function \(params, batch\) -> Tensor\[B\]; "
                                        r"got 'margin'"):
        ti.tracin(loss, ckpts, train, test, measure="margin")
    with pytest.raises(ValueError, match=r"^ti.tracin: `measure` must return one value per example"):
        ti.tracin(loss, ckpts, train, dict_test, measure=lambda p, b: measure(p, b).sum())
    with pytest.raises(ValueError, match=r"^ti.tracin: `test` must have the structure of `train`"):
        ti.tracin(loss, ckpts, train, dict_test)
