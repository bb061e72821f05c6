"""Per-example gradients of linear layers kept as factors: exact Gram matrices without forming them.

For a weight W `[out, in]` used as `F.linear(a, W, b)`, the gradient of example i's loss is
a sum of outer products over the positions t at which the layer is applied (T = 1 for an
MLP, the sequence length for a layer applied token by token):

    ∇_W ℓ_i = Σ_t G_itᵀ A_it,      A_it ∈ R^in the layer's input, G_it ∈ R^out ∂ℓ_i/∂(output at t),

so ⟨∇_W ℓ_i, ∇_W ℓ_j⟩ = Σ_{t,s} (G_it·G_js)(A_it·A_js) costs T_i·T_j·(in + out) instead of
in·out, and the n × P per-example gradients are never formed; against a dense stack V (e.g.
solved test gradients), ⟨V_W, ∇_W ℓ_i⟩ = Σ_t G_itᵀ V_W A_it (`dense_gram`). `grad_factors` captures A and G
for every parameter that the forward uses only as the weight or bias of `F.linear`
(`nn.Linear`, and any module calling `F.linear`), and takes `vmap(grad)` per-example
gradients of every other parameter (convolutions, embeddings, norms, tied weights); one
vectorized backward gives both. `gram`, `sq_norms` and `materialize` then equal
`ti.tree.pairwise_vdot`, the squared row norms and `ti.per_example_grads` to round-off, and
`dense_gram(V, factors)` equals `ti.tree.pairwise_vdot(V, materialize(factors))`.

Capture: the loss is evaluated for each example separately (`vmap` over the batch, each
example a batch of one, exactly as `ti.per_example_grads` does) under a
`torch.overrides.TorchFunctionMode` that sees every call receiving a parameter tensor.
`torch.func.functional_call` (hence `ti.functionalize`'s `apply`) hands the very tensor
objects of `params` to the modules, so a use is recognized by identity. A zero "probe" is
added to the output of each such `F.linear` call, and the gradient with respect to the
probes is G. Because every example runs on its own, per-example gradients mean what they
mean for `ti.per_example_grads` (a model in training mode with batch statistics is evaluated
per example there too); models should be in eval mode.

Which parameters factor: those whose every use in the forward is as the 2-d weight (or every
use as the 1-d bias) of `F.linear`; several calls with one weight are concatenated along T,
an input without an example axis is repeated for every example. Any other use (a weight tied
to an embedding, `W.t()`, a convolution, a custom op) sends the parameter to `vmap(grad)`; a
call that returns only metadata, such as `W.shape`, is not a use. A weight whose factors cost
more than its gradient (for Gram matrices T²·(in + out) >= in·out, long sequences; for
`dense_gram` T·(in + out) >= in·out) has its gradient formed from the factors instead, so no
layer becomes slower than with `ti.per_example_grads`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import optree
import torch
import torch.nn.functional as F
from torch.func import grad, vmap
from torch.overrides import TorchFunctionMode

from . import checks
from . import data as D
from . import tree as tr
from .objective import per_example
from .tree import PyTree

__all__ = ["GradFactors", "grad_factors", "grad_factor_fn", "gram", "dense_gram", "sq_norms", "materialize"]


class GradFactors(NamedTuple):
    """Per-example gradients of a batch of B examples, linear-layer weights kept as factors.

    A pytree whose leaves all have the leading example axis B, so `ti.take`,
    `ti.data.chunk_cat` and `ti.tree.map` apply.

    Attributes:
      linear: `{name: (A, G)}` for weights used only by `F.linear`: A `[B, T, in]` the
        layer's inputs, G `[B, T, out]` the gradients of each example's loss with respect to
        the layer's outputs, so that the gradient is `Σ_t G[i, t]ᵀ A[i, t]`, `[out, in]`.
        Several calls with the same weight are concatenated along T.
      dense: `{name: [B, *shape]}`, the per-example gradient of every other parameter:
        biases of linear layers (Σ_t G[i, t]), weights whose factors would cost more than
        the gradient itself (for `gram`: T² (in + out) >= in·out), and parameters used in
        any other way.
    """

    linear: dict
    dense: dict


_WEIGHT, _BIAS, _OTHER = "weight", "bias", "other"


def _linear_args(args, kwargs) -> tuple:
    """`(input, weight, bias)` of an `F.linear(input, weight, bias=None)` call."""
    bound = dict(zip(("input", "weight", "bias"), args))
    bound.update(kwargs)
    return bound["input"], bound["weight"], bound.get("bias")


def _holds_tensor(value) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in optree.tree_leaves(value, namespace=""))


class _Uses(TorchFunctionMode):
    """Records how one forward uses each parameter tensor (recognized by identity).

    `roles[name]` collects "weight" (the 2-d weight of F.linear), "bias" (the 1-d bias of
    F.linear) and "other" (any other call whose result holds a tensor; a call returning only
    metadata such as `.shape` carries no gradient and is ignored). `calls` lists, per F.linear
    call touching a parameter, `(weight name, bias name, zeros shaped like its output)`.
    """

    def __init__(self, names: dict):
        super().__init__()
        self.names = names   # id(tensor) -> parameter name
        self.roles: dict = {}
        self.calls: list = []

    def _note(self, tensor, role: str):
        name = self.names.get(id(tensor))
        if name is not None:
            self.roles.setdefault(name, set()).add(role)
        return name

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            a, W, b = _linear_args(args, kwargs)
            for leaf in optree.tree_leaves(a, namespace=""):
                self._note(leaf, _OTHER)
            w = self._note(W, _WEIGHT if W.dim() == 2 else _OTHER)
            bias = None if b is None else self._note(b, _BIAS if b.dim() == 1 else _OTHER)
            if w is not None or bias is not None:
                self.calls.append((w, bias, torch.zeros_like(out)))
        elif _holds_tensor(out):
            call: PyTree = (args, kwargs)
            for leaf in optree.tree_leaves(call, namespace=""):
                self._note(leaf, _OTHER)
        return out


def _linear_input(func, args, kwargs, probed: set):
    """The input of an `F.linear` call whose weight or bias is in `probed` (ids), else None."""
    if func is not F.linear:
        return None
    a, W, b = _linear_args(args, kwargs)
    return a if id(W) in probed or (b is not None and id(b) in probed) else None


class _Probing(TorchFunctionMode):
    """Adds `probes[k]` to the output of the k-th recognised layer call on the probed parameters
    and records that call's input.

    `recognize(func, args, kwargs, probed) -> input or None` picks the calls (default: `F.linear`
    on a probed weight or bias); `advice` ends the error raised when the calls under vmap are
    not those of the plain call that made the probes.
    """

    def __init__(self, probed: set, probes: tuple, where: str, *, recognize: Callable = _linear_input,
                 what: str = "F.linear", advice: str = "the loss must run the same layers for every call. "
                                                      "Use factored=False for this model."):
        super().__init__()
        self.probed, self.probes, self.where = probed, probes, where
        self.recognize, self.what, self.advice = recognize, what, advice
        self.inputs: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        a = self.recognize(func, args, kwargs, self.probed)
        if a is None:
            return out
        k = len(self.inputs)
        if k >= len(self.probes) or tuple(out.shape) != tuple(self.probes[k].shape):
            self._differs()
        self.inputs.append(a)
        return out + self.probes[k]

    def check_complete(self) -> None:
        """Raises unless every probe met its call."""
        if len(self.inputs) != len(self.probes):
            self._differs()

    def _differs(self):
        raise RuntimeError(
            f"{self.where}: the forward made other {self.what} calls on the parameters under vmap than in a plain "
            f"call on one example (expected {len(self.probes)} calls with output shapes "
            f"{[tuple(p.shape) for p in self.probes]}); {self.advice}")


class _Plan(NamedTuple):
    """What one plain forward on one example showed: which parameters factor, and the probed calls."""

    factorable: set    # names of the parameters used only as weights, or only as biases, of F.linear
    calls: list        # per probed F.linear call: (weight name or None, bias name or None, zero probe)


def _plan(loss: Callable, params: dict, batch, where: str) -> _Plan:
    """Runs `loss` on the first example of `batch` under `_Uses` and classifies the parameters.

    A parameter factors when every use is as the weight (or every use as the bias) of
    F.linear; a tensor object that appears under two names never factors.
    """
    counts: dict = {}
    for t in params.values():
        counts[id(t)] = counts.get(id(t), 0) + 1
    names = {id(t): name for name, t in params.items() if counts[id(t)] == 1}
    uses = _Uses(names)
    with torch.no_grad(), uses:
        per_example(loss, params, D.take(batch, slice(0, 1)), where=where)
    factorable = {name for name, roles in uses.roles.items() if roles in ({_WEIGHT}, {_BIAS})}
    calls = [(w if w in factorable else None, b if b in factorable else None, probe)
             for w, b, probe in uses.calls if w in factorable or b in factorable]
    return _Plan(factorable, calls)


def _factor_kernel(loss: Callable, rest: dict, probed: set, where: str) -> Callable:
    """Returns `(fallback, probes, batch) -> ((fallback grads, probe grads), layer inputs)`,
    one `vmap(grad)` over the examples of `batch`; `rest` (the factorable parameters) is closed over.
    """

    def example_loss(fallback, probes, example):
        with _Probing(probed, probes, where) as probing:
            value = per_example(loss, tr.merge(fallback, rest), D.batch_of_one(example), where=where)[0]
        probing.check_complete()
        return value, tuple(probing.inputs)

    return vmap(grad(example_loss, argnums=(0, 1), has_aux=True), in_dims=(None, None, 0))


def for_gram(T: int, n_in: int, out: int) -> bool:
    """Keep a weight's factors for `gram`: T²·(in + out) < in·out (their products cost less than the gradient's)."""
    return T * T * (n_in + out) < n_in * out


def for_dense_products(T: int, n_in: int, out: int) -> bool:
    """Keep a weight's factors for `dense_gram`: T·(in + out) < in·out (they hold fewer numbers than the gradient)."""
    return T * (n_in + out) < n_in * out


