"""How well predicted scores agree with what retraining actually does.

Every comparison reduces along the last axis, so `[n_test, k]` scores against `[n_test, k]`
actual changes give one number per test point (`[n_test]`), and `[k]` against `[k]` gives a
0-d tensor. Pearson correlation is invariant to the scale (and offset) of the scores, which
is why it compares methods that live on their own scale (TracIn, EmpiricalIF) with actual
leave-one-out changes as fairly as it compares influence functions.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import optree
import torch
from tqdm.auto import tqdm

from ..core import checks
from ..core import data as D
from ..core import tree as tr
from ..core.tree import PyTree
from .loo import measure_all

__all__ = ["pearson", "spearman", "topk_overlap", "sign_agreement", "lds", "LDSResult"]


def _as_pair(where: str, scores, actual) -> tuple[torch.Tensor, torch.Tensor]:
    """Both arguments as floating tensors of one shape with at least 2 values on the last axis."""
    x, y = torch.as_tensor(scores), torch.as_tensor(actual)
    if x.shape != y.shape:
        raise ValueError(f"{where}: `scores` and `actual` must have the same shape; got {list(x.shape)} and {list(y.shape)}.")
    if x.dim() == 0 or x.shape[-1] < 2:
        raise ValueError(f"{where}: needs at least 2 values along the last axis; got shape {list(x.shape)}.")
    dtype = torch.promote_types(x.dtype, y.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    x, y = x.to(dtype), y.to(dtype=dtype, device=x.device)
    for name, t in (("scores", x), ("actual", y)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: `{name}` has non-finite values (nan or inf); drop them before comparing.")
    return x, y


def _pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xc, yc = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    return (xc * yc).sum(-1) / torch.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last axis; tied values share the average of their ranks."""
    ordered = x.sort(dim=-1).values.contiguous()
    below = torch.searchsorted(ordered, x.contiguous(), right=False)
    through = torch.searchsorted(ordered, x.contiguous(), right=True)
    return (below + through + 1).to(x.dtype) / 2


