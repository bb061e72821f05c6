"""The namespace every docstring example runs in (`python -m pytest` collects them from
`tinfluence/` as doctests): `ti`, `torch`, `F`, and a small fitted problem, so an example
reads as a user writes it: `ti.influence(loss, params, train, test, ihvp=...)`.

- `model`, `apply`, `params`: multinomial logistic regression 8 → 3 (float64), trained
  to its optimum on `train` (60 examples) with l2 = 1e-2;
- `loss(params, batch)`, `predict(params, batch)`, `output_loss(outputs, batch)`;
- `train`, `test` (5 examples): `(x, y)` pairs; `top_k`: 4 training ids.
"""

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(autouse=True)
def _doctest_problem(request):
    if not isinstance(request.node, pytest.DoctestItem):
        yield
        return
    import tinfluence as ti

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)     # as a user's session starts (the tests' own modules use float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(65, 8, generator=g, dtype=torch.float64)
    y = (x[:, :3] + 0.5 * torch.randn(65, 3, generator=g, dtype=torch.float64)).argmax(1)
    train, test = (x[:60], y[:60]), (x[60:], y[60:])
    model = torch.nn.Linear(8, 3).double()
    apply, params = ti.functionalize(model)

    def predict(params, batch):
        return apply(params, batch[0])

    def output_loss(outputs, batch):
        return F.cross_entropy(outputs, batch[1], reduction="none")

    def loss(params, batch):
        return output_loss(predict(params, batch), batch)

    params = ti.minimize(ti.objective(loss, train, l2=1e-2), params, gtol=1e-10, newton_steps=3)
    request.getfixturevalue("doctest_namespace").update(
        ti=ti, torch=torch, F=F, model=model, apply=apply, params=params, loss=loss, predict=predict,
        output_loss=output_loss, train=train, test=test, top_k=torch.tensor([0, 5, 10, 15]))
    yield
    torch.set_default_dtype(default)
