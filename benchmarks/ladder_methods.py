"""The ladder's methods and peers: one registry entry each, `name -> Method(fn(task) -> scores [n_test, n_train])`.

Scores are in tinfluence's sign (positive = helpful: removing the example raises the test
loss); every peer used here reports that sign (benchmarks/RESULTS.md, `scale` column: all
positive), so LDS needs no fitted factor. An entry whose tinfluence function does not exist
in this version, or whose peer library is not installed, becomes a row saying so.

Each fn is timed whole in a fresh process (ladder.py): wrapping, fitting, scoring every test point.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tasks import pure

import tinfluence as ti

PEERS_PYTHON = os.environ.get("TINFLUENCE_PEERS_PYTHON", "/work/venv-peers/bin/python")
DEEP = ("mlp", "cnn")
ALL = ("lr", "mlp", "cnn")
CG_TOL, NYSTROM_RANK = 1e-3, 100
K_SIDE, COMPRESSED_DAMPING = 32, 0.1
TRAK_DIM = 512        # dattri's default; traker's 2048 exceeds n_train = 1000 and leaves ΦᵀΦ singular


@dataclass(frozen=True)
class Method:
    """One row of the ladder: `fn(task) -> [n_test, n_train]` scores, the task kinds it applies to, and what it needs."""

    label: str
    library: str
    fn: Callable
    kinds: tuple = ALL
    needs_ti: tuple = ()           # tinfluence attributes it calls that may not exist yet
    needs_module: str | None = None  # the peer's import name
    ensemble: int = 0              # independently trained models it needs (TRAK)
    note: str = ""

    def unavailable(self, task) -> str | None:
        """Why this method cannot run on `task` (None when it can)."""
        if task.kind not in self.kinds:
            return f"does not apply to {task.kind} models"
        if self.ensemble > task.spec.ensemble:
            return f"needs {self.ensemble} ensemble models; this run trains {task.spec.ensemble} (--quick)"
        missing = [f"ti.{a}" for a in self.needs_ti if not hasattr(ti, a)]
        if missing:
            return f"not available in this version ({', '.join(missing)} does not exist)"
        if self.needs_module and not _importable(self.needs_module):
            return f"not installed in the peers environment ({PEERS_PYTHON}): pip install {self.needs_module}"
        return None


_IMPORTABLE: dict = {}


def _importable(module: str) -> bool:
    if module not in _IMPORTABLE:
        _IMPORTABLE[module] = os.path.exists(PEERS_PYTHON) and subprocess.run(
            [PEERS_PYTHON, "-c", f"import {module}"], capture_output=True, check=False).returncode == 0
    return _IMPORTABLE[module]


# ---------------------------------------------------------------- tinfluence

def _output_loss(o, b):
    return F.cross_entropy(o, b[1], reduction="none")


def _predict(apply):
    return lambda p, b: apply(p, b[0])


def _curvature(task, apply, params, loss):
    """The objective's Hessian-vector product (LR) or its Gauss-Newton-vector product (deep), both + l2·I."""
    if task.kind == "lr":
        return ti.hvp(ti.objective(loss, task.train, l2=task.l2), params)
    return ti.ggn_vp(_predict(apply), params, task.train, output_loss=_output_loss, l2=task.l2)


def influence_direct(task):
    apply, params, loss = pure(task)
    H = ti.to_dense(_curvature(task, apply, params, loss), params)
    return ti.influence(loss, params, task.train, task.test, ihvp=ti.direct(H))


def influence_cg(task):
    apply, params, loss = pure(task)
    op = _curvature(task, apply, params, loss)
    pre = ti.nystrom(op, rank=NYSTROM_RANK, generator=torch.Generator().manual_seed(0))
    return ti.influence(loss, params, task.train, task.test, ihvp=ti.cg(op, tol=CG_TOL, maxiter=1000, preconditioner=pre),
                        factored=_factored(task))


