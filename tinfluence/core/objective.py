"""Per-example losses and the training objective R(θ) = mean loss + l2/2·‖θ‖²."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import checks
from . import collectives as dd
from . import data as D
from . import tree as tr

__all__ = ["objective", "Objective", "per_example", "example_loss"]

LossFn = Callable  # (params, batch) -> Tensor[B], one value per example


def per_example(loss: LossFn, params, batch, *, where: str = "ti", name: str = "loss") -> torch.Tensor:
    """`loss(params, batch)`, checked to be a floating tensor of shape [B] (B = examples in `batch`).

    `where` is the public call and `name` the argument (`loss`, `measure`, ...) named when
    the output is not one floating value per example. An integer output (e.g. a count of
    errors) is refused: it has no gradient, and every score built on it would be 0.
    Cost: metadata only, so it also runs under vmap and torch.compile.
    """
    out = loss(params, batch)
    b = D._count_examples(batch, name="batch", call=where)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (b,):
        got = f"shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise checks.ArgumentError(
            f"{where}: `{name}` must return one value per example, shape [{b}] (the leading axis of the batch); "
            f'it returned {got}. Use reduction="none" (e.g. F.cross_entropy(logits, y, reduction="none")) '
            "or return the per-example vector before .mean()."
        )
    if not out.is_floating_point():
        raise checks.ArgumentError(
            f"{where}: `{name}` must return floating values (a differentiable loss); it returned {out.dtype}, whose "
            f"gradient is zero everywhere. Return a floating loss, e.g. F.cross_entropy(..., reduction=\"none\"), "
            "not a count or an argmax comparison.")
    return out


def example_loss(loss: LossFn, *, where: str = "ti", name: str = "loss") -> Callable:
    """Returns `(params, example) -> 0-d tensor`: `loss` of ONE example (leaves without the
    example axis), evaluated as a batch of one and checked by `per_example`. The form that
    `vmap` over examples and `grad` per example take.
    """
    return lambda params, example: per_example(loss, params, D.batch_of_one(example), where=where, name=name)[0]


@dataclass(frozen=True)
class Objective:
    """R(θ) = (1/n) Σ_i loss(θ, z_i) + (l2/2)·‖θ‖², a pure function of the parameters.

    Calling it reduces the data chunk by chunk. `hvp`, `hessian` and the solvers read its
    fields to apply curvature chunk by chunk too, so memory stays bounded by `chunk_size`.

    With a process `group`, `data` is this rank's shard and n the GLOBAL number of
    examples: the value is all-reduced, and `ti.hvp` / `ti.hessian` all-reduce curvature.
    """

    loss: LossFn
    data: object
    l2: float
    chunk_size: int | None
    n: int
    group: object = None

    def data_term(self, params, chunk) -> torch.Tensor:
        """(1/n) Σ_{i in chunk} loss(θ, z_i): this chunk's share of the mean loss, 0-d."""
        return per_example(self.loss, params, chunk, where="ti.objective").sum() / self.n

    def regularizer(self, params) -> torch.Tensor:
        """(l2/2)·‖θ‖², 0-d."""
        return 0.5 * self.l2 * tr.sq_norm(params)

    def local_sum(self, params) -> torch.Tensor:
        """(1/n) Σ over this process's examples of loss(θ, z_i), 0-d (the whole mean loss without a group)."""
        return D._chunk_sum(lambda chunk: self.data_term(params, chunk), self.data, self.chunk_size, call="ti.objective")

    def __call__(self, params) -> torch.Tensor:
        """R(θ), a 0-d tensor.

        With a group the value is summed over ranks; its gradient is this rank's share
        (`ti.hvp` and `ti.hessian` reduce curvature themselves).
        """
        local = self.local_sum(params)
        if self.group is not None:
            local = local + (dd.all_reduce(local, self.group) - local).detach()
        return local + self.regularizer(params)


def objective(loss: LossFn, data, *, l2: float = 0.0, chunk_size: int | None = None, group=None) -> Objective:
    """Returns the training objective θ ↦ (1/n) Σ_i loss(θ, z_i) + (l2/2)·‖θ‖².

    Args:
      loss: `(params, batch) -> Tensor[B]`, one loss per example (reduction="none").
      data: the training set, a pytree of tensors with a common leading axis n.
      l2: weight decay coefficient λ₂ >= 0 (the ½ is included, so ∇ adds l2·θ).
      chunk_size: examples per chunk in every reduction (default 1024).
      group: a `torch.distributed` process group when `data` is this rank's shard
        (`ti.distributed.shard`); n is then the global number of examples (one
        all-reduce of the shard sizes, here) and values and curvature are all-reduced.

    Returns:
      An `Objective`: call it on parameters for a 0-d tensor; pass it to `ti.hvp`,
      `ti.hessian` or `ti.cg` for curvature.
    """
    l2 = checks.number("ti.objective", "l2", l2, minimum=0.0)
    checks.chunk_size("ti.objective", chunk_size)
    checks.function("ti.objective", "loss", loss, "(params, batch) -> Tensor[B]")
    n = dd.global_size(D._count_examples(data, name="data", call="ti.objective"), group)
    return Objective(loss=loss, data=data, l2=float(l2), chunk_size=chunk_size, n=n, group=group)
