"""Figures for influence results, drawn with matplotlib's Agg backend.

Each function returns a `matplotlib.figure.Figure` built on an Agg canvas (no pyplot, no
global backend switch, safe in scripts, servers and notebooks) and saves it when given a
`path`. matplotlib is imported on first use, so `import tinfluence` does not need it.
"""

from __future__ import annotations

import functools
import io
import os
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from .core import checks
from .validate.metrics import pearson

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["loo_scatter", "top_examples", "score_hist"]


def _figure(width: float, height: float):
    """A constrained-layout Figure on an Agg canvas that shows itself in notebooks (`_repr_png_`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = _figure_class()(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


@functools.cache
def _figure_class():
    from matplotlib.figure import Figure

    class InlineFigure(Figure):
        """A matplotlib Figure that Jupyter displays as a PNG without `%matplotlib inline`."""

        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png", dpi=100)
            return buffer.getvalue()

    return InlineFigure


def _rows(values) -> list:
    """`[k]`, `[n_test, k]` or a list of 1-d tensors -> a list of 1-d float64 tensors on the CPU."""
    if isinstance(values, torch.Tensor):
        values = [values] if values.dim() == 1 else list(values)
    return [torch.as_tensor(v).detach().to("cpu", torch.float64).reshape(-1) for v in values]


def _finish(fig, path):
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def loo_scatter(actual: torch.Tensor | Sequence[torch.Tensor], predicted: Mapping, *, labels: Sequence[str] | None = None,
                scale_free: Sequence[str] = (),
                title: str | None = None, path: str | os.PathLike | None = None) -> Figure:
    """Returns Koh & Liang's Figure 2: predicted against actual change in test loss, per method and test point.

    One panel per (method, test point): rows are methods, columns test points, each panel
    on its own scale (test points differ by orders of magnitude), with that panel's Pearson
    correlation in its title. x is the actual change from retraining (`ti.leave_one_out`),
    y the method's score (the library's sign: positive = helpful, the change when the
    point is removed), with the y = x line. Methods named in `scale_free` share the sign
    but not the scale of a loss change: their y axis says "score (own scale)" and they get
    no y = x line.

    Args:
      actual: `[k]`, `[n_test, k]`, or a list of 1-d tensors (one per test point, lengths may differ).
      predicted: method name -> scores shaped like `actual`.
      labels: one name per test point (column titles), default "test 0", "test 1", ...
      scale_free: names of methods whose scores have their own scale (TracIn, EmpiricalIF).
      title: the figure's overall title (model, data, method settings).
      path: where to save the PNG (or any format matplotlib writes), if given.

    Returns:
      The `matplotlib.figure.Figure` (shown by itself in a notebook).

    Raises:
      ValueError: `predicted` is empty, a method's scores are not shaped like `actual`, or
        `labels` has the wrong length; as `ti.pearson` for a panel of fewer than 2 points.

    Cost: O(Σ points) to draw; one PNG write when `path` is given.

    Examples:
      >>> actual = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
      >>> fig = ti.plot.loo_scatter(actual, {"cg": 0.9 * actual, "tracin": 5 * actual}, scale_free=["tracin"])
      >>> len(fig.axes)                                  # 2 methods × 3 test points
      6
    """
    if not predicted:
        raise ValueError("ti.plot.loo_scatter: `predicted` is empty; pass {method name: scores}.")
    truth = _rows(actual)
    panels = {name: _rows(s) for name, s in predicted.items()}
    for name, rows in panels.items():
        if [r.shape for r in rows] != [a.shape for a in truth]:
            raise ValueError(f"ti.plot.loo_scatter: scores of {name!r} must be shaped like `actual` "
                             f"{[list(a.shape) for a in truth]}; got {[list(r.shape) for r in rows]}.")
    names = list(labels) if labels is not None else [f"test {t}" for t in range(len(truth))]
    if len(names) != len(truth):
        raise ValueError(f"ti.plot.loo_scatter: `labels` must name each of the {len(truth)} test points; "
                         f"got {len(names)}.")
    fig = _figure(2.9 * len(truth) + 0.6, 2.5 * len(panels) + 0.5)
    grid = fig.subplots(len(panels), len(truth), squeeze=False)
    for row, (name, rows) in enumerate(panels.items()):
        own_scale = name in scale_free
        for col, (x, y) in enumerate(zip(truth, rows)):
            ax = grid[row, col]
            ax.scatter(x.numpy(), y.numpy(), s=8, alpha=0.7, color=f"C{col}")
            if not own_scale:
                lo, hi = min(x.min().item(), y.min().item()), max(x.max().item(), y.max().item())
                ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--")
            ax.axhline(0, color="0.85", lw=0.6, zorder=0)
            ax.axvline(0, color="0.85", lw=0.6, zorder=0)
            ax.set_title(f"{name}, {names[col]}: Pearson {pearson(y, x).item():.3f}", fontsize=8)
            ax.ticklabel_format(style="sci", scilimits=(-2, 2))
            ax.tick_params(labelsize=7)
            ax.xaxis.get_offset_text().set_fontsize(7)
            ax.yaxis.get_offset_text().set_fontsize(7)
            if row == len(panels) - 1:
                ax.set_xlabel("actual change in test loss", fontsize=8)
            if col == 0:
                ax.set_ylabel("score (own scale)" if own_scale else "predicted change in test loss", fontsize=8)
    fig.suptitle(title or "Predicted against actual change in test loss when one training point is removed",
                 fontsize=10)
    return _finish(fig, path)


def top_examples(images: torch.Tensor, scores: torch.Tensor, test_image: torch.Tensor, *, k: int = 5, labels: torch.Tensor | None = None,
                 test_label: int | torch.Tensor | list[int] | tuple[int, ...] | None = None,
                 image_shape: tuple | None = None, title: str | None = None, names: Sequence[str] | None = None,
                 path: str | os.PathLike | None = None) -> Figure:
    """Returns a figure of test images, each with its k most helpful and k most harmful training images.

    Helpful: the largest scores (removing them would raise the test loss most); harmful:
    the most negative. Each training image is titled with its id, label and score. Several
    test points (scores `[n_test, n_train]`, test images `[n_test, ...]`) get two rows each.

    Args:
      images: training images `[n_train, H, W]`, or `[n_train, D]` with `image_shape`.
      scores: `[n_train]` (one test point's row) or `[n_test, n_train]`.
      test_image: `[H, W]` (or `[D]` with `image_shape`), or `[n_test, ...]` matching `scores`.
      k: images per row, 1 <= k <= n_train.
      labels: `[n_train]` class labels, shown in the titles.
      test_label: the test point's label, or a sequence with one per test point.
      image_shape: `(H, W)` to reshape flat images.
      title: figure title.
      names: one name per test point (default "test", or "test 0", "test 1", ...).
      path: where to save, if given.

    Returns:
      The `matplotlib.figure.Figure` (shown by itself in a notebook).

    Raises:
      ValueError: `scores` is not `[n_train]` or `[n_test, n_train]`, or `test_image` does not
        hold n_test images.
      ArgumentError: `k` out of range, or non-finite `scores`.

    Cost: O(n_test · n_train) for the rankings, 2·n_test·(k + 1) image panels.

    Examples:
      >>> images = torch.rand(20, 4, 4, generator=torch.Generator().manual_seed(0))
      >>> scores = torch.randn(2, 20, generator=torch.Generator().manual_seed(1))
      >>> fig = ti.plot.top_examples(images, scores, images[:2], k=3)
      >>> len(fig.axes)                                  # 2 test points × 2 rows × (1 + k) panels
      16
    """
    images = torch.as_tensor(images).detach().cpu()
    scores = torch.as_tensor(scores).detach().cpu()
    n = images.shape[0]
    if scores.dim() not in (1, 2) or scores.shape[-1] != n:
        raise ValueError(f"ti.plot.top_examples: `scores` must be [n_train] = [{n}] (one test point's row); "
                         f"got {list(scores.shape)}. For several test points pass [n_test, {n}].")
    k = checks.integer("ti.plot.top_examples", "k", k, minimum=1, maximum=n)
    if not bool(torch.isfinite(scores).all()):
        raise checks.ArgumentError("ti.plot.top_examples: `scores` has non-finite values (nan or inf); a ranking of "
                                   "them is meaningless. Pass finite scores.")
    shape = image_shape or tuple(images.shape[1:])
    tests = torch.as_tensor(test_image).detach().cpu()
    rows = scores.reshape(-1, n)
    tests = tests.reshape(-1, *shape) if scores.dim() == 2 else tests.reshape(1, *shape)
    if tests.shape[0] != rows.shape[0]:
        raise ValueError(f"ti.plot.top_examples: `test_image` must hold one image per row of `scores` "
                         f"({rows.shape[0]}); got {tests.shape[0]}.")
    test_labels = list(test_label) if isinstance(test_label, (list, tuple, torch.Tensor)) else [test_label] * len(rows)
    titles = list(names) if names is not None else (["test"] if len(rows) == 1 else [f"test {t}" for t in range(len(rows))])
    fig = _figure(1.5 * (k + 1), 3.4 * len(rows) + (0.3 if title else 0))
    grid = fig.subplots(2 * len(rows), k + 1, squeeze=False)
    for t, (row_scores, image) in enumerate(zip(rows, tests)):
        top, bottom = grid[2 * t], grid[2 * t + 1]
        top[0].imshow(image.numpy(), cmap="gray_r")
        label = test_labels[t]
        top[0].set_title(titles[t] + (f" (label {int(label)})" if label is not None else ""), fontsize=8)
        bottom[0].set_visible(False)
        picks = {"helpful": row_scores.topk(k).indices, "harmful": (-row_scores).topk(k).indices}
        for axes, (kind, ids) in zip((top, bottom), picks.items()):
            for col, i in enumerate(ids.tolist(), start=1):
                axes[col].imshow(images[i].reshape(shape).numpy(), cmap="gray_r")
                train_label = f" y={int(labels[i])}" if labels is not None else ""
                axes[col].set_title(f"#{i}{train_label}\n{row_scores[i].item():+.1e}", fontsize=7)
            axes[1].set_ylabel(kind, fontsize=9)
    for ax in grid.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


def score_hist(scores: Mapping, *, bins: int = 50, path: str | os.PathLike | None = None) -> Figure:
    """Returns histograms of scores, one panel per method (each on its own scale).

    Args:
      scores: method name -> scores of any shape (e.g. `[n_test, n_train]`), flattened.
      bins: histogram bins.
      path: where to save, if given.

    Returns:
      The `matplotlib.figure.Figure`.

    Raises:
      ValueError: `scores` is empty.
      ArgumentError: `bins` not an int >= 1.

    Cost: O(Σ numel) for the histograms.

    Examples:
      >>> s = torch.randn(5, 60, generator=torch.Generator().manual_seed(0))
      >>> fig = ti.plot.score_hist({"cg": s, "tracin": 3 * s}, bins=20)
      >>> len(fig.axes)
      2
    """
    if not scores:
        raise ValueError("ti.plot.score_hist: `scores` is empty; pass {method name: scores}.")
    checks.integer("ti.plot.score_hist", "bins", bins, minimum=1)
    fig = _figure(3.2 * len(scores), 2.8)
    axes = fig.subplots(1, len(scores), squeeze=False).ravel()
    for ax, (name, s) in zip(axes, scores.items()):
        ax.hist(torch.as_tensor(s).detach().cpu().reshape(-1).numpy(), bins=bins, color="C0")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("score")
    return _finish(fig, path)
