"""Benchmark tasks: a trained model, its data, checkpoints, and ground truth computed independently.

A task is built once per run by `build(name, ...)` and saved to a file that every child
process (one per task, library and method) loads, so every library sees exactly the same
model, parameters and data. Ground truth never goes through tinfluence's kernels: the
gradients, Hessians and Gauss-Newton matrices of the logistic regression and of the tanh
MLP are written out in closed form here (softmax-cross-entropy algebra and hand-written
backpropagation), then solved densely with `torch.linalg`.

Tasks:
  digits-lr   multinomial logistic regression, standardized sklearn digits, l2=1e-2, float64;
              exact influence (dense closed-form Hessian) and actual leave-one-out retraining.
  digits-mlp  64-128-10 tanh MLP, l2=1e-2, trained by deterministic mini-batch SGD whose
              epochs give the TracIn checkpoints; exact = dense closed-form Gauss-Newton.
  fmnist-lr   logistic regression 784→10 on Fashion-MNIST (Debian `dataset-fashion-mnist`), float32;
              the large task (60k train × 1000 test) and the scaling table in n_train.
  fmnist-mlp  784-128-10 tanh MLP on Fashion-MNIST, float32, SGD checkpoints; no exact influence (EK-FAC is compared
              with kronfluence's).
  fmnist-scaling  fmnist-lr after 2 SGD epochs, 10 test points, for time and memory against n_train.

On Fashion-MNIST the references are computed for the first `REF_ROWS` test points only (a
dense reference for 1000 test points would cost more than every method benchmarked).
"""

from __future__ import annotations

import gzip
import os
import subprocess
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import tinfluence as ti
from tinfluence.demo import load_digits_split

DTYPE = torch.float64
L2 = 1e-2
REF_ROWS = 20
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"


@dataclass
class Task:
    """Everything a method needs, identical for every library.

    `l2` is the weight decay of the training objective R(θ) = mean loss + (l2/2)‖θ‖²; a
    library whose loss has no regularizer receives it as damping λ = l2 on the data
    Hessian, which is the same matrix. `checkpoints` are `(state_dict, lr)` pairs of one
    deterministic SGD run. `exact` is the dense influence `[n_test, n_train]` in
    tinfluence's sign (positive = helpful); `exact_tracin` the TracIn scores over the
    checkpoints; `loo` the actual leave-one-out changes of the test losses for the
    training ids `loo_ids`.
    """

    name: str
    kind: str                    # "lr" or "mlp"
    train: tuple
    test: tuple
    state: dict                  # trained parameters, as a state_dict of `make_model()`
    l2: float
    hidden: int = 0
    checkpoints: list = field(default_factory=list)
    exact: torch.Tensor | None = None
    exact_tracin: torch.Tensor | None = None
    grad_dot: torch.Tensor | None = None
    loo: torch.Tensor | None = None
    loo_ids: torch.Tensor | None = None
    ihvp_test: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return self.train[0].dtype

    def make_model(self, state: dict | None = None) -> nn.Module:
        """A fresh module in the task's dtype with the trained (or the given) parameters, in eval mode."""
        d, c = self.train[0].shape[1], int(self.train[1].max()) + 1
        torch.manual_seed(0)
        model = nn.Linear(d, c) if self.kind == "lr" else nn.Sequential(nn.Linear(d, self.hidden), nn.Tanh(), nn.Linear(self.hidden, c))
        model = model.to(self.dtype)
        model.load_state_dict(state if state is not None else self.state)
        return model.eval()

    def init_state(self) -> dict:
        """The seeded initial parameters (torch.manual_seed(0)) that SGD and L-BFGS start from."""
        return _init_state(self.kind, self.train[0].shape[1], int(self.train[1].max()) + 1, self.hidden, self.dtype)

    @property
    def n_train(self) -> int:
        return self.train[0].shape[0]

    @property
    def n_test(self) -> int:
        return self.test[0].shape[0]


def pure(task: Task):
    """`(apply, params, loss)` for tinfluence: the trained model as a pure function."""
    apply, params = ti.functionalize(task.make_model())

    def loss(p, batch):
        x, y = batch
        return F.cross_entropy(apply(p, x), y, reduction="none")

    return apply, params, loss


# ---------------------------------------------------------------- data

