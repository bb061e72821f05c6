"""Per-example losses and the training objective R(θ) = mean loss + l2/2·‖θ‖²."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from . import checks
from . import collectives as dd
from . import data as D
from . import tree as tr
from .tree import PyTree

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["objective", "Objective", "per_example", "example_loss"]

LossFn = Callable  # (params, batch) -> Tensor[B], one value per example


def per_example(loss: LossFn, params, batch, *, where: str = "ti", name: str = "loss") -> torch.Tensor:
    """`loss(params, batch)`, checked to be a floating tensor of shape [B] (B = examples in `batch`).

    An integer output (e.g. a count of errors) is refused: it has no gradient, and every
    score built on it would be 0.

    Args:
      loss: `(params, batch) -> Tensor[B]`.
      params: the parameters handed to `loss`.
      batch: a data set of B examples.
      where: the public call named in the message (`"ti.influence"`).
      name: the argument `loss` is in that call (`"loss"`, `"measure"`, ...).

    Returns:
      `loss(params, batch)`, a floating tensor `[B]`.

    Raises:
      ArgumentError: the output is not a tensor of shape [B], or is not floating point.
      TypeError, ValueError: `batch` is not a data set (as `ti.num_examples`).

    Cost: one call of `loss`; the checks read metadata only, so it also runs under vmap
    and torch.compile.

    Examples:
      >>> from tinfluence.core.objective import per_example
      >>> per_example(loss, params, train, where="ti.influence").shape
      torch.Size([60])
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

    Args:
      loss: `(params, batch) -> Tensor[B]`.
      where: the public call named when `loss`'s output is wrong.
      name: the argument `loss` is in that call.

    Returns:
      `(params, example) -> 0-d tensor`; raises as `per_example` when called.

    Cost: each call is one call of `loss` on a batch of one.

    Examples:
      >>> from tinfluence.core.objective import example_loss
      >>> f = example_loss(loss, where="ti.grad_dot")
      >>> torch.allclose(torch.func.vmap(f, in_dims=(None, 0))(params, train), loss(params, train))
      True
    """
    return lambda params, example: per_example(loss, params, D.batch_of_one(example), where=where, name=name)[0]


@dataclass(frozen=True)
class Objective:
    """R(θ) = (1/n) Σ_i loss(θ, z_i) + (l2/2)·‖θ‖², a pure function of the parameters; built by `ti.objective`.

    Calling it reduces the data chunk by chunk. `hvp`, `hessian` and the solvers read its
    fields to apply curvature chunk by chunk too, so memory stays bounded by `chunk_size`.
    With a process `group`, `data` is this rank's shard and n the GLOBAL number of
    examples: the value is all-reduced, and `ti.hvp` / `ti.hessian` all-reduce curvature.

    Attributes:
      loss: `(params, batch) -> Tensor[B]`, the per-example loss.
      data: the training set (this rank's shard with a group).
      l2: the weight-decay coefficient.
      chunk_size: examples per chunk (None: 1024).
      n: the number of examples the mean is over (global with a group).
      group: the `torch.distributed` process group, or None.

    Examples:
      >>> R = ti.objective(loss, train, l2=1e-2)
      >>> (R.n, R.l2)
      (60, 0.01)
    """

    loss: LossFn
    data: object
    l2: float
    chunk_size: int | None
    n: int
    group: ProcessGroup | None = None

    def data_term(self, params: PyTree, chunk: PyTree) -> torch.Tensor:
        """(1/n) Σ_{i in chunk} loss(θ, z_i): this chunk's share of the mean loss, a 0-d tensor.

        Args:
          params: the parameters.
          chunk: a data set, part of `data`.
        """
        return per_example(self.loss, params, chunk, where="ti.objective").sum() / self.n

    def regularizer(self, params: PyTree) -> torch.Tensor:
        """(l2/2)·‖θ‖² of the parameters `params`, a 0-d tensor."""
        return 0.5 * self.l2 * tr.sq_norm(params)

    def local_sum(self, params: PyTree) -> torch.Tensor:
        """(1/n) Σ over this process's examples of loss(θ, z_i) at `params`, a 0-d tensor (the whole mean loss
        without a group); O(n) loss evaluations, `chunk_size` at a time.
        """
        return D._chunk_sum(lambda chunk: self.data_term(params, chunk), self.data, self.chunk_size, call="ti.objective")

    def __call__(self, params: PyTree) -> torch.Tensor:
        """R(θ) at `params`, a 0-d tensor.

        With a group the value is summed over ranks; its gradient is this rank's share
        (`ti.hvp` and `ti.hessian` reduce curvature themselves).
        """
        local = self.local_sum(params)
        if self.group is not None:
            local = local + (dd.all_reduce(local, self.group) - local).detach()
        return local + self.regularizer(params)


def objective(loss: LossFn, data: PyTree, *, l2: float = 0.0, chunk_size: int | None = None,
              group: ProcessGroup | None = None) -> Objective:
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
      An `Objective`: call it on parameters for a 0-d tensor (differentiable, in the
      dtype of the loss); pass it to `ti.hvp` or `ti.hessian` for curvature (whose
      operators `ti.cg` and `ti.direct` take).

    Raises:
      ArgumentError: `l2` is not a finite number >= 0, `chunk_size` is neither None nor an
        int >= 1, or `loss` is not callable.
      TypeError, ValueError: `data` is not a data set (as `ti.num_examples`).

    Cost: metadata only here (with a group, one all-reduce of the shard sizes); each
    evaluation is n loss evaluations, `chunk_size` examples at a time (memory of one chunk).

    Examples:
      >>> R = ti.objective(loss, train, l2=1e-2)
      >>> expected = loss(params, train).mean() + 0.5 * 1e-2 * ti.tree.sq_norm(params)
      >>> torch.allclose(R(params), expected)
      True
    """
    l2 = checks.number("ti.objective", "l2", l2, minimum=0.0)
    checks.chunk_size("ti.objective", chunk_size)
    checks.function("ti.objective", "loss", loss, "(params, batch) -> Tensor[B]")
    n = dd.global_size(D._count_examples(data, name="data", call="ti.objective"), group)
    return Objective(loss=loss, data=data, l2=float(l2), chunk_size=chunk_size, n=n, group=group)
