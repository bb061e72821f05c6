"""Exceptions for numerical failures and the small checks that build tinfluence's messages.

Every message starts with the public call (`ti.cg: ...`), names the argument, states what
was expected and what was got, and where there is one, the fix.
"""

from __future__ import annotations

import optree
import torch


class ConvergenceError(RuntimeError):
    """A solver missed its tolerance or met a breakdown; `.info` holds its diagnostics (a `ti.SolveInfo`
    from `ti.cg`, `ti.lissa` and `ti.direct`)."""

    def __init__(self, message: str, info=None):
        super().__init__(message)
        self.info = info


class DivergenceError(RuntimeError):
    """An iteration blew up (non-finite or exploding iterate, or no better than x = 0); `.info` holds its
    diagnostics (a `ti.SolveInfo` from `ti.lissa`)."""

    def __init__(self, message: str, info=None):
        super().__init__(message)
        self.info = info


def check_positive(where: str, name: str, value, *, allow_zero: bool = False) -> None:
    """Raises ValueError unless `value` > 0 (or >= 0 with `allow_zero`)."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ValueError(f"{where}: `{name}` must be {'>= 0' if allow_zero else '> 0'}; got {value}.")


def check_chunk_size(where: str, chunk_size) -> None:
    """Raises ValueError unless `chunk_size` is None or an int >= 1."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{where}: `chunk_size` must be None or an int >= 1; got {chunk_size!r}.")


def fork_generator(generator: torch.Generator) -> torch.Generator:
    """A new generator in `generator`'s state: it draws what `generator` would, and the caller's
    generator is not advanced, so the same call with the same generator gives the same numbers."""
    local = torch.Generator(device=generator.device)
    local.set_state(generator.get_state())
    return local


def check_params(where: str, params) -> None:
    """Parameters must be floating-point, finite tensors in a pytree."""
    leaves = optree.tree_flatten_with_path(params, namespace="")
    paths, values = leaves[0], leaves[1]
    if not values:
        raise ValueError(f"{where}: `params` has no tensors; expected a dict of parameter tensors.")
    for path, leaf in zip(paths, values):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{where}: `params` leaf {path} must be a tensor; got {type(leaf).__name__}.")
        if not leaf.is_floating_point():
            raise TypeError(f"{where}: `params` leaf {path} must be floating point; got {leaf.dtype}.")
        if not bool(torch.isfinite(leaf).all()):
            raise ValueError(f"{where}: `params` leaf {path} has non-finite values (nan or inf).")
