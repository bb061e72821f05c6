"""Kernels: per-example gradients, Hessian- and Gauss-Newton-vector products, dense Hessians.

Each factory returns a pure function of parameter pytrees that composes with
`torch.func.vmap` and survives `torch.compile`. A curvature operator is a function
`v -> C v` on pytrees shaped like the parameters; given a stack of vectors (leaves with
one extra leading axis k) it returns the k products, computed in one vmapped call.
`compile=True` on `per_example_grad_fn`, `per_example_grads`, `hvp` and `ggn_vp`
compiles the per-chunk kernel itself, with the chunk as an argument, so every chunk of a
size reuses one compiled graph.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Callable, cast

import optree
import torch
from torch.func import grad, jacrev, jvp, vjp, vmap

from . import checks
from . import collectives as dd
from . import data as D
from . import tree as tr
from .objective import Objective, example_loss, per_example
from .operator import LinearOperator
from .tree import PyTree

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["per_example_grads", "per_example_grad_fn", "hvp", "ggn_vp", "hessian", "to_dense"]


def _check_compile(where: str, compile) -> None:
    """Raises `ArgumentError` (a TypeError) unless `compile` is a bool."""
    checks.flag(where, "compile", compile)


def _compiled(fn: Callable) -> Callable:
    """`torch.compile(fn, fullgraph=True, dynamic=False)` with a compiled-code cache of its own.

    Dynamo keeps compiled code per Python code object, and the kernels built here share
    their code with the kernels of every other call (same factory, other closures): after
    `torch._dynamo.config.recompile_limit` (8) of them a fullgraph compile would fail.
    Entering through a fresh copy of a code object gives each kernel its own cache, so
    only its own input shapes count against that limit.

    Under `fullgraph=True` an error raised by the traced code (a loss that is not
    per-example, say) surfaces as a dynamo `Unsupported`; the kernel then runs `fn`
    eagerly once, so the caller gets the error `fn` itself raises, and re-raises dynamo's
    error where `fn` runs fine.
    """

    def entry(*args):
        return fn(*args)

    entry.__code__ = entry.__code__.replace()
    compiled = torch.compile(entry, fullgraph=True, dynamic=False)

    def kernel(*args):
        try:
            return compiled(*args)
        except torch._dynamo.exc.Unsupported:
            fn(*args)
            raise

    return kernel


def _vector_and_stack(kernel: Callable, in_dims: tuple, compile: bool) -> tuple[Callable, Callable]:
    """`(kernel, vmap(kernel, in_dims))`, each compiled on its first call when `compile` is set."""
    stacked = vmap(kernel, in_dims=in_dims)
    return (_compiled(kernel), _compiled(stacked)) if compile else (kernel, stacked)


def per_example_grad_fn(loss: Callable, *, compile: bool = False) -> Callable:
    """Returns `(params, batch) -> G`, the gradient of each example's loss.

    `G` has the structure of `params`, each leaf `[B, *param.shape]`, with
    `G[i] = ∇_θ loss(θ, z_i)`. Computed as `vmap(grad(...))` over the examples of the batch
    (one vectorized backward; no Python loop over examples).

    With `compile=True` the kernel is `torch.compile(..., fullgraph=True, dynamic=False)`:
    one graph per batch size, compiled on the first call with that size and reused
    afterwards (chunked use sees two sizes, the chunk and the shorter last one). It pays
    off only over many calls of one size (large data, many test batches or checkpoints;
    measured break-even in docs/costs.md). Compiled code belongs to the returned function:
    keep it and reuse it; more than `torch._dynamo.config.recompile_limit` (8) distinct
    batch sizes make it fail.

    Args:
      loss: `(params, batch) -> Tensor[B]`, one loss per example.
      compile: compile the kernel with torch.compile (inductor).

    Returns:
      `(params, batch) -> G`, leaves `[B, *param.shape]` in the dtype and device of `params`.

    Raises:
      TypeError: `compile` is not a bool, or `loss` is not callable.

    Cost: one vectorized backward over the batch, O(B · cost of one gradient) time and
    B × P numbers for the result.

    Examples:
      >>> G = ti.per_example_grad_fn(loss)(params, train)
      >>> G["weight"].shape
      torch.Size([60, 3, 8])
    """
    return grad_fn(loss, compile=compile, call="ti.per_example_grads")


def grad_fn(loss: Callable, *, compile: bool = False, call: str, name: str = "loss") -> Callable:
    """`per_example_grad_fn` for the public call `call`, whose argument `name` (`loss`,
    `measure`, ...) is the function differentiated: the name its errors give.
    """
    _check_compile(call, compile)
    checks.function(call, name, loss, "(params, batch) -> Tensor[B]")
    kernel = vmap(grad(example_loss(loss, where=call, name=name)), in_dims=(None, 0))
    return _compiled(kernel) if compile else kernel


def grads(loss: Callable, params: PyTree, data: PyTree, *, chunk_size: int | None = None, compile: bool = False,
          call: str, name: str = "loss", data_name: str = "data") -> PyTree:
    """Per-example gradients of `data` (leaves `[n, *shape]`), each chunk checked to be finite.

    The checked path behind `ti.per_example_grads` for any public call: `params` (one
    floating dtype and device), `data` (a leading example axis, that dtype and device),
    `chunk_size` and the gradients themselves (one reduction per leaf and chunk; the ids and
    the leaf are named on failure) are checked with `call`'s name and the argument names
    `name` and `data_name`.
    """
    ref = checks.params(call, params)
    D._count_examples(data, name=data_name, call=call)
    checks.floating_like(call, data_name, data, ref)
    checks.chunk_size(call, chunk_size)
    kernel = grad_fn(loss, compile=compile, call=call, name=name)

    def chunk_grads(start, chunk):
        G = kernel(params, chunk)
        checks.finite_chunk(call, data_name, G, start)
        return G

    return D._chunk_cat(chunk_grads, data, chunk_size, call=call, indexed=True)


def per_example_grads(loss: Callable, params: PyTree, data: PyTree, *, chunk_size: int | None = None,
                      compile: bool = False) -> PyTree:
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
      compile: run the chunks through `per_example_grad_fn(loss, compile=True)`, built
        for this call: it compiles (seconds, see there) for the chunk size and once more
        for a shorter last chunk, so it pays off only on data of many chunks; to reuse
        compiled code across calls, keep a compiled `per_example_grad_fn` yourself.

    Returns:
      The pytree of `params` with leaves `[n, *param.shape]`, in their dtype and device.

    Raises:
      ArgumentError (a TypeError and a ValueError): `compile` not a bool, `chunk_size` not
        None or an int >= 1, parameters not one floating dtype and device, `data` of another
        dtype or device, a loss that is not one floating value per example, or a gradient
        that is not finite (the message names the example ids and the leaf).

    Cost: n/`chunk_size` vectorized backwards, O(n · cost of one gradient) time; memory
    n × P numbers for the result plus one chunk's intermediates.

    Examples:
      >>> G = ti.per_example_grads(loss, params, train, chunk_size=16)
      >>> torch.allclose(G["weight"], ti.per_example_grad_fn(loss)(params, train)["weight"])
      True
    """
    return grads(loss, params, data, chunk_size=chunk_size, compile=compile, call="ti.per_example_grads")


