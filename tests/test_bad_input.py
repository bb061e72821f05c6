"""Bad input and faults, one row each: the exception type and a message that starts with the
public call and names the argument (and, where the row says so, the fix). Rows that must give a
result check it against an independent reference and for finiteness.

The rows cover every class of docs/design.md, "Validation": numbers, integers and flags;
non-finite values (inputs and computed gradients or losses); dtypes, devices and parameter
containers; per-example outputs; structure; model consistency and stationarity; training ids.
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tinfluence as ti
from tinfluence.core import checks

N, N_TEST, D_IN, C = 24, 3, 5, 3
L2 = 1e-2


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    return x, y


class Case:
    """Logistic regression 5 -> 3 on random data, trained to a tight optimum (float64)."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(D_IN, C).double()
        self.apply, params0 = ti.functionalize(self.model)
        self.train, self.test = _data(N, 1), _data(N_TEST, 2)
        self.params = ti.minimize(ti.objective(self.loss, self.train, l2=L2), params0, gtol=1e-12, newton_steps=3)
        self.ckpts = [(self.params, 0.1)]

    def loss(self, params, batch):
        x, y = batch
        return F.cross_entropy(self.apply(params, x), y, reduction="none")

    def predict(self, params, batch):
        return self.apply(params, batch[0])

    @staticmethod
    def output_loss(outputs, batch):
        return F.cross_entropy(outputs, batch[1], reduction="none")


@pytest.fixture(scope="module")
def case():
    return Case()


def _with_row(data, row, value):
    x, y = data
    x = x.clone()
    x[row] = value
    return x, y


def _grads_ref(case, data):
    """Per-example gradients by one autograd call per example (the independent reference), raveled `[n, P]`."""
    x, y = data
    rows = []
    for i in range(x.shape[0]):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in case.params.items()}
        (g_w, g_b) = torch.autograd.grad(case.loss(p, (x[i:i + 1], y[i:i + 1])).sum(), [p["weight"], p["bias"]])
        rows.append(torch.cat([g_w.reshape(-1), g_b.reshape(-1)]))
    return torch.stack(rows)


def _dot_ref(case):
    return _grads_ref(case, case.test) @ _grads_ref(case, case.train).T


E = checks.ArgumentError
NAN, INF = float("nan"), float("inf")

