"""The kernels are plain functions of pytrees: torch.compile (inductor on CPU) equals eager.

The recomputing HVP (`cache=False`) and the per-example-gradient kernel compile as one graph
(`fullgraph=True`). The cached HVP replays a graph that `torch.func.linearize` already traced,
which dynamo runs through graph breaks: still equal to eager.
"""

import torch

import tinfluence as ti
from tinfluence import tree as tr
from models import build, cases


def _close(a, b):
    torch.testing.assert_close(tr.ravel(a, batch_ndim=1), tr.ravel(b, batch_ndim=1), rtol=1e-12, atol=1e-14)


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