def _accepting_stacks(apply_one: Callable, params, apply_many: Callable | None = None, *,
                      kind: str = "hessian") -> LinearOperator:
    """Lifts `v -> C v` to a `ti.LinearOperator` on `params`: stacks (leading axis k) go to
    `apply_many`, or vmap. It carries the parameters' structure, so solvers tell one vector
    from a stack by `is_stack`, without being told.
    """
    return LinearOperator(apply_one, params, many=apply_many, symmetric=True, kind=kind)


def _summed(terms: list, l2: float) -> Callable:
    """`v -> Σ_t term(v) + l2·v`, for one vector or a stack alike."""

    def apply(v):
        total = terms[0](v)
        for term in terms[1:]:
            total = tr.add(total, term(v))
        return tr.add_scaled(total, l2, v) if l2 else total

    return apply


def _chunked_operator(kernel: Callable, params, data, chunk_size: int | None, l2: float, compile: bool,
                      kind: str = "hessian") -> LinearOperator:
    """`v -> Σ_chunks kernel(params, chunk, v) + l2·v`, on one vector or a stack (leading axis k).

    The chunk is an argument of `kernel`, not a closure: compiled, the single-vector kernel
    and its vmap over the stack are each one graph that every chunk of the same size reuses
    (the shorter last chunk compiles once more), never a graph unrolled over the chunks.
    """
    one, many = _vector_and_stack(kernel, (None, None, 0), compile)
    chunks = list(D.chunks(data, chunk_size))

    def bound(fn):
        return _summed([functools.partial(fn, params, chunk) for chunk in chunks], l2)

    return _accepting_stacks(bound(one), params, bound(many), kind=kind)