def digits(n_train: int, n_test: int):
    """Standardized sklearn digits (`ti.demo.load_digits_split`), float64: n_train and the next n_test examples."""
    train, test, _ = load_digits_split(n_train)
    if n_test > len(test[0]):
        raise SystemExit(f"digits has {n_train + len(test[0])} examples; n_train + n_test = {n_train + n_test} is too many.")
    return train, ti.take(test, slice(0, n_test))


def fmnist_files() -> dict | None:
    """Paths of the four gzipped idx files of Debian's dataset-fashion-mnist, or None."""
    try:
        listed = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = []
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    found = {n: p for p in listed for n in names if p.endswith("/" + n)}
    if len(found) < 4:
        found = {n: os.path.join(FMNIST_DIR, n) for n in names if os.path.exists(os.path.join(FMNIST_DIR, n))}
    return found if len(found) == 4 else None


def _idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fmnist(n_train: int, n_test: int, dtype=torch.float32):
    """Fashion-MNIST flattened to 784 features, standardized with the training part's statistics."""
    files = fmnist_files()
    if files is None:
        raise FileNotFoundError(f"fmnist-lr needs Debian's dataset-fashion-mnist package: {FMNIST_INSTALL}")
    Xtr = torch.tensor(_idx(files["train-images-idx3-ubyte.gz"])[:n_train].reshape(n_train, -1), dtype=DTYPE) / 255
    ytr = torch.tensor(_idx(files["train-labels-idx1-ubyte.gz"])[:n_train].astype(np.int64))
    Xte = torch.tensor(_idx(files["t10k-images-idx3-ubyte.gz"])[:n_test].reshape(n_test, -1), dtype=DTYPE) / 255
    yte = torch.tensor(_idx(files["t10k-labels-idx1-ubyte.gz"])[:n_test].astype(np.int64))
    mean, std = Xtr.mean(0), Xtr.std(0) + 1e-2
    return (((Xtr - mean) / std).to(dtype), ytr), (((Xte - mean) / std).to(dtype), yte)


# ---------------------------------------------------------------- closed-form ground truth

def _lr_parts(state: dict, X: torch.Tensor):
    """Softmax probabilities and the inputs with a bias column, for θ = [W | b] as `[c, d+1]`."""
    Xb = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    theta = torch.cat([state["weight"], state["bias"][:, None]], 1)
    return torch.softmax(Xb @ theta.T, 1), Xb


def lr_grads(state: dict, data) -> torch.Tensor:
    """Per-example cross-entropy gradients `[n, c·(d+1)]`: (p − onehot(y)) ⊗ [x, 1]."""
    X, y = data
    p, Xb = _lr_parts(state, X)
    delta = p - F.one_hot(y, p.shape[1]).to(p.dtype)
    return (delta[:, :, None] * Xb[:, None, :]).reshape(len(X), -1)


def lr_hvp(state: dict, X: torch.Tensor, l2: float):
    """`V [k, c·(d+1)] -> (H + l2 I) V`, H the mean cross-entropy Hessian: (1/n) Σ (diag p − ppᵀ) ⊗ x̃x̃ᵀ."""
    p, Xb = _lr_parts(state, X)
    c = p.shape[1]

    def apply(V):
        Z = torch.einsum("kad,nd->kna", V.reshape(len(V), c, -1), Xb)          # [k, n, c]
        MZ = p * Z - p * (p * Z).sum(-1, keepdim=True)                        # (diag p − ppᵀ) z
        return torch.einsum("kna,nd->kad", MZ, Xb).reshape(len(V), -1) / len(X) + l2 * V

    return apply


def lr_hessian(state: dict, X: torch.Tensor, l2: float) -> torch.Tensor:
    """Dense `[P, P]` closed-form Hessian of the objective (columns of `lr_hvp` on the identity)."""
    P = state["weight"].numel() + state["bias"].numel()
    H = torch.cat([lr_hvp(state, X, l2)(E) for E in torch.eye(P, dtype=X.dtype).split(256)])
    return (H + H.T) / 2


