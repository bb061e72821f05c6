"""TracIn: gradient dot products summed over checkpoints saved along training (Pruthi et al. 2020)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Callable, Sequence

import optree
import torch

from ..core import checks
from ..core import collectives as dd
from ..core import tree as tr
from ..core.model import Checkpoint
from ..core.scoring import check_factored, check_inputs, grad_products, measure_or_loss, over_train, stacked_grads
from ..core.tree import PyTree

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["tracin", "tracin_self_influence"]


def _check_checkpoints(where: str, checkpoints) -> list[Checkpoint]:
    """The checkpoints as `ti.Checkpoint(params, float lr, frozen dict)`, all with the names and shapes of the first.

    A `(params, lr)` pair or `frozen=None` gets `frozen={}` (the state closed over by `apply`).
    """
    if isinstance(checkpoints, dict) or not isinstance(checkpoints, (list, tuple)) or not checkpoints:
        raise ValueError(
            f"{where}: `checkpoints` must be a non-empty list of (params, lr) pairs, e.g. [(params_t, 0.1), ...]; "
            f"got {type(checkpoints).__name__}{' (empty)' if isinstance(checkpoints, (list, tuple)) else ''}.")
    out = [_check_checkpoint(where, t, item) for t, item in enumerate(checkpoints)]
    first = out[0]
    first_frozen = first.frozen or {}
    shapes = [tuple(leaf.shape) for leaf in optree.tree_leaves(first.params, namespace="")]
    for t, ckpt in enumerate(out[1:], start=1):
        if optree.tree_structure(ckpt.params, namespace="") != optree.tree_structure(first.params, namespace="") or \
                [tuple(leaf.shape) for leaf in optree.tree_leaves(ckpt.params, namespace="")] != shapes:
            raise ValueError(f"{where}: checkpoint {t} does not have the parameter names and shapes of checkpoint 0; "
                             "every checkpoint must hold the same parameters.")
        frozen = ckpt.frozen or {}
        if frozen.keys() != first_frozen.keys():
            raise ValueError(f"{where}: checkpoint {t} does not have the frozen names of checkpoint 0 "
                             f"(differing: {sorted(frozen.keys() ^ first_frozen.keys())}); every checkpoint "
                             "must hold the same state, as ti.load_checkpoints returns it.")
    return out


def _check_checkpoint(where: str, t: int, item) -> Checkpoint:
    """One checkpoint checked: params valid, lr finite and > 0, frozen a dict of tensors disjoint from params."""
    if not isinstance(item, (list, tuple)) or len(item) not in (2, 3):
        got = f"{type(item).__name__} of length {len(item)}" if isinstance(item, (list, tuple)) else type(item).__name__
        raise ValueError(f"{where}: `checkpoints[{t}]` must be a (params, lr) pair or a ti.Checkpoint(params, lr, frozen); "
                         f"got {got}.")
    ckpt = item if isinstance(item, Checkpoint) else Checkpoint(*item)
    params, lr, frozen = ckpt.params, ckpt.lr, ckpt.frozen
    checks.params(f"{where}: checkpoint {t}", params)
    lr = checks.number(where, f"checkpoints[{t}] lr", lr, minimum=0.0, exclusive=True,
                       hint="Give each checkpoint the learning rate in force after it, e.g. (params_t, 0.1).")
    frozen = {} if frozen is None else frozen
    if not isinstance(frozen, Mapping) or not all(isinstance(v, torch.Tensor) for v in frozen.values()):
        raise TypeError(f"{where}: the `frozen` of checkpoint {t} must be a dict name -> tensor (the state outside "
                        f"`params`, as ti.load_checkpoints returns it) or None; got {type(frozen).__name__}.")
    if frozen and not isinstance(params, Mapping):
        raise TypeError(f"{where}: the `params` of checkpoint {t} must be a dict when it has `frozen` state; "
                        f"got {type(params).__name__}.")
    both = sorted(frozen.keys() & params.keys()) if frozen else []
    if both:
        raise ValueError(f"{where}: checkpoint {t} has names both in `params` and in `frozen`: {both}; a name is "
                         "either differentiated (params) or held fixed (frozen).")
    return Checkpoint(params, lr, dict(frozen))


def _lr_weighted_sum(ckpts: list[Checkpoint], term: Callable[[Checkpoint], torch.Tensor]) -> torch.Tensor:
    """`Σ_t lr_t · term(checkpoint t)`, accumulated one checkpoint at a time (`ckpts` is non-empty)."""
    first, *rest = ckpts
    total = first.lr * term(first)
    for ckpt in rest:
        total = total + ckpt.lr * term(ckpt)
    return total


def _replicated(ckpts: list) -> list:
    """What every rank must hold alike of the checkpoints: `(params, lr, frozen)` each."""
    return [(ckpt.params, ckpt.lr, ckpt.frozen) for ckpt in ckpts]


def _at(loss: Callable, frozen: dict | None) -> Callable:
    """`(p, batch) -> loss({**frozen, **p}, batch)`: the loss at a checkpoint's full state, a function of `p` only."""
    if not frozen:
        return loss
    return lambda p, batch: loss({**frozen, **p}, batch)


