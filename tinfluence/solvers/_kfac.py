"""K-FAC and EK-FAC: Kronecker-factored curvature, fitted once, as a value.

For a layer whose weight gradient is a sum of outer products over the positions t at which
the layer is applied (T = 1 for an MLP layer, the output locations of a convolution, the
tokens of an embedding), written in the weight's own coordinates as

    ∇_W ℓ_n = Σ_t l_nt r_ntᵀ,   W viewed as a matrix [d0, d1] (d0 = W.shape[0], d1 = the rest),

the Fisher block (1/N) Σ_n vec(∇_W ℓ_n) vec(∇_W ℓ_n)ᵀ is approximated (Martens & Grosse
2015; for positions, Grosse & Martens 2016: independent positions, homogeneous statistics) by

    F̂_W = L ⊗ R,   L = Σ_{n,t} l lᵀ, R = Σ_{n,t} r rᵀ, scaled by 1 / (N · positions)

(vec row-major, as `ti.tree.ravel` flattens W). For `nn.Linear` l = g (the gradient of the
example's loss with respect to the layer's output) and r = ã = [a, 1] (its input with a bias
column): L/N·T = S = E_n[(1/T) Σ_t g gᵀ] and R/N = A = E_n[Σ_t ã ãᵀ]. A convolution's r are
its im2col patches (`F.unfold`), an embedding's l are one-hot token vectors (L diagonal: the
token counts), GPT-2's `Conv1D` (`torch.addmm(b, x, W)`, W `[in, out]`) has l = ã, r = g.
Several uses of one weight (tied weights) add their positions to the same sums.

K-FAC inverts F̂_W + λI exactly in the eigenbasis Q_L ⊗ Q_R of the factors, with
eigenvalues s_i a_j. EK-FAC (George et al. 2018) keeps that basis and replaces the
eigenvalues by the second moments of the per-example gradients in it,
Λ_ij = (1/N) Σ_n [(Q_Lᵀ ∇_W ℓ_n Q_R)_ij]², from a second pass over the data.

Everything else (norm scales, biases outside recognised layers, grouped convolutions,
weights used in any other way) gets a diagonal block: the diagonal of the same Fisher from
per-example gradients (`fallback="diagonal"`), or zero curvature, i.e. (λI)⁻¹
(`fallback="identity"`). `Curvature.summary()` lists which parameter got which treatment.

Capture: as in `ti.factored`, the model runs example by example (`vmap`, each a batch of
one) under a `torch.overrides.TorchFunctionMode` that recognises the layer calls by the
identity of their weight tensor (`functional_call` hands over the very tensors of `params`),
adds a zero probe to each such call's output and records its input; one `vjp` per example,
vmapped over the pseudo-gradients of the chosen Fisher, gives the output gradients g and the
fallback parameters' per-example gradients together.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import optree
import torch
import torch.nn.functional as F
from torch.func import vjp, vmap

from ..core import checks
from ..core import collectives as dd
from ..core import data as D
from ..core import tree as tr
from ..core.factored import _Call, _layer_call, _patches, _Probing, _record_uses
from ..core.objective import per_example
from ..core.operator import LinearOperator
from ..core.transforms import hessian_fn
from ..core.tree import PyTree
from ._result import InverseOperator, Solution, SolveInfo, Status

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["Curvature", "DiagonalBlock", "KroneckerBlock", "ekfac", "kfac"]

FISHERS = ("empirical", "true", "ggn")
RELATIVE_DEFAULT = 0.1   # kronfluence's heuristic: damping = 0.1 × mean eigenvalue


# ---------------------------------------------------------------- the fitted value

@dataclasses.dataclass(frozen=True, eq=False)
class KroneckerBlock:
    """One weight (and the bias folded into it) with Kronecker-factored curvature.

    The weight is viewed as a matrix `[d0, d1]` (d0 = `shape[0]`, d1 = the rest flattened);
    a folded bias adds a column (`bias_side="right"`, nn.Linear, convolutions: `[W | b]`) or
    a row (`"left"`, GPT-2 Conv1D: `[W; bᵀ]`), so the block's frame is `[d0', d1']`.

    Attributes:
      weight, bias: parameter names (`bias` None when none is folded in).
      kind: the layer calls that use the weight, e.g. "linear", "conv2d", "embedding+linear" (tied).
      bias_side: "left", "right" or None.
      activation_side: which factor holds the layer inputs ("right": A = `right`, S = `left`).
      left, right: the factors `[d0', d0']` and `[d1', d1']` (`left` a vector `[d0]`, the
        diagonal, for embeddings), normalized so that `F̂ = left ⊗ right` (see the module docstring).
      left_basis, right_basis: their eigenvectors (float64 eigendecomposition; `left_basis`
        None when `left` is diagonal: the identity).
      eigenvalues: `[d0', d1']`, F̂'s eigenvalues in that basis: K-FAC `outer(eig(left), eig(right))`,
        EK-FAC the corrected second moments.
      damping: λ of this block.
    """

    weight: str
    bias: str | None
    kind: str
    bias_side: str | None
    activation_side: str
    left: torch.Tensor
    right: torch.Tensor
    left_basis: torch.Tensor | None
    right_basis: torch.Tensor
    eigenvalues: torch.Tensor
    damping: float

    @property
    def A(self) -> torch.Tensor:
        """The activation-side factor (inputs, with the bias column)."""
        return self.right if self.activation_side == "right" else self.left

    @property
    def S(self) -> torch.Tensor:
        """The gradient-side factor (output gradients)."""
        return self.left if self.activation_side == "right" else self.right


@dataclasses.dataclass(frozen=True, eq=False)
class DiagonalBlock:
    """A parameter outside any recognised layer: diagonal curvature.

    Attributes:
      name: the parameter.
      diagonal: shaped like the parameter: (1/N) Σ_n Σ_c (∂ℓ_nc/∂θ)² over the Fisher's
        pseudo-gradients ("diagonal"), or zeros ("identity": (F̂ + λI)⁻¹ = I/λ).
      treatment: "diagonal" or "identity".
      reason: why the parameter is not Kronecker-factored.
      damping: λ of this block.
    """

    name: str
    diagonal: torch.Tensor
    treatment: str
    reason: str
    damping: float


@dataclasses.dataclass(frozen=True, eq=False)
class Curvature:
    """A fitted block-diagonal curvature F̂ (K-FAC or EK-FAC blocks plus diagonal blocks).

    A value: it holds factors, eigenbases and eigenvalues (memory O(Σ d0² + d1² + P)) and
    composes with the solvers and estimators:

    - `ihvp` (a `ti.InverseOperator`): `ihvp(v)` = (F̂ + λI)⁻¹ v, exact in each block's
      eigenbasis, for `ti.influence(..., ihvp=curv.ihvp)` and `ti.self_influence`;
      `ihvp.solve(v)` returns it with its `SolveInfo` (status converged, 0 iterations, the
      true relative residual of the damped system). Calling the value itself gives `ihvp(v)`.
    - `operator` (a `ti.LinearOperator`, positive semi-definite): v ↦ F̂ v (no damping),
      e.g. for `ti.to_dense` or as a cheap operator for `ti.cg`.
    - `preconditioner` (a `ti.LinearOperator` of kind "preconditioner"): V ↦ (F̂ + λI)⁻¹ V,
      for `ti.cg(op, damping=λ, preconditioner=curv.preconditioner)`.

    All take one vector shaped like the parameters or a stack (leaves `[k, *shape]`) and
    cost O(k · Σ_blocks d0'·d1'·(d0' + d1')). λ is per block (see `damping_mode` of `ti.kfac`).

    Examples:
      >>> curv = ti.kfac(loss, params, train, predict=predict, output_loss=output_loss, damping=1e-2)
      >>> V = ti.per_example_grads(loss, params, test)
      >>> torch.allclose(curv.ihvp(V)["weight"], curv.preconditioner(V)["weight"])
      True
    """

    method: str
    fisher: str
    n: int
    damping: float
    damping_mode: str
    kronecker: tuple
    diagonal: tuple
    params: dict = dataclasses.field(repr=False)

    @property
    def ihvp(self) -> InverseOperator:
        """(F̂ + λI)⁻¹ as a `ti.InverseOperator` (callable, with `.solve(v) -> Solution`)."""
        return InverseOperator(functools.partial(_solve, self), on_failure="raise",
                               apply=functools.partial(_apply, self, mode="inverse"), solver=f"ti.{self.method}")

    @property
    def operator(self) -> LinearOperator:
        """V ↦ F̂ v, without damping."""
        fn = functools.partial(_apply, self, mode="forward")
        return LinearOperator(fn, self.params, many=fn, psd=True, kind="custom")

    @property
    def preconditioner(self) -> LinearOperator:
        """V ↦ (F̂ + λI)⁻¹ V, for `ti.cg(..., preconditioner=)`."""
        fn = functools.partial(_apply, self, mode="inverse")
        return LinearOperator(fn, self.params, many=fn, psd=True, kind="preconditioner")

    def __call__(self, v: PyTree) -> PyTree:
        return _apply(self, v, mode="inverse")

    def summary(self) -> str:
        """One line per block: parameter(s), shape, treatment, factor sizes, damping."""
        where = "ti.ekfac" if self.method == "ekfac" else "ti.kfac"
        head = (f"{where}: {self.fisher} Fisher of the mean loss over {self.n} examples, damping {self.damping:g} "
                f"({self.damping_mode})")
        lines = [head]
        for b in self.kronecker:
            names = b.weight + (f" + {b.bias}" if b.bias else "")
            shape = list(self.params[b.weight].shape)
            left = f"diagonal {b.left.shape[0]}" if b.left_basis is None else "×".join(map(str, b.left.shape))
            factors = f"left {left}, right {'×'.join(map(str, b.right.shape))}"
            values = "corrected eigenvalues" if self.method == "ekfac" else "Kronecker eigenvalues"
            lines.append(f"  {names} {shape}: Kronecker ({b.kind}); {factors}; {values}; λ={b.damping:.3g}")
        for b in self.diagonal:
            what = "diagonal Fisher" if b.treatment == "diagonal" else "identity (zero curvature)"
            lines.append(f"  {b.name} {list(b.diagonal.shape)}: {what} ({b.reason}); λ={b.damping:.3g}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def _to_frame(block: KroneckerBlock, V: dict, shape) -> torch.Tensor:
    """`[k, d0', d1']`: the block's weight (and folded bias) of a stack V."""
    W = V[block.weight]
    W = W.reshape(W.shape[0], shape[0], -1)
    if block.bias_side == "right":
        return torch.cat([W, V[block.bias][:, :, None]], 2)
    if block.bias_side == "left":
        return torch.cat([W, V[block.bias][:, None, :]], 1)
    return W