# (id, call(case), exception, regex[, mark]). Every regex starts with the public call and names the argument.
ERRORS = [
    # --- numbers: finite, in range; strings, None, bools refused with one message ---
    ("objective-l2-nan", lambda c: ti.objective(c.loss, c.train, l2=NAN), E, r"^ti.objective: `l2` must be a finite number >= 0; got nan"),
    ("objective-l2-inf", lambda c: ti.objective(c.loss, c.train, l2=INF), E, r"^ti.objective: `l2` must be a finite number >= 0; got inf"),
    ("objective-l2-str", lambda c: ti.objective(c.loss, c.train, l2="0.1"), E, r"^ti.objective: `l2` must be a finite number >= 0; got '0.1'"),
    ("objective-l2-none", lambda c: ti.objective(c.loss, c.train, l2=None), E, r"^ti.objective: `l2` must be a finite number >= 0; got None"),
    ("objective-l2-bool", lambda c: ti.objective(c.loss, c.train, l2=True), E, r"^ti.objective: `l2` must be a finite number >= 0; got True"),
    ("objective-l2-negative", lambda c: ti.objective(c.loss, c.train, l2=-1.0), E, r"^ti.objective: `l2` must be >= 0; got -1.0"),
    ("ggn-l2-nan", lambda c: ti.ggn_vp(c.predict, c.params, c.train, output_loss=c.output_loss, l2=NAN), E, r"^ti.ggn_vp: `l2` must be a finite number"),
    ("newton-l2-inf", lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test, l2=INF, indices=[0]), E, r"^ti.newton_loo: `l2` must be a finite number >= 0; got inf"),
    ("newton-damping-nan", lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test, l2=L2, damping=NAN, indices=[0]), E, r"^ti.newton_loo: `damping` must be a finite number"),
    ("newton-damping-str", lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test, l2=L2, damping="1e-3", indices=[0]), E, r"^ti.newton_loo: `damping` must be a finite number >= 0; got '1e-3'"),
    ("newton-damping-none", lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test, l2=L2, damping=None, indices=[0]), E, r"^ti.newton_loo: `damping` must be .*; got None"),
    ("direct-damping-inf", lambda c: ti.direct(torch.eye(3), damping=INF), E, r"^ti.direct: `damping` must be a finite number >= 0; got inf"),
    ("direct-damping-str", lambda c: ti.direct(torch.eye(3), damping="0"), E, r"^ti.direct: `damping` must be a finite number >= 0; got '0'"),
    ("cg-damping-nan", lambda c: ti.cg(ti.hvp(ti.objective(c.loss, c.train), c.params), damping=NAN), E, r"^ti.cg: `damping` must be a finite number"),
    ("cg-damping-none", lambda c: ti.cg(ti.hvp(ti.objective(c.loss, c.train), c.params), damping=None), E, r"^ti.cg: `damping` must be a finite number"),
    ("cg-tol-inf", lambda c: ti.cg(ti.hvp(ti.objective(c.loss, c.train), c.params), tol=INF), E, r"^ti.cg: `tol` must be a finite number"),
    ("lissa-damping-str", lambda c: ti.lissa(c.loss, c.params, c.train, damping="x"), E, r"^ti.lissa: `damping` must be a finite number"),
    ("lissa-l2-nan", lambda c: ti.lissa(c.loss, c.params, c.train, l2=NAN), E, r"^ti.lissa: `l2` must be a finite number"),
    ("radius-nan", lambda c: ti.empirical_if(c.loss, c.params, c.train, c.test, radius=NAN), E, r"^ti.empirical_if: `radius` must be a finite number > 0; got nan. Pass e.g. radius=1e-3"),
    ("radius-str", lambda c: ti.empirical_if(c.loss, c.params, c.train, c.test, radius="1e-3"), E, r"^ti.empirical_if: `radius` must be a finite number > 0"),
    ("radius-bool", lambda c: ti.empirical_if(c.loss, c.params, c.train, c.test, radius=True), E, r"^ti.empirical_if: `radius` must be a finite number > 0; got True"),
    ("reverse-ratio-nan", lambda c: ti.reverse_check(c.loss, c.params, c.train, ti.take(c.test, slice(0, 1)), torch.zeros(N), ratio=NAN), E, r"^ti.reverse_check: `ratio` must be in \(0, 0.5\]; got nan"),
    ("tracin-lr-nan", lambda c: ti.tracin(c.loss, [(c.params, NAN)], c.train, c.test), E, r"^ti.tracin: `checkpoints\[0\] lr` must be a finite number > 0; got nan. Give each checkpoint"),
    ("tracin-lr-str", lambda c: ti.tracin(c.loss, [(c.params, "0.1")], c.train, c.test), E, r"^ti.tracin: `checkpoints\[0\] lr` must be a finite number > 0; got '0.1'"),
    ("tracin-lr-bool", lambda c: ti.tracin(c.loss, [(c.params, True)], c.train, c.test), E, r"^ti.tracin: `checkpoints\[0\] lr` must be a finite number > 0; got True"),
    ("sgd-lr-nan", lambda c: ti.optim.sgd(NAN), E, r"^ti.optim.sgd: `lr` must be a finite number > 0; got nan"),
    ("sgd-momentum-one", lambda c: ti.optim.sgd(0.1, momentum=1.0), E, r"^ti.optim.sgd: `momentum` must be in \[0, 1\); got 1.0"),
    ("sgd-nesterov-int", lambda c: ti.optim.sgd(0.1, momentum=0.9, nesterov=1), E, r"^ti.optim.sgd: `nesterov` must be True or False; got 1"),
    ("adam-b1-str", lambda c: ti.optim.adam(b1="0.9"), E, r"^ti.optim.adam: `b1` must be in \[0, 1\); got '0.9'"),
    ("adam-lr-bool", lambda c: ti.optim.adam(lr=True), E, r"^ti.optim.adam: `lr` must be a finite number > 0; got True"),
    ("lds-fraction-nan", lambda c: ti.lds(lambda p, d: p, c.params, c.train, c.test, torch.zeros(N_TEST, N), measure=c.loss, fraction=NAN, generator=torch.Generator()), E, r"^ti.lds: `fraction` must be in \(0, 1\); got nan"),
    ("lds-scores-nan", lambda c: ti.lds(lambda p, d: p, c.params, c.train, c.test, torch.full((N_TEST, N), NAN), measure=c.loss, generator=torch.Generator()), E, r"^ti.lds: `scores` has non-finite values"),
    ("lbfgs-gtol-str", lambda c: ti.lbfgs_trainer(c.loss, gtol="1e-9"), E, r"^ti.lbfgs_trainer: `gtol` must be a finite number > 0"),
    ("lbfgs-l2-nan", lambda c: ti.lbfgs_trainer(c.loss, l2=NAN), E, r"^ti.lbfgs_trainer: `l2` must be a finite number >= 0; got nan"),
    # --- integers: bools refused everywhere the same way; floats and strings refused ---
    ("grad-dot-chunk-0", lambda c: ti.grad_dot(c.loss, c.params, c.train, c.test, chunk_size=0), E, r"^ti.grad_dot: `chunk_size` must be None or an int >= 1; got 0"),
    ("grad-dot-chunk-neg", lambda c: ti.grad_dot(c.loss, c.params, c.train, c.test, chunk_size=-1), E, r"^ti.grad_dot: `chunk_size` must be None or an int >= 1; got -1"),
    ("grad-dot-chunk-float", lambda c: ti.grad_dot(c.loss, c.params, c.train, c.test, chunk_size=2.5), E, r"^ti.grad_dot: `chunk_size` must be None or an int >= 1; got 2.5"),
    ("grad-dot-chunk-bool", lambda c: ti.grad_dot(c.loss, c.params, c.train, c.test, chunk_size=True), E, r"^ti.grad_dot: `chunk_size` must be None or an int >= 1; got True"),
    ("grad-cos-chunk-str", lambda c: ti.grad_cos(c.loss, c.params, c.train, c.test, chunk_size="8"), E, r"^ti.grad_cos: `chunk_size` must be None or an int >= 1; got '8'"),
    ("per-example-chunk-0", lambda c: ti.per_example_grads(c.loss, c.params, c.train, chunk_size=0), E, r"^ti.per_example_grads: `chunk_size` must be None or an int >= 1; got 0"),
    ("per-example-chunk-float", lambda c: ti.per_example_grads(c.loss, c.params, c.train, chunk_size=2.5), E, r"^ti.per_example_grads: `chunk_size` must be None or an int >= 1; got 2.5"),
    ("tracin-chunk-bool", lambda c: ti.tracin(c.loss, c.ckpts, c.train, c.test, chunk_size=False), E, r"^ti.tracin: `chunk_size` must be None or an int >= 1; got False"),
    ("tracin-self-chunk-0", lambda c: ti.tracin_self_influence(c.loss, c.ckpts, c.train, chunk_size=0), E, r"^ti.tracin_self_influence: `chunk_size` must be None or an int >= 1; got 0"),
    ("empirical-chunk-float", lambda c: ti.empirical_if(c.loss, c.params, c.train, c.test, chunk_size=2.5), E, r"^ti.empirical_if: `chunk_size` must be None or an int >= 1; got 2.5"),
    ("newton-chunk-0", lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test, l2=L2, indices=[0], chunk_size=0), E, r"^ti.newton_loo: `chunk_size` must be None or an int >= 1; got 0"),
    ("objective-chunk-bool", lambda c: ti.objective(c.loss, c.train, chunk_size=True), E, r"^ti.objective: `chunk_size` must be None or an int >= 1; got True"),
    ("ggn-chunk-float", lambda c: ti.ggn_vp(c.predict, c.params, c.train, output_loss=c.output_loss, chunk_size=1.5), E, r"^ti.ggn_vp: `chunk_size` must be None or an int >= 1; got 1.5"),
    ("knn-chunk-0", lambda c: ti.knn_candidates(lambda p, b: b[0], c.params, c.train, c.test, 2, chunk_size=0), E, r"^ti.knn_candidates: `chunk_size` must be None or an int >= 1; got 0"),
    ("factored-chunk-neg", lambda c: ti.factored.grad_factors(c.loss, c.params, c.train, chunk_size=-3), E, r"^ti.factored.grad_factors: `chunk_size` must be None or an int >= 1; got -3"),
    ("chunks-size-float", lambda c: list(ti.chunks(c.train, 2.5)), E, r"^ti.data.chunks: `size` must be None or an int >= 1; got 2.5"),
    ("knn-k-bool", lambda c: ti.knn_candidates(lambda p, b: b[0], c.params, c.train, c.test, True), E, r"^ti.knn_candidates: `k` must be an int in \[1, 24\]; got True"),
    ("knn-k-float", lambda c: ti.knn_candidates(lambda p, b: b[0], c.params, c.train, c.test, 2.0), E, r"^ti.knn_candidates: `k` must be an int in \[1, 24\]; got 2.0"),
    ("tracin-proj-bool", lambda c: ti.tracin(c.loss, c.ckpts, c.train, c.test, projection_dim=True, generator=torch.Generator()), E, r"^ti.tracin: `projection_dim` must be an int >= 1; got True"),
    ("tracin-proj-float", lambda c: ti.tracin(c.loss, c.ckpts, c.train, c.test, projection_dim=8.0, generator=torch.Generator()), E, r"^ti.tracin: `projection_dim` must be an int >= 1; got 8.0"),
    ("empirical-directions-bool", lambda c: ti.empirical_if(c.loss, c.params, c.train, c.test, directions=True, generator=torch.Generator()), E, r"^ti.empirical_if: `directions` must be an int >= 1; got True"),
    ("training-run-epochs-bool", lambda c: ti.training_run(c.loss, c.params, c.train, ti.optim.sgd(0.1), epochs=True, batch_size=4, generator=torch.Generator()), E, r"^ti.training_run: `epochs` must be an int >= 1; got True"),
    ("training-run-batch-float", lambda c: ti.training_run(c.loss, c.params, c.train, ti.optim.sgd(0.1), epochs=1, batch_size=4.0, generator=torch.Generator()), E, r"^ti.training_run: `batch_size` must be an int >= 1; got 4.0"),
    ("topk-k-bool", lambda c: ti.topk_overlap(torch.arange(4.0), torch.arange(4.0), True), E, r"^ti.topk_overlap: `k` must be an int in \[1, 4\]; got True"),
    ("lds-subsets-float", lambda c: ti.lds(lambda p, d: p, c.params, c.train, c.test, torch.zeros(N_TEST, N), measure=c.loss, subsets=4.0, generator=torch.Generator()), E, r"^ti.lds: `subsets` must be an int >= 3; got 4.0"),
    ("lbfgs-maxiter-bool", lambda c: ti.lbfgs_trainer(c.loss, maxiter=True), E, r"^ti.lbfgs_trainer: `maxiter` must be an int >= 1; got True"),
    ("hist-bins-float", lambda c: ti.plot.score_hist({"a": torch.zeros(4)}, bins=2.5), E, r"^ti.plot.score_hist: `bins` must be an int >= 1; got 2.5"),
    ("factored-flag-int", lambda c: ti.grad_dot(c.loss, c.params, c.train, c.test, factored=1), E, r"^ti.grad_dot: `factored` must be True or False; got 1"),
    ("compile-flag-str", lambda c: ti.per_example_grad_fn(c.loss, compile="yes"), E, r"^ti.per_example_grads: `compile` must be True or False; got 'yes'"),
    ("loo-progress-int", lambda c: ti.leave_one_out(lambda p, d: p, c.params, c.train, c.test, [0], measure=c.loss, progress=1), E, r"^ti.leave_one_out: `progress` must be True or False; got 1"),
    ("cg-maxiter-bool", lambda c: ti.cg(ti.hvp(ti.objective(c.loss, c.train), c.params), maxiter=True), E, r"^ti.cg: `maxiter` must be an int >= 1; got True"),
    ("influence-chunk-0", lambda c: ti.influence(c.loss, c.params, c.train, c.test, ihvp=lambda v: v, chunk_size=0), E, r"^ti.influence: `chunk_size` must be None or an int >= 1; got 0"),
    # --- non-finite values: a nan/inf row, or an overflow in the model, raises naming the ids and the leaf ---
    ("grad-dot-nan-row", lambda c: ti.grad_dot(c.loss, c.params, _with_row(c.train, 5, NAN), c.test), E, r"^ti.grad_dot: the gradients of 1 example\(s\) of `train` are not finite \(nan or inf\) in leaf \('bias',\): ids 5\. Check those rows"),
    ("grad-dot-inf-row-chunked", lambda c: ti.grad_dot(c.loss, c.params, _with_row(c.train, 13, INF), c.test, chunk_size=5), E, r"^ti.grad_dot: the gradients .* of `train` .*: ids 13\."),
    ("grad-dot-nan-test", lambda c: ti.grad_dot(c.loss, c.params, c.train, _with_row(c.test, 1, NAN)), E, r"^ti.grad_dot: the gradients of 1 example\(s\) of `test` .*: ids 1\."),
    ("grad-cos-nan-row", lambda c: ti.grad_cos(c.loss, c.params, _with_row(c.train, 0, NAN), c.test), E, r"^ti.grad_cos: the gradients of 1 example\(s\) of `train` .*: ids 0\."),
    ("grad-dot-factored-nan", lambda c: ti.grad_dot(c.loss, c.params, _with_row(c.train, 7, NAN), c.test, factored=True), E, r"^ti.grad_dot: the gradients .* of `train` .*: ids 7\."),
    ("tracin-nan-row", lambda c: ti.tracin(c.loss, c.ckpts, _with_row(c.train, 3, NAN), c.test), E, r"^ti.tracin: the gradients of 1 example\(s\) of `train` .*: ids 3\."),
    ("tracin-self-inf-row", lambda c: ti.tracin_self_influence(c.loss, c.ckpts, _with_row(c.train, 20, INF), chunk_size=8), E, r"^ti.tracin_self_influence: the gradients .*: ids 20\."),
    ("tracin-proj-nan-row", lambda c: ti.tracin(c.loss, c.ckpts, _with_row(c.train, 2, NAN), c.test, projection_dim=4, generator=torch.Generator()), E, r"^ti.tracin: the gradients .*: ids 2\."),
    ("empirical-nan-row", lambda c: ti.empirical_if(c.loss, c.params, _with_row(c.train, 9, NAN), c.test), E, r"^ti.empirical_if: the losses of 1 example\(s\) of `train` are not finite .*: ids 9\."),
    ("empirical-sphere-nan-row", lambda c: ti.empirical_if(c.loss, c.params, _with_row(c.train, 4, NAN), c.test, directions=3, generator=torch.Generator()), E, r"^ti.empirical_if: the losses .* of `train` .*: ids 4\."),
    ("empirical-nan-test", lambda c: ti.empirical_if(c.loss, c.params, c.train, _with_row(c.test, 2, NAN)), E, r"^ti.empirical_if: the losses of 1 example\(s\) of `test` .*: ids 2\."),
    ("empirical-overflow-radius", lambda c: ti.empirical_if(lambda p, b: c.loss(p, b) * torch.exp(1e4 * sum((p[k] - c.params[k]).pow(2).sum() for k in p)), c.params, c.train, c.test, radius=1.0), E, r"^ti.empirical_if: the losses at the perturbed parameters .* of `test` .*Lower `radius`"),
    ("per-example-nan-row", lambda c: ti.per_example_grads(c.loss, c.params, _with_row(c.train, 11, NAN), chunk_size=4), E, r"^ti.per_example_grads: the gradients of 1 example\(s\) of `data` .*: ids 11\."),
    ("per-example-overflow", lambda c: ti.per_example_grads(lambda p, b: torch.exp(1e3 * c.loss(p, b)), c.params, c.train), E, r"^ti.per_example_grads: the gradients of \d+ example\(s\) of `data` are not finite"),
    ("newton-nan-row", lambda c: ti.newton_loo(c.loss, c.params, _with_row(c.train, 6, NAN), c.test, l2=L2, indices=[0]), E, r"^ti.newton_loo: the gradients of 1 example\(s\) of `train` are not finite .*: ids 6\."),
    ("newton-gn-inf-row", lambda c: ti.newton_loo(c.loss, c.params, _with_row(c.train, 8, INF), c.test, l2=L2, indices=[0], predict=c.predict, output_loss=c.output_loss), E, r"^ti.newton_loo: the gradients .* of `train` .*: ids 8\."),
    ("newton-nan-test", lambda c: ti.newton_loo(c.loss, c.params, c.train, _with_row(c.test, 0, NAN), l2=L2, indices=[1]), E, r"^ti.newton_loo: the `measure` values of 1 example\(s\) of `test` .*: ids 0\."),
    ("grad-dot-product-overflow", lambda c: ti.grad_dot(lambda p, b: 1e200 * c.loss(p, b), c.params, c.train, c.test), E, r"^ti.grad_dot: the scores \(finite gradients whose products overflow\) of \d+ example\(s\) of `train` are not finite"),
    ("params-nan", lambda c: ti.grad_dot(c.loss, {**c.params, "bias": torch.full((C,), NAN)}, c.train, c.test), E, r"^ti.grad_dot: `params` leaf \('bias',\) has non-finite values"),
    ("influence-nan-row", lambda c: ti.influence(c.loss, c.params, _with_row(c.train, 5, NAN), c.test, ihvp=lambda v: v), E, r"^ti.influence: the gradients .* of `train` .*: ids 5\."),
    # --- dtypes, devices, containers ---
    ("grad-dot-float32-data", lambda c: ti.grad_dot(c.loss, c.params, (c.train[0].float(), c.train[1]), c.test), E, r"^ti.grad_dot: `train` leaf \(0,\) is torch.float32, the parameters torch.float64; cast"),
    ("tracin-float32-test", lambda c: ti.tracin(c.loss, c.ckpts, c.train, (c.test[0].float(), c.test[1])), E, r"^ti.tracin: `test` leaf \(0,\) is torch.float32"),
    ("empirical-float32-data", lambda c: ti.empirical_if(c.loss, c.params, (c.train[0].float(), c.train[1]), c.test), E, r"^ti.empirical_if: `train` leaf \(0,\) is torch.float32"),
    ("newton-float32-data", lambda c: ti.newton_loo(c.loss, c.params, (c.train[0].float(), c.train[1]), c.test, l2=L2, indices=[0]), E, r"^ti.newton_loo: `train` leaf \(0,\) is torch.float32"),
    ("per-example-float32-data", lambda c: ti.per_example_grads(c.loss, c.params, (c.train[0].float(), c.train[1])), E, r"^ti.per_example_grads: `data` leaf \(0,\) is torch.float32"),
    ("hvp-float32-data", lambda c: ti.hvp(ti.objective(c.loss, (c.train[0].float(), c.train[1])), c.params), E, r"^ti.hvp: `f.data` leaf \(0,\) is torch.float32"),
    ("mixed-leaf-dtypes", lambda c: ti.grad_dot(c.loss, {**c.params, "bias": c.params["bias"].float()}, c.train, c.test), E, r"^ti.grad_dot: every `params` leaf must have one dtype and device; got .*bias.*float32.*Cast them"),
    ("mixed-leaf-dtypes-per-example", lambda c: ti.per_example_grads(c.loss, {**c.params, "weight": c.params["weight"].float()}, c.train), E, r"^ti.per_example_grads: every `params` leaf must have one dtype"),
    ("int-params-leaf", lambda c: ti.tracin(c.loss, [({**c.params, "bias": torch.zeros(C, dtype=torch.long)}, 0.1)], c.train, c.test), E, r"^ti.tracin: checkpoint 0: `params` leaf \('bias',\) must be floating point; got torch.int64\. Cast it"),
    ("data-other-device", lambda c: ti.grad_dot(c.loss, c.params, (c.train[0].to("meta"), c.train[1]), c.test), E, r"^ti.grad_dot: `train` leaf \(0,\) is on meta, the parameters on cpu; move it"),
    ("labels-other-device", lambda c: ti.per_example_grads(c.loss, c.params, (c.train[0], c.train[1].to("meta"))), E, r"^ti.per_example_grads: `data` leaf \(1,\) is on meta"),
    ("params-list", lambda c: ti.grad_dot(c.loss, list(c.params.values()), c.train, c.test), E, r"^ti.grad_dot: `params` must be a dict\[str, Tensor\] .*; got list of 2 items.*dict\(zip\(names, tensors\)\)"),
    ("params-list-per-example", lambda c: ti.per_example_grads(c.loss, list(c.params.values()), c.train), E, r"^ti.per_example_grads: `params` must be a dict\[str, Tensor\]"),
    ("params-list-newton", lambda c: ti.newton_loo(c.loss, list(c.params.values()), c.train, c.test, indices=[0]), E, r"^ti.newton_loo: `params` must be a dict\[str, Tensor\]"),
    ("params-empty", lambda c: ti.grad_cos(c.loss, {}, c.train, c.test), E, r"^ti.grad_cos: `params` has no tensors"),
    ("loss-not-callable", lambda c: ti.grad_dot("cross_entropy", c.params, c.train, c.test), E, r"^ti.grad_dot: `loss` must be a function \(params, batch\) -> Tensor\[B\]; got 'cross_entropy'"),
    ("measure-not-callable", lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test, l2=L2, indices=[0], measure=3), E, r"^ti.newton_loo: `measure` must be a function"),
    # --- per-example outputs: integer losses, wrong shapes named by their argument ---
    ("int-loss-grad-dot", lambda c: ti.grad_dot(lambda p, b: (c.apply(p, b[0]).argmax(1) != b[1]).long(), c.params, c.train, c.test), E, r"^ti.grad_dot: `loss` must return floating values .* torch.int64"),
    ("int-loss-per-example", lambda c: ti.per_example_grads(lambda p, b: b[1], c.params, c.train), E, r"^ti.per_example_grads: `loss` must return floating values"),
    ("int-loss-tracin", lambda c: ti.tracin(lambda p, b: b[1], c.ckpts, c.train, c.test), E, r"^ti.tracin: `loss` must return floating values"),
    ("int-loss-objective", lambda c: ti.objective(lambda p, b: b[1], c.train)(c.params), E, r"^ti.objective: `loss` must return floating values"),
    ("bool-loss-empirical", lambda c: ti.empirical_if(lambda p, b: b[1] > 0, c.params, c.train, c.test), E, r"^ti.empirical_if: `loss` must return floating values"),
    ("measure-wrong-shape-newton", lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test, l2=L2, indices=[0], measure=lambda p, b: c.loss(p, b).sum()), E, r"^ti.newton_loo: `measure` must return one value per example"),
    ("loss-mean-grad-cos", lambda c: ti.grad_cos(lambda p, b: c.loss(p, b).mean(), c.params, c.train, c.test), E, r"^ti.grad_cos: `loss` must return one value per example.* Use reduction=\"none\""),
    ("measure-wrong-shape-influence", lambda c: ti.influence(c.loss, c.params, c.train, c.test, ihvp=lambda v: v, measure=lambda p, b: c.loss(p, b).sum()), E, r"^ti.influence: `measure` must return one value per example"),
    # --- load_checkpoints ---
    ("lrs-str", lambda c: ti.load_checkpoints(["a.pt"], c.model, lrs="0.1"), E, r"^ti.load_checkpoints: `lrs` must be one number > 0 or a sequence of them, one per path; got '0.1'. Pass e.g. lrs=0.1"),
    ("lrs-none", lambda c: ti.load_checkpoints(["a.pt"], c.model, lrs=None), E, r"^ti.load_checkpoints: `lrs` must be one number > 0 or a sequence"),
    ("lrs-nan", lambda c: ti.load_checkpoints(["a.pt"], c.model, lrs=NAN), E, r"^ti.load_checkpoints: `lrs` must be a finite number > 0; got nan"),
    ("lrs-list-str", lambda c: ti.load_checkpoints(["a.pt"], c.model, lrs=["0.1"]), E, r"^ti.load_checkpoints: `lrs\[0\]` must be a finite number > 0; got '0.1'"),
    # --- structure: test and train must be the same kind of batch ---
    ("grad-dot-structure", lambda c: ti.grad_dot(c.loss, c.params, c.train, {"x": c.test[0], "y": c.test[1]}), E, r"^ti.grad_dot: `test` must have the structure of `train`"),
    ("grad-cos-shape", lambda c: ti.grad_cos(c.loss, c.params, c.train, (c.test[0][:, :4], c.test[1])), E, r"^ti.grad_cos: `test` leaf \(0,\) must have per-example shape \[5\] like `train`; got \[4\]"),
    ("tracin-structure", lambda c: ti.tracin(c.loss, c.ckpts, c.train, (c.test[0],)), E, r"^ti.tracin: `test` must have the structure of `train`"),
    ("empirical-shape", lambda c: ti.empirical_if(c.loss, c.params, c.train, (c.test[0][:, None], c.test[1])), E, r"^ti.empirical_if: `test` leaf \(0,\) must have per-example shape \[5\]"),
    ("newton-structure", lambda c: ti.newton_loo(c.loss, c.params, c.train, [c.test[0], c.test[1]], l2=L2, indices=[0]), E, r"^ti.newton_loo: `test` must have the structure of `train`"),
    ("knn-shape", lambda c: ti.knn_candidates(lambda p, b: b[0], c.params, c.train, (c.test[0][:, :2], c.test[1]), 2), E, r"^ti.knn_candidates: `test` leaf \(0,\) must have per-example shape"),
    ("reverse-structure", lambda c: ti.reverse_check(c.loss, c.params, c.train, (c.test[0][:1],), torch.zeros(N)), E, r"^ti.reverse_check: `test_point` must have the structure of `train`"),
    # --- model consistency ---
    ("newton-inconsistent-gn", lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test, l2=L2, indices=[0], predict=lambda p, b: 2 * c.predict(p, b), output_loss=c.output_loss), E, r"^ti.newton_loo: `output_loss\(predict\(params, batch\), batch\)` must equal `loss\(params, batch\)`.*Make `predict` return"),
    ("newton-inconsistent-loss", lambda c: ti.newton_step_without(c.loss, c.params, c.train, l2=L2, remove=[0], predict=c.predict, output_loss=lambda o, b: F.mse_loss(o, F.one_hot(b[1], C).double(), reduction="none").sum(1)), E, r"^ti.newton_step_without: `output_loss\(predict\(params, batch\), batch\)` must equal"),
    ("newton-predict-scalar", lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test, l2=L2, indices=[0], predict=lambda p, b: c.predict(p, b).sum(), output_loss=c.output_loss), E, r"^ti.newton_loo: `predict` must return the model outputs"),
    ("newton-predict-not-callable", lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test, l2=L2, indices=[0], predict="apply", output_loss=c.output_loss), E, r"^ti.newton_loo: `predict` must be None or a function"),
    # --- training ids ---
    ("newton-ids-str", lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test, l2=L2, indices="01"), E, r"^ti.newton_loo: `indices` must be a list or 1-D integer tensor of training ids in \[0, n=24\); got '01'"),
    ("newton-ids-bool", lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test, l2=L2, indices=[True, False]), E, r"^ti.newton_loo: `indices` must hold integer training ids; got dtype torch.bool"),
    ("newton-ids-range", lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test, l2=L2, indices=[3, 24]), E, r"^ti.newton_loo: `indices` ids must lie in \[0, n=24\); got 24 at position 1"),
    ("newton-ids-mixed", lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test, l2=L2, indices=[1, "a"]), E, r"^ti.newton_loo: `indices` must be a list or 1-D integer tensor"),
    ("loo-ids-repeat", lambda c: ti.leave_one_out(lambda p, d: p, c.params, c.train, c.test, [2, 2], measure=c.loss, progress=False), E, r"^ti.leave_one_out: `indices` repeats a training id"),
    ("loo-ids-float", lambda c: ti.leave_one_out(lambda p, d: p, c.params, c.train, c.test, torch.tensor([1.0]), measure=c.loss, progress=False), E, r"^ti.leave_one_out: `indices` must hold integer training ids"),
    ("params-at-steps-str", lambda c: ti.training_run(c.loss, c.params, c.train, ti.optim.sgd(0.1), epochs=1, batch_size=12, generator=torch.Generator().manual_seed(0)).params_at("01"), E, r"^ti.TrainingRun.params_at: `steps` must be a non-empty sequence of ints in \[0, 2\]"),
    ("trajectory-budget-bool", lambda c: ti.trajectory_influence(ti.training_run(c.loss, c.params, c.train, ti.optim.sgd(0.1), epochs=1, batch_size=12, generator=torch.Generator().manual_seed(0)), c.test, memory_budget=True), E, r"^ti.trajectory_influence: `memory_budget` must be an int >= 1; got True. It is a number of bytes"),
    # --- small utilities ---
    ("minimize-gtol-nan", lambda c: ti.minimize(ti.objective(c.loss, c.train, l2=L2), c.params, gtol=NAN), E, r"^ti.minimize: `gtol` must be a finite number > 0; got nan"),
    ("minimize-maxiter-bool", lambda c: ti.minimize(ti.objective(c.loss, c.train, l2=L2), c.params, maxiter=True), E, r"^ti.minimize: `maxiter` must be an int >= 1; got True"),
    ("minimize-history-zero", lambda c: ti.minimize(ti.objective(c.loss, c.train, l2=L2), c.params, history_size=0), E, r"^ti.minimize: `history_size` must be an int >= 1; got 0"),
    ("minimize-newton-negative", lambda c: ti.minimize(ti.objective(c.loss, c.train, l2=L2), c.params, newton_steps=-1), E, r"^ti.minimize: `newton_steps` must be an int >= 0; got -1"),
    ("from-loader-list", lambda c: ti.from_loader([ti.take(c.train, slice(0, 12)), ti.take(c.train, slice(12, 24))]), E, r"^ti.from_loader: `source` is a list, which could hold batches or examples.*iter\(batches\)"),
    ("vdot-empty", lambda c: ti.vdot({}, {}), E, r"^ti.vdot: `x` has no tensor leaves"),
    ("top-examples-nan", lambda c: ti.plot.top_examples(torch.zeros(4, 2, 2), torch.tensor([0.0, NAN, 1.0, 2.0]), torch.zeros(2, 2), k=2), E, r"^ti.plot.top_examples: `scores` has non-finite values"),
]