def _all_reducing(local: LinearOperator, l2: float, group) -> LinearOperator:
    """`v -> Σ_ranks local(v) + l2·v`: ONE all-reduce per application (one vector or a whole
    stack), the l2 term added once.
    """

    def reduced(apply):
        def operator(v):
            total = dd.all_reduce(apply(v), group)
            return tr.add_scaled(total, l2, v) if l2 else total
        return operator

    return LinearOperator(reduced(local.fn), local.like, many=reduced(local.many), symmetric=local.symmetric,
                          psd=local.psd, kind=local.kind)


def _leaves(spec: optree.PyTreeSpec, v: PyTree) -> list[torch.Tensor]:
    """The leaves of `v`, in the order of `spec` (the flattened parameters); a ValueError if its structure differs."""
    # `flatten_up_to` is typed for any prefix spec (its items are subtrees); under a spec of tensor leaves they are tensors
    return cast("list[torch.Tensor]", spec.flatten_up_to(v))


def _retained_hvp(f: Callable, params) -> Callable:
    """`v -> ∇²f(params) v` by reverse over reverse on a gradient graph built once and kept."""
    leaves, spec = optree.tree_flatten(params, namespace="")
    primals = [leaf.detach().requires_grad_(True) for leaf in leaves]
    with torch.enable_grad():
        grads = torch.autograd.grad(f(optree.tree_unflatten(spec, primals)), primals, create_graph=True)
    live = [i for i, g in enumerate(grads) if g.requires_grad]   # a gradient constant in θ has H = 0

    def apply_one(v):
        tangents = _leaves(spec, v)
        out = [torch.zeros_like(t) for t in tangents]
        if live:
            products = torch.autograd.grad([grads[i] for i in live], primals, [tangents[i] for i in live],
                                           retain_graph=True, allow_unused=True)
            out = [o if p is None else p for o, p in zip(out, products)]
        return optree.tree_unflatten(spec, out)

    return apply_one


def _resolved_cache(where: str, cache: bool | None, compile: bool) -> bool:
    """`cache`, with None meaning `not compile`; the cached form cannot be compiled."""
    _check_compile(where, compile)
    if cache is None:
        return not compile
    if cache and compile:
        raise ValueError(
            f"{where}: `cache=True` and `compile=True` cannot be combined: the cached form replays an autograd "
            "graph kept from construction, which torch.compile cannot trace. Pass compile=True with cache=None "
            "(or cache=False) for the compiled recomputing form, or drop `compile` to keep the cached one."
        )
    return cache