def _from_frame(block: KroneckerBlock, X: torch.Tensor, shape) -> dict:
    """The inverse of `_to_frame`: `{weight: [k, *shape], bias: [k, ...]}`."""
    out = {}
    if block.bias_side == "right":
        X, out[block.bias] = X[:, :, :-1], X[:, :, -1]
    elif block.bias_side == "left":
        X, out[block.bias] = X[:, :-1], X[:, -1]
    out[block.weight] = X.reshape(X.shape[0], *shape)
    return out


def _scaled(values: torch.Tensor, damping: float, mode: str) -> torch.Tensor:
    """The factor each eigen-coordinate is multiplied by: 1/(Λ + λ), Λ, or Λ + λ."""
    return {"inverse": 1.0 / (values + damping), "forward": values, "damped": values + damping}[mode]


def _block_apply(block: KroneckerBlock, X: torch.Tensor, mode: str) -> torch.Tensor:
    """Q f(Λ) Qᵀ X on frames `[k, d0', d1']`, Q = Q_L ⊗ Q_R, f as `_scaled`."""
    QL, QR = block.left_basis, block.right_basis
    Y = X @ QR if QL is None else QL.mT @ X @ QR
    Y = Y * _scaled(block.eigenvalues, block.damping, mode)
    return Y @ QR.mT if QL is None else QL @ Y @ QR.mT


