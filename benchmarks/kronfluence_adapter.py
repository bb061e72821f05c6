"""kronfluence adapters: (E)K-FAC influence and gradient dot products through its `Analyzer`.

Each call is timed whole: wrapping the model (`prepare_model`), fitting the factors with
`fit_all_factors` into a fresh temporary output folder (removed afterwards), and
`compute_pairwise_scores` of every test point against every training point.

Settings: the library's recommended task definition (training loss summed over the batch, so
per-example gradients are those of each example's cross-entropy; labels sampled from the
model's softmax for the true Fisher, its default), the test cross-entropy as measurement
(the quantity the references differentiate), every factor and score dtype set to the task's
dtype (float64 on digits; the eigendecompositions are float64 by default), the whole test set
as one query batch as in its examples, and the training loader batch of the other peers.
kronfluence divides its covariance and eigenvalue-correction sums by the number of examples,
so its curvature is the Fisher of the mean loss; the objective's Hessian adds l2·I, hence
`damping_factor = l2`.
"""

from __future__ import annotations

import tempfile
import warnings

import torch
import torch.nn.functional as F
from tasks import Task


def _kronfluence_task(generator: torch.Generator):
    from kronfluence.task import Task as KronfluenceTask

    class Classification(KronfluenceTask):
        """Cross-entropy summed over the batch; with `sample`, labels drawn from the model's softmax (true Fisher)."""

        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    return Classification()


def _kronfluence(task: Task, strategy: str, empirical: bool = False):
    """Pairwise scores `[n_test, n_train]` of kronfluence with factor `strategy`, as the library returns them;
    `empirical`: the Fisher of the given labels (`use_empirical_fisher=True`) instead of sampled ones.
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from peers import _batch
    from torch.utils.data import TensorDataset

    dtype = task.dtype
    ktask = _kronfluence_task(torch.Generator().manual_seed(0))
    model = task.make_model()
    model = prepare_model(torch.nn.Sequential(model) if task.kind == "lr" else model, ktask)   # it wraps submodules only
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as folder, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")   # its torch.cuda.amp.GradScaler
        analyzer = Analyzer(analysis_name="benchmark", model=model, task=ktask, cpu=True, disable_tqdm=True,
                            output_dir=folder)
        train, test = TensorDataset(*task.train), TensorDataset(*task.test)
        factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=empirical, activation_covariance_dtype=dtype,
                                      gradient_covariance_dtype=dtype,
                                      per_sample_gradient_dtype=dtype, lambda_dtype=dtype)
        analyzer.fit_all_factors(factors_name=strategy, dataset=train, per_device_batch_size=_batch(task),
                                 factor_args=factor_args)
        score_args = ScoreArguments(damping_factor=task.l2, per_sample_gradient_dtype=dtype, precondition_dtype=dtype,
                                    score_dtype=dtype)
        analyzer.compute_pairwise_scores(scores_name=strategy, factors_name=strategy, query_dataset=test, train_dataset=train,
                                         per_device_query_batch_size=task.n_test, per_device_train_batch_size=_batch(task),
                                         score_args=score_args)
        return analyzer.load_pairwise_scores(strategy)["all_modules"]


def kronfluence_ekfac(task: Task):
    """Returns kronfluence's EK-FAC influence scores `[n_test, n_train]` (its default strategy)."""
    return _kronfluence(task, "ekfac")


def kronfluence_ekfac_empirical(task: Task):
    """Kronfluence's EK-FAC scores `[n_test, n_train]` with the empirical Fisher (the given labels)."""
    return _kronfluence(task, "ekfac", empirical=True)


def kronfluence_identity(task: Task):
    """Returns kronfluence's unpreconditioned scores `[n_test, n_train]`: per-example gradient dot products."""
    return _kronfluence(task, "identity")


NOTES = {
    ("kronfluence", "ekfac"): "strategy 'ekfac' (its default): true Fisher with labels sampled from the softmax (seed 0), "
                              "damping_factor = l2 (its curvature is of the mean loss), factor and score dtypes = the task's, "
                              "test cross-entropy as measurement, training batch min(n, 4096), all test points in one query batch",
    ("kronfluence", "ekfac-emp"): "strategy 'ekfac' with use_empirical_fisher=True (the given labels), otherwise as "
                                  "'ekfac'; the setting whose scores tinfluence's equal to round-off (× 1/n)",
    ("kronfluence", "grad-dot"): "strategy 'identity' (no preconditioning): per-example cross-entropy gradient dot "
                                 "products, dtypes = the task's",
}