def hvp(f: Callable, params: PyTree, *, cache: bool | None = None, compile: bool = False) -> LinearOperator:
    """Returns the operator v ↦ ∇²f(θ) v at θ = `params`, exact.

    Three forms, one result:

    - `cache=True` (default unless `compile=True`): the gradient of f is computed once,
      here, with its autograd graph kept; every product is one backward pass through it
      (reverse over reverse). The fastest form for the many products at one point that CG
      and LiSSA make; the kept graph holds f's intermediates over all the data (memory ∝ n).
    - `cache=False`: every product is a fresh `jvp(grad(·))` (forward over reverse), an
      `Objective` reduced chunk by chunk (memory ∝ chunk); a pure torch.func composition
      that nests in other transforms and compiles with `torch.compile(fullgraph=True)`.
    - `compile=True`: that form compiled per chunk, one kernel `(params, chunk, v)` reused
      by every chunk of one size (the shorter last chunk compiles once more) and a vmapped
      one for stacks, each on first use. Compile time does not grow with n while the
      saving per product does, so it pays on data too large to cache, after ~10² products
      (docs/costs.md). Compiled code belongs to the operator: a new one traces again.

    An `Objective` with a process group (`ti.objective(..., group=)`) applies this rank's
    curvature, then all-reduces the product once per call (one collective for a whole
    stack) and adds l2·v once.

    Args:
      f: `params -> 0-d tensor`, e.g. `ti.objective(loss, train, l2=...)`.
      params: the point θ at which the Hessian is taken.
      cache: keep the gradient graph or recompute per call; None means `not compile`.
      compile: compile the recomputing form with torch.compile (inductor).

    Returns:
      `Hv`, a `ti.LinearOperator` (kind "hessian"): `v` shaped like `params` -> H v
      likewise; a stack (leaves `[k, *shape]`) -> the k products in one vmapped call. Pure.

    Raises:
      TypeError: `compile` is not a bool.
      ValueError: `cache=True` together with `compile=True`.

    Cost: building the cached form, about one gradient of f; each product about one
    gradient's backward per vector (k vectors batched in one call), O(k · cost of ∇f).

    Examples:
      >>> R = ti.objective(loss, train, l2=1e-2)
      >>> Hv = ti.hvp(R, params)
      >>> torch.allclose(ti.to_dense(Hv, params), ti.hessian(R, params))
      True
    """
    ref = checks.params("ti.hvp", params)
    checks.function("ti.hvp", "f", f, "params -> 0-d tensor, e.g. ti.objective(loss, train)")
    if isinstance(f, Objective):
        checks.floating_like("ti.hvp", "f.data", f.data, ref)
    cache = _resolved_cache("ti.hvp", cache, compile)
    if isinstance(f, Objective) and f.group is not None:
        dd._check_replicated("ti.hvp", f.group, params=params, l2=f.l2)
        local = hvp(dataclasses.replace(f, l2=0.0, group=None), params, cache=cache, compile=compile)
        return _all_reducing(local, f.l2, f.group)
    if cache:
        return _accepting_stacks(_retained_hvp(f, params), params)
    if isinstance(f, Objective):
        def chunk_hvp(p, chunk, v):
            chunk_grad = grad(lambda q: f.data_term(q, chunk))
            return jvp(chunk_grad, (p,), (v,))[1]

        return _chunked_operator(chunk_hvp, params, f.data, f.chunk_size, f.l2, compile)

    def full_hvp(p, v):
        return jvp(grad(f), (p,), (v,))[1]

    one, many = _vector_and_stack(full_hvp, (None, 0), compile)
    return _accepting_stacks(functools.partial(one, params), params, functools.partial(many, params))


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
        tangents = _leaves(spec, v)
        Jv = torch.autograd.grad([JTu[i] for i in live], u, [tangents[i] for i in live], retain_graph=True)[0]
        HJv = torch.autograd.grad(g_out, o, Jv, retain_graph=True)[0] if g_out.requires_grad else torch.zeros_like(Jv)
        # 1/n on the outputs' side ([B, ...] per vector), not on the P-sized result
        pulled = torch.autograd.grad(outputs, primals, HJv / n, retain_graph=True, allow_unused=True)
        return optree.tree_unflatten(spec, [torch.zeros_like(t) if g is None else g for t, g in zip(tangents, pulled)])

    return term