def _apply(curv: Curvature, v, *, mode: str):
    """(F̂ + λI)⁻¹ v ("inverse"), F̂ v ("forward") or (F̂ + λI) v ("damped"), for one vector or a stack."""
    stacked = LinearOperator(lambda u: u, curv.params)._is_stack(v, f"ti.{curv.method}")
    V = v if stacked else tr.map(lambda leaf: leaf.unsqueeze(0), v)
    out = {}
    for block in curv.kronecker:
        shape = curv.params[block.weight].shape
        out.update(_from_frame(block, _block_apply(block, _to_frame(block, V, shape), mode), shape))
    for block in curv.diagonal:
        out[block.name] = V[block.name] * _scaled(block.diagonal, block.damping, mode)
    out = {name: out[name] for name in curv.params}
    return out if stacked else tr.map(lambda leaf: leaf[0], out)


def _solve(curv: Curvature, v) -> Solution:
    """`Solution(x, info)`: the exact block inverse and the true relative residual of the damped system."""
    stacked = LinearOperator(lambda u: u, curv.params)._is_stack(v, f"ti.{curv.method}")
    V = v if stacked else tr.map(lambda leaf: leaf.unsqueeze(0), v)
    X = _apply(curv, V, mode="inverse")
    residual = tr.map(torch.sub, _apply(curv, X, mode="damped"), V)
    norms = torch.stack([leaf.reshape(leaf.shape[0], -1).pow(2).sum(1) for leaf in optree.tree_leaves(V, namespace="")])
    res = torch.stack([leaf.reshape(leaf.shape[0], -1).pow(2).sum(1) for leaf in optree.tree_leaves(residual, namespace="")])
    relative = (res.sum(0) / norms.sum(0).clamp_min(torch.finfo(norms.dtype).tiny)).sqrt()
    k = relative.shape[0]
    info = SolveInfo(torch.full((k,), int(Status.CONVERGED), dtype=torch.long, device=relative.device),
                     torch.zeros(k, dtype=torch.long, device=relative.device), relative,
                     torch.full_like(relative, float("nan")), solver=f"ti.{curv.method}", tol=0.0,
                     context={"damping": curv.damping})
    return Solution(X if stacked else tr.map(lambda leaf: leaf[0], X), info if stacked else info.single())


# ---------------------------------------------------------------- recognising layer calls

_ACTIVATION_SIDE = {"linear": "right", "conv": "right", "embedding": "left", "addmm": "left"}


def _kind_name(call: _Call) -> str:
    if call.kind == "conv":
        return f"conv{call.weight.dim() - 2}d"
    return "conv1d (GPT-2, addmm)" if call.kind == "addmm" else call.kind


def _layer_input(func, args, kwargs, probed: set):
    """The input of a recognised layer call whose weight is in `probed` (ids), else None."""
    call = _layer_call(func, args, kwargs)
    return call.input if call is not None and id(call.weight) in probed else None




class _Plan(NamedTuple):
    """Which parameters are Kronecker-factored, the biases folded into them, and the probed calls."""

    kronecker: dict    # weight name -> (bias name or None, bias side or None, kind label, activation side)
    reasons: dict      # every other parameter -> why it falls back
    calls: list        # per probed call: (call options, kind, weight name, has folded bias, probe)


def _plan(predict: Callable, params: dict, example_batch, where: str) -> _Plan:
    """Runs `predict` on one example under `ti.factored`'s `_Uses` and classifies the parameters.

    A weight is factored when every use is as the weight of a recognised layer call and no
    other name holds the same tensor; a bias is folded into its weight when every use is as
    the bias of calls of that one factored weight with one activation side (the first such
    bias per weight; others fall back).
    """
    uses, counts = _record_uses(lambda: predict(params, example_batch), params, tuple(_ACTIVATION_SIDE))
    weights = {name for name, roles in uses.roles.items() if all(isinstance(r, tuple) and r[0] == "weight" for r in roles)}
    biases: dict[str, tuple[str, str]] = {}   # weight name -> (the bias folded into it, its side)
    for name, roles in uses.roles.items():
        if name in weights or len(roles) != 1:
            continue
        (role,) = roles
        if isinstance(role, tuple) and role[0] == "bias" and role[1] in weights and role[1] not in biases:
            biases[role[1]] = (name, _ACTIVATION_SIDE[role[2]])
    calls: list = []
    kinds: dict[str, list[str]] = {}
    firsts: dict[str, str] = {}
    for call, w, b, probe in uses.calls:
        if w in weights:
            folded_bias = biases.get(w, (None, None))[0]
            calls.append((call.options, call.kind, w, b is not None and b == folded_bias, probe))
            kinds.setdefault(w, []).append(_kind_name(call))
            firsts.setdefault(w, call.kind)
    kronecker = {w: (*biases.get(w, (None, None)), "+".join(dict.fromkeys(kinds[w])),
                     biases.get(w, (None, None))[1] or _ACTIVATION_SIDE[firsts[w]])
                 for w in params if w in weights}
    folded = {b for b, *_ in kronecker.values() if b is not None}
    reasons: dict[str, str] = {}
    for name in params:
        if name in kronecker or name in folded:
            continue
        roles = uses.roles.get(name)
        reasons[name] = ("not used by predict" if roles is None else
                         "one tensor under several names" if counts[id(params[name])] > 1 else
                         "bias outside a factored layer" if all(isinstance(r, tuple) and r[0] == "bias" for r in roles) else
                         "used outside a recognised layer")
    return _Plan(kronecker, reasons, calls)


