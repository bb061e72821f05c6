"""Compressed per-example gradients (LoGra, Choe et al. 2024) and influence in the projected space.

For a weight W `[out, in]` applied by `F.linear` at positions t, example i's gradient is
`Σ_t g_t a_tᵀ` (`ti.factored`). A Kronecker projection `P_out [k_out, out]`, `P_in [k_in, in]`
maps it to `P_out (Σ_t g_t a_tᵀ) P_inᵀ = Σ_t (P_out g_t)(P_in a_t)ᵀ`, `[k_out, k_in]`: the layer
inputs and output gradients are projected separately and the per-example gradient is never
formed, at O(T·(k_in·in + k_out·out) + T·k_in·k_out) per example and layer.

Every matrix-shaped parameter gets this projection, whether its gradient is seen as factors or
formed (convolutions, embeddings, tied weights and GPT-2's `Conv1D` are formed by `vmap(grad)`
and projected as `P_out ∇W P_inᵀ`, the same map), so a training and a test gradient always meet
through one linear map. Vectors (biases, norm scales) are concatenated and projected by one
dense sketch of width `k_rest` (the fallback projection of formed gradients). With entries of
variance 1/k (Gaussian) or ±1/√s at s hashed rows per column (SJLT), `E[PᵀP] = I`, so every
projected inner product is an unbiased estimate of the exact one; its relative error falls as
1/√k.

The projected gradients then meet through a damped covariance in the projected space,
`Ĉ = (1/n) Σ_z ĝ_z ĝ_zᵀ`, inverted exactly (per layer block or for the whole projection):

    score(z_test, z) = (1/n) ĝ_testᵀ (Ĉ + λI)⁻¹ ĝ_z,

the sign and scale of `ti.influence` (positive = helpful: removing z would raise the test loss),
with the empirical Fisher standing in for the Hessian.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import optree
import torch
from torch.func import grad, jacrev, vmap

from ..core import checks
from ..core import data as D
from ..core import factored as fa
from ..core import tree as tr
from ..core.objective import per_example
from ..core.tree import PyTree

__all__ = ["Projector", "projector", "compressed_grad_fn", "compressed_grads", "ProjectedCurvature",
           "projected_curvature", "compressed_influence"]

KINDS = ("gaussian", "sjlt")


@dataclass(frozen=True)
class _Gaussian:
    """One random map `R^d -> R^k` on the last axis: a dense Gaussian `matrix [k, d]`."""

    k: int
    matrix: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.mT

    def tensors(self) -> tuple:
        return (self.matrix,)


@dataclass(frozen=True)
class _SJLT:
    """One random map `R^d -> R^k` on the last axis: an SJLT given by `rows [s, d]` (the s output
    rows of every input coordinate) and `signs [s, d]` (±1/√s).
    """

    k: int
    rows: torch.Tensor
    signs: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        values = (x.unsqueeze(-2) * self.signs).reshape(*x.shape[:-1], -1)   # [..., s·d]
        out = x.new_zeros(*x.shape[:-1], self.k)
        return out.index_add_(-1, self.rows.reshape(-1), values)

    def tensors(self) -> tuple:
        return (self.rows, self.signs)


_Sketch = _Gaussian | _SJLT


def _draw(kind: str, k: int, d: int, sparsity: int, generator, dtype, device) -> _Sketch:
    if kind == "gaussian":
        m = torch.randn(k, d, generator=generator, dtype=dtype, device=generator.device) / math.sqrt(k)
        return _Gaussian(k, m.to(device))
    s = min(sparsity, k)
    rows = torch.randint(0, k, (s, d), generator=generator, device=generator.device)
    signs = (torch.randint(0, 2, (s, d), generator=generator, device=generator.device) * 2 - 1).to(dtype) / math.sqrt(s)
    return _SJLT(k, rows.to(device), signs.to(device))


@dataclass(frozen=True)
class Projector:
    """A fixed random projection of per-example gradients to `dim` numbers.

    A value built by `ti.projector`; the same object projects training and test gradients.

    Attributes:
      kind: "gaussian" or "sjlt".
      matrices: `{name: (P_out, P_in)}` for every parameter with two or more axes (reshaped to
        `[shape[0], prod(shape[1:])]`); its block is `P_out ∇W P_inᵀ`, flattened row-major.
      rest: names of the vector parameters, projected together by `rest_sketch`.
      rest_sketch: the fallback projection of the concatenated vector gradients (None if none).
      blocks: `{name: slice}` of each matrix parameter's columns in the output, then `"rest"`.
      shapes: `{name: shape}` of the matrix parameters.
      dim: output width, Σ k_out·k_in over matrices plus k_rest.
      fingerprint: a hex digest of every drawn tensor (identifies the projection in a store).

    Examples:
      >>> proj = ti.projector(params, k_in=4, k_out=2, generator=torch.Generator().manual_seed(0))
      >>> list(proj.blocks), proj.rest, proj.dim       # weight [3, 8]: 2·4 columns; bias: k_rest = 8
      (['weight', 'rest'], ('bias',), 16)
    """

    kind: str
    matrices: dict
    rest: tuple
    rest_sketch: _Sketch | None
    blocks: dict
    shapes: dict
    dim: int
    fingerprint: str

    def project_matrix(self, name: str, g: torch.Tensor) -> torch.Tensor:
        """`P_out g P_inᵀ` for formed gradients `g [..., *shape]`: `[..., k_out·k_in]`."""
        p_out, p_in = self.matrices[name]
        shape = self.shapes[name]
        lead = g.shape[:g.dim() - len(shape)]
        m = g.reshape(*lead, shape[0], -1)
        return p_out(p_in(m).mT).mT.reshape(*lead, -1)

    def project_factors(self, name: str, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """`Σ_t (P_out G_t)(P_in A_t)ᵀ`, `[B, *q, k_out·k_in]`, the gradient never formed.

        A `[B, T, in]` are a layer's inputs, G `[B, *q, T, out]` its output gradients (q: optional
        query-token axes).
        """
        p_out, p_in = self.matrices[name]
        a = p_in(A)                                      # [B, T, k_in]
        g = p_out(G)                                     # [B, *q, T, k_out]
        a = a.reshape(a.shape[0], *([1] * (g.dim() - 3)), *a.shape[1:])
        return (g.mT @ a).flatten(-2)

    def project_rest(self, vectors: dict, lead: tuple) -> torch.Tensor:
        """The fallback block for formed vector gradients `{name: [*lead, *shape]}`: `[*lead, k_rest]`."""
        if self.rest_sketch is None:
            raise ValueError("ti.Projector.project_rest: this projector has no vector parameters (`rest` is empty), "
                             "so there is no fallback block; project only its `matrices`.")
        flat = torch.cat([vectors[name].reshape(*lead, -1) for name in self.rest], dim=-1)
        return self.rest_sketch(flat)


def _fingerprint(kind: str, names: list, sketches: list) -> str:
    h = hashlib.sha256(kind.encode())
    for name, sketch in zip(names, sketches):
        h.update(name.encode())
        for t in sketch.tensors():
            h.update(np.ascontiguousarray(t.detach().cpu().to(torch.float64 if t.is_floating_point() else torch.int64)
                                          .numpy()).tobytes())
    return h.hexdigest()


def _check_k(where: str, name: str, k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{where}: `{name}` must be an int >= 1; got {k!r}.")


def projector(params: dict, *, k_in: int, k_out: int, k_rest: int | None = None, kind: str = "gaussian",
              sparsity: int = 4, generator: torch.Generator) -> Projector:
    """Returns a random projection of per-example gradients, drawn once from `generator`.

    Args:
      params: `dict[str, Tensor]` (e.g. from `ti.functionalize`); only names and shapes are read.
      k_in: projected width of every matrix parameter's input side (its columns).
      k_out: projected width of its output side (its rows); each matrix gets k_out·k_in numbers.
      k_rest: width of the one fallback projection of all vector parameters (default k_in·k_out).
      kind: "gaussian" (entries N(0, 1/k)) or "sjlt" (sparse: each input coordinate lands on
        `sparsity` random rows with random signs ±1/√sparsity; applied by index_add, O(d)).
      sparsity: nonzeros per column for "sjlt".
      generator: a `torch.Generator`; its state is copied, not advanced, so the same call gives
        the same projection (for the training set, the test set, a resumed store).

    Returns:
      `Projector` of width `dim = Σ_matrices k_out·k_in + k_rest`; `E[⟨Pg, Ph⟩] = ⟨g, h⟩`.

    Raises:
      TypeError: `params` not a dict; `generator` not a torch.Generator.
      ArgumentError: `params` not floating tensors of one dtype and device.
      ValueError: a k < 1, an unknown `kind`.

    Cost: O(Σ_matrices (k_in·in + k_out·out) + k_rest·Σ vector sizes) draws and memory
    (Gaussian; SJLT stores `sparsity` entries per input coordinate instead).

    Examples:
      >>> proj = ti.projector(params, k_in=4, k_out=2, generator=torch.Generator().manual_seed(0))
      >>> proj.dim
      16
      >>> ti.projector(params, k_in=4, k_out=2, generator=torch.Generator().manual_seed(0)).fingerprint == proj.fingerprint
      True
    """
    where = "ti.projector"
    if not isinstance(params, dict):
        raise TypeError(f"{where}: `params` must be a dict[str, Tensor] (as ti.functionalize returns); "
                        f"got {type(params).__name__}.")
    checks.params(where, params)
    if kind not in KINDS:
        raise ValueError(f"{where}: `kind` must be one of {KINDS}; got {kind!r}.")
    k_rest = k_in * k_out if k_rest is None else k_rest
    for name, k in (("k_in", k_in), ("k_out", k_out), ("k_rest", k_rest), ("sparsity", sparsity)):
        _check_k(where, name, k)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{where}: `generator` must be a torch.Generator, e.g. torch.Generator().manual_seed(0); "
                        f"got {type(generator).__name__}.")
    local = tr.fork_generator(generator)
    matrices, blocks, shapes, start, drawn, names = {}, {}, {}, 0, [], []
    for name, p in params.items():
        if p.dim() < 2:
            continue
        out_f, in_f = p.shape[0], p[0].numel()
        p_out = _draw(kind, k_out, out_f, sparsity, local, p.dtype, p.device)
        p_in = _draw(kind, k_in, in_f, sparsity, local, p.dtype, p.device)
        matrices[name] = (p_out, p_in)
        shapes[name] = tuple(p.shape)
        blocks[name] = slice(start, start + k_out * k_in)
        start += k_out * k_in
        drawn += [p_out, p_in]
        names += [name + ".out", name + ".in"]
    rest = tuple(name for name, p in params.items() if p.dim() < 2)
    rest_sketch = None
    if rest:
        first = params[rest[0]]
        rest_sketch = _draw(kind, k_rest, sum(params[n].numel() for n in rest), sparsity, local, first.dtype, first.device)
        blocks["rest"] = slice(start, start + k_rest)
        start += k_rest
        drawn.append(rest_sketch)
        names.append("rest")
    return Projector(kind, matrices, rest, rest_sketch, blocks, shapes, start, _fingerprint(kind, names, drawn))


def _check_projector(where: str, proj, params: dict) -> None:
    if not isinstance(proj, Projector):
        raise TypeError(f"{where}: `projector` must be a ti.Projector (from ti.projector(params, ...)); "
                        f"got {type(proj).__name__}.")
    expected = set(proj.matrices) | set(proj.rest)
    if set(params) != expected:
        raise ValueError(f"{where}: `projector` was drawn for other parameters; only in params: "
                         f"{sorted(set(params) - expected)}, only in the projector: {sorted(expected - set(params))}. "
                         "Draw it with ti.projector(params, ...) for these params.")


# ---------------------------------------------------------------------------------------------
# Capture: F.linear inputs and output gradients (always kept as factors), all other gradients formed.


def _capture_kernel(loss: Callable, params: dict, batch, *, per_token: bool, where: str):
    """One vectorized backward over `batch` under `ti.factored`'s probing.

    With `per_token`, `loss(params, batch)` returns `[B, T]` and every gradient gains a query-token
    axis (`jacrev` over the T losses: a vmap of T backward passes). Returns
    `(plan, formed {name: [B, *q, *shape]}, probe grads, layer inputs)`.
    """
    summed = (lambda p, b: _token_losses(loss, p, b, where).sum(-1)) if per_token else loss
    plan = fa._plan(summed, params, batch, where)
    factored, fallback = tr.partition(params, lambda name, _: name in plan.factorable)
    probes = tuple(probe for _, _, probe in plan.calls)
    probed = {id(t) for t in factored.values()}

    def example_loss(free, probe_values, example):
        with fa._Probing(probed, probe_values, where) as probing:
            one = D.batch_of_one(example)
            value = _token_losses(loss, tr.merge(free, factored), one, where)[0] if per_token else \
                per_example(loss, tr.merge(free, factored), one, where=where)[0]
        probing.check_complete()
        return value, tuple(probing.inputs)

    derivative = jacrev if per_token else grad
    (formed, probe_grads), inputs = vmap(derivative(example_loss, argnums=(0, 1), has_aux=True),
                                         in_dims=(None, None, 0))(fallback, probes, batch)
    return plan, dict(formed), probe_grads, inputs


def _token_losses(loss: Callable, params, batch, where: str) -> torch.Tensor:
    """`loss(params, batch)` checked to be `[B, T]`."""
    out = loss(params, batch)
    b = D._count_examples(batch, name="batch", call=where)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != b:
        got = f"shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{where}: `token_loss` must return one loss per example and token, shape [{b}, T]; it returned "
                         f"{got}. Return e.g. F.cross_entropy(logits.mT, labels, reduction='none') * mask.")
    return out


def _compress(proj: Projector, params: dict, plan, formed: dict, probe_grads: tuple, inputs: tuple,
              lead: tuple) -> torch.Tensor:
    """The projected gradients `[*lead, dim]` from a capture (lead = (B,) or (B, T_query))."""
    B = lead[0]
    pieces: dict = {}
    for (w, b, _), G, a in zip(plan.calls, probe_grads, inputs):
        G = G.reshape(*lead, -1, G.shape[-1])             # [B, *q, T, out]
        if w is not None:
            part = proj.project_factors(w, a.reshape(B, -1, a.shape[-1]), G)
            pieces[w] = part if w not in pieces else pieces[w] + part
        if b is not None:
            formed[b] = G.sum(-2) + formed.get(b, 0)
    for name in proj.matrices:
        if name not in pieces:
            pieces[name] = proj.project_matrix(name, formed[name])
    out = [pieces[name] for name in proj.matrices]
    if proj.rest:
        out.append(proj.project_rest(formed, lead))
    return torch.cat(out, dim=-1)


def compressed_grad_fn(loss: Callable, proj: Projector, *, per_token: bool = False) -> Callable:
    """Returns `(params, batch) -> [B, dim]` (`[B, T, dim]` with `per_token`), projected gradients.

    The kernel of `ti.compressed_grads` (one batch, no chunking) and, with `per_token`, of
    `ti.token_grads`; composes with the caller's own loop over chunks.

    Args:
      loss: `(params, batch) -> Tensor[B]` (`Tensor[B, T]` with `per_token`).
      proj: a `ti.Projector`.
      per_token: differentiate every token's loss (one extra axis T).

    Returns:
      `kernel(params, batch)`: `[B, proj.dim]` (or `[B, T, proj.dim]`), dtype and device of the
      parameters; it raises as `ti.compressed_grads` does.

    Cost: per call, one vectorized backward over the batch (T of them with `per_token`).

    Examples:
      >>> proj = ti.projector(params, k_in=4, k_out=2, generator=torch.Generator().manual_seed(0))
      >>> kernel = ti.compressed_grad_fn(loss, proj)
      >>> torch.allclose(kernel(params, train), ti.compressed_grads(loss, params, train, projector=proj))
      True
    """
    return compressed_kernel(loss, proj, per_token=per_token, where="ti.compressed_grads")


def compressed_kernel(loss: Callable, proj: Projector, *, per_token: bool = False, where: str) -> Callable:
    """`compressed_grad_fn` for the public call `where` (the name its errors give)."""

    def kernel(params, batch):
        if not isinstance(params, dict):
            raise TypeError(f"{where}: `params` must be a dict[str, Tensor] (as ti.functionalize returns); "
                            f"got {type(params).__name__}.")
        _check_projector(where, proj, params)
        plan, formed, probe_grads, inputs = _capture_kernel(loss, params, batch, per_token=per_token, where=where)
        B = D._count_examples(batch, name="batch", call=where)
        captured: tr.PyTree = (formed, probe_grads)
        lead = (B,) if not per_token else (B, next(iter(optree.tree_leaves(captured, namespace=""))).shape[1])
        return _compress(proj, params, plan, formed, probe_grads, inputs, lead)

    return kernel


def compressed_grads(loss: Callable, params: dict, data: PyTree, *, projector: Projector,
                     chunk_size: int | None = None) -> torch.Tensor:
    """Returns the projected per-example gradients `P ∇ℓ(z_i)` of `data`, `[n, projector.dim]`.

    Linear layers (`F.linear` whose weight is a parameter) are projected from their captured
    inputs and output gradients, never formed; every other parameter's gradient is formed by
    `vmap(grad)` per chunk and projected (see the module notes). Computed chunk by chunk.

    Args:
      loss: `(params, batch) -> Tensor[B]`, one loss per example (model in eval mode).
      params: `dict[str, Tensor]`.
      data: pytree of tensors with a common leading axis n (dict batches included).
      projector: `ti.projector(params, ...)`, the same for every set that is compared.
      chunk_size: examples per vectorized backward (default 1024).

    Returns:
      `[n, dim]`, dtype and device of the parameters; `ĝ_i · ĝ_j` estimates `⟨∇ℓ_i, ∇ℓ_j⟩` unbiasedly.

    Raises:
      TypeError: `params` not a dict; `projector` not a Projector.
      ValueError: a projector drawn for other parameters; bad data or loss.
      ArgumentError: a bad `chunk_size`.

    Cost: one vectorized backward per chunk, plus O(T·(k_in·in + k_out·out + k_in·k_out)) per
    example and linear layer applied at T positions; formed gradients of other parameters
    cost their size. Memory: `[n, dim]` out, one chunk's captured factors at a time.

    Examples:
      The weight's block is `P_out ∇W P_inᵀ` of the exact per-example gradient:

      >>> proj = ti.projector(params, k_in=4, k_out=2, generator=torch.Generator().manual_seed(0))
      >>> G = ti.compressed_grads(loss, params, train, projector=proj)
      >>> G.shape
      torch.Size([60, 16])
      >>> exact = ti.per_example_grads(loss, params, train)["weight"]          # [60, 3, 8]
      >>> torch.allclose(G[:, proj.blocks["weight"]], proj.project_matrix("weight", exact))
      True
    """
    where = "ti.compressed_grads"
    checks.chunk_size(where, chunk_size)
    D._count_examples(data, name="data", call=where)
    kernel = compressed_kernel(loss, projector, where=where)
    return D.chunk_cat(lambda chunk: kernel(params, chunk), data, chunk_size)


# ---------------------------------------------------------------------------------------------
# Curvature in the projected space.


@dataclass(frozen=True)
class ProjectedCurvature:
    """The damped covariance of projected training gradients, inverted: `v ↦ v (Ĉ + λI)⁻¹`.

    Attributes:
      blocks: column slices, one per block (the whole projection, or one per layer).
      inverses: `(Ĉ_b + λI)⁻¹` per block, `[k_b, k_b]`.
      n: the number of training examples Ĉ averages over.
      damping: λ.

    Examples:
      >>> G = torch.randn(60, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
      >>> curv = ti.projected_curvature(G, damping=0.1)
      >>> curv.n, torch.allclose(curv.query(G), curv.precondition(G) / 60)
      (60, True)
    """

    blocks: tuple
    inverses: tuple
    n: int
    damping: float

    def precondition(self, Q: torch.Tensor) -> torch.Tensor:
        """`Q (Ĉ + λI)⁻¹` for queries `Q [..., dim]` (block by block): `[..., dim]`."""
        parts = [Q[..., s].to(inv.dtype) @ inv for s, inv in zip(self.blocks, self.inverses)]
        return torch.cat(parts, dim=-1)

    def query(self, Q: torch.Tensor) -> torch.Tensor:
        """`(1/n) Q (Ĉ + λI)⁻¹`: the query side of an influence score, computed once per query batch."""
        return self.precondition(Q) / self.n


def projected_curvature(grads: torch.Tensor | Iterable[torch.Tensor], *, damping: float,
                        blocks: Projector | dict | None = None) -> ProjectedCurvature:
    """Returns the damped covariance `Ĉ = (1/n) Σ_z ĝ_z ĝ_zᵀ` of projected gradients, exactly inverted.

    Args:
      grads: `[n, dim]` projected training gradients, or an iterable of `[c, dim]` chunks
        (e.g. a `ti.io.GradientStore`), reduced chunk by chunk in at least float32.
      damping: λ > 0, absolute (a common choice: 0.1 × the mean diagonal of Ĉ).
      blocks: None for one `[dim, dim]` block; a `Projector` (or its `.blocks`) for one block per
        layer (block-diagonal Ĉ, Σ k_b² numbers instead of dim²).

    Returns:
      `ProjectedCurvature`, inverses in the gradients' dtype promoted to at least float32.

    Raises:
      ValueError: `damping` <= 0 or not finite; empty or non-2-D `grads`; blocks that do not
        tile `dim`.

    Cost: O(n·Σ k_b²) for the covariance, O(Σ k_b³) for the inverses (Cholesky); memory
    Σ k_b² (dim² for one block).

    Examples:
      >>> G = torch.randn(60, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
      >>> curv = ti.projected_curvature(G, damping=0.1)
      >>> C = G.T @ G / 60 + 0.1 * torch.eye(16, dtype=G.dtype)
      >>> torch.allclose(curv.precondition(G) @ C, G)
      True
    """
    where = "ti.projected_curvature"
    damping = float(damping)
    if not (math.isfinite(damping) and damping > 0):
        raise ValueError(f"{where}: `damping` must be finite and > 0; got {damping}.")
    chunks = [grads] if isinstance(grads, torch.Tensor) else grads
    sums, n, slices = None, 0, None
    for chunk in chunks:
        if chunk.dim() != 2:
            raise ValueError(f"{where}: `grads` must be [n, dim] (or chunks [c, dim]); got shape {list(chunk.shape)}.")
        if slices is None:
            slices = _slices(where, blocks, chunk.shape[1])
        work = chunk.to(torch.promote_types(chunk.dtype, torch.float32))
        part = [work[:, s].mT @ work[:, s] for s in slices]
        sums = part if sums is None else [a + b for a, b in zip(sums, part)]
        n += chunk.shape[0]
    if sums is None or slices is None or n == 0:
        raise ValueError(f"{where}: `grads` is empty.")
    inverses = tuple(_damped_inverse(S / n, damping) for S in sums)
    return ProjectedCurvature(tuple(slices), inverses, n, damping)


def _slices(where: str, blocks, dim: int) -> list:
    if blocks is None:
        return [slice(0, dim)]
    slices = list((blocks.blocks if isinstance(blocks, Projector) else blocks).values()
                  if isinstance(blocks, (Projector, dict)) else blocks)
    if sum(s.stop - s.start for s in slices) != dim or any(a.stop != b.start for a, b in zip(slices, slices[1:])):
        raise ValueError(f"{where}: `blocks` must tile the {dim} projected columns in order; got {slices}.")
    return slices


def _damped_inverse(C: torch.Tensor, damping: float) -> torch.Tensor:
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(C + damping * eye))


def compressed_influence(loss: Callable, params: dict, train: PyTree, test: PyTree, *, projector: Projector, damping: float,
                         per_layer: bool = False, chunk_size: int | None = None) -> torch.Tensor:
    """Returns influence in the projected space, `(1/n) ĝ_testᵀ (Ĉ + λI)⁻¹ ĝ_z`, `[n_test, n_train]`.

    The LoGra estimate: training and test gradients projected by `projector`
    (`ti.compressed_grads`), curvature the damped covariance of the projected training gradients
    (`ti.projected_curvature`). For data sets too large to hold `[n_train, dim]`, write the
    training side once with `ti.io.write_store` and score query batches against it.

    Sign: positive = helpful (removing z would raise the test loss), as `ti.influence`.

    Args:
      loss: `(params, batch) -> Tensor[B]`, one loss per example.
      params: `dict[str, Tensor]`.
      train: training set, leading axis n_train.
      test: test set, leading axis n_test.
      projector: `ti.projector(params, ...)`.
      damping: λ > 0 added to Ĉ.
      per_layer: True inverts one block per parameter matrix (and one for the vectors).
      chunk_size: examples per vectorized backward.

    Returns:
      `[n_test, n_train]`, dtype of the parameters (at least float32).

    Raises:
      TypeError: `params` not a dict; `projector` not a Projector.
      ValueError: as `ti.compressed_grads` and `ti.projected_curvature` (e.g. `damping` <= 0).

    Cost: one projected-gradient pass over each set, O(n_train·dim²) for Ĉ, O(dim³) for its
    inverse, O(n_test·n_train·dim) for the scores. Memory: n_train·dim projected gradients.

    Examples:
      >>> proj = ti.projector(params, k_in=4, k_out=2, generator=torch.Generator().manual_seed(0))
      >>> scores = ti.compressed_influence(loss, params, train, test, projector=proj, damping=0.1)
      >>> scores.shape
      torch.Size([5, 60])
      >>> Gz, Gt = (ti.compressed_grads(loss, params, d, projector=proj) for d in (train, test))
      >>> C = Gz.T @ Gz / 60 + 0.1 * torch.eye(proj.dim, dtype=Gz.dtype)
      >>> torch.allclose(scores, torch.linalg.solve(C, Gt.T).T @ Gz.T / 60)
      True
    """
    Gz = compressed_grads(loss, params, train, projector=projector, chunk_size=chunk_size)
    Gt = compressed_grads(loss, params, test, projector=projector, chunk_size=chunk_size)
    curvature = projected_curvature(Gz, damping=damping, blocks=projector if per_layer else None)
    return curvature.query(Gt) @ Gz.to(curvature.inverses[0].dtype).mT