def plain_cg(apply, B: torch.Tensor, tol: float = 1e-12, maxiter: int = 5000) -> torch.Tensor:
    """Textbook conjugate gradients on the rows of B (k systems), used for references too large to factorize."""
    x, r = torch.zeros_like(B), B.clone()
    p, rs = r.clone(), (r * r).sum(1)
    bound = tol**2 * rs
    for _ in range(maxiter):
        Ap = apply(p)
        alpha = rs / (p * Ap).sum(1)
        x, r = x + alpha[:, None] * p, r - alpha[:, None] * Ap
        new = (r * r).sum(1)
        if bool((new <= bound).all()):
            return x
        p, rs = r + (new / rs)[:, None] * p, new
    raise RuntimeError(f"reference CG did not converge in {maxiter} iterations")


def mlp_forward(state: dict, X: torch.Tensor):
    h = torch.tanh(X @ state["0.weight"].T + state["0.bias"])
    return h, h @ state["2.weight"].T + state["2.bias"]


def _with_one(A: torch.Tensor) -> torch.Tensor:
    return torch.cat([A, torch.ones(len(A), 1, dtype=A.dtype)], 1)


def _mlp_backprop(state: dict, data):
    """Hand-written backpropagation: the layer inputs x̃, h̃ and output gradients d_h, d_o of each example."""
    X, y = data
    h, o = mlp_forward(state, X)
    d_o = torch.softmax(o, 1) - F.one_hot(y, o.shape[1]).to(o.dtype)
    d_h = (d_o @ state["2.weight"]) * (1 - h**2)
    return _with_one(X), d_h, _with_one(h), d_o


def mlp_grads(state: dict, data) -> torch.Tensor:
    """Per-example gradients by hand-written backpropagation, `[n, P]`: [W1 | b1] then [W2 | b2], row-major."""
    x, d_h, h, d_o = _mlp_backprop(state, data)
    n = len(x)
    return torch.cat([(d_h[:, :, None] * x[:, None, :]).reshape(n, -1), (d_o[:, :, None] * h[:, None, :]).reshape(n, -1)], 1)


