"""Independent references, public so that users can check tinfluence's numbers themselves.

They are deliberately slow and simple: a Python loop over examples with plain
`torch.autograd`, sharing no code path with the vectorized kernels they check.
"""

from __future__ import annotations

from typing import Callable

import torch

from .core import data as D
from .core import tree as tr

__all__ = ["loop_grads"]


def loop_grads(loss: Callable, params: dict, data) -> dict:
    """Per-example gradients by one `torch.autograd.grad` call per example.

    A reference for `ti.per_example_grads`, sharing none of its code path.

    Args:
      loss: `(params, batch) -> Tensor[B]`, one loss per example.
      params: `dict[str, Tensor]`, not modified.
      data: a pytree of tensors with leading axis n.

    Returns:
      A dict like `params` with leaves `[n, *param.shape]`; a parameter that an example's loss
      does not touch gets zeros.

    Cost: n backward passes, one per example (a Python loop: slow by design).

    Examples:
      >>> from tinfluence.testing import loop_grads
      >>> some = ti.take(train, torch.arange(4))
      >>> G = loop_grads(loss, params, some)
      >>> G["weight"].shape
      torch.Size([4, 3, 8])
      >>> torch.allclose(G["weight"], ti.per_example_grads(loss, params, some)["weight"])
      True
    """
    rows = []
    for i in range(D.num_examples(data)):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        example = D.take(data, slice(i, i + 1))
        grads = torch.autograd.grad(loss(leaves, example).sum(), list(leaves.values()), allow_unused=True)
        rows.append({k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)})
    return tr.stack(rows)
