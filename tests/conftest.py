"""Shared fixtures: float64 everywhere, explicit generators, and the convex ground-truth case
(multinomial logistic regression on scikit-learn's digits, trained to a tight optimum)."""

import pytest
import torch
import torch.nn.functional as F

import tinfluence as ti
from tinfluence.demo import load_digits_split

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)   # the tests are many small ops: one thread is fastest and immune to a busy machine


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


class DigitsLR:
    """Multinomial logistic regression on digits, L2 1e-2, float64, gradient max-norm <= 1e-12."""

    l2 = 1e-2

    def __init__(self, n_train=1000):
        self.train, self.test, _ = load_digits_split(n_train)   # standardized, float64
        self.model = torch.nn.Linear(64, 10)
        self.apply, params0 = ti.functionalize(self.model)
        self.params = ti.minimize(self.objective(self.train), ti.tree.zeros_like(params0), gtol=1e-12, newton_steps=5)

    def loss(self, params, batch):
        x, y = batch
        return F.cross_entropy(self.apply(params, x), y, reduction="none")

    def objective(self, data, **kw):
        return ti.objective(self.loss, data, l2=self.l2, **kw)


_CACHE = {}


@pytest.fixture(scope="session")
def digits_lr():
    """The trained digits model (shared by the session; never mutate it)."""
    if "lr" not in _CACHE:
        _CACHE["lr"] = DigitsLR()
    return _CACHE["lr"]
