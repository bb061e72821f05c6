"""Per-example gradients of linear, conv and embedding layers kept as factors: exact Gram matrices without forming them.

For a weight W `[out, in]` used as `F.linear(a, W, b)`, the gradient of example i's loss is
a sum of outer products over the positions t at which the layer is applied (T = 1 for an
MLP, the sequence length for a layer applied token by token):

    ∇_W ℓ_i = Σ_t G_itᵀ A_it,      A_it ∈ R^in the layer's input, G_it ∈ R^out ∂ℓ_i/∂(output at t),

so ⟨∇_W ℓ_i, ∇_W ℓ_j⟩ = Σ_{t,s} (G_it·G_js)(A_it·A_js) costs T_i·T_j·(in + out) instead of
in·out, and the n × P per-example gradients are never formed; against a dense stack V (e.g.
solved test gradients), ⟨V_W, ∇_W ℓ_i⟩ = Σ_t G_itᵀ V_W A_it (`dense_gram`). A convolution
(`F.conv1d`, `F.conv2d`, groups = 1) with weight `[out, C, *kernel]` is the same linear layer
on its im2col patches (`F.unfold` with the call's stride, padding and dilation): A_it
`[C, *kernel]` the patch under output position t, G_it ∈ R^out. An embedding `[rows, dim]`
has ∇_W ℓ_i = Σ_t onehot(id_it) G_itᵀ, so its products are sums over matching ids:
Σ_{t,s} [id_it = id_js] (G_it·G_js), and Σ_t V_W[id_it]·G_it against V.

`grad_factors` captures the factors for every parameter that the forward uses only as the
weight or bias of such calls (`nn.Linear`, `nn.Conv1d`, `nn.Conv2d`, `nn.Embedding`, and any
module calling those functions), and takes `vmap(grad)` per-example gradients of every other
parameter (norms, grouped convolutions, embeddings with `max_norm` or `scale_grad_by_freq`,
tied weights); one vectorized backward gives both. `gram`, `sq_norms` and `materialize` then
equal `ti.tree.pairwise_vdot`, the squared row norms and `ti.per_example_grads` to round-off,
and `dense_gram(V, factors)` equals `ti.tree.pairwise_vdot(V, materialize(factors))`.

Capture: the loss is evaluated for each example separately (`vmap` over the batch, each
example a batch of one, exactly as `ti.per_example_grads` does) under a
`torch.overrides.TorchFunctionMode` that sees every call receiving a parameter tensor.
`torch.func.functional_call` (hence `ti.functionalize`'s `apply`) hands the very tensor
objects of `params` to the modules, so a use is recognized by identity. A zero "probe" is
added to the output of each recognised call, and the gradient with respect to the probes is
G. Because every example runs on its own, per-example gradients mean what they mean for
`ti.per_example_grads` (a model in training mode with batch statistics is evaluated per
example there too); models should be in eval mode.

Which parameters factor: those whose every use in the forward is as the weight of calls of
one kind (linear, conv or embedding), or every use as the 1-d bias of linear or conv calls;
several calls with one weight are concatenated along T, an input without an example axis is
repeated for every example. Any other use (a weight tied to an embedding, `W.t()`, a custom
op) sends the parameter to `vmap(grad)`; a call that returns only metadata, such as
`W.shape`, is not a use. A weight whose factors cost more than its gradient has its gradient
formed from the factors instead, so no layer becomes slower than with `ti.per_example_grads`:
with width = in + out per position (1 + dim for an embedding) and size = in·out (rows·dim),
for Gram matrices T²·width >= size (long sequences, large feature maps), for `dense_gram`
T·width >= size.
"""

from __future__ import annotations