def _factored(task) -> bool:
    return task.kind != "cnn"          # the CNN rows were measured with dense per-example gradients


def tracin(task):
    _, _, loss = pure(task)
    checkpoints = [(ti.functionalize(task.make_model(state))[1], lr) for state, lr in task.checkpoints]
    return ti.tracin(loss, checkpoints, task.train, task.test, factored=_factored(task))


def empirical_if(task):
    _, params, loss = pure(task)
    return ti.empirical_if(loss, params, task.train, task.test, radius=1e-3)


def grad_dot(task):
    _, params, loss = pure(task)
    return ti.grad_dot(loss, params, task.train, task.test, factored=_factored(task))


def grad_cos(task):
    _, params, loss = pure(task)
    return ti.grad_cos(loss, params, task.train, task.test, factored=_factored(task))


def newton_loo(task):
    """One Newton step per removed example; the LR's Hessian is its Gauss-Newton matrix, so the fast factors apply."""
    apply, params, loss = pure(task)
    return ti.newton_loo(loss, params, task.train, task.test, l2=task.l2, indices=torch.arange(task.n_train),
                         predict=_predict(apply), output_loss=_output_loss)


def _kfac_family(task, fit, fisher: str):
    """Influence with the (E)K-FAC curvature of `fisher` ("empirical" or "ggn"), damping l2 (the objective's)."""
    apply, params, loss = pure(task)
    curvature = fit(loss, params, task.train, predict=_predict(apply), output_loss=_output_loss, fisher=fisher,
                    damping=task.l2)
    return ti.influence(loss, params, task.train, task.test, ihvp=curvature.ihvp, factored=_factored(task))


def base_run(task):
    """The base model's SGD run as a `ti.training_run`: init seed 0, order Generator(0), SGD with weight decay l2."""
    spec = task.spec
    _, params0 = ti.functionalize(task.make_model(task.init_state(0)))
    _, _, loss = pure(task)
    step = ti.optim.sgd(lr=spec.lr, weight_decay=task.l2)
    return ti.training_run(loss, params0, task.train, step, epochs=spec.epochs, batch_size=spec.batch,
                           generator=torch.Generator().manual_seed(0))


def trajectory(task):
    """Influence through the recorded base run (the same-schedule ground truth's run), on the test loss."""
    _, _, loss = pure(task)
    return ti.trajectory_influence(base_run(task), task.test, measure=loss)


def compressed(task):
    """LoGra: gradients projected to K_SIDE per side of each matrix (vectors: K_SIDE), damping 0.1 × mean diag Ĉ."""
    _, params, loss = pure(task)
    projector = ti.projector(params, k_in=K_SIDE, k_out=K_SIDE, k_rest=K_SIDE, generator=torch.Generator().manual_seed(0))
    grads = ti.compressed_grads(loss, params, task.train, projector=projector)         # [n_train, dim]
    damping = COMPRESSED_DAMPING * float(grads.pow(2).sum(1).mean()) / grads.shape[1]   # × mean diagonal of Ĉ = ĝᵀĝ / n
    return ti.compressed_influence(loss, params, task.train, task.test, projector=projector, damping=damping)


# ---------------------------------------------------------------- peers

def _peers():
    import peers
    return peers


def kronfluence_ekfac(task):
    import kronfluence_adapter
    return kronfluence_adapter.kronfluence_ekfac(task)


def dattri_cg(task):
    return _peers().dattri_cg(task)


def dattri_tracin(task):
    return _peers().dattri_tracin(task)


def captum_tracin(task):
    return _peers().captum_tracin(task)


def _ensemble(task, k: int) -> list:
    """The first k TRAK ensemble members (state_dicts); LR has one optimum, so its ensemble is θ̂."""
    if task.kind == "lr":
        return [task.state]
    if len(task.ensemble) < k:
        raise ValueError(f"the task holds {len(task.ensemble)} ensemble models, TRAK-{k} needs {k}")
    return list(task.ensemble[:k])


