"""Figures for influence results, drawn with matplotlib's Agg backend.

Each function returns a `matplotlib.figure.Figure` built on an Agg canvas (no pyplot, no
global backend switch, safe in scripts, servers and notebooks) and saves it when given a
`path`. matplotlib is imported on first use, so `import tinfluence` does not need it.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from .validate.metrics import pearson

__all__ = ["loo_scatter", "top_examples", "score_hist"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _rows(values) -> list:
    """`[k]`, `[n_test, k]` or a list of 1-d tensors -> a list of 1-d float64 tensors on the CPU."""
    if isinstance(values, torch.Tensor):
        values = [values] if values.dim() == 1 else list(values)
    return [torch.as_tensor(v).detach().to("cpu", torch.float64).reshape(-1) for v in values]


def _finish(fig, path):
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def loo_scatter(actual, predicted: Mapping, *, labels: Sequence[str] | None = None, scale_free: Sequence[str] = (),
                path=None):
    """Returns Koh & Liang's Figure 2: predicted against actual change in test loss, a panel per method.

    One point per (test point, removed training point), coloured by test point; x is the
    actual change from retraining (`ti.leave_one_out`), y the method's score (the library's
    sign: positive = helpful, the change when the point is removed). Each title carries
    the method's Pearson correlation, averaged over test points. Methods named in
    `scale_free` get no y = x line: their scores share the sign but not the scale.

    Args:
      actual: `[k]`, `[n_test, k]`, or a list of 1-d tensors (one per test point, lengths may differ).
      predicted: method name -> scores shaped like `actual`.
      labels: one legend entry per test point.
      scale_free: names of methods whose scores have their own scale (TracIn, EmpiricalIF).
      path: where to save the PNG (or any format matplotlib writes), if given.

    Returns:
      The `matplotlib.figure.Figure`.

    Raises:
      ValueError: `predicted` is empty, or a method's scores are not shaped like `actual`.
    """
    if not predicted:
        raise ValueError("ti.plot.loo_scatter: `predicted` is empty; pass {method name: scores}.")
    truth = _rows(actual)
    panels = {name: _rows(s) for name, s in predicted.items()}
    for name, rows in panels.items():
        if [r.shape for r in rows] != [a.shape for a in truth]:
            raise ValueError(f"ti.plot.loo_scatter: scores of {name!r} must be shaped like `actual` "
                             f"{[list(a.shape) for a in truth]}; got {[list(r.shape) for r in rows]}.")
    cols = min(len(panels), 3)
    fig = _figure(4.0 * cols, 3.8 * math.ceil(len(panels) / cols))
    axes = fig.subplots(math.ceil(len(panels) / cols), cols, squeeze=False).ravel()
    for ax, (name, rows) in zip(axes, panels.items()):
        for t, (x, y) in enumerate(zip(truth, rows)):
            ax.scatter(x.numpy(), y.numpy(), s=9, alpha=0.7, label=labels[t] if labels else None)
        r = torch.stack([pearson(y, x) for x, y in zip(truth, rows)]).mean().item()
        if name not in scale_free:
            lo = min(min(x.min().item(), y.min().item()) for x, y in zip(truth, rows))
            hi = max(max(x.max().item(), y.max().item()) for x, y in zip(truth, rows))
            ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--")
        ax.axhline(0, color="0.85", lw=0.6, zorder=0)
        ax.axvline(0, color="0.85", lw=0.6, zorder=0)
        ax.set_title(f"{name}{' (own scale)' if name in scale_free else ''}   Pearson {r:.3f}", fontsize=10)
        ax.set_xlabel("actual change in test loss")
        ax.set_ylabel("predicted change (score)")
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    if labels:
        axes[0].legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return _finish(fig, path)


def top_examples(images, scores, test_image, *, k: int = 5, labels=None, test_label=None,
                 image_shape: tuple | None = None, title: str | None = None, path=None):
    """Returns a figure of a test image with its k most helpful and k most harmful training images.

    Helpful: the largest scores (removing them would raise the test loss most); harmful:
    the most negative. Each training image is titled with its id, label and score.

    Args:
      images: training images `[n_train, H, W]`, or `[n_train, D]` with `image_shape`.
      scores: `[n_train]`, one test point's scores.
      test_image: `[H, W]` (or `[D]` with `image_shape`).
      k: images per row, 1 <= k <= n_train.
      labels: `[n_train]` class labels, shown in the titles.
      test_label: the test point's label.
      image_shape: `(H, W)` to reshape flat images.
      title: figure title.
      path: where to save, if given.

    Returns:
      The `matplotlib.figure.Figure`.

    Raises:
      ValueError: `scores` is not `[n_train]`, or `k` is out of range.
    """
    images = torch.as_tensor(images).detach().cpu()
    scores = torch.as_tensor(scores).detach().cpu()
    n = images.shape[0]
    if tuple(scores.shape) != (n,):
        raise ValueError(f"ti.plot.top_examples: `scores` must be [n_train] = [{n}] (one test point's row); got {list(scores.shape)}.")
    if not 1 <= k <= n:
        raise ValueError(f"ti.plot.top_examples: `k` must be between 1 and {n}; got {k}.")
    shape = image_shape or tuple(images.shape[1:])
    picks = {"helpful": scores.topk(k).indices, "harmful": (-scores).topk(k).indices}
    fig = _figure(1.5 * (k + 1), 3.6)
    grid = fig.subplots(2, k + 1, squeeze=False)
    grid[0, 0].imshow(torch.as_tensor(test_image).detach().cpu().reshape(shape).numpy(), cmap="gray_r")
    grid[0, 0].set_title("test" + (f" (label {test_label})" if test_label is not None else ""), fontsize=8)
    grid[1, 0].set_visible(False)
    for row, (kind, ids) in enumerate(picks.items()):
        for col, i in enumerate(ids.tolist(), start=1):
            ax = grid[row, col]
            ax.imshow(images[i].reshape(shape).numpy(), cmap="gray_r")
            label = f" y={int(labels[i])}" if labels is not None else ""
            ax.set_title(f"#{i}{label}\n{scores[i].item():+.1e}", fontsize=7)
        grid[row, 1].set_ylabel(kind, fontsize=9)
    for ax in grid.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


def score_hist(scores: Mapping, *, bins: int = 50, path=None):
    """Returns histograms of scores, one panel per method (each on its own scale).

    Args:
      scores: method name -> scores of any shape (e.g. `[n_test, n_train]`), flattened.
      bins: histogram bins.
      path: where to save, if given.

    Returns:
      The `matplotlib.figure.Figure`.

    Raises:
      ValueError: `scores` is empty.
    """
    if not scores:
        raise ValueError("ti.plot.score_hist: `scores` is empty; pass {method name: scores}.")
    fig = _figure(3.2 * len(scores), 2.8)
    axes = fig.subplots(1, len(scores), squeeze=False).ravel()
    for ax, (name, s) in zip(axes, scores.items()):
        ax.hist(torch.as_tensor(s).detach().cpu().reshape(-1).numpy(), bins=bins, color="C0")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("score")
    return _finish(fig, path)