def _projection(params, dim: int, generator: torch.Generator) -> Callable:
    """Returns `G -> [c, dim]`: a Gaussian random projection, entries N(0, 1/dim), drawn once.

    One `[numel, dim]` block per parameter leaf, in optree order, from a copy of
    `generator` (not advanced), so E[proj(g)·proj(h)] = ⟨g, h⟩ exactly (unbiased).
    """
    local = tr.fork_generator(generator)
    blocks = [
        torch.randn(leaf.numel(), dim, generator=local, dtype=leaf.dtype, device=generator.device).to(leaf.device) / math.sqrt(dim)
        for leaf in optree.tree_leaves(params, namespace="")
    ]

    def project(G):
        leaves = optree.tree_leaves(G, namespace="")
        return sum(leaf.reshape(leaf.shape[0], -1) @ block for leaf, block in zip(leaves, blocks))

    return project


def tracin(loss: Callable, checkpoints: Sequence[tuple], train: PyTree, test: PyTree, *, measure: Callable | None = None,
           projection_dim: int | None = None, generator: torch.Generator | None = None,
           chunk_size: int | None = None, group: ProcessGroup | None = None, factored: bool = False) -> torch.Tensor:
    """Returns TracIn scores Σ_t lr_t ⟨∇m(θ_t, z_test), ∇ℓ(θ_t, z)⟩, `[n_test, n_train]`.

    The TracInCP form, m = `measure` (default `loss`), lr_t the learning rate in force after
    checkpoint θ_t. Sign: positive = proponent (helpful): a gradient step on z lowers m to
    first order, so removing z would raise it; TracIn's own sign is the same. Scale: for
    full-batch gradient descent with a checkpoint at every step, `tracin / n` is the
    first-order change of m that z's share of the steps caused, ignoring how removing z
    changes the later trajectory; compare rankings. With `projection_dim=d` every gradient
    is multiplied by one shared Gaussian N(0, 1/d) matrix: each product is an unbiased
    estimate with error about ‖∇m‖‖∇ℓ‖/√d.

    Args:
      loss: `(params, batch) -> Tensor[B]`, the per-example training loss ℓ.
      checkpoints: list of `(params_t, lr_t)` pairs or `ti.Checkpoint(params_t, lr_t, frozen_t)`
        (as `ti.load_checkpoints` returns them), lr_t > 0. `loss` and `measure` are evaluated
        at `{**frozen_t, **p}` with gradients over `p` only.
      train: training set, leading axis n_train.
      test: test set, leading axis n_test; shaped like `train` unless a `measure` reads it.
      measure: `(params, batch) -> Tensor[B]`, the test quantity m; default `loss`.
      projection_dim: d for the random-projection variant; None for exact products.
      generator: required with `projection_dim`; its state is copied, not advanced.
      chunk_size: examples per vectorized backward (default 1024).
      group: a process group when `train` is this rank's contiguous shard (as `ti.grad_dot`;
        the checkpoints, `test` and `generator` are checked alike on every rank).
      factored: linear, conv and embedding weights' products from their factors (as `ti.grad_dot`);
        not with `projection_dim`.

    Returns:
      `[n_test, n_train]` tensor, dtype and device of the parameters; positive = helpful.

    Raises:
      ValueError: empty or inconsistent `checkpoints`, lr <= 0, `projection_dim` < 1, a
        `generator` missing with (or given without) `projection_dim`, `projection_dim` with
        `factored=True`; bad data, loss or measure (as `ti.grad_dot`).
      TypeError: a non-callable `loss` or `measure`; a non-bool `factored`; `params_t` not a
        dict with `factored=True` or with `frozen_t`; `frozen_t` not a dict of tensors.

    Cost:
      Per checkpoint what `ti.grad_dot` costs, O(n_test·n_train·P) time and
      O((n_test + chunk_size)·P) memory; projected, O(n_test·d + chunk_size·P + P·d) memory.

    Examples:
      >>> ckpts = [(params, 0.1), (ti.tree.scale(0.5, params), 0.05)]
      >>> scores = ti.tracin(loss, ckpts, train, test)
      >>> scores.shape
      torch.Size([5, 60])
      >>> torch.allclose(ti.tracin(loss, ckpts[:1], train, test), 0.1 * ti.grad_dot(loss, params, train, test))
      True

    References:
      Pruthi, Liu, Kale & Sundararajan, Estimating Training Data Influence by Tracing
      Gradient Descent, NeurIPS 2020.
    """
    where = "ti.tracin"
    ckpts = _check_checkpoints(where, checkpoints)
    check_inputs(where, loss, ckpts[0].params, train, test, chunk_size=chunk_size, alike=measure is None)
    check_factored(where, factored)
    m, name = measure_or_loss(where, loss, measure)
    if factored and projection_dim is not None:
        raise ValueError(f"{where}: `projection_dim` needs the per-example gradients formed, which `factored=True` avoids; "
                         "use factored=True without projection_dim (exact, and cheap for linear layers) or "
                         "projection_dim with factored=False.")
    project = _projection_or_identity(where, ckpts[0].params, projection_dim, generator)
    drawn = {} if generator is None else {"generator": generator.get_state()}
    dd._check_replicated(where, group, checkpoints=_replicated(ckpts), test=test, **drawn)
    pairwise, _ = grad_products(factored)

    def scores(ckpt: Checkpoint) -> torch.Tensor:
        U = stacked_grads(_at(m, ckpt.frozen), ckpt.params, test, chunk_size=chunk_size, transform=project,
                          where=where, factored=factored, name=name)  # [n_test, ...]
        return over_train(lambda G: pairwise(U, project(G)), _at(loss, ckpt.frozen), ckpt.params, train,
                          chunk_size=chunk_size, where=where, group=group, factored=factored)

    return _lr_weighted_sum(ckpts, scores)


