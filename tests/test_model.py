"""functionalize: pure, never touches the module, handles buffers, subsets, ties and odd inputs."""

import pytest
import torch
from torch import nn

import tinfluence as ti
from models import TiedLM, build, cases


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
