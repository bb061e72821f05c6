"""Per-token influence for sequence models.

Which training sequences moved each query token's loss, and which training tokens moved a query's loss.

A sequence model's loss is a sum of token losses, `ℓ(z) = Σ_t ℓ_t(z)` (any masking and weighting
inside `ℓ_t`); gradients are linear, so `∇ℓ(z) = Σ_t ∇ℓ_t(z)` and every per-token score sums over
its token axis to the per-sequence score. `token_grads` computes the projected gradient of every
token's loss at once: inside the vmap over sequences, `jacrev` over the T token losses (a vmap of
T backward passes through one forward), with linear layers captured as factors, so the per-token
gradient of a weight is `Σ_s (P_out g_s^{(t)})(P_in a_s)ᵀ` and is never formed. No Python loop
runs over tokens or sequences.

Scores carry the sign and scale of `ti.compressed_influence`: `(1/n) ĝ_qᵀ (Ĉ + λI)⁻¹ ĝ_z`,
positive = helpful (removing the training sequence, or its token, would raise the query loss);
Ĉ is the covariance of the n training SEQUENCES' projected gradients.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..core import checks
from ..core import data as D
from ..core.tree import PyTree
from .compressed import ProjectedCurvature, Projector, compressed_kernel

__all__ = ["token_grads", "query_token_influence", "train_token_influence"]


def token_grads(token_loss: Callable, params: dict, data: PyTree, *, projector: Projector,
                chunk_size: int | None = None) -> torch.Tensor:
    """Returns the projected gradient of every token's loss, `[n, T, projector.dim]`.

    `token_grads(...).sum(1)` equals `ti.compressed_grads` of the sequence loss
    `lambda p, b: token_loss(p, b).sum(-1)` to round-off.

    Args:
      token_loss: `(params, batch) -> Tensor[B, T]`, one loss per sequence and position (0 where
        masked), e.g. next-token cross-entropy times the attention mask.
      params: `dict[str, Tensor]`.
      data: a dict batch (or any pytree) with leading axis n, e.g. `{"input_ids", "attention_mask"}`.
      projector: `ti.projector(params, ...)`, the one the training store was written with.
      chunk_size: sequences per vectorized backward (default 1024; memory grows with chunk·T·dim).

    Returns:
      `[n, T, dim]`, dtype and device of the parameters.

    Raises:
      ValueError: `token_loss` not `[B, T]`; as `ti.compressed_grads`.
      TypeError: as `ti.compressed_grads`.
      ArgumentError: a bad `chunk_size`.

    Cost: per chunk, T backward passes batched by vmap, and O(T²·(k_out·k_in + k_out·out) +
    T·k_in·in) per sequence and linear layer for the projections; memory O(chunk·T·dim).

    Examples:
      >>> x, y = ti.take(train, torch.arange(12))
      >>> seqs = (x.reshape(4, 3, 8), y.reshape(4, 3))                     # 4 sequences of 3 tokens
      >>> token_loss = lambda p, b: F.cross_entropy(apply(p, b[0]).mT, b[1], reduction="none")   # [B, 3]
      >>> seq_loss = lambda p, b: token_loss(p, b).sum(-1)
      >>> proj = ti.projector(params, k_in=4, k_out=2, generator=torch.Generator().manual_seed(0))
      >>> G = ti.token_grads(token_loss, params, seqs, projector=proj)
      >>> G.shape
      torch.Size([4, 3, 16])
      >>> torch.allclose(G.sum(1), ti.compressed_grads(seq_loss, params, seqs, projector=proj))
      True
    """
    where = "ti.token_grads"
    checks.chunk_size(where, chunk_size)
    D._count_examples(data, name="data", call=where)
    kernel = compressed_kernel(token_loss, projector, per_token=True, where=where)
    return D.chunk_cat(lambda chunk: kernel(params, chunk), data, chunk_size)


def _check_curvature(where: str, curvature) -> None:
    if not isinstance(curvature, ProjectedCurvature):
        raise TypeError(f"{where}: `curvature` must be a ti.ProjectedCurvature (ti.projected_curvature of the training "
                        f"gradients); got {type(curvature).__name__}.")


def query_token_influence(token_loss: Callable, params: dict, queries: PyTree, train: PyTree, *, projector: Projector,
                          curvature: ProjectedCurvature, chunk_size: int | None = None,
                          progress: bool = False) -> torch.Tensor:
    """Returns the influence of each training sequence on each query token's loss, `[n_query, T, n_train]`.

    `[q, t, z]` estimates the change of query q's loss at position t when training sequence z is
    removed; summed over t it is the per-sequence score of `ti.compressed_influence` (with the
    sequence loss `token_loss(...).sum(-1)`). Masked positions score 0.

    Args:
      token_loss: `(params, batch) -> Tensor[B, T]`, as for `ti.token_grads`.
      params: `dict[str, Tensor]`.
      queries: query sequences (dict batch), leading axis n_query.
      train: the projected training gradients: a `ti.io.GradientStore`, or a tensor `[n_train, dim]`.
      projector: the projector `train` was computed with.
      curvature: `ti.projected_curvature(train, damping=...)`.
      chunk_size: query sequences per vectorized backward.
      progress: a tqdm bar over the store's chunks.

    Returns:
      `[n_query, T, n_train]`, dtype of the curvature (at least float32); positive = helpful.

    Raises:
      TypeError: `curvature` not a `ti.ProjectedCurvature`; as `ti.token_grads`.
      ValueError: as `ti.token_grads`.

    Cost: one per-token gradient pass over the queries, then one `[n_query·T, dim] × [dim, n_train]`
    product, O(n_query·T·dim·n_train) (chunk by chunk for a store).

    Examples:
      >>> x, y = ti.take(train, torch.arange(12))
      >>> seqs = (x.reshape(4, 3, 8), y.reshape(4, 3))                     # 4 sequences of 3 tokens
      >>> token_loss = lambda p, b: F.cross_entropy(apply(p, b[0]).mT, b[1], reduction="none")   # [B, 3]
      >>> seq_loss = lambda p, b: token_loss(p, b).sum(-1)
      >>> proj = ti.projector(params, k_in=4, k_out=2, generator=torch.Generator().manual_seed(0))
      >>> Gz = ti.compressed_grads(seq_loss, params, seqs, projector=proj)
      >>> curv = ti.projected_curvature(Gz, damping=0.1)
      >>> scores = ti.query_token_influence(token_loss, params, seqs, Gz, projector=proj, curvature=curv)
      >>> scores.shape
      torch.Size([4, 3, 4])
      >>> per_sequence = ti.compressed_influence(seq_loss, params, seqs, seqs, projector=proj, damping=0.1)
      >>> torch.allclose(scores.sum(1), per_sequence)
      True
    """
    where = "ti.query_token_influence"
    _check_curvature(where, curvature)
    Q = token_grads(token_loss, params, queries, projector=projector, chunk_size=chunk_size)
    if isinstance(train, torch.Tensor):
        return curvature.query(Q) @ train.to(curvature.inverses[0].dtype).mT
    return train.influence(Q, curvature, progress=progress)


def train_token_influence(token_loss: Callable, params: dict, train: PyTree, queries: PyTree, *, projector: Projector,
                          curvature: ProjectedCurvature, query_loss: Callable | None = None,
                          chunk_size: int | None = None) -> torch.Tensor:
    """Returns the influence of each training token on each query's loss, `[n_query, n_train, T]`.

    `[q, z, t]` is the share of training sequence z's score on query q carried by z's token loss
    at position t; summed over t it is the per-sequence score. Typically `train` is a few
    sequences retrieved from a store (`GradientStore.topk`), to see which of their tokens matter.

    Args:
      token_loss: `(params, batch) -> Tensor[B, T]`, as for `ti.token_grads`.
      params: `dict[str, Tensor]`.
      train: training sequences (dict batch), leading axis n_train.
      queries: query sequences, leading axis n_query.
      projector: the projector the curvature was computed with.
      curvature: `ti.projected_curvature` of the whole training set's projected gradients.
      query_loss: `(params, batch) -> Tensor[B]`, the query measure (e.g. one token's loss); default
        `token_loss(...).sum(-1)`, the query sequence's loss.
      chunk_size: training sequences per vectorized backward.

    Returns:
      `[n_query, n_train, T]`, dtype of the curvature (at least float32); positive = helpful.

    Raises:
      TypeError: `curvature` not a `ti.ProjectedCurvature`; as `ti.token_grads`.
      ValueError: as `ti.token_grads`.
      ArgumentError: a bad `chunk_size`.

    Cost: one per-token gradient pass over `train` (chunk by chunk) and one gradient pass over
    the queries, then O(n_query·n_train·T·dim); memory n_query·n_train·T for the result and
    chunk·T·dim for the gradients.

    Examples:
      >>> x, y = ti.take(train, torch.arange(12))
      >>> seqs = (x.reshape(4, 3, 8), y.reshape(4, 3))                     # 4 sequences of 3 tokens
      >>> token_loss = lambda p, b: F.cross_entropy(apply(p, b[0]).mT, b[1], reduction="none")   # [B, 3]
      >>> seq_loss = lambda p, b: token_loss(p, b).sum(-1)
      >>> proj = ti.projector(params, k_in=4, k_out=2, generator=torch.Generator().manual_seed(0))
      >>> curv = ti.projected_curvature(ti.compressed_grads(seq_loss, params, seqs, projector=proj), damping=0.1)
      >>> scores = ti.train_token_influence(token_loss, params, seqs, seqs, projector=proj, curvature=curv)
      >>> scores.shape
      torch.Size([4, 4, 3])
      >>> per_sequence = ti.compressed_influence(seq_loss, params, seqs, seqs, projector=proj, damping=0.1)
      >>> torch.allclose(scores.sum(-1), per_sequence)
      True
    """
    where = "ti.train_token_influence"
    _check_curvature(where, curvature)
    checks.chunk_size(where, chunk_size)
    measure = query_loss or (lambda p, b: token_loss(p, b).sum(-1))
    query_kernel = compressed_kernel(measure, projector, where=where)
    Q = curvature.query(D.chunk_cat(lambda c: query_kernel(params, c), queries, chunk_size))   # [n_query, dim]
    kernel = compressed_kernel(token_loss, projector, per_token=True, where=where)
    D._count_examples(train, name="train", call=where)
    return D.chunk_cat(lambda c: torch.einsum("qd,ztd->qzt", Q, kernel(params, c).to(Q.dtype)), train, chunk_size, dim=1)
