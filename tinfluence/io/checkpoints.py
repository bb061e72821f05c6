"""Checkpoints saved along training, as the `ti.Checkpoint(params, lr, frozen)` that `ti.tracin` takes."""

from __future__ import annotations

import os
from typing import Callable, Sequence, cast

import torch
from torch import nn

from ..core import checks
from ..core.model import Checkpoint, functionalize

__all__ = ["load_checkpoints"]


def load_checkpoints(paths: Sequence, model: nn.Module, *, lrs: float | Sequence[float], trainable: Callable | None = None) -> list:
    """Returns `[ti.Checkpoint(params_t, lr_t, frozen_t), ...]` read from saved `state_dict`s, one per path.

    Each file is read with `torch.load(path, weights_only=True)` (no code is run) and must
    hold the complete state dict of `model` (`torch.save(model.state_dict(), path)`).
    `params_t` holds the parameters that `trainable` selects, with the names, dtypes and
    device of `ti.functionalize(model, trainable)`'s `params`; `frozen_t` holds every other
    parameter and every saved buffer of that checkpoint, so `ti.tracin` evaluates checkpoint t
    with its own complete state (frozen layers and batch-norm statistics as they were at t).
    The module is never changed.

    Args:
      paths: file paths (str or PathLike), in training order.
      model: the `nn.Module` whose state dicts were saved.
      lrs: the learning rate in force after each checkpoint: one number for all, or a
        sequence with one entry per path.
      trainable: `(name, parameter) -> bool`, as for `ti.functionalize`; default all.

    Returns:
      list of `ti.Checkpoint`: `(params, lr)` pairs that carry the rest of the state as `.frozen`, ready for `ti.tracin`.

    Raises:
      ValueError: no paths, a length mismatch between `paths` and `lrs`, or a file whose state
        dict lacks an entry of `model`'s, has one of another shape, or holds names the model
        does not have.
      ArgumentError: an lr that is not a number > 0.
      TypeError: a file that does not hold a dict of tensors.

    Cost: one `torch.load` per path; memory one full state dict per checkpoint.

    Examples:
      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "step0.pt")
      ...     torch.save(model.state_dict(), path)
      ...     checkpoints = ti.load_checkpoints([path], model, lrs=0.1, trainable=lambda name, p: name == "bias")
      >>> sorted(checkpoints[0].params), sorted(checkpoints[0].frozen), checkpoints[0].lr
      (['bias'], ['weight'], 0.1)
      >>> torch.equal(checkpoints[0].frozen["weight"], model.weight.detach())
      True
    """
    where = "ti.load_checkpoints"
    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, Sequence) or not paths:
        raise ValueError(f"{where}: `paths` must be a non-empty list of file paths; got {paths!r}.")
    if checks.is_real(lrs):
        rates = [checks.number(where, "lrs", lrs, minimum=0.0, exclusive=True)] * len(paths)
    elif isinstance(lrs, (str, bytes)) or not hasattr(lrs, "__len__"):
        raise checks.ArgumentError(f"{where}: `lrs` must be one number > 0 or a sequence of them, one per path; got "
                                   f"{checks.describe(lrs)}. Pass e.g. lrs=0.1 or lrs=[0.1] * len(paths).")
    else:
        rates = [checks.number(where, f"lrs[{t}]", lr, minimum=0.0, exclusive=True)   # a sequence: not a number
                 for t, lr in enumerate(cast(Sequence[float], lrs))]
    if len(rates) != len(paths):
        raise ValueError(f"{where}: `lrs` must be one number or have one entry per path; got {len(rates)} for {len(paths)} paths.")
    _, chosen = functionalize(model, trainable)
    own = model.state_dict()
    tied = _tied(model)
    rest = {k: v for k, v in own.items() if k not in chosen and k not in tied}
    out = []
    for path, lr in zip(paths, rates):
        state = _read(where, path, own)
        out.append(Checkpoint(_cast(state, chosen), float(lr), _cast(state, rest)))
    return out


def _tied(model: nn.Module) -> set:
    """State-dict names that alias a parameter listed under another name (tied weights)."""
    return {k for k, _ in model.named_parameters(remove_duplicate=False)} - dict(model.named_parameters()).keys()


def _cast(state: dict, like: dict) -> dict:
    """The entries of `state` named in `like`, with their dtype and device."""
    return {name: state[name].to(dtype=ref.dtype, device=ref.device) for name, ref in like.items()}


def _read(where: str, path, own: dict) -> dict:
    """One saved state dict, checked to hold exactly the names and shapes of the model's `own`."""
    state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TypeError(f"{where}: {os.fspath(path)!r} must hold a state dict (name -> tensor), as saved by "
                        f"torch.save(model.state_dict(), path); got {type(state).__name__}.")
    unknown = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    if unknown or missing:
        raise ValueError(f"{where}: {os.fspath(path)!r} does not match the model's names: "
                         f"missing {missing}, not in the model {unknown}. Was it saved from another model? "
                         "Save the complete torch.save(model.state_dict(), path): every checkpoint is evaluated "
                         "with its own complete state (frozen parameters and buffers included).")
    wrong = [f"{name!r}: saved {tuple(state[name].shape)}, model {tuple(ref.shape)}"
             for name, ref in own.items() if state[name].shape != ref.shape]
    if wrong:
        raise ValueError(f"{where}: {os.fspath(path)!r} has parameters of other shapes than the model: {'; '.join(wrong)}.")
    return state
