"""Kernels: per-example gradients, Hessian- and Gauss-Newton-vector products, dense Hessians.

Each factory returns a pure function of parameter pytrees that composes with
`torch.func.vmap` and survives `torch.compile`. A curvature operator is a function
`v -> C v` on pytrees shaped like the parameters; given a stack of vectors (leaves with
one extra leading axis k) it returns the k products, computed in one vmapped call.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import optree
import torch
from torch.func import grad, hessian as _func_hessian, jvp, vjp, vmap

from . import data as D
from . import distributed as dd
from . import tree as tr
from .errors import check_params
from .objective import Objective, per_example

__all__ = ["per_example_grads", "per_example_grad_fn", "hvp", "ggn_vp", "hessian", "to_dense"]


def per_example_grad_fn(loss: Callable, *, where: str = "ti.per_example_grads") -> Callable:
    """Returns `(params, batch) -> G`, the gradient of each example's loss.

    `G` has the structure of `params`, each leaf `[B, *param.shape]`, with
    `G[i] = ∇_θ loss(θ, z_i)`. Computed as `vmap(grad(...))` over the examples of the batch
    (one vectorized backward; no Python loop over examples).
    """

    def example_loss(params, example):
        batch = tr.map(lambda leaf: leaf.unsqueeze(0), example)
        return per_example(loss, params, batch, where=where)[0]

    return vmap(grad(example_loss), in_dims=(None, 0))


def per_example_grads(loss: Callable, params, data, *, chunk_size: int | None = None):
    """Gradients of every example's loss: leaves `[n, *param.shape]`, `G[i] = ∇_θ loss(θ, z_i)`.

    Computed chunk by chunk (`chunk_size` examples at a time, default 1024) with one
    vectorized backward per chunk; the result itself holds n × P numbers. For reductions
    that never need all of them at once, iterate `ti.data.chunks` and call
    `per_example_grad_fn(loss)` per chunk, as `ti.influence` does.

    Args:
      loss: `(params, batch) -> Tensor[B]`, one loss per example.
      params: `dict[str, Tensor]` (or any pytree) of floating parameters.
      data: pytree of tensors with a common leading axis n.
      chunk_size: examples per vectorized backward.
    """
    check_params("ti.per_example_grads", params)
    D.num_examples(data, name="data", where="ti.per_example_grads")
    kernel = per_example_grad_fn(loss)
    return D.chunk_cat(lambda chunk: kernel(params, chunk), data, chunk_size)


def _accepting_stacks(apply_one: Callable, params) -> Callable:
    """Lifts `v -> C v` to also take a stack of vectors (leading axis k) via vmap.

    The operator carries the parameters it acts on as `.params`, so solvers can tell one
    vector from a stack without being told.
    """

    def operator(v):
        return vmap(apply_one)(v) if tr.has_leading_axis(v, params) else apply_one(v)

    operator.params = params
    return operator


def _all_reducing(local: Callable, l2: float, group) -> Callable:
    """`v -> Σ_ranks local(v) + l2·v`: ONE all-reduce per application, the l2 term added once."""

    def operator(v):
        total = dd.all_reduce(local(v), group)
        return tr.add_scaled(total, l2, v) if l2 else total

    operator.params = local.params
    return operator


def _tangent_map(fn: Callable, primal) -> Callable:
    """`v -> J_fn(primal) v` by a fresh forward-mode `jvp` per call."""
    return lambda v: jvp(fn, (primal,), (v,))[1]


def _retained_hvp(f: Callable, params) -> Callable:
    """`v -> ∇²f(params) v` by reverse over reverse on a gradient graph built once and kept."""
    leaves, spec = optree.tree_flatten(params, namespace="")
    primals = [leaf.detach().requires_grad_(True) for leaf in leaves]
    with torch.enable_grad():
        grads = torch.autograd.grad(f(optree.tree_unflatten(spec, primals)), primals, create_graph=True)
    live = [i for i, g in enumerate(grads) if g.requires_grad]   # a gradient constant in θ has H = 0

    def apply_one(v):
        tangents = spec.flatten_up_to(v)
        out = [torch.zeros_like(t) for t in tangents]
        if live:
            products = torch.autograd.grad([grads[i] for i in live], primals, [tangents[i] for i in live],
                                           retain_graph=True, allow_unused=True)
            out = [o if p is None else p for o, p in zip(out, products)]
        return optree.tree_unflatten(spec, out)

    return apply_one


def hvp(f: Callable, params, *, cache: bool = True) -> Callable:
    """Returns the operator v ↦ ∇²f(θ) v at θ = `params`, exact.

    With `cache=True` (default) the gradient of f is computed once, here, with its
    autograd graph kept, and every product is one backward pass through that graph
    (reverse over reverse). Measured on CPU (one thread, digits logistic regression, in
    units of one gradient of the objective): building costs 0.8, one product 0.5, where a
    fresh forward-over-reverse `jvp(grad(f))` costs 2.7 per product and
    `torch.func.linearize` ~200 just to trace. That is what CG and
    LiSSA need: many products at the same parameters. The kept graph holds the
    intermediate values of f's forward and backward passes over all the data
    (memory ∝ n for an objective).

    With `cache=False` every product is a fresh `jvp(grad(·))` (forward over reverse)
    and an `Objective` (from `ti.objective`) is reduced chunk by chunk,
    H v = Σ_chunks ∇²(chunk's share of the mean loss) v + l2·v, holding one chunk's
    intermediates at a time. This form is a pure torch.func composition: it nests inside
    other transforms and compiles with `torch.compile(fullgraph=True)`.

    An `Objective` with a process group (`ti.objective(..., group=)`) applies the
    curvature of this rank's shard (either form above), then all-reduces the product once
    per call (one collective for all right-hand sides of a stack) and adds l2·v once.

    Args:
      f: `params -> 0-d tensor`, e.g. `ti.objective(loss, train, l2=...)`.
      params: the point θ at which the Hessian is taken.
      cache: keep the gradient graph (fast, memory ∝ data) or recompute per call
        (memory ∝ chunk, compile-friendly).

    Returns:
      `Hv(v)`: `v` shaped like `params` -> H v likewise; `v` with leaves `[k, *shape]`
      -> leaves `[k, *shape]` (k products in one vmapped call). Pure: the same `v` gives
      the same result, and `params` are never modified.
    """
    check_params("ti.hvp", params)
    if isinstance(f, Objective) and f.group is not None:
        return _all_reducing(hvp(dataclasses.replace(f, l2=0.0, group=None), params, cache=cache), f.l2, f.group)
    if cache:
        return _accepting_stacks(_retained_hvp(f, params), params)
    if isinstance(f, Objective):
        terms = [_tangent_map(grad(lambda p, c=chunk: f.data_term(p, c)), params)
                 for chunk in D.chunks(f.data, f.chunk_size)]

        def apply_one(v):
            total = terms[0](v)
            for term in terms[1:]:
                total = tr.add(total, term(v))
            return tr.add_scaled(total, f.l2, v) if f.l2 else total
    else:
        apply_one = _tangent_map(grad(f), params)
    return _accepting_stacks(apply_one, params)


def _retained_ggn_term(forward: Callable, output_grad: Callable, params, n: int) -> Callable:
    """`v -> (1/n) Jᵀ H_out J v` for one chunk, replaying graphs built once (reverse mode only).

    J v comes from the double-vjp identity: Jᵀu is linear in a dummy cotangent u, so the
    gradient of ⟨Jᵀu, v⟩ with respect to u is J v.
    """
    leaves, spec = optree.tree_flatten(params, namespace="")
    primals = [leaf.detach().requires_grad_(True) for leaf in leaves]
    with torch.enable_grad():
        outputs = forward(optree.tree_unflatten(spec, primals))
        u = torch.zeros_like(outputs, requires_grad=True)
        JTu = torch.autograd.grad(outputs, primals, u, create_graph=True, allow_unused=True)
        o = outputs.detach().requires_grad_(True)
        g_out = output_grad(o)
    live = [i for i, t in enumerate(JTu) if t is not None and t.requires_grad]

    def term(v):
        tangents = spec.flatten_up_to(v)
        Jv = torch.autograd.grad([JTu[i] for i in live], u, [tangents[i] for i in live], retain_graph=True)[0]
        HJv = torch.autograd.grad(g_out, o, Jv, retain_graph=True)[0] if g_out.requires_grad else torch.zeros_like(Jv)
        pulled = torch.autograd.grad(outputs, primals, HJv, retain_graph=True, allow_unused=True)
        return optree.tree_unflatten(spec, [torch.zeros_like(t) if g is None else g / n for t, g in zip(tangents, pulled)])

    return term


def ggn_vp(predict: Callable, params, data, *, output_loss: Callable, l2: float = 0.0,
           chunk_size: int | None = None, cache: bool = True, group=None) -> Callable:
    """Returns the Gauss-Newton operator v ↦ (1/n) Σ_i J_iᵀ H_i J_i v + l2·v.

    With outputs o_i = predict(θ, z_i) and per-example losses output_loss(o_i, z_i),
    J_i = ∂o_i/∂θ and H_i = ∂²output_loss/∂o_i². For convex output losses (cross
    entropy, squared error) the operator is positive semi-definite even when the model is
    not convex, and it equals the Hessian of the objective when `predict` is linear in θ.

    Args:
      predict: `(params, batch) -> Tensor[B, ...]`, e.g. `lambda p, b: apply(p, b[0])`.
      params: the point θ.
      data: the training set, leading axis n.
      output_loss: `(outputs, batch) -> Tensor[B]`, e.g.
        `lambda o, b: F.cross_entropy(o, b[1], reduction="none")`.
      l2: added l2·v, matching `ti.objective(..., l2=)`.
      chunk_size: examples per chunk (default 1024).
      cache: keep each chunk's forward and output-gradient graphs and replay them (fast,
        memory ∝ data), or recompute per call with `jvp`/`vjp` (memory ∝ chunk, compile-friendly).
      group: a `torch.distributed` process group when `data` is this rank's shard: n is
        the global number of examples and each product is all-reduced once (l2·v added once).

    Returns:
      `GNv(v)` on pytrees shaped like `params`, or on stacks with leading axis k. Pure.
    """
    check_params("ti.ggn_vp", params)
    if l2 < 0:
        raise ValueError(f"ti.ggn_vp: `l2` must be >= 0; got {l2}.")
    n = dd.global_size(D.num_examples(data, name="data", where="ti.ggn_vp"), group)

    def chunk_term(chunk):
        forward = lambda p: predict(p, chunk)  # noqa: E731
        output_grad = grad(lambda o: per_example(output_loss, o, chunk, where="ti.ggn_vp", name="output_loss").sum())
        if cache:
            return _retained_ggn_term(forward, output_grad, params, n)

        def term(v):
            outputs, Jv = jvp(forward, (params,), (v,))
            HJv = jvp(output_grad, (outputs,), (Jv,))[1]
            return tr.scale(1.0 / n, vjp(forward, params)[1](HJv)[0])

        return term

    terms = [chunk_term(chunk) for chunk in D.chunks(data, chunk_size)]
    local_l2 = 0.0 if group is not None else l2

    def apply_one(v):
        total = terms[0](v)
        for term in terms[1:]:
            total = tr.add(total, term(v))
        return tr.add_scaled(total, local_l2, v) if local_l2 else total

    operator = _accepting_stacks(apply_one, params)
    return operator if group is None else _all_reducing(operator, l2, group)


def hessian(f: Callable, params) -> torch.Tensor:
    """Dense Hessian ∇²f(θ) as a `[P, P]` matrix over `ti.tree.ravel(params)`.

    For small P only (P² numbers). An `Objective` is reduced chunk by chunk. Computed with
    `torch.func.hessian` (forward over reverse on the raveled parameters), independently
    of `hvp`'s code path. An `Objective` with a process group sums its shards' Hessians
    (one all-reduce of the `[P, P]` matrix) and adds l2·I once.
    """
    check_params("ti.hessian", params)
    flat = tr.ravel(params)

    def dense(fn):
        return _func_hessian(lambda x: fn(tr.unravel(x, params)))(flat)

    if isinstance(f, Objective):
        H = D.chunk_sum(lambda chunk: dense(lambda p: f.data_term(p, chunk)), f.data, f.chunk_size)
        H = dd.all_reduce(H, f.group)
        return H + f.l2 * torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
    return dense(f)


def to_dense(operator: Callable, params) -> torch.Tensor:
    """The matrix `[P, P]` of a linear operator on parameter pytrees (column j = C e_j).

    Applies the operator once to the stack of all P basis vectors; for small P only.
    """
    flat = tr.ravel(params)
    basis = tr.unravel(torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device), params)
    return tr.ravel(operator(basis), batch_ndim=1).T
