"""The kernels are plain functions of pytrees: torch.compile (inductor on CPU) equals eager.

The first three tests compile tinfluence's functions from outside, as a user would: the
recomputing HVP (`cache=False`), the per-example-gradient kernel and the Gauss-Newton
product compile as one graph (`fullgraph=True`); the cached HVP replays a kept autograd
graph, which dynamo runs through graph breaks, still equal to eager. The rest test the
built-in switch, `compile=True`.

Tolerance: compiled code may fuse and reorder reductions, so results may differ from eager
by round-off; on these tiny float64 models that is a few ulps of the largest entry, well
inside rtol=1e-12, atol=1e-14 (a real error, e.g. a missing chunk, is of order 1e-2).
"""

import pytest
import torch
import torch.nn.functional as F
from models import build, cases

import tinfluence as ti
from tinfluence import tree as tr

pytestmark = pytest.mark.slow   # compiles kernels with inductor: the fast subset (-m "not slow") leaves it out


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)   # leaf by leaf, structures equal


def _no_recompile():
    """Within this block, compiling a kernel again for inputs it has seen is an error."""
    return torch._dynamo.config.patch(error_on_recompile=True)


def test_compiled_hvp_equals_eager(generator):
    _, params, loss, data = build(cases()[1])
    torch._dynamo.reset()
    V = tr.random_like(params, generator=generator, batch=(3,))
    R = ti.objective(loss, data, l2=1e-2, chunk_size=5)
    recomputing = ti.hvp(R, params, cache=False)
    _close(torch.compile(recomputing, fullgraph=True)(V), recomputing(V))
    cached = ti.hvp(R, params, cache=True)
    _close(torch.compile(cached)(V), cached(V))


def test_compiled_per_example_grads_equal_eager():
    _, params, loss, data = build(cases()[2])
    torch._dynamo.reset()
    kernel = ti.per_example_grad_fn(loss)
    _close(torch.compile(kernel, fullgraph=True)(params, data), kernel(params, data))


def test_compiled_ggn_vp_equals_eager(generator):
    apply, params, loss, data = build(cases()[1])
    torch._dynamo.reset()
    GNv = ti.ggn_vp(lambda p, b: apply(p, b[0]), params, data, cache=False,
                    output_loss=lambda o, b: torch.nn.functional.cross_entropy(o, b[1], reduction="none"))
    V = tr.random_like(params, generator=generator, batch=(2,))
    _close(torch.compile(GNv, fullgraph=True)(V), GNv(V))


@pytest.mark.parametrize("case", cases()[:2], ids=lambda c: c[0])
def test_compile_switch_per_example_grads_equal_eager(case):
    _, params, loss, data = build(case)   # 12 examples: chunks of 5, 5 and a shorter 2
    eager = ti.per_example_grads(loss, params, data, chunk_size=5)
    _close(ti.per_example_grads(loss, params, data, chunk_size=5, compile=True), eager)
    kernel = ti.per_example_grad_fn(loss, compile=True)
    first, last = ti.take(data, slice(0, 5)), ti.take(data, slice(10, 12))
    for batch in (first, last):   # one compile per batch size
        kernel(params, batch)
    with _no_recompile():
        _close(kernel(params, ti.take(data, slice(5, 10))), tr.map(lambda g: g[5:10], eager))
        _close(kernel(params, last), tr.map(lambda g: g[10:], eager))


def test_compile_switch_hvp_on_objective_one_graph_for_all_chunks(generator):
    _, params, loss, data = build(cases()[1])
    R = ti.objective(loss, data, l2=1e-2, chunk_size=4)   # three chunks of the same size
    v = tr.random_like(params, generator=generator)
    V = tr.random_like(params, generator=generator, batch=(3,))
    eager = ti.hvp(R, params, cache=False)
    Hv = ti.hvp(R, params, compile=True)
    with _no_recompile():   # chunks 2 and 3 reuse chunk 1's graph, for one vector and for a stack
        _close(Hv(v), eager(v))
        _close(Hv(V), eager(V))
        _close(Hv(tr.scale(-2.0, V)), eager(tr.scale(-2.0, V)))
    # and the eager form is the Hessian: the compiled one is checked against the dense matrix too
    torch.testing.assert_close(tr.ravel(Hv(V), batch_ndim=1), tr.ravel(V, batch_ndim=1) @ ti.hessian(R, params),
                               rtol=1e-10, atol=1e-12)