def dattri_trak(task, k: int):
    """Dattri's TRAKAttributor over k independently trained models, CPU projector, float64 gradients."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    model = task.make_model()

    def _pair(pair):
        x, y = pair
        return (x.unsqueeze(0), y.unsqueeze(0)) if x.dim() == 1 else (x, y)

    def margin(params, pair):             # TRAK's model output: log-odds of the correct class
        x, y = _pair(pair)
        logp = -F.cross_entropy(torch.func.functional_call(model, params, x), y)
        return logp - torch.log(1 - torch.exp(logp))

    def correct_probability(params, pair):
        x, y = _pair(pair)
        return torch.exp(-F.cross_entropy(torch.func.functional_call(model, params, x), y))

    attribution = AttributionTask(loss_func=margin, model=model, checkpoints=_ensemble(task, k))
    attributor = TRAKAttributor(task=attribution, correct_probability_func=correct_probability, device="cpu")
    train, test = _peers()._loaders(task)
    attributor.cache(train)
    return attributor.attribute(test).T


def traker_trak(task, k: int):
    """Traker's TRAKer over k models with its CPU BasicProjector (float32: its stores are float32)."""
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    states = [{n: v.float() for n, v in s.items()} for s in _ensemble(task, k)]
    model = task.make_model().float()
    grad_dim = sum(p.numel() for p in model.parameters())
    dim = min(TRAK_DIM, grad_dim)
    X, y = task.train[0].float(), task.train[1]
    Xt, yt = task.test[0].float(), task.test[1]
    batch = 250
    with tempfile.TemporaryDirectory(prefix="traker-") as folder:
        projector = BasicProjector(grad_dim=grad_dim, proj_dim=dim, seed=0, proj_type=ProjectionType.rademacher,
                                   device="cpu", dtype=torch.float32)
        traker = TRAKer(model=model, task="image_classification", train_set_size=len(X), save_dir=folder, device="cpu",
                        projector=projector, proj_dim=dim, use_half_precision=False, logging_level=40)
        for i, state in enumerate(states):
            traker.load_checkpoint(state, model_id=i)
            for xb, yb in zip(X.split(batch), y.split(batch)):
                traker.featurize(batch=(xb, yb), num_samples=len(xb))
        traker.finalize_features()
        for i, state in enumerate(states):
            traker.start_scoring_checkpoint(exp_name="ladder", checkpoint=state, model_id=i, num_targets=len(Xt))
            for xb, yb in zip(Xt.split(batch), yt.split(batch)):
                traker.score(batch=(xb, yb), num_samples=len(xb))
        scores = traker.finalize_scores(exp_name="ladder")
    return torch.as_tensor(scores).T


def bergson(task):
    import bergson  # noqa: F401
    raise NotImplementedError("bergson is installed but has no adapter yet")


# ---------------------------------------------------------------- the registry

