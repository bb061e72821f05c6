"""functionalize: pure, never touches the module, handles buffers, subsets, ties and odd inputs."""

import pytest
import torch
from models import TiedLM, build, cases
from torch import nn

import tinfluence as ti


@pytest.mark.parametrize("case", cases(), ids=lambda c: c[0])
def test_apply_equals_module_and_module_is_untouched(case):
    _, module, inputs, _, data = case
    module = module.double()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    flag = module.training
    apply, params = ti.functionalize(module)
    args, kwargs = inputs(data)
    torch.testing.assert_close(apply(params, *args, **kwargs), module(*args, **kwargs), rtol=0, atol=0)
    apply({k: v + 1.0 for k, v in params.items()}, *args, **kwargs)
    assert module.training == flag
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_params_are_copies_and_follow_dtype():
    m = nn.Linear(3, 2).double()
    _, params = ti.functionalize(m)
    params["weight"].add_(1.0)
    assert not torch.equal(params["weight"], m.weight)
    assert params["weight"].dtype == torch.float64 and not params["weight"].requires_grad


def test_trainable_subset_freezes_the_rest():
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    apply, params = ti.functionalize(m, trainable=lambda name, p: name.startswith("2."))
    assert set(params) == {"2.weight", "2.bias"}
    x = torch.randn(5, 3)
    torch.testing.assert_close(apply(params, x), m(x))
    g = torch.func.grad(lambda p: apply(p, x).sum())(params)
    assert set(g) == {"2.weight", "2.bias"}


def test_tied_parameters_appear_once_and_stay_tied():
    m = TiedLM().double()
    apply, params = ti.functionalize(m)
    assert "head.weight" not in params and "emb.weight" in params
    tokens = torch.tensor([1, 2, 3])
    changed = dict(params, **{"emb.weight": params["emb.weight"] * 2})
    reference = TiedLM().double()
    reference.load_state_dict(m.state_dict())
    with torch.no_grad():
        reference.emb.weight.mul_(2)   # changes the tied head too
    torch.testing.assert_close(apply(changed, tokens), reference(tokens))


def test_batchnorm_in_eval_uses_running_stats_and_buffers_stay():
    _, module, _, _, data = cases()[3]
    module = module.double()
    rm = module[1].running_mean.clone()
    apply, params = ti.functionalize(module)
    apply(params, data[0])
    assert torch.equal(module[1].running_mean, rm)


def test_training_mode_with_stochastic_layers_warns():
    m = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    with pytest.warns(UserWarning, match=r"call module.eval\(\) first"):
        ti.functionalize(m)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="`trainable` selected no parameter of Linear; its parameters are 'weight', 'bias'"):
        ti.functionalize(nn.Linear(2, 2), trainable=lambda n, p: False)
    with pytest.raises(TypeError, match="`module` must be a torch.nn.Module"):
        ti.functionalize(lambda x: x)
    bad = nn.Linear(2, 2)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"`params` leaf \('weight',\) has non-finite values"):
        ti.functionalize(bad)
    with pytest.raises(ValueError, match="has no parameters"):
        ti.functionalize(nn.Tanh())


def test_build_helper_runs_every_case():
    for case in cases():
        apply, params, loss, data = build(case)
        assert loss(params, data).shape == (ti.num_examples(data),)


def _mlp_with_bn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    return m


def test_apply_refuses_missing_misspelled_and_unknown_keys():
    m = _mlp_with_bn()
    apply, params = ti.functionalize(m, trainable=lambda name, p: name.startswith("3."))
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"ti.functionalize: apply: `params` is missing \['3.bias'\]"):
        apply({"3.weight": params["3.weight"]}, x)
    with pytest.raises(ValueError, match=r"is missing \['3.bias'\] and has unknown \['3.bais' \(did you mean '3.bias'\?\)\]"):
        apply({"3.weight": params["3.weight"], "3.bais": params["3.bias"]}, x)
    with pytest.raises(ValueError, match=r"ti.functionalize: apply: `params` has unknown \['extra'\]; expected every key"):
        apply({**params, "extra": torch.zeros(2, dtype=torch.float64)}, x)
    with pytest.raises(ValueError, match=r"`params\['3.bias'\]` has shape \(1,\); the module's is \(2,\)"):
        apply({**params, "3.bias": torch.zeros(1, dtype=torch.float64)}, x)   # would broadcast silently
    with pytest.raises(TypeError, match=r"`params\['3.bias'\]` must be a tensor; got float"):
        apply({**params, "3.bias": 0.0}, x)


def test_apply_refuses_params_that_are_not_a_dict():
    apply, params = ti.functionalize(nn.Linear(3, 2))
    for bad in (list(params.values()), tuple(params.values()), params["weight"]):
        with pytest.raises(TypeError, match=r"ti.functionalize: apply: `params` must be a dict name -> tensor, like the "
                                            r"`params` ti.functionalize returned \(keys \['weight', 'bias'\]\); got "
                                            + type(bad).__name__ + r".*dict\(zip\(names, tensors\)\)"):
            apply(bad, torch.randn(4, 3))


def test_apply_takes_frozen_parameters_and_buffers_as_overrides():
    """Frozen parameters and buffers may be passed by name; the result is that of a module
    rebuilt with that state (load_state_dict), and gradients flow only to what is differentiated."""
    m = _mlp_with_bn()
    def sel(name, p):
        return name.startswith("3.")

    apply, params = ti.functionalize(m, trainable=sel)
    other = _mlp_with_bn()
    with torch.no_grad():
        for t in list(other.parameters()) + [other[1].running_mean, other[1].running_var]:
            t.add_(torch.rand_like(t))
    state = other.state_dict()
    frozen = {k: v for k, v in state.items() if not k.startswith("3.") and k != "1.num_batches_tracked"}
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(apply({**frozen, **params, "3.weight": state["3.weight"], "3.bias": state["3.bias"]}, x),
                               other(x), rtol=0, atol=0)
    g = torch.func.grad(lambda p: apply({**frozen, **p}, x).pow(2).sum())(params)
    reference = _mlp_with_bn()
    reference.load_state_dict({**state, "3.weight": params["3.weight"], "3.bias": params["3.bias"]})
    reference(x).pow(2).sum().backward()
    assert set(g) == {"3.weight", "3.bias"}
    torch.testing.assert_close(g["3.weight"], reference[3].weight.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(apply(params, x), m(x), rtol=0, atol=0)   # the overrides were not kept


def test_training_mode_errors_say_to_call_eval():
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    for layer in (nn.Dropout(0.5), nn.BatchNorm1d(4)):
        m = nn.Sequential(nn.Linear(3, 4), layer, nn.Linear(4, 2))
        with pytest.warns(UserWarning):
            apply, params = ti.functionalize(m)

        def loss(p, b, apply=apply):
            return torch.nn.functional.cross_entropy(apply(p, b[0]), b[1], reduction="none")

        with pytest.raises(RuntimeError, match=r"ti.functionalize: apply: Sequential has layers in training mode "
                                               r"\(1: " + type(layer).__name__ + r"\).*Call model.eval\(\) before "
                                               r"ti.functionalize.*pass the masks in the batch"):
            ti.per_example_grads(loss, params, (x, y))
        m.eval()   # apply runs the module in the mode it is in when called
        assert ti.per_example_grads(loss, params, (x, y))["0.weight"].shape == (6, 4, 3)
