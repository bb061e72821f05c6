"""Exceptions for numerical failures, and the historical names of the argument checks (now `checks`).

Every message starts with the public call (`ti.cg: ...`), names the argument, states what
was expected and what was got, and where there is one, the fix.
"""

from __future__ import annotations

import torch

from . import checks
from .checks import ArgumentError  # noqa: F401  (re-exported)


class ConvergenceError(RuntimeError):
    """A solver missed its tolerance or met a breakdown; `.info` holds its diagnostics (a `ti.SolveInfo`
    from `ti.cg`, `ti.lissa` and `ti.direct`).
    """

    def __init__(self, message: str, info=None):
        super().__init__(message)
        self.info = info


class DivergenceError(RuntimeError):
    """An iteration blew up (non-finite or exploding iterate, or no better than x = 0); `.info` holds its
    diagnostics (a `ti.SolveInfo` from `ti.lissa`).
    """

    def __init__(self, message: str, info=None):
        super().__init__(message)
        self.info = info


def check_positive(where: str, name: str, value, *, allow_zero: bool = False) -> None:
    """Raises `ArgumentError` unless `value` is a finite number > 0 (>= 0 with `allow_zero`); `checks.number`."""
    checks.number(where, name, value, minimum=0.0, exclusive=not allow_zero)


def check_chunk_size(where: str, chunk_size) -> None:
    """Raises `ArgumentError` unless `chunk_size` is None or an int >= 1 (not a bool); `checks.chunk_size`."""
    checks.chunk_size(where, chunk_size)


def fork_generator(generator: torch.Generator) -> torch.Generator:
    """A new generator in `generator`'s state: it draws what `generator` would, and the caller's
    generator is not advanced, so the same call with the same generator gives the same numbers.
    """
    local = torch.Generator(device=generator.device)
    local.set_state(generator.get_state())
    return local


def check_params(where: str, params) -> None:
    """Parameters: a dict of finite floating tensors of one dtype and device; `checks.params`."""
    checks.params(where, params)