import math
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
    """Per-example gradients of a batch of B examples, layer weights kept as factors.

    A pytree whose leaves all have the leading example axis B, so `ti.take`,
    `ti.data.chunk_cat` and `ti.tree.map` apply.

    Attributes:
      linear: `{name: (A, G)}` for weights used only by `F.linear` or only by `F.conv1d` /
        `F.conv2d` (groups = 1): A `[B, T, *in]` the layer's inputs (`in = (in_features,)`;
        for a convolution `(C, *kernel)`, the im2col patches at its T output positions), G
        `[B, T, out]` the gradients of each example's loss with respect to the layer's outputs,
        so that the gradient is `Σ_t G[i, t]ᵀ A[i, t]`, `[out, *in]`. Several calls with the
        same weight are concatenated along T.
      dense: `{name: [B, *shape]}`, the per-example gradient of every other parameter:
        biases (Σ_t G[i, t]), weights whose factors would cost more than the gradient itself
        (for `gram`: T²·(in + out) >= in·out), and parameters used in any other way.
      embedding: `{name: (ids, G, rows)}` for weights `[rows, dim]` used only by `F.embedding`
        (no `max_norm`, no `scale_grad_by_freq`): ids `[B, T]` int64 the looked-up rows, G
        `[B, T, dim]` the gradients with respect to the looked-up vectors (zero at `padding_idx`),
        `rows` an empty `[B, rows, 0]` tensor carrying the table's size; the gradient is
        `Σ_t onehot(ids[i, t]) G[i, t]ᵀ`.
    """

    linear: dict
    dense: dict
    embedding: dict


_WEIGHT, _BIAS, _OTHER = "weight", "bias", "other"


def _linear_args(args, kwargs) -> tuple:
    """`(input, weight, bias)` of an `F.linear(input, weight, bias=None)` call."""
    bound = dict(zip(("input", "weight", "bias"), args))
    bound.update(kwargs)
    return bound["input"], bound["weight"], bound.get("bias")


def _holds_tensor(value) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in optree.tree_leaves(value, namespace=""))


class _Call(NamedTuple):
    """A recognised layer call: kind, input (indices for an embedding), weight, bias, options."""

    kind: str           # "linear", "conv", "embedding", "addmm"
    input: object
    weight: torch.Tensor
    bias: object
    options: tuple      # conv: (stride, padding, dilation); embedding: (padding_idx,)


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_EMBEDDING_ARGS = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")


def _bound(names: tuple, args, kwargs) -> dict:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _layer_call(func, args, kwargs) -> _Call | None:
    """The call as a factorable layer, or None (grouped convolutions, max_norm embeddings, ...); shared with ti.kfac."""
    if func is F.linear:
        a, W, b = _linear_args(args, kwargs)
        if W.dim() == 2 and (b is None or b.dim() == 1):
            return _Call("linear", a, W, b, ())
    elif func in (F.conv1d, F.conv2d):
        c = _bound(_CONV_ARGS, args, kwargs)
        if c.get("groups", 1) == 1:
            return _Call("conv", c["input"], c["weight"], c.get("bias"),
                         (c.get("stride", 1), c.get("padding", 0), c.get("dilation", 1)))
    elif func is F.embedding:
        c = _bound(_EMBEDDING_ARGS, args, kwargs)
        if c.get("max_norm") is None and not c.get("scale_grad_by_freq", False):
            return _Call("embedding", c["input"], c["weight"], None, (c.get("padding_idx"),))
    elif func is torch.addmm:
        c = _bound(("input", "mat1", "mat2"), args, kwargs)
        if c.get("beta", 1) == 1 and c.get("alpha", 1) == 1 and c["mat1"].dim() == 2 and c["mat2"].dim() == 2 \
                and c["input"].dim() == 1:
            return _Call("addmm", c["mat1"], c["mat2"], c["input"], ())
    return None


def _pairs(n: int, value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _explicit_padding(padding, kernel: tuple, dilation: tuple) -> list:
    """`[(before, after)]` per spatial axis for an int, tuple, "valid" or "same" padding."""
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in _pairs(len(kernel), padding)]


def _patches(x: torch.Tensor, kernel: tuple, options: tuple) -> torch.Tensor:
    """im2col: `[N, C, *spatial]` -> `[N, positions, C·prod(kernel)]` (`F.unfold`, output locations row-major)."""
    stride, padding, dilation = options
    n = len(kernel)
    stride, dilation = _pairs(n, stride), _pairs(n, dilation)
    pads = _explicit_padding(padding, kernel, dilation)
    x = F.pad(x, [p for before_after in reversed(pads) for p in before_after])
    if n == 1:
        x, kernel, stride, dilation = x.unsqueeze(2), (1, *kernel), (1, *stride), (1, *dilation)
    return F.unfold(x, kernel, dilation=dilation, stride=stride).mT