def _projection_or_identity(where: str, params, projection_dim, generator) -> Callable:
    if projection_dim is None:
        if generator is not None:
            raise ValueError(f"{where}: `generator` is only used with `projection_dim`; pass projection_dim=... or drop generator.")
        return lambda G: G
    projection_dim = checks.integer(where, "projection_dim", projection_dim, minimum=1,
                                    hint="Pass e.g. projection_dim=512, or None for exact products.")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"{where}: `projection_dim` needs an explicit `generator`, "
                         f"e.g. generator=torch.Generator().manual_seed(0); got {type(generator).__name__}.")
    return _projection(params, projection_dim, generator)


def tracin_self_influence(loss: Callable, checkpoints: Sequence[tuple], train: PyTree, *, chunk_size: int | None = None,
                          group: ProcessGroup | None = None, factored: bool = False) -> torch.Tensor:
    """Returns TracIn self-influence Σ_t lr_t ‖∇ℓ(z; θ_t)‖² for every training example, `[n_train]`.

    The diagonal of `ti.tracin(loss, checkpoints, train, train)`, without the n² matrix.
    Large values flag examples the model keeps having to fit (mislabeled or atypical).
    Always >= 0; its scale is that of `ti.tracin` (see there).

    Args:
      loss: `(params, batch) -> Tensor[B]`, one loss per example.
      checkpoints: list of `(params_t, lr_t)` or `ti.Checkpoint(params_t, lr_t, frozen_t)`,
        as for `ti.tracin`.
      train: training set, leading axis n_train.
      chunk_size: examples per vectorized backward (default 1024).
      group: a `torch.distributed` process group when `train` is this rank's contiguous shard
        (`ti.distributed.shard`); the checkpoints must be the same on every rank (checked),
        and every rank returns the single-process result, gathered in rank order.
      factored: True computes linear, conv and embedding weights' squared gradient norms from their
        factors
        (`ti.factored.sq_norms`, n·T²·(in + out) per layer) without forming per-example
        gradients; the same result to round-off.

    Returns:
      `[n_train]` tensor, dtype and device of the parameters.

    Raises:
      ValueError: as `ti.tracin`.
      TypeError: as `ti.tracin`.

    Cost:
      One per-example gradient pass over train per checkpoint; O(chunk_size·P) memory
      (factored: O(chunk_size·T·(in + out)) per linear layer).

    Examples:
      >>> ckpts = [(params, 0.1), (ti.tree.scale(0.5, params), 0.05)]
      >>> own = ti.tracin_self_influence(loss, ckpts, train)
      >>> torch.allclose(own, ti.tracin(loss, ckpts, train, train).diagonal())
      True
    """
    where = "ti.tracin_self_influence"
    ckpts = _check_checkpoints(where, checkpoints)
    check_inputs(where, loss, ckpts[0].params, train, chunk_size=chunk_size)
    check_factored(where, factored)
    dd._check_replicated(where, group, checkpoints=_replicated(ckpts))
    _, sq_norms = grad_products(factored)
    return _lr_weighted_sum(ckpts, lambda ckpt: over_train(sq_norms, _at(loss, ckpt.frozen), ckpt.params, train,
                                                           chunk_size=chunk_size, where=where, group=group,
                                                           factored=factored))
