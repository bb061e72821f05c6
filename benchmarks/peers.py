"""Adapters: one function per (library, method) that takes a `Task` and returns scores `[n_test, n_train]`.

Every adapter is timed whole: wrapping the model and data in the library's own objects,
fitting or caching what it caches, and scoring all test points. Each library gets exactly
the task's model, parameters and data, and its recommended settings (its defaults unless
noted in `NOTES`). The training objective is mean cross-entropy + (l2/2)‖θ‖²; libraries
whose loss has no regularizer receive l2 as Hessian damping/regularization, the same matrix.
Scores are returned as the library computes them; `run.py` normalizes sign and scale
by a least-squares factor to the method's reference and prints that factor.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.nn.functional as F
from kronfluence_adapter import NOTES as KRONFLUENCE_NOTES
from kronfluence_adapter import kronfluence_ekfac, kronfluence_ekfac_empirical, kronfluence_identity
from tasks import Task, pure
from torch_influence_adapter import NOTES as TORCH_INFLUENCE_NOTES
from torch_influence_adapter import torch_influence_cg, torch_influence_exact, torch_influence_lissa

import tinfluence as ti

INSTALL = {
    "captum": "pip install captum",
    "dattri": "pip install dattri",
    "pydvl": "pip install pydvl",
    "kronfluence": "pip install kronfluence",
    "pytorch_influence_functions": "pip install pytorch-influence-functions",
    "torch_influence": "pip install git+https://github.com/alstonlo/torch-influence",
}

# tinfluence's CG per task: (relative residual tol, rank of the Nyström preconditioner). The tolerance is the
# loosest at which the scores still reach exact influence (Pearson >= 0.9999 with the direct solve): on digits-mlp
# tol 1e-2 gives 0.99997, 1e-3 1.000000 in twice the time.
CG = {"digits-lr": (1e-2, 50), "digits-mlp": (1e-2, 100), "fmnist-lr": (1e-2, 100)}
LISSA = {"lr": dict(depth=400, batch_size=256, repeats=1), "mlp": dict(depth=300, batch_size=256, repeats=1)}
MAX_BATCH = 4096      # peers' loader batch: the whole training set on digits, 4096 examples on Fashion-MNIST


def _batch(task: Task) -> int:
    return min(task.n_train, MAX_BATCH)


def _ggn(task: Task, apply, params):
    return ti.ggn_vp(lambda p, b: apply(p, b[0]), params, task.train,
                     output_loss=lambda o, b: F.cross_entropy(o, b[1], reduction="none"), l2=task.l2)


def _checkpoints(task: Task):
    return [(ti.functionalize(task.make_model(state))[1], lr) for state, lr in task.checkpoints]


# ---------------------------------------------------------------- tinfluence

def ti_exact(task: Task):
    _, params, loss = pure(task)
    H = ti.hessian(ti.objective(loss, task.train, l2=task.l2), params)
    return ti.influence(loss, params, task.train, task.test, ihvp=ti.direct(H))


def ti_cg(task: Task):
    apply, params, loss = pure(task)
    op = ti.hvp(ti.objective(loss, task.train, l2=task.l2), params) if task.kind == "lr" else _ggn(task, apply, params)
    tol, rank = CG[task.name]
    precondition = ti.nystrom(op, rank=rank, generator=torch.Generator().manual_seed(0))
    return ti.influence(loss, params, task.train, task.test, ihvp=ti.cg(op, tol=tol, maxiter=1000, preconditioner=precondition))


def _ti_ekfac(task: Task, fisher: str):
    """EK-FAC influence with damping = l2 (the objective's weight decay), as kronfluence's `damping_factor`.

    Scored with `factored=True`: the training side meets the solved test stack through each linear
    layer's captured inputs and output gradients, never as per-example gradients.
    """
    apply, params, loss = pure(task)
    curv = ti.ekfac(loss, params, task.train, predict=lambda p, b: apply(p, b[0]),
                    output_loss=lambda o, b: F.cross_entropy(o, b[1], reduction="none"), fisher=fisher,
                    generator=torch.Generator().manual_seed(0) if fisher == "true" else None, damping=task.l2)
    return ti.influence(loss, params, task.train, task.test, ihvp=curv.ihvp, factored=True)


def ti_ekfac(task: Task):
    return _ti_ekfac(task, "true")


def ti_ekfac_empirical(task: Task):
    return _ti_ekfac(task, "empirical")


def ti_lissa(task: Task):
    _, params, loss = pure(task)
    ihvp = ti.lissa(loss, params, task.train, l2=task.l2, generator=torch.Generator().manual_seed(0), **LISSA[task.kind])
    return ti.influence(loss, params, task.train, task.test, ihvp=ihvp)


def ti_tracin(task: Task):
    _, _, loss = pure(task)
    return ti.tracin(loss, _checkpoints(task), task.train, task.test, factored=True)


def ti_tracin_last(task: Task):
    """TracIn on the last layer only (as captum's TracInCPFast): per checkpoint, the earlier layers are that checkpoint's."""
    last = {"weight", "bias"} if task.kind == "lr" else {"2.weight", "2.bias"}
    total = 0
    for state, lr in task.checkpoints:
        apply, params = ti.functionalize(task.make_model(state), lambda name, _: name in last)
        loss = lambda p, b, apply=apply: F.cross_entropy(apply(p, b[0]), b[1], reduction="none")  # noqa: E731
        total = total + lr * ti.grad_dot(loss, params, task.train, task.test, factored=True)
    return total


def ti_tracin_proj(task: Task):
    _, _, loss = pure(task)
    return ti.tracin(loss, _checkpoints(task), task.train, task.test, projection_dim=256,
                     generator=torch.Generator().manual_seed(0))


def ti_grad_dot(task: Task):
    _, params, loss = pure(task)
    return ti.grad_dot(loss, params, task.train, task.test, factored=True)


def ti_empirical_if(task: Task):
    _, params, loss = pure(task)
    return ti.empirical_if(loss, params, task.train, task.test, radius=1e-3)


# ---------------------------------------------------------------- dattri

def _dattri_task(task: Task, checkpoints):
    from dattri.task import AttributionTask

    model = task.make_model()

    def loss_func(params, pair):
        x, y = pair
        if x.dim() == 1:                       # dattri vmaps over single examples; its Hessians pass batches
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        return F.cross_entropy(torch.func.functional_call(model, params, x), y)

    return AttributionTask(loss_func=loss_func, model=model, checkpoints=checkpoints)


def _loaders(task: Task, train_batch: int | None = None):
    from torch.utils.data import DataLoader, TensorDataset

    train = DataLoader(TensorDataset(*task.train), batch_size=train_batch or _batch(task), shuffle=False)
    test = DataLoader(TensorDataset(*task.test), batch_size=task.n_test, shuffle=False)
    return train, test


def _dattri_if(task: Task, cls, **kw):
    attributor = cls(task=_dattri_task(task, task.make_model().state_dict()), device="cpu", **kw)
    train, test = _loaders(task)
    attributor.cache(train)
    return attributor.attribute(train, test).T


def dattri_exact(task: Task):
    from dattri.algorithm.influence_function import IFAttributorExplicit
    return _dattri_if(task, IFAttributorExplicit, regularization=task.l2)


def dattri_cg(task: Task):
    from dattri.algorithm.influence_function import IFAttributorCG
    return _dattri_if(task, IFAttributorCG, regularization=task.l2)


def dattri_lissa(task: Task):
    from dattri.algorithm.influence_function import IFAttributorLiSSA
    return _dattri_if(task, IFAttributorLiSSA, damping=task.l2)


def dattri_arnoldi(task: Task):
    from dattri.algorithm.influence_function import IFAttributorArnoldi
    return _dattri_if(task, IFAttributorArnoldi, regularization=task.l2)


def dattri_tracin(task: Task):
    from dattri.algorithm.tracin import TracInAttributor

    states = [state for state, _ in task.checkpoints]
    lrs = torch.tensor([lr for _, lr in task.checkpoints], dtype=torch.float64)
    attributor = TracInAttributor(task=_dattri_task(task, states), weight_list=lrs, normalized_grad=False, device="cpu")
    train, test = _loaders(task)
    return attributor.attribute(train, test).T


def dattri_grad_dot(task: Task):
    from dattri.algorithm.tracin import TracInAttributor

    attributor = TracInAttributor(task=_dattri_task(task, [task.make_model().state_dict()]),
                                  weight_list=torch.ones(1, dtype=torch.float64), normalized_grad=False, device="cpu")
    train, test = _loaders(task)
    return attributor.attribute(train, test).T


# ---------------------------------------------------------------- captum

def _captum_checkpoints(task: Task, states):
    folder = tempfile.mkdtemp(prefix="captum-ckpt-")
    paths, lrs = [], {}
    for i, (state, lr) in enumerate(states):
        path = os.path.join(folder, f"{i}.pt")
        torch.save(state, path)
        paths.append(path)
        lrs[path] = lr

    def load(model, path):
        model.load_state_dict(torch.load(path))
        return lrs[path]

    return paths, load


def _dataset(task: Task):
    from torch.utils.data import TensorDataset
    return TensorDataset(*task.train)


def _captum_tracin(task: Task, cls, states, **kw):
    model = task.make_model()
    paths, load = _captum_checkpoints(task, states)
    tracer = cls(model, _dataset(task), paths, checkpoints_load_func=load, batch_size=_batch(task), **kw)
    return tracer.influence(task.test)


def captum_tracin(task: Task):
    from captum.influence import TracInCP
    return _captum_tracin(task, TracInCP, task.checkpoints, loss_fn=torch.nn.CrossEntropyLoss(reduction="none"))


def _final_fc(model):
    return model if isinstance(model, torch.nn.Linear) else model[-1]


def captum_tracin_fast(task: Task):
    from captum.influence import TracInCPFast

    model = task.make_model()
    paths, load = _captum_checkpoints(task, task.checkpoints)
    tracer = TracInCPFast(model, _final_fc(model), _dataset(task), paths, checkpoints_load_func=load,
                          loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=_batch(task))
    return tracer.influence(task.test)


def captum_grad_dot(task: Task):
    from captum.influence import TracInCP
    return _captum_tracin(task, TracInCP, [(task.make_model().state_dict(), 1.0)],
                          loss_fn=torch.nn.CrossEntropyLoss(reduction="none"))


def _captum_if(task: Task, cls, **kw):
    model = task.make_model()
    paths, load = _captum_checkpoints(task, [(task.make_model().state_dict(), 1.0)])
    f = cls(model, _dataset(task), paths[0], checkpoints_load_func=load, loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
            batch_size=_batch(task), hessian_reg=task.l2 * task.n_train, **kw)
    return f.influence(task.test)


def captum_exact(task: Task):
    from captum.influence import NaiveInfluenceFunction
    return _captum_if(task, NaiveInfluenceFunction)


def captum_arnoldi(task: Task):
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction
    return _captum_if(task, ArnoldiInfluenceFunction)


# ---------------------------------------------------------------- pyDVL

def _pydvl(task: Task, cls, **kw):
    train, _ = _loaders(task)
    model = task.make_model()
    f = cls(model, F.cross_entropy, regularization=task.l2, **kw).fit(train)
    return f.influences(*task.test, *task.train, mode="up")


def pydvl_exact(task: Task):
    from pydvl.influence.torch import DirectInfluence
    return _pydvl(task, DirectInfluence)


def pydvl_cg(task: Task):
    from pydvl.influence.torch import CgInfluence
    return _pydvl(task, CgInfluence)


def pydvl_lissa(task: Task):
    from pydvl.influence.torch import LissaInfluence
    return _pydvl(task, LissaInfluence)


def pydvl_arnoldi(task: Task):
    from pydvl.influence.torch import ArnoldiInfluence
    return _pydvl(task, ArnoldiInfluence)


# ---------------------------------------------------------------- registry

ADAPTERS = {
    "tinfluence": {"exact": ti_exact, "cg": ti_cg, "lissa": ti_lissa, "ekfac": ti_ekfac,
                   "ekfac-emp": ti_ekfac_empirical, "tracin": ti_tracin, "tracin-fast": ti_tracin_last,
                   "tracin-proj": ti_tracin_proj,
                   "grad-dot": ti_grad_dot, "empirical-if": ti_empirical_if},
    "dattri": {"exact": dattri_exact, "cg": dattri_cg, "lissa": dattri_lissa, "arnoldi": dattri_arnoldi,
               "tracin": dattri_tracin, "grad-dot": dattri_grad_dot},
    "captum": {"exact": captum_exact, "arnoldi": captum_arnoldi, "tracin": captum_tracin, "tracin-fast": captum_tracin_fast,
               "grad-dot": captum_grad_dot},
    "pydvl": {"exact": pydvl_exact, "cg": pydvl_cg, "lissa": pydvl_lissa, "arnoldi": pydvl_arnoldi},
    "kronfluence": {"ekfac": kronfluence_ekfac, "ekfac-emp": kronfluence_ekfac_empirical, "grad-dot": kronfluence_identity},
    "torch_influence": {"exact": torch_influence_exact, "cg": torch_influence_cg, "lissa": torch_influence_lissa},
}

# (library, method) pairs whose recommended settings approximate the method (no pass/fail check).
APPROXIMATE = {("dattri", "tracin"), ("dattri", "grad-dot"), ("captum", "tracin-fast"), ("tinfluence", "tracin-fast")}

# Installed peers without an adapter, and why.
NOT_WIRED = {
    "pytorch_influence_functions": "its entry points read a config and loop over test points one at a time, writing "
                                   "JSON files; it cannot take a given parameter set and score a test set in one call",
}

# Methods each task runs (tinfluence's reference method for each is the same name).
TASK_METHODS = {
    "digits-lr": ["exact", "cg", "lissa", "arnoldi", "ekfac", "ekfac-emp", "tracin", "tracin-fast", "tracin-proj",
                  "grad-dot", "empirical-if"],
    "digits-mlp": ["cg", "lissa", "arnoldi", "ekfac", "ekfac-emp", "tracin", "tracin-fast", "tracin-proj", "grad-dot", "empirical-if"],
    "fmnist-lr": ["cg", "ekfac", "ekfac-emp", "tracin", "tracin-fast", "grad-dot"],
    "fmnist-mlp": ["ekfac", "ekfac-emp", "tracin", "tracin-fast", "grad-dot"],
}

NOTES = {
    ("tinfluence", "cg"): "all test points solved together, preconditioned by ti.nystrom (rank 50 on digits-lr, 100 "
                          "otherwise, its sketch included in the time); relative residual tol 1e-2 (exact Hessian on the "
                          "LR tasks, Gauss-Newton on digits-mlp: the loosest that still reaches Pearson 0.9999 with "
                          "exact influence)",
    ("tinfluence", "ekfac"): "ti.ekfac(fisher=\"true\", labels sampled from the softmax through a generator seeded 0), "
                             "damping = l2, default chunks; scores through ti.influence(ihvp=curv.ihvp, factored=True) "
                             "(training linear layers as their factors)",
    ("tinfluence", "ekfac-emp"): "ti.ekfac(fisher=\"empirical\"), otherwise as ekfac",
    ("tinfluence", "lissa"): "depth 400 (LR) / 300 (MLP), batch 256, 1 repeat, scale auto",
    ("tinfluence", "tracin"): "factored=True: exact Gram matrices of every linear layer from its inputs and output "
                              "gradients (ti.factored), per-example gradients never formed",
    ("tinfluence", "grad-dot"): "factored=True (as tracin)",
    ("tinfluence", "tracin-fast"): "the last layer's parameters only, as captum's TracInCPFast: ti.grad_dot(factored=True) "
                                   "per checkpoint, earlier layers at that checkpoint",
    ("tinfluence", "tracin-proj"): "random projection to 256 dims",
    ("tinfluence", "empirical-if"): "ascent/descent, radius 1e-3",
    ("dattri", "cg"): "library default: 10 iterations",
    ("dattri", "lissa"): "library defaults: batch 1, depth 5000, scaling 50",
    ("dattri", "arnoldi"): "library defaults",
    ("dattri", "tracin"): "library default: gradients randomly projected to 512 dims",
    ("dattri", "grad-dot"): "TracInAttributor on the final parameters, weight 1, default 512-dim projection",
    ("captum", "exact"): "NaiveInfluenceFunction; its Hessian is of the summed loss, so hessian_reg = n·l2",
    ("captum", "grad-dot"): "TracInCP on the final parameters, weight 1",
    ("captum", "tracin-fast"): "TracInCPFast: last layer only (the whole model for LR)",
    ("captum", "arnoldi"): "library defaults",
    ("pydvl", "cg"): "library defaults (rtol 1e-4)",
    ("pydvl", "lissa"): "library defaults (maxiter 1000, scale 10)",
    ("pydvl", "arnoldi"): "library defaults (rank 10)",
}
NOTES.update(KRONFLUENCE_NOTES)
NOTES.update(TORCH_INFLUENCE_NOTES)
