"""Pytree algebra: property tests on nested dict/tuple/list trees against raveled references."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tinfluence as ti
from tinfluence import tree as tr

shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)


@st.composite
def trees(draw, depth=2):
    """A random nest of dicts, tuples and lists with float64 tensor leaves."""
    if depth == 0 or draw(st.booleans()):
        return torch.randn(draw(shapes), generator=torch.Generator().manual_seed(draw(st.integers(0, 10**6))))
    kind = draw(st.sampled_from(["dict", "tuple", "list"]))
    children = [draw(trees(depth=depth - 1)) for _ in range(draw(st.integers(1, 3)))]
    if kind == "dict":
        keys = draw(st.lists(st.text("abcxyz", min_size=1, max_size=3), min_size=len(children), max_size=len(children), unique=True))
        return dict(zip(keys, children))
    return tuple(children) if kind == "tuple" else list(children)


def like(t, seed):
    return tr.random_like(t, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=40, deadline=None)
@given(trees(), st.integers(0, 100))
def test_algebra_matches_raveled_vectors(x, seed):
    y = like(x, seed)
    fx, fy = tr.ravel(x), tr.ravel(y)
    torch.testing.assert_close(tr.ravel(tr.add(x, y)), fx + fy, rtol=0, atol=0)
    torch.testing.assert_close(tr.ravel(tr.sub(x, y)), fx - fy, rtol=0, atol=0)
    torch.testing.assert_close(tr.ravel(tr.scale(2.5, x)), 2.5 * fx, rtol=0, atol=0)
    torch.testing.assert_close(tr.ravel(tr.add_scaled(x, -0.5, y)), fx - 0.5 * fy, rtol=0, atol=1e-15)
    torch.testing.assert_close(tr.vdot(x, y), fx @ fy, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tr.norm(x), torch.linalg.norm(fx), rtol=1e-12, atol=1e-12)
    assert tr.size(x) == fx.numel()
    assert tr.ravel(tr.zeros_like(x)).abs().sum() == 0


@settings(max_examples=40, deadline=None)
@given(trees())
def test_ravel_unravel_roundtrip_keeps_structure_dtype_device(x):
    back = tr.unravel(tr.ravel(x), x)
    import optree
    assert optree.tree_structure(back, namespace="") == optree.tree_structure(x, namespace="")
    for a, b in zip(optree.tree_leaves(back, namespace=""), optree.tree_leaves(x, namespace="")):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        assert torch.equal(a, b)


@settings(max_examples=30, deadline=None)
@given(trees(), st.integers(1, 4))
def test_stack_unstack_and_batched_ravel(x, k):
    items = [like(x, s) for s in range(k)]
    stacked = tr.stack(items)
    assert tr.leading_size(stacked) == k
    for a, b in zip(tr.unstack(stacked), items):
        assert torch.equal(tr.ravel(a), tr.ravel(b))
    flat = tr.ravel(stacked, batch_ndim=1)
    assert flat.shape == (k, tr.size(x))
    assert torch.equal(flat, torch.stack([tr.ravel(i) for i in items]))
    assert torch.equal(tr.ravel(tr.unravel(flat, x), batch_ndim=1), flat)
    op = ti.LinearOperator(lambda v: v, like=x)
    assert op.is_stack(stacked) and not op.is_stack(x)


@settings(max_examples=30, deadline=None)
@given(trees(), st.integers(1, 3), st.integers(1, 4))
def test_pairwise_vdot_equals_matrix_of_raveled(x, m, n):
    A = tr.stack([like(x, s) for s in range(m)])
    B = tr.stack([like(x, 100 + s) for s in range(n)])
    expected = tr.ravel(A, batch_ndim=1) @ tr.ravel(B, batch_ndim=1).T
    torch.testing.assert_close(tr.pairwise_vdot(A, B), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(tr.vdot)(A, A), (tr.ravel(A, batch_ndim=1) ** 2).sum(1), rtol=1e-12, atol=1e-12)


def test_random_like_is_reproducible_and_sphere_has_unit_norm():
    x = {"w": torch.zeros(3, 4), "b": torch.zeros(3)}
    a = tr.random_like(x, generator=torch.Generator().manual_seed(1))
    b = tr.random_like(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tr.ravel(a), tr.ravel(b))
    s = tr.random_like(x, generator=torch.Generator().manual_seed(2), kind="sphere", batch=(5,))
    torch.testing.assert_close(tr.ravel(s, batch_ndim=1).norm(dim=1), torch.ones(5))
    with pytest.raises(ValueError, match="`kind` must be"):
        tr.random_like(x, generator=torch.Generator(), kind="cube")


def test_select_partition_merge():
    params = {"fc1.w": torch.ones(2), "fc1.b": torch.ones(1), "fc2.w": torch.ones(3)}
    chosen, rest = tr.partition(params, lambda name, p: name.startswith("fc1."))
    assert set(chosen) == {"fc1.w", "fc1.b"} and set(rest) == {"fc2.w"}
    assert tr.merge(chosen, rest).keys() == params.keys()
    with pytest.raises(ValueError, match="must be disjoint"):
        tr.merge(chosen, chosen)


def test_dict_leaves_align_by_key_not_insertion_order():
    x = {"fc2.weight": torch.tensor([1.0]), "fc1.weight": torch.tensor([2.0])}
    y = {"fc1.weight": torch.tensor([10.0]), "fc2.weight": torch.tensor([20.0])}
    assert tr.vdot(x, y).item() == 1 * 20 + 2 * 10


def test_shape_errors_are_explained():
    x = {"w": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="last dimension P=6"):
        tr.unravel(torch.zeros(5), x)
    with pytest.raises(ValueError, match="parameter shapes"):
        ti.LinearOperator(lambda v: v, like=x).is_stack({"w": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="structure of the parameters"):
        ti.LinearOperator(lambda v: v, like=x).is_stack({"v": torch.zeros(2, 3)})
    assert ti.ravel is tr.ravel and ti.unravel is tr.unravel and ti.vdot is tr.vdot