def pearson(scores: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """Returns Pearson's correlation between `scores` and `actual` along the last axis.

    Matches `scipy.stats.pearsonr`. Invariant to a positive scale and any offset of either
    argument. A constant row has no correlation and gives nan.

    Args:
      scores: predicted changes, e.g. `[n_test, k]` influence scores.
      actual: the measured changes, same shape (e.g. from `ti.leave_one_out`).

    Returns:
      `[...]`: one correlation in [-1, 1] per row (0-d for 1-d inputs).

    Raises:
      ValueError: shapes differ, fewer than 2 values per row, or non-finite values.

    Cost: O(numel) time and memory.

    Examples:
      >>> scores = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
      >>> actual = scores + torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
      >>> r = ti.pearson(scores, actual)
      >>> r.shape
      torch.Size([3])
      >>> torch.allclose(r[0], torch.corrcoef(torch.stack([scores[0], actual[0]]))[0, 1])
      True
    """
    return _pearson(*_as_pair("ti.pearson", scores, actual))


def spearman(scores: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """Returns Spearman's rank correlation between `scores` and `actual` along the last axis.

    The Pearson correlation of the ranks, tied values taking the average of their ranks;
    matches `scipy.stats.spearmanr`. Invariant to any increasing transform of either argument.

    Args:
      scores: predicted changes, `[..., k]`.
      actual: measured changes, same shape.

    Returns:
      `[...]`: one rank correlation in [-1, 1] per row.

    Raises:
      ValueError: shapes differ, fewer than 2 values per row, or non-finite values.

    Cost: O(numel · log k) (one sort per row) time, O(numel) memory.

    Examples:
      >>> x, y = torch.tensor([1., 2., 2., 4.]), torch.tensor([1., 3., 2., 4.])
      >>> ranks = torch.tensor([[1., 2.5, 2.5, 4.], [1., 3., 2., 4.]])   # tied values share their mean rank
      >>> torch.allclose(ti.spearman(x, y), torch.corrcoef(ranks)[0, 1])
      True
    """
    x, y = _as_pair("ti.spearman", scores, actual)
    return _pearson(_ranks(x), _ranks(y))


def _check_k(where: str, k: int, size: int) -> int:
    return checks.integer(where, "k", k, minimum=1, maximum=size, hint=f"(the number of values per row is {size}.)")


def topk_overlap(scores: torch.Tensor, actual: torch.Tensor, k: int) -> torch.Tensor:
    """Returns the fraction of the k largest |actual| that are also among the k largest |scores|.

    Compares which training points matter most, regardless of sign and scale: 1 when the
    two top-k sets by magnitude coincide. Ties at the k-th place are broken by position.

    Args:
      scores: predicted changes, `[..., m]`.
      actual: measured changes, same shape.
      k: size of the top sets, 1 <= k <= m.

    Returns:
      `[...]`: overlap in [0, 1] per row.

    Raises:
      ValueError: shapes differ, or non-finite values.
      ArgumentError: `k` not an int in [1, m].

    Cost: O(numel) time (two top-k per row) and memory.

    Examples:
      >>> scores, actual = torch.tensor([3., -2., 0.1, 0.]), torch.tensor([1., 5., 0., 4.])
      >>> ti.topk_overlap(scores, actual, k=2).item()      # top 2 by magnitude: {0, 1} and {1, 3}
      0.5
    """
    x, y = _as_pair("ti.topk_overlap", scores, actual)
    _check_k("ti.topk_overlap", k, x.shape[-1])
    in_actual = torch.zeros_like(y).scatter(-1, y.abs().topk(k, dim=-1).indices, 1.0)
    return in_actual.gather(-1, x.abs().topk(k, dim=-1).indices).sum(-1) / k


def sign_agreement(scores: torch.Tensor, actual: torch.Tensor, *, k: int | None = None) -> torch.Tensor:
    """Returns the fraction of points where `scores` and `actual` have the same sign.

    With the library's sign (positive = helpful), this asks whether a predicted helpful
    point really raises the test loss when removed. `k` restricts the count to the k
    points with the largest |scores| (top-k sign agreement), where the sign matters most.
    Zero counts as its own sign.

    Args:
      scores: predicted changes, `[..., m]`.
      actual: measured changes, same shape.
      k: if given, only the k largest |scores| per row are counted (1 <= k <= m).

    Returns:
      `[...]`: agreement in [0, 1] per row.

    Raises:
      ValueError: shapes differ, or non-finite values.
      ArgumentError: `k` not an int in [1, m].

    Cost: O(numel) time and memory.

    Examples:
      >>> scores, actual = torch.tensor([1., -2., 3., -0.5]), torch.tensor([2., -1., 1., 0.5])
      >>> ti.sign_agreement(scores, actual).item(), ti.sign_agreement(scores, actual, k=2).item()
      (0.75, 1.0)
    """
    x, y = _as_pair("ti.sign_agreement", scores, actual)
    same = (torch.sign(x) == torch.sign(y)).to(x.dtype)
    if k is None:
        return same.mean(-1)
    _check_k("ti.sign_agreement", k, x.shape[-1])
    return same.gather(-1, x.abs().topk(k, dim=-1).indices).mean(-1)


class LDSResult(NamedTuple):
    """Linear datamodeling score: mean over test points and its confidence interval (`ti.lds`).

    Attributes:
      mean: 0-d, the mean over test points of the per-test rank correlation.
      low: 0-d, the lower end of the confidence interval.
      high: 0-d, the upper end.
      per_test: `[n_test]`, Spearman's correlation over the subsets, one per test point.

    Examples:
      >>> ti.LDSResult._fields
      ('mean', 'low', 'high', 'per_test')
    """

    mean: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    per_test: torch.Tensor


def lds(train_fn: Callable, params: PyTree, train: PyTree, test: PyTree, scores: torch.Tensor, *, measure: Callable, subsets: int = 16,
        fraction: float = 0.5, generator: torch.Generator, confidence: float = 0.95,
        chunk_size: int | None = None, progress: bool = True) -> LDSResult:
    """Returns the linear datamodeling score of `scores` (Park et al. 2023), with a confidence interval.

    Retrains on `subsets` random subsets S_j, each a `fraction` of the training set
    (`train_fn(params, take(train, S_j))`). The per-test LDS is Spearman's correlation, over
    the subsets, between the predicted change Σ_{i ∉ S_j} scores[t, i] (score ≈ change when
    removed) and the measured `measure(θ_{S_j}, z_t)`; averaged over test points, with a
    normal-approximation interval `mean ± z·sd/√n_test`.

    Args:
      train_fn: `(params, data) -> params`, e.g. `ti.lbfgs_trainer(loss, l2=...)`.
      params: the trained parameters θ̂ (the warm start).
      train: the training set, leading axis n_train.
      test: the test set, leading axis n_test.
      scores: `[n_test, n_train]`, any method's scores.
      measure: `(params, batch) -> Tensor[B]`, the quantity the scores predict (the loss).
      subsets: number of random subsets m >= 3 (m retrainings; more narrows each test's LDS).
      fraction: share of training points kept in each subset, in (0, 1).
      generator: source of the subsets; its state is copied, never advanced.
      confidence: level of the interval over test points, in (0, 1).
      chunk_size: test examples measured at once.
      progress: show a progress bar over the retrainings.

    Returns:
      `LDSResult(mean, low, high, per_test)`; `per_test` is `[n_test]`.

    Raises:
      ValueError: `scores` is not `[n_test, n_train]`; bad data.
      ArgumentError: `train_fn` or `measure` not a function, `subsets` < 3, `fraction` or
        `confidence` outside (0, 1), a bad `chunk_size`, `generator` not a torch.Generator,
        or non-finite `scores`.

    Cost: `subsets` calls of `train_fn` and as many passes of `measure` over the test set,
    plus O(n_test · n_train · subsets) for the predictions.

    Examples:
      Influence scores of this convex model rank the subsets' test losses well:

      >>> H = ti.hessian(ti.objective(loss, train, l2=1e-2), params)
      >>> scores = ti.influence(loss, params, train, test, ihvp=ti.direct(H))
      >>> r = ti.lds(ti.newton_trainer(loss, params, train, l2=1e-2), params, train, test, scores,
      ...            measure=loss, subsets=8, generator=torch.Generator().manual_seed(0), progress=False)
      >>> r.per_test.shape, bool(r.low <= r.mean <= r.high), bool(r.mean > 0.5)
      (torch.Size([5]), True, True)

    References:
      Park et al., TRAK: Attributing Model Behavior at Scale, 2023.
    """
    where = "ti.lds"
    n_train = D._count_examples(train, name="train", call=where)
    n_test = D._count_examples(test, name="test", call=where)
    scores = torch.as_tensor(scores)
    if tuple(scores.shape) != (n_test, n_train):
        raise ValueError(f"{where}: `scores` must be [n_test, n_train] = [{n_test}, {n_train}]; got {list(scores.shape)}.")
    checks.function(where, "train_fn", train_fn, "(params, data) -> params")
    checks.function(where, "measure", measure, "(params, batch) -> Tensor[B]")
    subsets = checks.integer(where, "subsets", subsets, minimum=3, hint="(at least 3 to rank subsets against each other)")
    fraction = checks.number(where, "fraction", fraction, minimum=0.0, exclusive=True, maximum=1.0, exclusive_max=True)
    confidence = checks.number(where, "confidence", confidence, minimum=0.0, exclusive=True, maximum=1.0,
                               exclusive_max=True)
    checks.chunk_size(where, chunk_size)
    if not isinstance(generator, torch.Generator):
        raise checks.ArgumentError(f"{where}: `generator` must be a torch.Generator, e.g. "
                                   f"torch.Generator().manual_seed(0); got {checks.describe(generator)}.")
    if not bool(torch.isfinite(scores).all()):
        raise checks.ArgumentError(f"{where}: `scores` has non-finite values (nan or inf); pass finite scores.")
    keep = max(1, round(fraction * n_train))
    local = tr.fork_generator(generator)
    kept = torch.rand(subsets, n_train, generator=local, device=generator.device).argsort(dim=1)[:, :keep].cpu()
    masks = torch.zeros(subsets, n_train, dtype=torch.bool).scatter(1, kept, True)   # [subsets, n_train]
    measured = torch.stack([
        measure_all(measure, train_fn(params, D.take(train, mask.to(_device(train)))), test, chunk_size, where)
        for mask in tqdm(masks, desc="lds retraining", disable=not progress)
    ], dim=1)                                                                         # [n_test, subsets]
    predicted = scores @ (~masks).to(device=scores.device, dtype=scores.dtype).T        # [n_test, subsets]
    per_test = spearman(predicted, measured.to(predicted))
    z = torch.special.ndtri(torch.tensor(0.5 + confidence / 2, dtype=per_test.dtype))
    half = z * per_test.std() / n_test ** 0.5 if n_test > 1 else torch.tensor(float("nan"), dtype=per_test.dtype)
    mean = per_test.mean()
    return LDSResult(mean=mean, low=mean - half, high=mean + half, per_test=per_test)


def _device(data) -> torch.device:
    """The device of the first leaf of a data set."""
    return optree.tree_leaves(data, namespace="")[0].device
