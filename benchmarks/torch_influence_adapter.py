"""Adapters for torch-influence (github.com/alstonlo/torch-influence): exact, CG and LiSSA influence.

The library takes a `BaseObjective` (outputs, mean loss on the outputs, regularization, test
loss) and an influence module holding the model and DataLoaders. As for the other peers whose
loss has no regularizer, l2 is passed as damping (damp = l2, no train_regularization): the
matrix it inverts is then exactly the task's Hessian of mean loss + l2 I (the Gauss-Newton
matrix plus l2 I on the MLP, as the reference), and its training gradients are those of the
per-example loss alone, as in the reference. Its `influences(train_idxs,
test_idxs)` returns the influence of each training point on the MEAN test loss of
`test_idxs`, so per-test-point scores come from one call per test point (as its own example
does); each call solves one inverse-HVP and forms the training gradients one example at a
time. (With (l2/2)‖θ‖² as train_regularization instead, its training gradient would be
∇ℓ_z + l2·θ, shifting each test point's scores by one constant.) Scores are returned as it computes them: (1/n) ∇L_z · H⁻¹ ∇L_test, predicting
L_test(without z) − L_test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tasks import Task

# LiSSA's module has no defaults: repeat, depth and scale of the library's own LiSSA tests.
LISSA = dict(repeat=1, depth=5000, scale=10)


def _objective():
    from torch_influence import BaseObjective

    class Objective(BaseObjective):
        def train_outputs(self, model, batch):
            return model(batch[0])

        def train_loss_on_outputs(self, outputs, batch):
            return F.cross_entropy(outputs, batch[1])          # mean reduction, as it requires

        def train_regularization(self, params):
            return 0.0 * params.sum()                          # l2 enters as damping

        def test_loss(self, model, params, batch):
            return F.cross_entropy(model(batch[0]), batch[1])

    return Objective()


def _influences(task: Task, cls, **kw):
    """Scores `[n_test, n_train]` of the torch-influence module `cls`, one `influences` call per test point."""
    from peers import _loaders

    train, test = _loaders(task)
    module = cls(model=task.make_model(), objective=_objective(), train_loader=train, test_loader=test,
                 device=task.train[0].device, damp=task.l2, **kw)
    train_idxs = list(range(task.n_train))
    return torch.stack([module.influences(train_idxs, [j]) for j in range(task.n_test)])


def torch_influence_exact(task: Task):
    """Returns torch-influence's scores `[n_test, n_train]` with the dense inverse Hessian (AutogradInfluenceModule)."""
    from torch_influence import AutogradInfluenceModule
    return _influences(task, AutogradInfluenceModule)


def torch_influence_cg(task: Task):
    """Returns torch-influence's scores `[n_test, n_train]` by scipy CG (CGInfluenceModule, scipy's defaults)."""
    from torch_influence import CGInfluenceModule
    return _influences(task, CGInfluenceModule, gnh=task.kind == "mlp")


def torch_influence_lissa(task: Task):
    """Returns torch-influence's scores `[n_test, n_train]` by LiSSA (LiSSAInfluenceModule)."""
    from torch_influence import LiSSAInfluenceModule
    return _influences(task, LiSSAInfluenceModule, gnh=task.kind == "mlp", **LISSA)


NOTES = {
    ("torch_influence", "exact"): "AutogradInfluenceModule: dense autograd Hessian of mean CE, damp = l2, torch.inverse; "
                                  "one influences() call per test point, training gradients one example at a time",
    ("torch_influence", "cg"): "CGInfluenceModule: scipy.sparse.linalg.cg with scipy's defaults (rtol 1e-5, maxiter 10·P), "
                               "damp = l2, Gauss-Newton (gnh) on the MLP; one solve per test point",
    ("torch_influence", "lissa"): "LiSSAInfluenceModule with its tests' settings: repeat 1, depth 5000, scale 10, "
                                  "batches of the training loader sampled with replacement, damp = l2, Gauss-Newton (gnh) on "
                                  "the MLP; one solve per test point",
}
