"""Checkpoints saved along training, as the (params, lr) pairs that `ti.tracin` takes."""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import torch
from torch import nn

from ..core.model import functionalize

__all__ = ["load_checkpoints"]


def load_checkpoints(paths: Sequence, model: nn.Module, *, lrs, trainable: Callable | None = None) -> list:
    """Returns `[(params_t, lr_t), ...]` read from saved `state_dict`s, one pair per path.

    Each file is read with `torch.load(path, weights_only=True)` (no code is run) and must
    hold a state dict of `model` (`torch.save(model.state_dict(), path)`). Only the
    parameters that `trainable` selects are returned, with the names, dtypes and device of
    `ti.functionalize(model, trainable)`'s `params`, so the result plugs into the `apply`
    of that call; buffers and frozen parameters stay those of `model`. The module is never
    changed.

    Args:
      paths: file paths (str or PathLike), in training order.
      model: the `nn.Module` whose parameters were saved.
      lrs: the learning rate in force after each checkpoint: one number for all, or a
        sequence with one entry per path.
      trainable: `(name, parameter) -> bool`, as for `ti.functionalize`; default all.

    Returns:
      list of `(dict[str, Tensor], float)`, ready for `ti.tracin`.

    Raises:
      ValueError: no paths, a length mismatch between `paths` and `lrs`, a non-positive lr,
        or a file whose state dict lacks a selected parameter, has one of another shape, or
        holds names the model does not have.
      TypeError: a file that does not hold a dict of tensors.
    """
    where = "ti.load_checkpoints"
    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, Sequence) or not paths:
        raise ValueError(f"{where}: `paths` must be a non-empty list of file paths; got {paths!r}.")
    single = isinstance(lrs, (int, float)) or (isinstance(lrs, torch.Tensor) and lrs.dim() == 0)
    rates = [lrs] * len(paths) if single else list(lrs)
    if len(rates) != len(paths):
        raise ValueError(f"{where}: `lrs` must be one number or have one entry per path; got {len(rates)} for {len(paths)} paths.")
    for t, lr in enumerate(rates):
        if not (math.isfinite(float(lr)) and float(lr) > 0):
            raise ValueError(f"{where}: `lrs[{t}]` must be finite and > 0; got {lr}.")
    _, reference = functionalize(model, trainable)
    known = set(model.state_dict().keys())
    return [(_read(where, path, reference, known), float(lr)) for path, lr in zip(paths, rates)]


def _read(where: str, path, reference: dict, known: set) -> dict:
    """The selected parameters from one saved state dict, checked against `reference`."""
    state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TypeError(f"{where}: {os.fspath(path)!r} must hold a state dict (name -> tensor), as saved by "
                        f"torch.save(model.state_dict(), path); got {type(state).__name__}.")
    unknown = sorted(set(state) - known)
    missing = sorted(set(reference) - set(state))
    if unknown or missing:
        raise ValueError(f"{where}: {os.fspath(path)!r} does not match the model's names: "
                         f"missing {missing}, not in the model {unknown}. Was it saved from another model?")
    wrong = [f"{name!r}: saved {tuple(state[name].shape)}, model {tuple(ref.shape)}"
             for name, ref in reference.items() if state[name].shape != ref.shape]
    if wrong:
        raise ValueError(f"{where}: {os.fspath(path)!r} has parameters of other shapes than the model: {'; '.join(wrong)}.")
    return {name: state[name].to(dtype=ref.dtype, device=ref.device) for name, ref in reference.items()}