def ggn_vp(predict: Callable, params: PyTree, data: PyTree, *, output_loss: Callable, l2: float = 0.0,
           chunk_size: int | None = None, cache: bool | None = None, compile: bool = False,
           group: ProcessGroup | None = None) -> LinearOperator:
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
        memory ∝ data), or recompute per call with `jvp`/`vjp` (memory ∝ chunk,
        compile-friendly); None means `not compile`.
      compile: compile the recomputing form as in `ti.hvp(..., compile=True)`: one kernel
        `(params, chunk, v)` reused by every chunk of the same size (the shorter last
        chunk compiles once more), and a vmapped one for stacks, each compiled on first use.
      group: a `torch.distributed` process group when `data` is this rank's shard: n is
        the global number of examples and each product is all-reduced once (l2·v added once).

    Returns:
      `GNv`, a `ti.LinearOperator` (kind "ggn", positive semi-definite for a convex output
      loss) on pytrees shaped like `params`, or on stacks with leading axis k. Pure.

    Raises:
      TypeError: `compile` is not a bool.
      ValueError: `l2` < 0, or `cache=True` together with `compile=True`.

    Cost: per product, one forward-mode and one reverse pass through `predict` per vector
    (k vectors batched in one call), O(k · n · cost of one example's forward); the cached
    form keeps every chunk's graphs (memory ∝ n), the recomputing one a chunk's.

    Examples:
      >>> GNv = ti.ggn_vp(predict, params, train, output_loss=output_loss, l2=1e-2)
      >>> H = ti.hessian(ti.objective(loss, train, l2=1e-2), params)   # predict is linear in θ
      >>> torch.allclose(ti.to_dense(GNv, params), H)
      True
    """
    ref = checks.params("ti.ggn_vp", params)
    l2 = checks.number("ti.ggn_vp", "l2", l2, minimum=0.0)
    checks.chunk_size("ti.ggn_vp", chunk_size)
    checks.function("ti.ggn_vp", "predict", predict, "(params, batch) -> Tensor[B, ...]")
    checks.function("ti.ggn_vp", "output_loss", output_loss, "(outputs, batch) -> Tensor[B]")
    cache = _resolved_cache("ti.ggn_vp", cache, compile)
    dd._check_replicated("ti.ggn_vp", group, params=params, l2=l2)
    n = dd.global_size(D._count_examples(data, name="data", call="ti.ggn_vp"), group)
    checks.floating_like("ti.ggn_vp", "data", data, ref)
    local_l2 = 0.0 if group is not None else l2

    def parts(chunk: PyTree) -> tuple[Callable, Callable]:
        forward = lambda p: predict(p, chunk)  # noqa: E731
        output_grad = grad(lambda o: per_example(output_loss, o, chunk, where="ti.ggn_vp", name="output_loss").sum())
        return forward, output_grad

    if cache:
        terms = [_retained_ggn_term(*parts(chunk), params, n) for chunk in D.chunks(data, chunk_size)]
        operator = _accepting_stacks(_summed(terms, local_l2), params, kind="ggn")
    else:
        def chunk_ggn_vp(p, chunk, v):
            forward, output_grad = parts(chunk)
            outputs, Jv = jvp(forward, (p,), (v,))[:2]   # typed as 2 or 3 values (3 with has_aux=True)
            HJv = jvp(output_grad, (outputs,), (Jv,))[1]
            return tr.scale(1.0 / n, vjp(forward, p)[1](HJv)[0])

        operator = _chunked_operator(chunk_ggn_vp, params, data, chunk_size, local_l2, compile, kind="ggn")
    return operator if group is None else _all_reducing(operator, l2, group)


# Basis vectors per vectorized pass when a dense matrix is formed column block by column block
# (small enough that a block's [32, n, c] intermediates stay in cache; docs/costs.md).
DENSE_BLOCK = 32


def hessian_fn(f: Callable, *, chunk_size: int | None = None) -> Callable:
    """`x -> ∇²f(x)`, the dense Hessian `[*x.shape, *x.shape]` of a scalar `f` of one tensor.

    `torch.func.jacrev(grad(f))`: a vmapped reverse pass (`chunk_size` basis vectors at a
    time, all at once by default) over the gradient. This is the one path to a dense
    Hessian: `jacrev(jacrev(f))` and `torch.func.hessian(f)` (`jacfwd(jacrev(f))`)
    differentiate a vmapped backward pass and are wrong through `F.layer_norm` with an
    elementwise weight (docs/design.md, "Which autodiff path is trusted"). Composes
    with `vmap` (per-example Hessians; measured in docs/costs.md).
    """
    return jacrev(grad(f), chunk_size=chunk_size)


def hessian(f: Callable, params: PyTree) -> torch.Tensor:
    """Dense Hessian ∇²f(θ) as a `[P, P]` matrix over `ti.tree.ravel(params)`.

    For small P only (P² numbers). An `Objective` is reduced chunk by chunk. Computed with
    `hessian_fn` (`torch.func.jacrev(grad(·), chunk_size=32)`) on the raveled parameters
    (reverse over reverse, 32 basis vectors per vectorized pass), independently of `hvp`'s
    code path. An `Objective` with a process group sums its shards' Hessians (one
    all-reduce of the `[P, P]` matrix) and adds l2·I once. Cost: P/32 vectorized reverse
    passes over the data, P² numbers of memory.

    Args:
      f: `params -> 0-d tensor`, e.g. `ti.objective(loss, train, l2=...)`.
      params: the point θ; P = `ti.tree.size(params)`.

    Returns:
      `[P, P]` tensor, symmetric, dtype and device of `params`, in the order of `ti.tree.ravel`.

    Raises:
      ArgumentError: `params` is not a pytree of finite floating tensors of one dtype and device.

    Examples:
      >>> H = ti.hessian(ti.objective(loss, train, l2=1e-2), params)
      >>> H.shape, torch.allclose(H, H.T)
      (torch.Size([27, 27]), True)
    """
    checks.params("ti.hessian", params)
    flat = tr.ravel(params)

    def dense(fn):
        return hessian_fn(lambda x: fn(tr.unravel(x, params)), chunk_size=DENSE_BLOCK)(flat)

    if isinstance(f, Objective):
        H = D.chunk_sum(lambda chunk: dense(lambda p: f.data_term(p, chunk)), f.data, f.chunk_size)
        H = dd.all_reduce(H, f.group)
        return H + f.l2 * torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
    return dense(f)


def to_dense(operator: Callable, params: PyTree) -> torch.Tensor:
    """The matrix `[P, P]` of a linear operator on parameter pytrees (column j = C e_j).

    Applies the operator to stacks of `DENSE_BLOCK` (32) basis vectors; for small P only.

    Cost: P/32 operator calls on stacks of 32 vectors; memory P² numbers.

    Args:
      operator: `v -> C v` on pytrees shaped like `params` and on stacks of them (leading axis k),
        e.g. `ti.hvp(R, params)`, `ti.ggn_vp(...)`, `curv.operator`.
      params: the structure the operator acts on; P = `ti.tree.size(params)`.

    Returns:
      `[P, P]` tensor in the order of `ti.tree.ravel(params)`, dtype and device of `params`.

    Examples:
      >>> A = torch.tensor([[2., 1.], [1., 3.]], dtype=torch.float64)
      >>> op = ti.LinearOperator(lambda u: A @ u, like=torch.zeros(2, dtype=torch.float64))
      >>> torch.equal(ti.to_dense(op, torch.zeros(2, dtype=torch.float64)), A)
      True
    """
    flat = tr.ravel(params)
    identity = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
    columns = [tr.ravel(operator(tr.unravel(block, params)), batch_ndim=1) for block in identity.split(DENSE_BLOCK)]
    return torch.cat(columns).T