_LINEAR, _LAYERS = ("linear",), ("linear", "conv", "embedding")


class _Uses(TorchFunctionMode):
    """Records how one forward uses each parameter tensor (recognized by identity).

    `roles[name]` collects `("weight", kind)` (the weight of a recognised call of a kind in
    `kinds`: "linear", "conv", "embedding", "addmm"), `("bias", weight name or None, kind)` (the
    bias of such a call) and "other" (any other call whose result holds a tensor; a call
    returning only metadata such as `.shape` carries no gradient and is ignored). `calls`
    lists, per recognised call touching a parameter, `(call, weight name, bias name, zeros
    shaped like its output)`. Shared by `ti.factored` and `ti.kfac`, which classify from it.
    """

    def __init__(self, names: dict, kinds: tuple):
        super().__init__()
        self.names = names   # id(tensor) -> parameter name
        self.kinds = kinds
        self.roles: dict = {}
        self.calls: list = []

    def _note(self, tensor, role):
        name = self.names.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        if name is not None:
            self.roles.setdefault(name, set()).add(role)
        return name

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        call = _layer_call(func, args, kwargs)
        if call is not None and call.kind in self.kinds:
            operands: PyTree = (call.input, call.options)
            for leaf in optree.tree_leaves(operands, namespace=""):
                self._note(leaf, _OTHER)
            w = self._note(call.weight, (_WEIGHT, call.kind))
            bias = self._note(call.bias, (_BIAS, w, call.kind))
            if w is not None or bias is not None:
                self.calls.append((call, w, bias, torch.zeros_like(out)))
        elif _holds_tensor(out):
            operands = (args, kwargs)
            for leaf in optree.tree_leaves(operands, namespace=""):
                self._note(leaf, _OTHER)
        return out


def _record_uses(run: Callable, params: dict, kinds: tuple) -> tuple[_Uses, dict]:
    """`(uses, counts)`: `run()` (one plain forward, without gradients) under `_Uses`, and how many
    names each parameter tensor has (`counts[id(tensor)]`); a tensor under two names is not
    tracked (it never factors).
    """
    counts: dict = {}
    for t in params.values():
        counts[id(t)] = counts.get(id(t), 0) + 1
    uses = _Uses({id(t): name for name, t in params.items() if counts[id(t)] == 1}, kinds)
    with torch.no_grad(), uses:
        run()
    return uses, counts


def _recognizer(kinds: tuple) -> Callable:
    """`(func, args, kwargs, probed) -> input or None`: the input of a recognised call of a kind in
    `kinds` whose weight or bias is in `probed` (ids).
    """

    def recognize(func, args, kwargs, probed: set):
        call = _layer_call(func, args, kwargs)
        if call is None or call.kind not in kinds:
            return None
        return call.input if id(call.weight) in probed or (call.bias is not None and id(call.bias) in probed) else None

    return recognize


_linear_input = _recognizer(_LINEAR)


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

    factorable: set    # names of the parameters used only as weights of one kind, or only as biases
    calls: list        # per probed call: (weight name or None, bias name or None, zero probe)
    layers: list       # per probed call: (kind, options, weight shape)


def _plan(loss: Callable, params: dict, batch, where: str, kinds: tuple = _LINEAR) -> _Plan:
    """Runs `loss` on the first example of `batch` under `_Uses` and classifies the parameters.

    A parameter factors when every use is as the weight of recognised calls of one kind in
    `kinds` (or every use as the bias of linear or conv calls); a tensor object that appears
    under two names never factors.
    """
    uses, _ = _record_uses(lambda: per_example(loss, params, D.take(batch, slice(0, 1)), where=where), params, kinds)
    factorable = {name for name, roles in uses.roles.items()
                  if (len(roles) == 1 and next(iter(roles))[0] == _WEIGHT)
                  or all(isinstance(r, tuple) and r[0] == _BIAS for r in roles)}
    kept = [(w in factorable or b in factorable) for _, w, b, _ in uses.calls]
    calls = [(w if w in factorable else None, b if b in factorable else None, probe)
             for (_, w, b, probe), k in zip(uses.calls, kept) if k]
    layers = [(call.kind, call.options, tuple(call.weight.shape)) for (call, *_), k in zip(uses.calls, kept) if k]
    return _Plan(factorable, calls, layers)