def _assemble(plan: _Plan, params: dict, dense: dict, probe_grads: tuple, inputs: tuple, B: int,
              keep: Callable = for_gram) -> GradFactors:
    """GradFactors of B examples from the probe gradients and layer inputs of the probed calls; a weight
    whose factors `keep(T, in, out)` refuses is formed from them, `Σ_t G_tᵀ A_t`.
    """
    pieces: dict = {}
    for (w, b, _), G, a in zip(plan.calls, probe_grads, inputs):
        G = G.reshape(B, -1, G.shape[-1])   # [B, T, out]
        if w is not None:
            pieces.setdefault(w, []).append((a.reshape(B, -1, a.shape[-1]), G))
        if b is not None:
            dense[b] = G.sum(1) + dense.get(b, 0)
    linear = {}
    for name, parts in pieces.items():
        A = torch.cat([a for a, _ in parts], dim=1)   # [B, T, in]
        G = torch.cat([g for _, g in parts], dim=1)   # [B, T, out]
        out_features, in_features = params[name].shape
        if keep(A.shape[1], in_features, out_features):
            linear[name] = (A, G)
        else:
            dense[name] = G.mT @ A
    return GradFactors(linear=linear, dense=dense)


def grad_factor_fn(loss: Callable) -> Callable:
    """Returns `(params, batch) -> GradFactors`, the per-example gradients of a batch, factored.

    Like `ti.per_example_grad_fn`, but linear-layer weights come as `(A, G)` (see `GradFactors`).
    Each call runs the loss once on the batch's first example (no gradient) to see which
    parameters are used only by `F.linear`, then one `vmap(grad)` over the batch returns their
    factors and the per-example gradients of all other parameters. Assumes each example's loss
    depends on that example only and that the forward runs the same layers for every example.

    Args:
      loss: `(params, batch) -> Tensor[B]`, one loss per example.

    Returns:
      `(params, batch) -> GradFactors` with leading axis B on every leaf.

    Raises:
      TypeError: (when called) `params` is not a `dict[str, Tensor]`.
      RuntimeError: (when called) the forward under vmap made other F.linear calls than the plain one.

    Cost:
      As `grad_factors` for one chunk.

    Examples:
      >>> factors = ti.factored.grad_factor_fn(loss)(params, train)
      >>> sorted(factors.linear), sorted(factors.dense)
      (['weight'], ['bias'])
    """
    return factor_fn(loss, call="ti.factored.grad_factors")