# ---------------------------------------------------------------- per-example capture

class _Index(NamedTuple):
    """One-hot vectors kept as indices: `ids` `[B, T]`, `weight` `[B, T]` (0 at padding_idx), `size`."""

    ids: torch.Tensor
    weight: torch.Tensor
    size: int

    def dense(self) -> torch.Tensor:
        return (F.one_hot(self.ids, self.size).to(self.weight.dtype) * self.weight[..., None])[:, None]


def _sides(kind: str, options: tuple, shape, x, g: torch.Tensor):
    """`(l, r)` of one call for B examples: dense `[B, m', T, d]` (m' = 1 or m) or `_Index`.

    g: the probe gradients `[B, m, *call output]`.
    """
    B, m = g.shape[:2]
    if kind == "linear":
        return g.reshape(B, m, -1, shape[0]), x.reshape(B, 1, -1, shape[1])
    if kind == "addmm":
        return x.reshape(B, 1, -1, shape[0]), g.reshape(B, m, -1, shape[1])
    if kind == "embedding":
        ids = x.reshape(B, -1).long()
        weight = torch.ones(ids.shape, dtype=g.dtype, device=g.device)
        padding_idx = options[0]
        if padding_idx is not None:
            weight = weight * (ids != padding_idx % shape[0]).to(g.dtype)
        return _Index(ids, weight, shape[0]), g.reshape(B, m, -1, shape[1])
    channels, kernel = shape[1], tuple(shape[2:])
    spatial = x.shape[-len(kernel):]
    patches = _patches(x.reshape(-1, channels, *spatial), kernel, options)             # [B·N1, L, C·K]
    G = g.reshape(B, m, -1, shape[0], patches.shape[1]).transpose(-1, -2)               # [B, m, N1, L, out]
    return G.reshape(B, m, -1, shape[0]), patches.reshape(B, 1, -1, patches.shape[-1])


def _with_bias_column(side, flags: float, B: int, T: int):
    """`side` with a column of `flags` (1 where the call adds the folded bias, else 0)."""
    dense = side.dense() if isinstance(side, _Index) else side
    column = torch.full((B, dense.shape[1], T, 1), flags, dtype=dense.dtype, device=dense.device)
    return torch.cat([dense, column], -1)


class _Captured(NamedTuple):
    fallback: dict       # per-example pseudo-gradients of the fallback parameters, [B, m, *shape]
    sides: dict          # weight name -> list of (l, r) per use
    m: int


def _capture_fn(predict: Callable, params: dict, plan: _Plan, where: str) -> Callable:
    """Returns `(chunk, U) -> _Captured`: one vjp per example with the m cotangents U `[B, m, *output]`."""
    held = set(plan.kronecker) | {b for b, *_ in plan.kronecker.values() if b is not None}
    closed, fallback = tr.partition(params, lambda name, _: name in held)
    probes = tuple(probe for *_, probe in plan.calls)
    probed = {id(params[w]) for w in plan.kronecker}

    def example(fb, example, cotangents):
        def forward(fb, probes):
            with _Probing(probed, probes, where, recognize=_layer_input, what="layer",
                          advice="`predict` must run the same layers for every example.") as probing:
                out = predict(tr.merge(fb, closed), D.batch_of_one(example))
            probing.check_complete()
            return out, tuple(probing.inputs)

        # torch types vjp's result as 2 or 3 values; with has_aux=True it is 3
        _, pull, inputs = cast("tuple[Any, Callable, Any]", vjp(forward, fb, probes, has_aux=True))
        fb_grads, probe_grads = vmap(pull)(cotangents.unsqueeze(1))
        return fb_grads, probe_grads, inputs

    batched = vmap(example, in_dims=(None, 0, 0))

    def capture(chunk, U):
        fb_grads, probe_grads, inputs = batched(fallback, chunk, U)
        B, m = U.shape[:2]
        sides: dict = {w: [] for w in plan.kronecker}
        for (options, kind, w, has_bias, _), g, x in zip(plan.calls, probe_grads, inputs):
            lf, r = _sides(kind, options, params[w].shape, x, g)
            side = plan.kronecker[w][1]
            if side is not None:
                T = r.shape[2]
                lf, r = (_with_bias_column(lf, float(has_bias), B, T), r) if side == "left" else \
                       (lf, _with_bias_column(r, float(has_bias), B, T))
            sides[w].append((lf, r))
        return _Captured(dict(fb_grads), sides, m)

    return capture


# ---------------------------------------------------------------- Fisher pseudo-gradients