def _factor_kernel(loss: Callable, rest: dict, probed: set, where: str, kinds: tuple = _LAYERS) -> Callable:
    """Returns `(fallback, probes, batch) -> ((fallback grads, probe grads), layer inputs)`,
    one `vmap(grad)` over the examples of `batch`; `rest` (the factorable parameters) is closed over.
    """
    recognize = _recognizer(kinds)

    def example_loss(fallback, probes, example):
        with _Probing(probed, probes, where, recognize=recognize, what="F.linear, conv or embedding") as probing:
            value = per_example(loss, tr.merge(fallback, rest), D.batch_of_one(example), where=where)[0]
        probing.check_complete()
        return value, tuple(probing.inputs)

    return vmap(grad(example_loss, argnums=(0, 1), has_aux=True), in_dims=(None, None, 0))


def for_gram(T: int, width: int, size: int) -> bool:
    """Keep a weight's factors for `gram`: T²·width < size, their products cost less than the gradient's.

    `width` is what one position's factors cost in a product (in + out for a linear or conv
    weight `[out, in]` on patches of `in` numbers; 1 + dim for an embedding row, one index
    comparison and a dim-long dot product), `size` the gradient's (in·out; rows·dim).
    """
    return T * T * width < size


def for_dense_products(T: int, width: int, size: int) -> bool:
    """Keep a weight's factors for `dense_gram`: T·width < size, they hold fewer numbers than the gradient
    (`width` and `size` as for `for_gram`).
    """
    return T * width < size


def _layer_factors(kind: str, options: tuple, shape: tuple, a: torch.Tensor, G: torch.Tensor, B: int) -> tuple:
    """`(A or ids, G)` of one call for B examples from its recorded input `a` and probe gradient `G`.

    linear: A `[B, T, in]`, G `[B, T, out]`. conv (weight `[out, C, *kernel]`): A the im2col
    patches `[B, T, C, *kernel]`, T the output positions, G `[B, T, out]`. embedding (weight
    `[rows, dim]`): ids `[B, T]` int64, G `[B, T, dim]`, zero where the id is `padding_idx`.
    """
    if kind == "linear":
        return a.reshape(B, -1, a.shape[-1]), G.reshape(B, -1, G.shape[-1])
    if kind == "embedding":
        ids = a.reshape(B, -1).long()
        G = G.reshape(B, -1, shape[1])
        padding_idx = options[0]
        return ids, G if padding_idx is None else G * (ids != padding_idx % shape[0]).unsqueeze(-1).to(G.dtype)
    kernel = tuple(shape[2:])
    patches = _patches(a.reshape(-1, shape[1], *a.shape[-len(kernel):]), kernel, options)   # [B·N, L, C·K]
    G = G.reshape(B, -1, shape[0], patches.shape[1]).transpose(-1, -2)                    # [B, N, L, out]
    return patches.reshape(B, -1, shape[1], *kernel), G.reshape(B, -1, shape[0])