@pytest.mark.parametrize("call, error, match", [pytest.param(*row[1:4], id=row[0], marks=row[4:]) for row in ERRORS])
def test_bad_input_is_a_clear_error(case, call, error, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # a training-mode or stationarity warning is not the point here
        with pytest.raises(error, match=match) as info:
            call(case)
    message = str(info.value)
    assert message.startswith("ti."), message                # the public call comes first
    assert "`" in message, message                          # and an argument is named
    assert isinstance(info.value, (TypeError, ValueError))   # either `except` catches it


def test_argument_error_is_both_type_and_value_error():
    with pytest.raises(TypeError):
        checks.integer("ti.x", "k", 2.5)
    with pytest.raises(ValueError):
        checks.integer("ti.x", "k", 2.5)


def test_the_table_covers_every_class():
    assert len(ERRORS) + len(RESULTS) >= 80


def test_training_mode_dropout_is_explained():
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, C)).double().train()
    with pytest.warns(UserWarning, match=r"ti.functionalize: Sequential is in training mode .* call module.eval\(\) first"):
        apply, params = ti.functionalize(model)
    train = _data(6, 3)
    loss = lambda p, b: F.cross_entropy(apply(p, b[0]), b[1], reduction="none")  # noqa: E731
    with pytest.raises(RuntimeError, match=r"Call model.eval\(\) before ti.functionalize"):
        ti.per_example_grads(loss, params, train)


