"""Figures: one panel per (method, test point), honest axis labels, no empty panels, and
figures that show themselves in notebooks."""

import pytest
import torch

import tinfluence as ti


def _data(n_test=3, k=20):
    g = torch.Generator().manual_seed(0)
    actual = [torch.randn(k, generator=g) * 10.0 ** -t for t in range(n_test)]   # scales differ 100x
    predicted = {"direct": [a * 0.9 for a in actual], "tracin": [a * 1e4 + torch.randn(k, generator=g) for a in actual]}
    return actual, predicted


def test_loo_scatter_has_a_panel_per_method_and_test_point_each_on_its_scale():
    actual, predicted = _data()
    fig = ti.plot.loo_scatter(actual, predicted, labels=["a", "b", "c"], scale_free=["tracin"], title="T")
    axes = fig.axes
    assert len(axes) == 2 * 3 and all(ax.get_visible() for ax in axes)
    # each test point's panel spans its own range: the 100x smaller one is not squeezed into the first's
    spans = [axes[c].get_xlim()[1] - axes[c].get_xlim()[0] for c in range(3)]
    assert spans[0] > 20 * spans[2]
    assert axes[0].get_ylabel() == "predicted change in test loss"
    assert axes[3].get_ylabel() == "score (own scale)"
    assert fig.get_suptitle() == "T"
    assert "Pearson 1.000" in axes[0].get_title()


def test_figures_render_themselves_as_png_for_notebooks(tmp_path):
    actual, predicted = _data(n_test=1)
    png = ti.plot.loo_scatter(actual, predicted)._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_top_examples_shows_every_test_point():
    g = torch.Generator().manual_seed(1)
    images, scores = torch.rand(30, 4, 4, generator=g), torch.randn(2, 30, generator=g)
    fig = ti.plot.top_examples(images, scores, images[:2], k=3, names=["t0", "t1"], test_label=[1, 2])
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 2 * (1 + 2 * 3)          # per test point: its image, 3 helpful, 3 harmful
    best = scores[1].topk(3).indices.tolist()
    titles = [ax.get_title() for ax in fig.axes]
    assert all(any(t.startswith(f"#{i}") for t in titles) for i in best)


@pytest.mark.parametrize("call, message", [
    (lambda: ti.plot.loo_scatter([torch.zeros(3)], {"a": [torch.zeros(3)]}, labels=["x", "y"]),
     r"ti.plot.loo_scatter: `labels` must name each of the 1 test points; got 2"),
    (lambda: ti.plot.top_examples(torch.zeros(5, 2, 2), torch.zeros(2, 5), torch.zeros(3, 2, 2)),
     r"ti.plot.top_examples: `test_image` must hold one image per row of `scores` \(2\); got 3"),
])
def test_plot_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
