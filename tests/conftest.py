"""Shared fixtures: float64 everywhere, explicit generators, and the convex ground-truth case
(multinomial logistic regression on scikit-learn's digits, trained to a tight optimum)."""

import pytest
import torch
import torch.nn.functional as F

import tinfluence as ti

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)   # the tests are many small ops: one thread is fastest and immune to a busy machine


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def _digits(n_train=1000):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float64)
    y = torch.tensor(y)
    mean, std = X[:n_train].mean(0), X[:n_train].std(0) + 1e-6   # constant pixels stay 0
    X = (X - mean) / std
    return (X[:n_train], y[:n_train]), (X[n_train:], y[n_train:])


class DigitsLR:
    """Multinomial logistic regression on digits, L2 1e-2, float64, gradient max-norm <= 1e-12."""

    l2 = 1e-2

    def __init__(self, n_train=1000):
        self.train, self.test = _digits(n_train)
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