def test_newton_warns_far_from_a_stationary_point(case):
    far = {k: v + 0.5 for k, v in case.params.items()}
    with pytest.warns(UserWarning, match=r"ti.newton_loo: `params` is far from a stationary point .*ti.minimize"):
        out = ti.newton_loo(case.loss, far, case.train, case.test, l2=L2, indices=[0, 1])
    assert torch.isfinite(out).all()


def test_newton_is_silent_at_the_optimum(case):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ti.newton_loo(case.loss, case.params, case.train, case.test, l2=L2, indices=[0, 1],
                      predict=case.predict, output_loss=case.output_loss)


# Inputs at the edge that must give the right result: (id, call(case), reference(case)).
RESULTS = [
    ("chunk-numpy-int", lambda c: ti.grad_dot(c.loss, c.params, c.train, c.test, chunk_size=np.int64(5)), _dot_ref),
    ("chunk-tensor-int", lambda c: ti.grad_dot(c.loss, c.params, c.train, c.test, chunk_size=torch.tensor(7)), _dot_ref),
    ("chunk-larger-than-n", lambda c: ti.grad_dot(c.loss, c.params, c.train, c.test, chunk_size=10**6), _dot_ref),
    ("chunk-one", lambda c: ti.grad_dot(c.loss, c.params, c.train, c.test, chunk_size=1), _dot_ref),
    ("factored-chunked", lambda c: ti.grad_dot(c.loss, c.params, c.train, c.test, chunk_size=5, factored=True), _dot_ref),
    ("tracin-int-lr", lambda c: ti.tracin(c.loss, [(c.params, 2)], c.train, c.test), lambda c: 2 * _dot_ref(c)),
    ("tracin-tensor-lr", lambda c: ti.tracin(c.loss, [(c.params, torch.tensor(0.5))], c.train, c.test), lambda c: 0.5 * _dot_ref(c)),
    ("per-example-chunked", lambda c: ti.tree.ravel(ti.per_example_grads(c.loss, c.params, c.train, chunk_size=5), batch_ndim=1),
     lambda c: _grads_ref(c, c.train)[:, _ravel_order(c)]),
    ("l2-numpy-float", lambda c: ti.objective(c.loss, c.train, l2=np.float64(L2))(c.params),
     lambda c: c.loss(c.params, c.train).mean() + 0.5 * L2 * sum(v.pow(2).sum() for v in c.params.values())),
    ("l2-int-zero", lambda c: ti.objective(c.loss, c.train, l2=0)(c.params), lambda c: c.loss(c.params, c.train).mean()),
    ("grad-cos-unit-diagonal", lambda c: ti.grad_cos(c.loss, c.params, c.train, ti.take(c.train, slice(0, 4))).diagonal(),
     lambda c: torch.ones(4, dtype=torch.float64)),
    ("newton-gn-matches-exact", lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test, l2=L2, indices=[0, 5], predict=c.predict, output_loss=c.output_loss),
     lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test, l2=L2, indices=[0, 5])),
    ("newton-ids-tensor", lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test, l2=L2, indices=torch.tensor([2, 3])),
     lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test, l2=L2, indices=[2, 3])),
    ("newton-measure-other-data", lambda c: ti.newton_loo(c.loss, c.params, c.train, c.test[0], l2=L2, indices=[1], measure=lambda p, x: c.apply(p, x)[:, 0]),
     lambda c: _newton_reference_logit(c, 1)),
]