def factor_fn(loss: Callable, *, call: str, keep: Callable = for_gram) -> Callable:
    """`grad_factor_fn` for the public call `call` (the name its errors give); `keep(T, in, out)` says
    which factored weights stay factors (`for_gram`, `for_dense_products`), the others are formed.
    """
    where = call

    def kernel(params, batch):
        if not isinstance(params, dict):
            raise TypeError(f"{where}: `params` must be a dict[str, Tensor] (as ti.functionalize returns) to name the "
                            f"linear layers' weights; got {type(params).__name__}.")
        plan = _plan(loss, params, batch, where)
        factored, fallback = tr.partition(params, lambda name, _: name in plan.factorable)
        probes = tuple(probe for _, _, probe in plan.calls)
        probed = {id(t) for t in factored.values()}
        (dense, probe_grads), inputs = _factor_kernel(loss, factored, probed, where)(fallback, probes, batch)
        return _assemble(plan, params, dict(dense), probe_grads, inputs,
                         D._count_examples(batch, name="batch", call=where), keep)

    return kernel


def grad_factors(loss: Callable, params: dict, data: PyTree, *, chunk_size: int | None = None) -> GradFactors:
    """Returns the per-example gradients of `data` with linear-layer weights kept as factors.

    `materialize(grad_factors(loss, params, data))` equals `ti.per_example_grads(loss, params,
    data)`; `gram`, `dense_gram` and `sq_norms` use the factors directly. Computed chunk by chunk
    (one vectorized backward per chunk).

    Args:
      loss: `(params, batch) -> Tensor[B]`, one loss per example; models in eval mode, each
        example's loss depending on that example only.
      params: `dict[str, Tensor]`, e.g. from `ti.functionalize`.
      data: pytree of tensors with a common leading axis n.
      chunk_size: examples per vectorized backward (default 1024).

    Returns:
      `GradFactors` with leading axis n on every leaf, dtype and device of the parameters.

    Raises:
      TypeError: `loss` not callable, `params` not a dict of floating tensors.
      ValueError: bad data, a loss that is not per-example, or a bad `chunk_size`.
      RuntimeError: the forward under vmap made other F.linear calls than the plain one.

    Cost:
      One vectorized backward per chunk plus a forward of one example. Memory: n·T·(in + out)
      per factored weight instead of n·in·out; other parameters n·size.

    Examples:
      >>> factors = ti.factored.grad_factors(loss, params, train)
      >>> A, G = factors.linear["weight"]
      >>> A.shape, G.shape
      (torch.Size([60, 1, 8]), torch.Size([60, 1, 3]))
    """
    where = "ti.factored.grad_factors"
    checks.function(where, "loss", loss, "(params, batch) -> Tensor[B]")
    ref = checks.params(where, params)
    checks.chunk_size(where, chunk_size)
    D._count_examples(data, name="data", call=where)
    checks.floating_like(where, "data", data, ref)
    kernel = factor_fn(loss, call=where)
    return D.chunk_cat(lambda chunk: kernel(params, chunk), data, chunk_size)