def _cotangents(fisher: str, predict: Callable, output_loss: Callable, params: dict, chunk, generator, where: str):
    """`U [B, m, *output]`: per example, the m output cotangents u with F_n = Σ_c J_nᵀ u_c u_cᵀ J_n.

    empirical: m = 1, u = ∂ℓ/∂o at the given labels. true: m = 1, u = softmax(o) − onehot(ŷ),
    ŷ ~ Categorical(softmax(o)) (cross entropy of logits only, checked). ggn: m = O (outputs per
    example), the columns of a square root of ∂²ℓ/∂o² (its eigendecomposition).
    """
    with torch.no_grad():
        o = predict(params, chunk)
    o = o.detach()
    if fisher == "ggn":
        def example_hessian(oi, example):
            return hessian_fn(lambda q: per_example(output_loss, q[None], D.batch_of_one(example), where=where,
                                                 name="output_loss")[0])(oi)

        H = vmap(example_hessian)(o, chunk).reshape(o.shape[0], o[0].numel(), o[0].numel())
        w, Q = torch.linalg.eigh((H + H.mT) / 2)
        # Round-off of a convex loss's Hessian is about eps × the size of its terms, which a confident example's
        # small eigenvalues do not bound (float32 softmax: −5e-8 beside eigenvalues of 1e-5); judged against
        # √eps × the chunk's largest curvature, a concave direction is refused and round-off is clamped to 0.
        if bool((w < -math.sqrt(torch.finfo(w.dtype).eps) * w.abs().amax().clamp_min(torch.finfo(w.dtype).tiny)).any()):
            raise ValueError(f'{where}: fisher="ggn" needs an output loss convex in the outputs; ∂²output_loss/∂o² has '
                             f"eigenvalue {float(w.min()):.3e} < 0. Use fisher=\"empirical\".")
        R = Q * w.clamp_min(0).sqrt()[:, None, :]
        return R.mT.reshape(o.shape[0], -1, *o.shape[1:])
    with torch.enable_grad():
        q = o.clone().requires_grad_(True)
        u = torch.autograd.grad(per_example(output_loss, q, chunk, where=where, name="output_loss").sum(), q)[0]
    if fisher == "empirical":
        return u[:, None]
    if o.dim() != 2:
        raise ValueError(f'{where}: fisher="true" samples class labels from softmax(outputs) and needs outputs '
                         f"[B, classes]; `predict` returned {list(o.shape)}. Use fisher=\"ggn\" (its exact expectation) "
                         'or "empirical".')
    p = torch.softmax(o, -1)
    label = p - u
    tol = math.sqrt(torch.finfo(o.dtype).eps)
    if not (bool(((label - label.round()).abs() <= tol).all()) and bool(((label.round().sum(-1) - 1).abs() == 0).all())
            and bool((label.round() >= 0).all())):
        raise ValueError(f'{where}: fisher="true" samples labels from softmax(outputs), the predictive distribution of '
                         "a cross entropy of logits against one class label; `output_loss` is not that "
                         "(softmax(o) − ∂output_loss/∂o is not one-hot). For other losses use fisher=\"ggn\" (the exact "
                         'expectation over the model\'s distribution when the loss is a negative log-likelihood, e.g. '
                         'squared error) or "empirical".')
    sampled = torch.multinomial(p.to(generator.device), 1, generator=generator).squeeze(1).to(p.device)
    return (p - F.one_hot(sampled, p.shape[1]).to(p.dtype))[:, None]


# ---------------------------------------------------------------- sums over the data

_F64 = torch.float64


def _dense(side) -> torch.Tensor:
    """A side as a dense tensor `[B, m', T, d]` in the model's dtype (one-hot indices materialized)."""
    return side.dense() if isinstance(side, _Index) else side


def _is_diagonal(uses: list) -> bool:
    """Whether every use's left side is one-hot (a pure embedding): the left factor is diagonal."""
    return all(isinstance(lf, _Index) for lf, _ in uses)


def _gram(side, m: int) -> torch.Tensor:
    """Σ over examples, cotangents and positions of x xᵀ (a side without the m axis counts m times), float64.

    One chunk's product runs in the model's dtype (its B·T terms); the chunks are summed in float64.
    """
    if isinstance(side, _Index):
        return torch.zeros(side.size, dtype=_F64, device=side.ids.device).index_add_(
            0, side.ids.reshape(-1), (side.weight.reshape(-1) * m).to(_F64))
    X = side.reshape(-1, side.shape[-1])
    return (X.mT @ X).to(_F64) * (m / side.shape[1])


def _factor_sums(captured: _Captured) -> dict:
    """Pass 1 of a chunk: left/right sums and positions per factored weight, squared fallback gradients."""
    m = captured.m
    out = {"diag": {name: g.to(_F64).pow(2).sum((0, 1)) for name, g in captured.fallback.items()},
           "left": {}, "right": {}, "positions": {}}
    for w, uses in captured.sides.items():
        diagonal = _is_diagonal(uses)
        out["left"][w] = sum(_gram(lf if diagonal else _dense(lf), m) for lf, _ in uses)
        out["right"][w] = sum(_gram(r, m) for _, r in uses)
        out["positions"][w] = torch.tensor(float(sum(r.shape[0] * m * r.shape[2] for _, r in uses)), dtype=_F64,
                                           device=uses[0][1].device)
    return out


def _corrected_sums(captured: _Captured, bases: dict) -> dict:
    """Pass 2 of a chunk (EK-FAC): Σ_n Σ_c (Q_Lᵀ ∇_W ℓ_nc Q_R)² per factored weight, float64.

    The rotations and the chunk's sum of squares (non-negative terms) run in the model's dtype;
    the chunks are summed in float64.
    """
    out = {}
    for w, uses in captured.sides.items():
        QL, QR = bases[w]
        QR = QR.to(_dense(uses[0][1]).dtype)
        if QL is None:
            out[w] = _indexed_squares([lf for lf, _ in uses], [(_dense(r) @ QR).to(_F64) for _, r in uses],
                                      captured.m)
            continue
        QL = QL.to(QR.dtype)
        if len(uses) == 1 and uses[0][0].shape[2] == uses[0][1].shape[2] == 1:
            out[w] = _outer_squares(_dense(uses[0][0]) @ QL, _dense(uses[0][1]) @ QR).to(_F64)
            continue
        G = sum((_dense(lf) @ QL).mT @ (_dense(r) @ QR) for lf, r in uses)           # [B, m, d0', d1']
        out[w] = G.pow(2).sum((0, 1)).to(_F64)
    return out