def _ravel_order(case):
    """Column order of the reference gradients (weight, bias) in ti.tree.ravel's leaf order."""
    sizes = {"weight": D_IN * C, "bias": C}
    starts = {"weight": 0, "bias": D_IN * C}
    return torch.cat([torch.arange(starts[k], starts[k] + sizes[k]) for k in sorted(case.params)])   # optree sorts keys


def _newton_reference_logit(case, i):
    """The first logit of every test point after one dense Newton step without example i (autograd Hessian)."""
    keep = torch.arange(N) != i
    flat = ti.ravel(case.params)
    R = lambda v: ti.objective(case.loss, ti.take(case.train, keep), l2=L2)(ti.unravel(v, case.params))  # noqa: E731
    g = torch.autograd.functional.jacobian(R, flat)
    H = torch.autograd.functional.hessian(R, flat)
    stepped = ti.unravel(flat - torch.linalg.solve(H, g), case.params)
    return (case.apply(stepped, case.test[0])[:, 0] - case.apply(case.params, case.test[0])[:, 0])[:, None]


@pytest.mark.parametrize("call, reference", [row[1:] for row in RESULTS], ids=[row[0] for row in RESULTS])
def test_edge_input_gives_the_right_result(case, call, reference):
    out, expected = call(case), reference(case)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected.to(out.dtype), rtol=1e-9, atol=1e-11)


def test_finite_check_costs_one_reduction_per_leaf(monkeypatch):
    """The success path reduces each leaf once and never looks for ids."""
    calls = []
    original = torch.Tensor.sum
    monkeypatch.setattr(torch.Tensor, "sum", lambda self, *a, **k: calls.append(self.shape) or original(self, *a, **k))
    G = {"w": torch.ones(8, 3, 2), "b": torch.ones(8, 3)}
    checks.finite_chunk("ti.x", "train", G, 0)
    assert len(calls) == 2