def _assemble(plan: _Plan, params: dict, dense: dict, probe_grads: tuple, inputs: tuple, B: int,
              keep: Callable = for_gram) -> GradFactors:
    """GradFactors of B examples from the probe gradients and layer inputs of the probed calls; a weight
    whose factors `keep(T, width, size)` refuses is formed from them (`materialize`).
    """
    pieces: dict = {}
    kinds: dict = {}
    for (w, b, _), (kind, options, shape), G, a in zip(plan.calls, plan.layers, probe_grads, inputs):
        A, G = _layer_factors(kind, options, shape, a, G, B)
        if w is not None:
            pieces.setdefault(w, []).append((A, G))
            kinds[w] = kind
        if b is not None:
            dense[b] = G.sum(1) + dense.get(b, 0)
    linear, embedding = {}, {}
    for name, parts in pieces.items():
        A = torch.cat([a for a, _ in parts], dim=1)   # [B, T, *in] (ids [B, T] for an embedding)
        G = torch.cat([g for _, g in parts], dim=1)   # [B, T, out]
        if kinds[name] == "embedding":
            rows = params[name].shape[0]
            factors = (A, G, G.new_empty(B, rows, 0))
            if keep(A.shape[1], 1 + G.shape[-1], rows * G.shape[-1]):
                embedding[name] = factors
            else:
                dense[name] = _materialize_rows(*factors)
        else:
            n_in = math.prod(A.shape[2:])
            if keep(A.shape[1], n_in + G.shape[-1], n_in * G.shape[-1]):
                linear[name] = (A, G)
            else:
                dense[name] = _materialize_one(A, G)
    return GradFactors(linear=linear, dense=dense, embedding=embedding)


def grad_factor_fn(loss: Callable) -> Callable:
    """Returns `(params, batch) -> GradFactors`, the per-example gradients of a batch, factored.

    Like `ti.per_example_grad_fn`, but linear and conv weights come as `(A, G)`, embedding
    weights as `(ids, G, rows)` (see `GradFactors`). Each call runs the loss once on the batch's
    first example (no gradient) to see which parameters are used only by such layer calls,
    then one `vmap(grad)` over the batch returns their
    factors and the per-example gradients of all other parameters. Assumes each example's loss
    depends on that example only and that the forward runs the same layers for every example.

    Args:
      loss: `(params, batch) -> Tensor[B]`, one loss per example.

    Returns:
      `(params, batch) -> GradFactors` with leading axis B on every leaf.

    Raises:
      TypeError: (when called) `params` is not a `dict[str, Tensor]`.
      RuntimeError: (when called) the forward under vmap made other layer calls than the plain one.

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
        plan = _plan(loss, params, batch, where, _LAYERS)
        factored, fallback = tr.partition(params, lambda name, _: name in plan.factorable)
        probes = tuple(probe for _, _, probe in plan.calls)
        probed = {id(t) for t in factored.values()}
        (dense, probe_grads), inputs = _factor_kernel(loss, factored, probed, where)(fallback, probes, batch)
        return _assemble(plan, params, dict(dense), probe_grads, inputs,
                         D._count_examples(batch, name="batch", call=where), keep)

    return kernel


def grad_factors(loss: Callable, params: dict, data: PyTree, *, chunk_size: int | None = None) -> GradFactors:
    """Returns the per-example gradients of `data` with linear, conv and embedding weights kept as factors.

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
      RuntimeError: the forward under vmap made other layer calls than the plain one.

    Cost:
      One vectorized backward per chunk plus a forward of one example (and, per conv call, an
      im2col of its input). Memory: n·T·(in + out) per factored linear or conv weight (in =
      C·prod(kernel)) instead of n·in·out, n·T·(1 + dim) per embedding instead of n·rows·dim;
      other parameters n·size.

    Examples:
      >>> factors = ti.factored.grad_factors(loss, params, train)
      >>> A, G = factors.linear["weight"]
      >>> A.shape, G.shape
      (torch.Size([60, 1, 8]), torch.Size([60, 1, 3]))
      >>> conv_apply, conv_params = ti.functionalize(torch.nn.Conv2d(2, 4, 3, stride=2))
      >>> conv_loss = lambda p, b: F.cross_entropy(conv_apply(p, b[0]).flatten(1), b[1], reduction="none")
      >>> batch = (torch.randn(6, 2, 3, 3), torch.randint(0, 4, (6,)))
      >>> A, G = ti.factored.grad_factors(conv_loss, conv_params, batch).linear["weight"]   # 1 output position
      >>> A.shape, G.shape
      (torch.Size([6, 1, 2, 3, 3]), torch.Size([6, 1, 4]))
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
    """Σ_t G[i, t]ᵀ A[i, t] for every i: `[B, out, *in]`."""
    return (G.mT @ A.flatten(2)).reshape(G.shape[0], G.shape[-1], *A.shape[2:])