def _outer_squares(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Σ_n Σ_c (l_nc r_ncᵀ)² for one position (L `[B, m_l, 1, d0]`, R `[B, m_r, 1, d1]`, m_l or m_r possibly 1 and
    broadcast): the square of a rank-one gradient is the outer product of the squares, so the sum is one
    `[d0, B·m] × [B·m, d1]` product and the `[B, m, d0, d1]` gradients are never formed (memory B·m·(d0 + d1)).
    """
    A, B = L[:, :, 0].pow(2), R[:, :, 0].pow(2)                              # [B, m_l, d0], [B, m_r, d1]
    if A.shape[1] == 1:
        return A[:, 0].mT @ B.sum(1)
    if B.shape[1] == 1:
        return A.sum(1).mT @ B[:, 0]
    return A.reshape(-1, A.shape[-1]).mT @ B.reshape(-1, B.shape[-1])


def _indexed_squares(lefts: list, rights: list, m: int) -> torch.Tensor:
    """Σ_n Σ_c (Σ_t onehot_t r_tᵀ)² for one-hot left sides, without forming the `[B, size, d]` gradients."""
    ids = torch.cat([lf.ids for lf in lefts], 1)                                        # [B, T]
    weight = torch.cat([lf.weight for lf in lefts], 1).to(_F64)
    R = torch.cat([r.expand(r.shape[0], m, *r.shape[2:]) for r in rights], 2)         # [B, m, T, d]
    B, size = ids.shape[0], lefts[0].size
    keys = (torch.arange(B, device=ids.device)[:, None] * size + ids).reshape(-1)
    distinct, position = torch.unique(keys, return_inverse=True)
    rows = (R * weight[:, None, :, None]).permute(0, 2, 1, 3).reshape(-1, *R.shape[1:2], R.shape[-1])
    sums = torch.zeros(len(distinct), *rows.shape[1:], dtype=_F64, device=R.device).index_add_(0, position, rows)
    return torch.zeros(size, R.shape[-1], dtype=_F64, device=R.device).index_add_(0, distinct % size, sums.pow(2).sum(1))


def _cotangent_count(fisher: str, predict: Callable, params: dict, example_batch) -> int:
    """m, the pseudo-gradients per example: the outputs per example for "ggn", else 1."""
    if fisher != "ggn":
        return 1
    with torch.no_grad():
        return predict(params, example_batch)[0].numel()


def _eigh(matrix: torch.Tensor):
    """Float64 eigendecomposition of a symmetric PSD factor, eigenvalues clamped at 0 (round-off)."""
    w, Q = torch.linalg.eigh((matrix + matrix.mT) / 2)
    return w.clamp_min(0), Q


# ---------------------------------------------------------------- the public calls

def _check(where: str, loss, params, train, predict, output_loss, fisher, generator, damping, damping_mode,
           fallback, chunk_size) -> None:
    for name, fn in (("loss", loss), ("predict", predict), ("output_loss", output_loss)):
        if not callable(fn):
            raise TypeError(f"{where}: `{name}` must be a function; got {type(fn).__name__}.")
    if not isinstance(params, dict):
        raise TypeError(f"{where}: `params` must be a dict[str, Tensor] (as ti.functionalize returns) to name the "
                        f"layers' weights; got {type(params).__name__}.")
    checks.params(where, params)
    checks.chunk_size(where, chunk_size)
    D._count_examples(train, name="train", call=where)
    if fisher not in FISHERS:
        raise ValueError(f'{where}: `fisher` must be "empirical", "true" or "ggn"; got {fisher!r}.')
    if fisher == "true" and not isinstance(generator, torch.Generator):
        raise TypeError(f'{where}: fisher="true" samples labels and needs `generator=torch.Generator()` (seeded); '
                        f"got {type(generator).__name__}.")
    if damping_mode not in ("absolute", "relative"):
        raise ValueError(f'{where}: `damping_mode` must be "absolute" or "relative"; got {damping_mode!r}.')
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping > 0:
        raise ValueError(f"{where}: `damping` must be a number > 0 (F̂ is singular in general: the output gradients of "
                         f"softmax cross entropy sum to zero); got {damping!r}. Pass the objective's l2, or "
                         f'damping={RELATIVE_DEFAULT}, damping_mode="relative".')
    if fallback not in ("diagonal", "identity"):
        raise ValueError(f'{where}: `fallback` must be "diagonal" or "identity"; got {fallback!r}.')


def _check_loss(where: str, loss, predict, output_loss, params, batch) -> None:
    """`loss` must equal `output_loss(predict(...))`: the scores use one, the curvature the other."""
    with torch.no_grad():
        direct = per_example(loss, params, batch, where=where)
        composed = per_example(output_loss, predict(params, batch), batch, where=where, name="output_loss")
    if not torch.allclose(direct, composed, rtol=1e-5, atol=1e-8):
        raise ValueError(f"{where}: `loss(params, batch)` must equal `output_loss(predict(params, batch), batch)`; on "
                         f"the first examples they differ by {float((direct - composed).abs().max()):.3e}. Pass the "
                         "predict/output_loss split of the same loss.")


def _kronecker_factors(plan: _Plan, sums: dict, n: int, m: int) -> dict:
    """`{weight: (left, right, (eig(left), Q_L), (eig(right), Q_R))}` from pass 1's sums.

    F̂ = (Σ l lᵀ) ⊗ (Σ r rᵀ) / (N · positions), split so that the activation side is the mean
    over examples of Σ_t ã ãᵀ and the gradient side the mean over examples of (1/T) Σ_{c,t} g gᵀ.
    A diagonal left factor (embeddings) keeps the identity as its basis (Q_L = None).
    """
    out = {}
    for w, (_, _, _, activation) in plan.kronecker.items():
        positions = float(sums["positions"][w])
        scale = {activation: n * m, ("left" if activation == "right" else "right"): positions / m}
        left, right = sums["left"][w] / scale["left"], sums["right"][w] / scale["right"]
        out[w] = (left, right, (left.clamp_min(0), None) if left.dim() == 1 else _eigh(left), _eigh(right))
    return out


def _fit(where: str, method: str, loss, params, train, predict, output_loss, fisher, generator, damping, damping_mode,
         fallback, chunk_size, group) -> Curvature:
    """`ti.kfac` (method "kfac") and `ti.ekfac` ("ekfac"): pass 1 (factors, diagonals), eigendecompositions,
    pass 2 for EK-FAC (corrected eigenvalues), damping per block.
    """
    _check(where, loss, params, train, predict, output_loss, fisher, generator, damping, damping_mode, fallback,
           chunk_size)
    first = D.take(train, slice(0, min(8, D.num_examples(train))))
    _check_loss(where, loss, predict, output_loss, params, first)
    plan = _plan(predict, params, D.take(train, slice(0, 1)), where)
    capture = _capture_fn(predict, params, plan, where)
    n = dd.global_size(D.num_examples(train), group)

    def sweep(statistics: Callable):
        local = generator if generator is None else tr.fork_generator(generator)
        total = D.chunk_sum(lambda chunk: statistics(capture(chunk, _cotangents(
            fisher, predict, output_loss, params, chunk, local, where))), train, chunk_size)
        return dd.all_reduce(total, group)

    sums = sweep(_factor_sums)
    factors = _kronecker_factors(plan, sums, n, _cotangent_count(fisher, predict, params, D.take(train, slice(0, 1))))
    bases = {w: (QL, QR) for w, (_, _, (_, QL), (_, QR)) in factors.items()}
    if method == "ekfac":
        corrected = sweep(lambda captured: _corrected_sums(captured, bases))
    dtype = next(iter(params.values())).dtype
    values = {w: corrected[w] / n if method == "ekfac" else torch.outer(factors[w][2][0], factors[w][3][0])
              for w in factors}
    diagonals = {name: (sums["diag"][name] / n if fallback == "diagonal" else torch.zeros_like(sums["diag"][name]))
                 for name in plan.reasons}
    dampings = _dampings(damping, damping_mode, values, diagonals)
    kronecker = tuple(
        KroneckerBlock(w, bias, kind, side, activation, factors[w][0].to(dtype), factors[w][1].to(dtype),
                       None if bases[w][0] is None else bases[w][0].to(dtype), bases[w][1].to(dtype),
                       values[w].to(dtype), dampings[w])
        for w, (bias, side, kind, activation) in plan.kronecker.items())
    diagonal = tuple(DiagonalBlock(name, diagonals[name].to(dtype), fallback, plan.reasons[name], dampings[name])
                     for name in plan.reasons)
    return Curvature(method, fisher, n, float(damping), damping_mode, kronecker, diagonal, params)


def _dampings(damping: float, mode: str, values: dict, diagonals: dict) -> dict:
    """λ per block: `damping`, or `damping` × the block's mean eigenvalue (the whole curvature's mean
    for a block with none: identity fallback, unused parameters).
    """
    every = {**values, **diagonals}
    if mode == "absolute":
        return {name: float(damping) for name in every}
    means = {name: float(v.mean()) for name, v in every.items()}
    curved = [v for name, v in every.items() if means[name] > 0]
    total = sum(float(v.sum()) for v in curved) / max(sum(v.numel() for v in curved), 1)
    return {name: float(damping) * (mean if mean > 0 else total) for name, mean in means.items()}


def kfac(loss: Callable, params: dict, train: PyTree, *, predict: Callable, output_loss: Callable, fisher: str = "empirical",
         generator: torch.Generator | None = None, damping: float, damping_mode: str = "absolute",
         fallback: str = "diagonal", chunk_size: int | None = None, group: ProcessGroup | None = None) -> Curvature:
    """Fits K-FAC (Martens & Grosse 2015; convolutions as in Grosse & Martens 2016): F̂ = ⊕_layers L ⊗ R.

    Per recognised layer (`nn.Linear`, `nn.Conv1d`/`nn.Conv2d` with groups = 1,
    `nn.Embedding`, GPT-2's `Conv1D`; the module docstring and docs/design.md give the
    factors) A = E_n[Σ_t ã ãᵀ] (inputs with a bias column) and S = E_n[(1/T) Σ_t Σ_c g gᵀ]
    (output gradients), so that A ⊗ S approximates the Fisher block of the MEAN loss, exactly
    for one example and T = 1; both eigendecomposed in float64, and `ihvp` inverts F̂ + λI
    exactly in that basis. Every other parameter gets a `fallback` block (`curv.summary()`).

    Fisher: "empirical" (the given labels), "true" (one label per example drawn from
    softmax(outputs) through a copy of `generator`; cross entropy of logits only, checked), or
    "ggn" (its exact expectation for any output loss convex in the outputs: the O columns of a
    square root of ∂²output_loss/∂o² are back-propagated, O backward passes per example).
    Damping: absolute (λ = `damping` per block) or relative (λ_block = `damping` × the block's
    mean eigenvalue, kronfluence's heuristic with 0.1). To stand for `ti.objective(loss, train,
    l2=l2)`, pass damping = l2.

    Args:
      loss: `(params, batch) -> Tensor[B]`, the per-example training loss, equal to
        `output_loss(predict(params, batch), batch)` (checked on the first examples).
      params: `dict[str, Tensor]` (as from `ti.functionalize`); the layers' weights are
        recognised by identity, so `predict` must use these very tensors.
      train: the training set, leading axis n (this rank's shard with `group`).
      predict: `(params, batch) -> outputs [B, ...]`, e.g. `lambda p, b: apply(p, b[0])`.
      output_loss: `(outputs, batch) -> Tensor[B]`.
      fisher: "empirical", "true" or "ggn" (above).
      generator: `torch.Generator`, required for fisher="true".
      damping: λ > 0 (absolute), or the multiple of the mean eigenvalue (relative).
      damping_mode: "absolute" or "relative".
      fallback: "diagonal" (the diagonal of the same Fisher from per-example gradients)
        or "identity" (zero curvature: (F̂ + λI)⁻¹ = I/λ) for parameters outside recognised layers.
      chunk_size: examples per vectorized capture (default 1024).
      group: a `torch.distributed` process group when `train` is this rank's shard: every
        sum is all-reduced once per pass, N is the global size, every rank holds the same curvature.

    Returns:
      `Curvature` (`ihvp`, `operator`, `preconditioner`, on one vector or a stack); through
      `ti.influence(..., ihvp=curv.ihvp)` the score (1/n) g_testᵀ (F̂ + λI)⁻¹ g_z, positive = helpful.

    Cost: one pass over the data (a vmapped vjp per example with m = 1, or O for "ggn",
    cotangents, plus B·m·T·(d0² + d1²) flops per chunk), eigendecompositions O(Σ d0³ + d1³);
    an `ihvp` on k vectors O(k Σ d0'·d1'·(d0' + d1')). Memory O(Σ d0² + d1² + P), never P².

    Raises:
      TypeError: a function argument not callable, `params` not a dict of floating tensors,
        no `generator` for fisher="true".
      ValueError: a bad option; `loss` not `output_loss(predict(...))`; fisher="true" with a
        loss other than cross entropy; fisher="ggn" with a non-convex output loss.
      RuntimeError: the forward makes other layer calls under vmap than on one example.

    Examples:
      >>> curv = ti.kfac(loss, params, train, predict=predict, output_loss=output_loss, damping=1e-3)
      >>> ti.influence(loss, params, train, test, ihvp=curv.ihvp).shape   # [n_test, n_train]
      torch.Size([5, 60])

    References:
      Martens & Grosse, Optimizing neural networks with Kronecker-factored approximate curvature, ICML 2015.
      Grosse & Martens, A Kronecker-factored approximate Fisher matrix for convolution layers, ICML 2016.
    """
    return _fit("ti.kfac", "kfac", loss, params, train, predict, output_loss, fisher, generator, damping, damping_mode,
                fallback, chunk_size, group)


def ekfac(loss: Callable, params: dict, train: PyTree, *, predict: Callable, output_loss: Callable, fisher: str = "empirical",
          generator: torch.Generator | None = None, damping: float, damping_mode: str = "absolute",
          fallback: str = "diagonal", chunk_size: int | None = None, group: ProcessGroup | None = None) -> Curvature:
    """Fits EK-FAC (George et al. 2018): K-FAC's eigenbasis with eigenvalues corrected from the gradients.

    Everything as `ti.kfac`, then a second pass over the data replaces each block's
    eigenvalues s_i a_j by Λ_ij = (1/N) Σ_n Σ_c [(Q_Sᵀ ∇_W ℓ_nc Q_A)_ij]², the second
    moments of the per-example (pseudo-)gradients in the Kronecker eigenbasis: the best
    diagonal in that basis, so the block's trace equals the exact Fisher block's. Relative
    damping uses the mean of the corrected eigenvalues (as kronfluence does).

    Matched with kronfluence (`FactorArguments(strategy="ekfac", use_empirical_fisher=True)`,
    `ScoreArguments(damping_factor=λ)`, float64): tinfluence's scores equal kronfluence's
    pairwise scores divided by n (its score is g_testᵀ (F̂ + λI)⁻¹ g_train without the 1/n,
    same sign), to 4e-16 relative on digits logistic regression (benchmarks/RESULTS-kfac.md).

    Args, Returns, Raises: as `ti.kfac`.

    Cost: `ti.kfac`'s plus a second pass whose per-chunk memory is B·m·d0'·d1' per layer
    (the chunk's rotated per-example gradients; embeddings only B·m·T·d1).

    Examples:
      >>> curv = ti.ekfac(loss, params, train, predict=predict, output_loss=output_loss, damping=1e-2)
      >>> G = ti.per_example_grads(loss, params, test)
      >>> x, info = ti.cg_solve(ti.ggn_vp(predict, params, train, output_loss=output_loss), G, damping=1e-2,
      ...                       tol=1e-10, preconditioner=curv.preconditioner)   # the exact GGN solve
      >>> exact = ti.direct(ti.hessian(ti.objective(loss, train, l2=1e-2), params))(G)
      >>> torch.allclose(x["weight"], exact["weight"])
      True

    References:
      George, Laurent, Bouthillier, Ballas & Vincent, Fast approximate natural gradient descent
      in a Kronecker-factored eigenbasis, NeurIPS 2018.
      Grosse et al., Studying large language model generalization with influence functions, 2023.
    """
    return _fit("ti.ekfac", "ekfac", loss, params, train, predict, output_loss, fisher, generator, damping, damping_mode,
                fallback, chunk_size, group)