def _check_factors(where: str, name: str, factors) -> None:
    if not isinstance(factors, GradFactors):
        raise TypeError(f"{where}: `{name}` must be a GradFactors (from ti.factored.grad_factors); "
                        f"got {type(factors).__name__}.")


def _materialize_one(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Σ_t G[i, t]ᵀ A[i, t] for every i: `[B, out, in]`."""
    return G.mT @ A


def _factored_gram(A1, G1, A2, G2) -> torch.Tensor:
    """Σ_{t,s} (G1[i,t]·G2[j,s]) (A1[i,t]·A2[j,s]): `[B1, B2]`, two matrix products."""
    (B1, T1), (B2, T2) = A1.shape[:2], A2.shape[:2]
    KA = A1.reshape(B1 * T1, -1) @ A2.reshape(B2 * T2, -1).T
    KG = G1.reshape(B1 * T1, -1) @ G2.reshape(B2 * T2, -1).T
    return (KA * KG).reshape(B1, T1, B2, T2).sum((1, 3))


def _flat_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) @ y.reshape(y.shape[0], -1).T


def gram(F1: GradFactors, F2: GradFactors) -> torch.Tensor:
    """Returns all inner products ⟨∇ℓ(z_i), ∇ℓ(z'_j)⟩ between two batches' gradients, `[B1, B2]`.

    Equal to `ti.tree.pairwise_vdot(materialize(F1), materialize(F2))` to round-off.

    Args:
      F1: `GradFactors` of B1 examples.
      F2: `GradFactors` of B2 examples, for the same parameters.

    Returns:
      `[B1, B2]` tensor, dtype and device of the factors.

    Raises:
      TypeError: an argument is not a `GradFactors`.
      ValueError: `F1` and `F2` do not hold the same parameters.

    Cost:
      A weight factored on both sides: B1·B2·T1·T2·(in + out) (two matrix products); a weight
      dense on either side is materialized on the other and costs B1·B2·in·out, as dense leaves do.

    Examples:
      >>> factors = ti.factored.grad_factors(loss, params, train)
      >>> G = ti.per_example_grads(loss, params, train)
      >>> torch.allclose(ti.factored.gram(factors, factors), ti.tree.pairwise_vdot(G, G))
      True
    """
    where = "ti.factored.gram"
    _check_factors(where, "F1", F1)
    _check_factors(where, "F2", F2)
    names1, names2 = F1.linear.keys() | F1.dense.keys(), F2.linear.keys() | F2.dense.keys()
    if names1 != names2:
        raise ValueError(f"{where}: `F1` and `F2` must hold the same parameters; only in F1: {sorted(names1 - names2)}, "
                         f"only in F2: {sorted(names2 - names1)}.")
    total = torch.zeros(())   # a 0-d zero adds as the int 0 does (no dtype promotion, any device), typed a Tensor
    for name in sorted(names1):
        if name in F1.linear and name in F2.linear:
            total = total + _factored_gram(*F1.linear[name], *F2.linear[name])
        else:
            x = F1.dense[name] if name in F1.dense else _materialize_one(*F1.linear[name])
            y = F2.dense[name] if name in F2.dense else _materialize_one(*F2.linear[name])
            total = total + _flat_dot(x, y)
    return total


def _contracted_first(k: int, T: int) -> bool:
    """Whether `U · (A, G)` is cheaper contracted directly, k·c·T·in·out, than through the chunk's
    gradients formed from the factors, c·T·in·out + k·c·in·out (always for T = 1 or k = 1).
    """
    return k * T < T + k


def _dense_factored(U: torch.Tensor, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """`[k, c]`: ⟨U[j], Σ_t G[i, t]ᵀ A[i, t]⟩ for U `[k, out, in]`, A `[c, T, in]`, G `[c, T, out]`."""
    k, out, n_in = U.shape
    c, T = A.shape[:2]
    if _contracted_first(k, T):
        P = (U.reshape(k * out, n_in) @ A.reshape(c * T, n_in).T).reshape(k, out, c * T)   # no [c, out, in]
        return (P * G.reshape(c * T, out).T).sum(1).reshape(k, c, T).sum(2)
    return U.reshape(k, -1) @ _materialize_one(A, G).reshape(c, -1).T


def dense_gram(V: dict, factors: GradFactors) -> torch.Tensor:
    """Returns the inner products ⟨V[j], ∇ℓ(z_i)⟩ of a dense stack with factored gradients, `[k, c]`.

    Equal to `ti.tree.pairwise_vdot(V, materialize(factors))` to round-off, without the c
    per-example gradients of a factored weight applied at one position: there
    `⟨V_W[j], g_i a_iᵀ⟩ = Σ_o (V_W[j] a_i)_o g_io`. A weight applied at T > 1 positions takes
    the cheaper of contracting V with the factors directly and forming the chunk's gradients
    from them by one batched product (`materialize`); dense leaves are flattened dot products.
    `ti.influence(factored=True)` scores each training chunk with it (V the solved test stack).

    Args:
      V: `{name: [k, *shape]}`, one entry per parameter of `factors` (e.g. `ihvp` of test
        gradients), the dtype and device of the factors.
      factors: `GradFactors` of c examples.

    Returns:
      `[k, c]` tensor, dtype and device of the factors.

    Raises:
      TypeError: `factors` is not a `GradFactors`.
      ValueError: `V` does not hold the parameters of `factors`, or a leaf is not `[k, *shape]`.

    Cost:
      A factored weight `[out, in]` at T positions: k·c·in·out + k·c·out time and k·c·out
      memory for T = 1; min(k·c·T·in·out, c·T·in·out + k·c·in·out) time otherwise (memory
      k·c·T·out or c·in·out). A dense leaf: k·c·size. Never more than the dense products.

    Examples:
      >>> factors = ti.factored.grad_factors(loss, params, train)
      >>> V = ti.tree.map(lambda p: torch.randn(2, *p.shape, dtype=p.dtype), params)
      >>> S = ti.factored.dense_gram(V, factors)
      >>> torch.allclose(S, ti.tree.pairwise_vdot(V, ti.per_example_grads(loss, params, train)))
      True
    """
    where = "ti.factored.dense_gram"
    _check_factors(where, "factors", factors)
    names = factors.linear.keys() | factors.dense.keys()
    if not isinstance(V, dict) or V.keys() != names:
        held = set(V) if isinstance(V, dict) else set()
        raise ValueError(f"{where}: `V` must hold the parameters of `factors` as a dict; only in V: "
                         f"{sorted(held - names)}, only in factors: {sorted(names - held)}.")
    k = None
    total = torch.zeros(())   # a 0-d zero adds as the int 0 does (no dtype promotion, any device), typed a Tensor
    for name in sorted(names):
        if name in factors.linear:
            A, G = factors.linear[name]
            shape = (G.shape[-1], A.shape[-1])
        else:
            shape = tuple(factors.dense[name].shape[1:])
        v = V[name]
        k = v.shape[0] if k is None and isinstance(v, torch.Tensor) and v.dim() else k
        if not isinstance(v, torch.Tensor) or v.dim() != len(shape) + 1 or tuple(v.shape[1:]) != shape \
                or v.shape[0] != k:
            got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{where}: `V[{name!r}]` must be [k, {', '.join(map(str, shape))}] "
                             f"(k = {k}, the stack's size); got {got}.")
        total = total + (_dense_factored(v, *factors.linear[name]) if name in factors.linear
                         else _flat_dot(v, factors.dense[name]))
    return total


def sq_norms(factors: GradFactors) -> torch.Tensor:
    """Returns ‖∇ℓ(z_i)‖² for every example of the batch, `[B]`.

    A factored weight contributes Σ_{t,s} (G_it·G_is)(A_it·A_is).

    Args:
      factors: `GradFactors` of B examples.

    Returns:
      `[B]` tensor, dtype and device of the factors.

    Raises:
      TypeError: `factors` is not a `GradFactors`.

    Cost:
      B·T²·(in + out) per factored weight, B·size per dense leaf.

    Examples:
      >>> factors = ti.factored.grad_factors(loss, params, train)
      >>> torch.allclose(ti.factored.sq_norms(factors), ti.factored.gram(factors, factors).diagonal())
      True
    """
    _check_factors("ti.factored.sq_norms", "factors", factors)
    total = torch.zeros(())   # a 0-d zero adds as the int 0 does (no dtype promotion, any device), typed a Tensor
    for A, G in factors.linear.values():
        total = total + ((A @ A.mT) * (G @ G.mT)).sum((1, 2))
    for leaf in factors.dense.values():
        total = total + leaf.reshape(leaf.shape[0], -1).pow(2).sum(1)
    return total


def materialize(factors: GradFactors) -> dict:
    """Returns the per-example gradients as `ti.per_example_grads` does: `{name: [B, *shape]}`.

    A factored weight becomes `Σ_t G[i, t]ᵀ A[i, t]`.

    Args:
      factors: `GradFactors` of B examples.

    Returns:
      `{name: [B, *shape]}`, dtype and device of the factors.

    Raises:
      TypeError: `factors` is not a `GradFactors`.

    Cost:
      B·T·in·out per factored weight; memory B·P (writing the result dominates).

    Examples:
      >>> G = ti.factored.materialize(ti.factored.grad_factors(loss, params, train))
      >>> torch.allclose(G["weight"], ti.per_example_grads(loss, params, train)["weight"])
      True
    """
    _check_factors("ti.factored.materialize", "factors", factors)
    return {**factors.dense, **{name: _materialize_one(A, G) for name, (A, G) in factors.linear.items()}}