def _materialize_rows(ids: torch.Tensor, G: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Σ_t onehot(ids[i, t]) G[i, t]ᵀ for every i: `[B, rows, dim]` (a scatter-add of the rows)."""
    out = G.new_zeros(G.shape[0], rows.shape[1], G.shape[-1])
    return out.scatter_add(1, ids.unsqueeze(-1).expand_as(G), G)


def _position_gram(KA: torch.Tensor, G1: torch.Tensor, G2: torch.Tensor) -> torch.Tensor:
    """Σ_{t,s} KA[(i,t),(j,s)] (G1[i,t]·G2[j,s]): `[B1, B2]` from the input-side products `[B1·T1, B2·T2]`."""
    (B1, T1), (B2, T2) = G1.shape[:2], G2.shape[:2]
    KG = G1.reshape(B1 * T1, -1) @ G2.reshape(B2 * T2, -1).T
    return (KA * KG).reshape(B1, T1, B2, T2).sum((1, 3))


def _factored_gram(A1, G1, A2, G2) -> torch.Tensor:
    """Σ_{t,s} (G1[i,t]·G2[j,s]) (A1[i,t]·A2[j,s]): `[B1, B2]`, two matrix products."""
    return _position_gram(A1.reshape(G1.shape[0] * G1.shape[1], -1) @ A2.reshape(G2.shape[0] * G2.shape[1], -1).T,
                          G1, G2)


def _rows_gram(ids1, G1, _rows1, ids2, G2, _rows2) -> torch.Tensor:
    """Σ_{t,s} [ids1[i,t] = ids2[j,s]] (G1[i,t]·G2[j,s]): `[B1, B2]`, one comparison and one matrix product."""
    return _position_gram((ids1.reshape(-1, 1) == ids2.reshape(1, -1)).to(G1.dtype), G1, G2)


def _formed(factors: GradFactors, name: str) -> torch.Tensor:
    """The per-example gradients `[B, *shape]` of one parameter, formed from its factors if need be."""
    if name in factors.dense:
        return factors.dense[name]
    if name in factors.embedding:
        return _materialize_rows(*factors.embedding[name])
    return _materialize_one(*factors.linear[name])


def _names(factors: GradFactors) -> set:
    return factors.linear.keys() | factors.dense.keys() | factors.embedding.keys()


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
      A linear or conv weight factored on both sides: B1·B2·T1·T2·(in + out) (two matrix
      products); an embedding `[rows, dim]`: B1·B2·T1·T2·(1 + dim) (the index matches and one
      product); a weight dense on either side is materialized on the other and costs
      B1·B2·size, as dense leaves do.

    Examples:
      >>> factors = ti.factored.grad_factors(loss, params, train)
      >>> G = ti.per_example_grads(loss, params, train)
      >>> torch.allclose(ti.factored.gram(factors, factors), ti.tree.pairwise_vdot(G, G))
      True
    """
    where = "ti.factored.gram"
    _check_factors(where, "F1", F1)
    _check_factors(where, "F2", F2)
    names1, names2 = _names(F1), _names(F2)
    if names1 != names2:
        raise ValueError(f"{where}: `F1` and `F2` must hold the same parameters; only in F1: {sorted(names1 - names2)}, "
                         f"only in F2: {sorted(names2 - names1)}.")
    total = torch.zeros(())   # a 0-d zero adds as the int 0 does (no dtype promotion, any device), typed a Tensor
    for name in sorted(names1):
        if name in F1.linear and name in F2.linear:
            total = total + _factored_gram(*F1.linear[name], *F2.linear[name])
        elif name in F1.embedding and name in F2.embedding:
            total = total + _rows_gram(*F1.embedding[name], *F2.embedding[name])
        else:
            total = total + _flat_dot(_formed(F1, name), _formed(F2, name))
    return total


def _contracted_first(k: int, T: int) -> bool:
    """Whether `U · (A, G)` is cheaper contracted directly, k·c·T·in·out, than through the chunk's
    gradients formed from the factors, c·T·in·out + k·c·in·out (always for T = 1 or k = 1).
    """
    return k * T < T + k


def _dense_factored(U: torch.Tensor, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """`[k, c]`: ⟨U[j], Σ_t G[i, t]ᵀ A[i, t]⟩ for U `[k, out, *in]`, A `[c, T, *in]`, G `[c, T, out]`."""
    k, out = U.shape[:2]
    c, T = A.shape[:2]
    if _contracted_first(k, T):
        n_in = math.prod(A.shape[2:])
        P = (U.reshape(k * out, n_in) @ A.reshape(c * T, n_in).T).reshape(k, out, c * T)   # no [c, out, in]
        return (P * G.reshape(c * T, out).T).sum(1).reshape(k, c, T).sum(2)
    return U.reshape(k, -1) @ _materialize_one(A, G).reshape(c, -1).T


def _dense_rows(U: torch.Tensor, ids: torch.Tensor, G: torch.Tensor, _rows: torch.Tensor) -> torch.Tensor:
    """`[k, c]`: ⟨U[j], Σ_t onehot(ids[i, t]) G[i, t]ᵀ⟩ = Σ_t U[j, ids[i, t]]·G[i, t] for U `[k, rows, dim]`."""
    c, T, dim = G.shape
    picked = U.index_select(1, ids.reshape(-1))                        # [k, c·T, dim]
    return (picked * G.reshape(1, c * T, dim)).sum(-1).reshape(-1, c, T).sum(2)


def dense_gram(V: dict, factors: GradFactors) -> torch.Tensor:
    """Returns the inner products ⟨V[j], ∇ℓ(z_i)⟩ of a dense stack with factored gradients, `[k, c]`.

    Equal to `ti.tree.pairwise_vdot(V, materialize(factors))` to round-off, without the c
    per-example gradients of a factored weight applied at one position: there
    `⟨V_W[j], g_i a_iᵀ⟩ = Σ_o (V_W[j] a_i)_o g_io`. A weight applied at T > 1 positions takes
    the cheaper of contracting V with the factors directly and forming the chunk's gradients
    from them by one batched product (`materialize`); an embedding picks the looked-up rows of V,
    `Σ_t V_W[j, ids_it]·g_it`; dense leaves are flattened dot products.
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
      A factored linear or conv weight `[out, in]` (in = C·prod(kernel) for a convolution) at
      T positions: k·c·in·out + k·c·out time and k·c·out memory for T = 1; min(k·c·T·in·out,
      c·T·in·out + k·c·in·out) time otherwise (memory k·c·T·out or c·in·out). An embedding
      `[rows, dim]`: k·c·T·dim time and memory. A dense leaf: k·c·size. Never more than the
      dense products.

    Examples:
      >>> factors = ti.factored.grad_factors(loss, params, train)
      >>> V = ti.tree.map(lambda p: torch.randn(2, *p.shape, dtype=p.dtype), params)
      >>> S = ti.factored.dense_gram(V, factors)
      >>> torch.allclose(S, ti.tree.pairwise_vdot(V, ti.per_example_grads(loss, params, train)))
      True
    """
    where = "ti.factored.dense_gram"
    _check_factors(where, "factors", factors)
    names = _names(factors)
    if not isinstance(V, dict) or V.keys() != names:
        held = set(V) if isinstance(V, dict) else set()
        raise ValueError(f"{where}: `V` must hold the parameters of `factors` as a dict; only in V: "
                         f"{sorted(held - names)}, only in factors: {sorted(names - held)}.")
    k = None
    total = torch.zeros(())   # a 0-d zero adds as the int 0 does (no dtype promotion, any device), typed a Tensor
    for name in sorted(names):
        if name in factors.linear:
            A, G = factors.linear[name]
            shape = (G.shape[-1], *A.shape[2:])
        elif name in factors.embedding:
            _, G, rows = factors.embedding[name]
            shape = (rows.shape[1], G.shape[-1])
        else:
            shape = tuple(factors.dense[name].shape[1:])
        v = V[name]
        k = v.shape[0] if k is None and isinstance(v, torch.Tensor) and v.dim() else k
        if not isinstance(v, torch.Tensor) or v.dim() != len(shape) + 1 or tuple(v.shape[1:]) != shape \
                or v.shape[0] != k:
            got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{where}: `V[{name!r}]` must be [k, {', '.join(map(str, shape))}] "
                             f"(k = {k}, the stack's size); got {got}.")
        total = total + (_dense_factored(v, *factors.linear[name]) if name in factors.linear else
                         _dense_rows(v, *factors.embedding[name]) if name in factors.embedding else
                         _flat_dot(v, factors.dense[name]))
    return total


def sq_norms(factors: GradFactors) -> torch.Tensor:
    """Returns ‖∇ℓ(z_i)‖² for every example of the batch, `[B]`.

    A factored linear or conv weight contributes Σ_{t,s} (G_it·G_is)(A_it·A_is), an embedding
    Σ_{t,s} [ids_it = ids_is] (G_it·G_is).

    Args:
      factors: `GradFactors` of B examples.

    Returns:
      `[B]` tensor, dtype and device of the factors.

    Raises:
      TypeError: `factors` is not a `GradFactors`.

    Cost:
      B·T²·(in + out) per factored linear or conv weight, B·T²·(1 + dim) per embedding,
      B·size per dense leaf.

    Examples:
      >>> factors = ti.factored.grad_factors(loss, params, train)
      >>> torch.allclose(ti.factored.sq_norms(factors), ti.factored.gram(factors, factors).diagonal())
      True
    """
    _check_factors("ti.factored.sq_norms", "factors", factors)
    total = torch.zeros(())   # a 0-d zero adds as the int 0 does (no dtype promotion, any device), typed a Tensor
    for A, G in factors.linear.values():
        A = A.flatten(2)
        total = total + ((A @ A.mT) * (G @ G.mT)).sum((1, 2))
    for ids, G, _ in factors.embedding.values():
        total = total + ((ids.unsqueeze(2) == ids.unsqueeze(1)).to(G.dtype) * (G @ G.mT)).sum((1, 2))
    for leaf in factors.dense.values():
        total = total + leaf.reshape(leaf.shape[0], -1).pow(2).sum(1)
    return total


def materialize(factors: GradFactors) -> dict:
    """Returns the per-example gradients as `ti.per_example_grads` does: `{name: [B, *shape]}`.

    A factored linear or conv weight becomes `Σ_t G[i, t]ᵀ A[i, t]` (reshaped to the weight's
    shape), an embedding the scatter-add of `G[i, t]` into the rows `ids[i, t]`.

    Args:
      factors: `GradFactors` of B examples.

    Returns:
      `{name: [B, *shape]}`, dtype and device of the factors.

    Raises:
      TypeError: `factors` is not a `GradFactors`.

    Cost:
      B·T·in·out per factored linear or conv weight, B·(rows + T)·dim per embedding; memory
      B·P (writing the result dominates).

    Examples:
      >>> G = ti.factored.materialize(ti.factored.grad_factors(loss, params, train))
      >>> torch.allclose(G["weight"], ti.per_example_grads(loss, params, train)["weight"])
      True
      >>> emb_apply, emb_params = ti.functionalize(torch.nn.Embedding(10, 4, padding_idx=0))
      >>> emb_loss = lambda p, ids: emb_apply(p, ids).pow(2).sum((1, 2))
      >>> ids = torch.tensor([[0, 3], [3, 3], [5, 9]])
      >>> factors = ti.factored.grad_factors(emb_loss, emb_params, ids)
      >>> sorted(factors.embedding)
      ['weight']
      >>> torch.allclose(ti.factored.materialize(factors)["weight"], ti.per_example_grads(emb_loss, emb_params, ids)["weight"])
      True
    """
    _check_factors("ti.factored.materialize", "factors", factors)
    return {name: _formed(factors, name) for name in _names(factors)}