def _kron_sum(A: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Σ_i A_i ⊗ u_i v_iᵀ as `[(j, a), (k, b)]`: A `[n, J, K]`, U `[n, a]`, V `[n, b]`."""
    n, J, K = A.shape
    S = A.reshape(n, -1).T @ (U[:, :, None] * V[:, None, :]).reshape(n, -1)     # [(j, k), (a, b)]
    return S.reshape(J, K, U.shape[1], V.shape[1]).permute(0, 2, 1, 3).reshape(J * U.shape[1], K * V.shape[1])


def mlp_ggn(state: dict, X: torch.Tensor, l2: float) -> torch.Tensor:
    """Dense Gauss-Newton matrix (1/n) Σ J_iᵀ (diag p_i − p_i p_iᵀ) J_i + l2 I, in `mlp_grads`' order.

    The output Jacobian of example i is J_i = [D_i ⊗ x̃_iᵀ, I ⊗ h̃_iᵀ] with D_i = ∂o/∂(pre-activation)
    `[c, hidden]`, x̃ = [x, 1], h̃ = [h, 1]; the blocks of Σ J_iᵀ M_i J_i are then Kronecker sums.
    """
    h, o = mlp_forward(state, X)
    p = torch.softmax(o, 1)
    M = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]                     # [n, c, c]
    D = state["2.weight"][None] * (1 - h**2)[:, None, :]                        # [n, c, hidden]
    U, V = _with_one(X), _with_one(h)
    DM = D.transpose(1, 2) @ M                                                  # [n, hidden, c]
    top = torch.cat([_kron_sum(DM @ D, U, U), _kron_sum(DM, U, V)], 1)
    bottom = torch.cat([_kron_sum(DM, U, V).T, _kron_sum(M, V, V)], 1)
    G = torch.cat([top, bottom]) / len(X)
    G = (G + G.T) / 2
    return G + l2 * torch.eye(len(G), dtype=X.dtype)


def solve_dense(A: torch.Tensor, G_test: torch.Tensor) -> torch.Tensor:
    L = torch.linalg.cholesky(A)
    return torch.cholesky_solve(G_test.T, L).T


# ---------------------------------------------------------------- training

def sgd_checkpoints(task: Task, *, epochs: int, lr: float, batch: int, every: int, seed: int = 0) -> list:
    """Deterministic mini-batch SGD on mean loss + (l2/2)‖θ‖² from the module's seeded init.

    Returns `[(state_dict, lr), ...]` saved every `every` epochs (the final one included).
    """
    model = task.make_model(task.init_state())
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=task.l2)
    g = torch.Generator().manual_seed(seed)
    X, y = task.train
    out = []
    for epoch in range(epochs):
        for ids in torch.randperm(len(X), generator=g).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(X[ids]), y[ids]).backward()
            opt.step()
        if (epoch + 1) % every == 0:
            out.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, lr))
    return out


def _init_state(kind: str, d: int, c: int, hidden: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    model = nn.Linear(d, c) if kind == "lr" else nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, c))
    return {k: v.to(dtype) for k, v in model.state_dict().items()}


def _optimum(task: Task, *, newton: bool, maxiter: int = 5000) -> dict:
    """θ̂: L-BFGS (plus Newton-CG polish when `newton`) on the exact training objective."""
    apply, params0 = ti.functionalize(task.make_model(task.init_state()))
    loss = lambda p, b: F.cross_entropy(apply(p, b[0]), b[1], reduction="none")  # noqa: E731
    R = ti.objective(loss, task.train, l2=task.l2)
    zeros = ti.tree.zeros_like(params0)
    return ti.minimize(R, zeros, gtol=1e-12 if newton else 1e-9, maxiter=maxiter, newton_steps=5 if newton else 0)


def _loo(task: Task, ids: torch.Tensor) -> torch.Tensor:
    """Actual change of each test loss when each training id is removed (warm-started L-BFGS + Newton)."""
    _, params, loss = pure(task)
    trainer = ti.lbfgs_trainer(loss, l2=task.l2, gtol=1e-12, newton_steps=5)
    return ti.leave_one_out(trainer, params, task.train, task.test, ids, measure=loss, progress=False)


# ---------------------------------------------------------------- builders

def lr_dots(state: dict, test, train) -> torch.Tensor:
    """⟨g_test, g_train⟩ `[n_test, n_train]` from the closed form g = δ ⊗ x̃ (δ = p − onehot(y)): (δ·δ')(x̃·x̃')."""
    (p, Xb), (q, Yb) = _lr_parts(state, test[0]), _lr_parts(state, train[0])
    delta = p - F.one_hot(test[1], p.shape[1]).to(p.dtype)
    epsilon = q - F.one_hot(train[1], q.shape[1]).to(q.dtype)
    return (delta @ epsilon.T) * (Xb @ Yb.T)


def mlp_dots(state: dict, test, train) -> torch.Tensor:
    """⟨g_test, g_train⟩ `[n_test, n_train]` from `mlp_grads`' outer products: Σ_layers (d·d')(ã·ã')."""
    x1, dh1, h1, do1 = _mlp_backprop(state, test)
    x2, dh2, h2, do2 = _mlp_backprop(state, train)
    return (dh1 @ dh2.T) * (x1 @ x2.T) + (do1 @ do2.T) * (h1 @ h2.T)


def _dots(task: Task, state: dict, rows: int | None = None) -> torch.Tensor:
    """Closed-form gradient dot products `[rows, n_train]` in float64, 4096 training examples at a time."""
    dots = lr_dots if task.kind == "lr" else mlp_dots
    wide = {k: v.to(torch.float64) for k, v in state.items()}
    test = (task.test[0][:rows].to(torch.float64), task.test[1][:rows])
    return torch.cat([dots(wide, test, (X.to(torch.float64), y)) for X, y in zip(*(t.split(4096) for t in task.train))], 1)


def _reference_tracin(task: Task, rows: int | None = None) -> torch.Tensor:
    return sum(lr * _dots(task, state, rows) for state, lr in task.checkpoints)


def build_digits_lr(n_train: int, n_test: int, loo: int) -> Task:
    train, test = digits(n_train, n_test)
    task = Task("digits-lr", "lr", train, test, state={}, l2=L2)
    task.state = _optimum(task, newton=True)
    H = lr_hessian(task.state, train[0], task.l2)
    task.exact = (solve_dense(H, lr_grads(task.state, test)) @ lr_grads(task.state, train).T) / n_train
    task.checkpoints = sgd_checkpoints(task, epochs=10, lr=0.1, batch=32, every=2)
    task.exact_tracin = _reference_tracin(task)
    task.grad_dot = _dots(task, task.state)
    if loo:
        ids = torch.arange(loo) * (n_train // loo)
        task.loo_ids, task.loo = ids, _loo(task, ids)
    return task


def build_digits_mlp(n_train: int, n_test: int, hidden: int = 128) -> Task:
    train, test = digits(n_train, n_test)
    task = Task("digits-mlp", "mlp", train, test, state={}, l2=L2, hidden=hidden)
    task.checkpoints = sgd_checkpoints(task, epochs=30, lr=0.1, batch=32, every=5)
    task.state = task.checkpoints[-1][0]
    G = mlp_ggn(task.state, train[0], task.l2)
    task.exact = (solve_dense(G, mlp_grads(task.state, test)) @ mlp_grads(task.state, train).T) / n_train
    task.exact_tracin = _reference_tracin(task)
    task.grad_dot = _dots(task, task.state)
    return task


def build_fmnist_lr(n_train: int, n_test: int, *, checkpoints: bool = True, ihvp_test: int | None = REF_ROWS,
                    optimum: bool = True) -> Task:
    """Logistic regression on Fashion-MNIST, float32, trained to the optimum in float64 (or, with
    `optimum=False`, the parameters after 2 SGD epochs: enough for timing the scaling in n_train).

    `exact` (first `REF_ROWS` test points) from textbook CG in float64 on the closed-form Hessian (P = 7850).
    """
    train, test = fmnist(n_train, n_test)
    wide = Task("fmnist-lr", "lr", (train[0].double(), train[1]), test, state={}, l2=L2)
    state = _optimum(wide, newton=True, maxiter=1000) if optimum else sgd_checkpoints(wide, epochs=2, lr=0.05, batch=256, every=2)[0][0]
    task = Task("fmnist-lr", "lr", train, test, state={k: v.float() for k, v in state.items()}, l2=L2,
                ihvp_test=min(ihvp_test, n_test) if ihvp_test else None)
    rows = min(REF_ROWS, n_test)
    Xte = test[0][:rows].double()
    U = plain_cg(lr_hvp(state, wide.train[0], task.l2), lr_grads(state, (Xte, test[1][:rows])), tol=1e-7)
    task.exact = torch.cat([U @ lr_grads(state, chunk).T for chunk in zip(*(t.split(4096) for t in wide.train))], 1) / n_train
    task.grad_dot = _dots(task, task.state, rows)
    if checkpoints:
        task.checkpoints = sgd_checkpoints(task, epochs=3, lr=0.05, batch=256, every=1)
        task.exact_tracin = _reference_tracin(task, rows)
    return task


def build_fmnist_mlp(n_train: int, n_test: int, hidden: int = 128) -> Task:
    """784-128-10 tanh MLP on Fashion-MNIST, float32; 3 SGD epochs give the TracIn checkpoints (no exact influence);
    inverse-HVP methods (EK-FAC) score the first `REF_ROWS` test points.
    """
    train, test = fmnist(n_train, n_test)
    task = Task("fmnist-mlp", "mlp", train, test, state={}, l2=1e-4, hidden=hidden, ihvp_test=min(REF_ROWS, n_test))
    task.checkpoints = sgd_checkpoints(task, epochs=3, lr=0.05, batch=128, every=1)
    task.state = task.checkpoints[-1][0]
    rows = min(REF_ROWS, n_test)
    task.exact_tracin = _reference_tracin(task, rows)
    task.grad_dot = _dots(task, task.state, rows)
    return task


def build_fmnist_scaling(n_train: int, n_test: int) -> Task:
    return build_fmnist_lr(n_train, n_test, checkpoints=False, ihvp_test=None, optimum=False)


BUILDERS = {"digits-lr": build_digits_lr, "digits-mlp": build_digits_mlp, "fmnist-lr": build_fmnist_lr,
            "fmnist-mlp": build_fmnist_mlp, "fmnist-scaling": build_fmnist_scaling}


def build(name: str, n_train: int, n_test: int, *, loo: int = 0) -> Task:
    if name == "digits-lr":
        return build_digits_lr(n_train, n_test, loo)
    return BUILDERS[name](n_train, n_test)


def save(task: Task, path: str) -> None:
    torch.save(task.__dict__, path)


def load(path: str) -> Task:
    fields = torch.load(path, weights_only=False)
    task = Task.__new__(Task)
    task.__dict__.update(fields)
    return task