REGISTRY = {
    "if-direct": Method("influence, direct", "tinfluence", influence_direct, kinds=("lr", "cnn"),
                        note="dense Hessian of the objective (LR) or dense Gauss-Newton matrix (CNN), + l2·I "
                             "(damping = the weight decay l2), Cholesky; the MLP's P = 9610 is left to CG"),
    "if-cg": Method("influence, CG", "tinfluence", influence_cg,
                    note=f"CG on the Hessian (LR) / Gauss-Newton matrix (deep) + l2·I (damping = l2), tol {CG_TOL:g}, "
                         f"preconditioned by ti.nystrom rank {NYSTROM_RANK}, all test points together"),
    "newton-loo": Method("Newton LOO", "tinfluence", newton_loo, kinds=("lr",),
                         note="ti.newton_loo, one Newton step per removed example (all n), the retrained loss"),
    "kfac": Method("K-FAC", "tinfluence", lambda task: _kfac_family(task, ti.kfac, "empirical"), needs_ti=("kfac",),
                   note="ti.kfac, empirical Fisher (gradients at the labels), damping = l2 (absolute)"),
    "ekfac": Method("EK-FAC", "tinfluence", lambda task: _kfac_family(task, ti.ekfac, "empirical"), needs_ti=("ekfac",),
                    note="ti.ekfac, empirical Fisher, damping = l2 (absolute)"),
    "kfac-ggn": Method("K-FAC, GGN", "tinfluence", lambda task: _kfac_family(task, ti.kfac, "ggn"), needs_ti=("kfac",),
                       note="ti.kfac(fisher=\"ggn\"): the Gauss-Newton matrix (the expectation of the true Fisher), "
                            "damping = l2 (absolute)"),
    "ekfac-ggn": Method("EK-FAC, GGN", "tinfluence", lambda task: _kfac_family(task, ti.ekfac, "ggn"), needs_ti=("ekfac",),
                        note="ti.ekfac(fisher=\"ggn\"), damping = l2 (absolute)"),
    "trajectory": Method("trajectory influence", "tinfluence", trajectory, kinds=DEEP,
                         needs_ti=("training_run", "trajectory_influence", "optim"),
                         note="ti.training_run through the base SGD run (init seed 0, order Generator(0), "
                              "ti.optim.sgd with weight decay l2): the same-schedule ground truth's run"),
    "compressed": Method("compressed-gradient influence", "tinfluence", compressed, needs_ti=("compressed_influence",),
                         note=f"ti.compressed_influence, Gaussian ti.projector k_in = k_out = k_rest = {K_SIDE} (seed 0), "
                              f"damping = {COMPRESSED_DAMPING:g} × the mean diagonal of the projected covariance"),
    "tracin": Method("TracIn", "tinfluence", tracin,
                     note="every checkpoint of the base SGD run (LR: a separate SGD run), exact gradients"),
    "empirical-if": Method("EmpiricalIF", "tinfluence", empirical_if, note="radius 1e-3"),
    "grad-dot": Method("grad-dot", "tinfluence", grad_dot),
    "grad-cos": Method("grad-cos", "tinfluence", grad_cos),
    "kronfluence-ekfac": Method("EK-FAC", "kronfluence", kronfluence_ekfac, needs_module="kronfluence",
                                note="benchmarks/kronfluence_adapter.py: true Fisher, damping_factor = l2"),
    "dattri-cg": Method("influence, CG", "dattri", dattri_cg, needs_module="dattri",
                        note="IFAttributorCG, regularization = l2, library default 10 iterations"),
    "dattri-tracin": Method("TracIn", "dattri", dattri_tracin, needs_module="dattri",
                            note="TracInAttributor over the same checkpoints, default 512-dim projection"),
    "dattri-trak-1": Method("TRAK-1", "dattri", lambda task: dattri_trak(task, 1), needs_module="dattri"),
    "dattri-trak-10": Method("TRAK-10", "dattri", lambda task: dattri_trak(task, 10), kinds=DEEP, needs_module="dattri",
                             ensemble=10,
                             note="TRAKAttributor over 10 models, margin output, library defaults (512-dim projection on CPU, "
                                  "no regularization)"),
    "traker-trak-1": Method("TRAK-1", "traker", lambda task: traker_trak(task, 1), needs_module="trak",
                            note=f"TRAKer, BasicProjector on CPU, {TRAK_DIM} dims (at most P), float32 (its stores), "
                                 "library defaults otherwise (no lambda_reg)"),
    "traker-trak-10": Method("TRAK-10", "traker", lambda task: traker_trak(task, 10), kinds=DEEP, needs_module="trak",
                             ensemble=10),
    "traker-trak-50": Method("TRAK-50", "traker", lambda task: traker_trak(task, 50), kinds=DEEP, needs_module="trak",
                             ensemble=50),
    "captum-tracin": Method("TracIn", "captum", captum_tracin, needs_module="captum",
                            note="TracInCP over the same checkpoints"),
    "bergson": Method("bergson", "bergson", bergson, needs_module="bergson"),
}