def test_compile_switch_hvp_on_function_equals_eager(generator):
    _, params, loss, data = build(cases()[1])
    f = lambda p: loss(p, data).square().mean() + tr.sq_norm(p)  # noqa: E731  a plain function, no Objective
    v = tr.random_like(params, generator=generator)
    V = tr.random_like(params, generator=generator, batch=(2,))
    Hv, eager = ti.hvp(f, params, compile=True), ti.hvp(f, params, cache=False)
    _close(Hv(v), eager(v))
    _close(Hv(V), eager(V))


def test_compile_switch_ggn_vp_equals_eager(generator):
    apply, params, loss, data = build(cases()[1])
    kw = dict(output_loss=lambda o, b: F.cross_entropy(o, b[1], reduction="none"), l2=1e-2, chunk_size=6)
    predict = lambda p, b: apply(p, b[0])  # noqa: E731
    V = tr.random_like(params, generator=generator, batch=(2,))
    GNv = ti.ggn_vp(predict, params, data, compile=True, **kw)
    with _no_recompile():
        _close(GNv(V), ti.ggn_vp(predict, params, data, cache=False, **kw)(V))


def test_compile_switch_kernels_have_their_own_compile_cache():
    _, params, loss, data = build(cases()[0])
    chunk = ti.take(data, slice(0, 5))
    twice = lambda p, b: 2.0 * loss(p, b)  # noqa: E731  same code as `loss`'s kernel, another closure
    G = ti.per_example_grads(loss, params, chunk)
    with torch._dynamo.config.patch(recompile_limit=1):   # kernels sharing one compile cache would fail on the second
        _close(ti.per_example_grad_fn(loss, compile=True)(params, chunk), G)
        _close(ti.per_example_grad_fn(twice, compile=True)(params, chunk), tr.scale(2.0, G))


def test_compile_switch_reports_the_users_error_not_dynamos():
    _, params, loss, data = build(cases()[0])
    mean_loss = lambda p, b: loss(p, b).mean()  # noqa: E731
    with pytest.raises(ValueError, match=r"ti\.per_example_grads: `loss` must return one value per example"):
        ti.per_example_grads(mean_loss, params, data, compile=True)
    with pytest.raises(ValueError, match=r"ti\.objective: `loss` must return one value per example"):
        ti.hvp(ti.objective(mean_loss, data), params, compile=True)(params)


def test_compile_switch_errors():
    apply, params, loss, data = build(cases()[0])
    R = ti.objective(loss, data)
    ggn = lambda **kw: ti.ggn_vp(lambda p, b: apply(p, b[0]), params, data,  # noqa: E731
                                 output_loss=lambda o, b: F.cross_entropy(o, b[1], reduction="none"), **kw)
    with pytest.raises(ValueError, match=r"ti\.hvp: `cache=True` and `compile=True` cannot be combined.*cache=None"):
        ti.hvp(R, params, cache=True, compile=True)
    with pytest.raises(ValueError, match=r"ti\.ggn_vp: `cache=True` and `compile=True` cannot be combined"):
        ggn(cache=True, compile=True)
    with pytest.raises(TypeError, match=r"ti\.hvp: `compile` must be True or False; got 'yes' \(str\)"):
        ti.hvp(R, params, compile="yes")
    with pytest.raises(TypeError, match=r"ti\.ggn_vp: `compile` must be True or False; got 1 \(int\)"):
        ggn(compile=1)
    with pytest.raises(TypeError, match=r"ti\.per_example_grads: `compile` must be True or False; got None"):
        ti.per_example_grads(loss, params, data, compile=None)
    with pytest.raises(TypeError, match=r"ti\.per_example_grads: `compile` must be True or False"):
        ti.per_example_grad_fn(loss, compile="fullgraph")
