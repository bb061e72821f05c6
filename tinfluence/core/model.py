"""From `nn.Module` to a pure function of a parameter dict."""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from .errors import check_params

__all__ = ["functionalize"]

_STOCHASTIC_IN_TRAINING = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def functionalize(module: nn.Module, trainable: Callable[[str, torch.Tensor], bool] | None = None):
    """Returns `(apply, params)`: the module as a pure function of a parameter dict.

    `apply(params, *args, **kwargs)` runs `module.forward(*args, **kwargs)` with the given
    parameters through `torch.func.functional_call`. Buffers (e.g. BatchNorm running
    statistics) and the parameters that `trainable` leaves out are copied once and
    closed over inside `apply`, frozen. Tied (shared) parameters appear once in `params`
    and stay tied.

    The module is never changed: `params` are detached copies, its training flag and
    its tensors stay as they were. `apply` runs the module in the mode it is in; call
    `module.eval()` first so that dropout and batch norm act per example (a warning says
    so when such layers are in training mode).

    Args:
      module: any `nn.Module`, with positional, keyword or dict inputs.
      trainable: `(name, parameter) -> bool` choosing the attributed parameters, e.g.
        `lambda name, p: name.startswith("fc.")`; default all parameters.

    Returns:
      apply: `(params, *args, **kwargs) -> module output`, pure.
      params: `dict[str, Tensor]` of the chosen parameters (detached copies, same dtype
        and device as the module's).

    Raises:
      TypeError: `module` is not an `nn.Module`, or a chosen parameter is not floating point.
      ValueError: `trainable` selects no parameter, or a parameter is not finite.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"ti.functionalize: `module` must be a torch.nn.Module; got {type(module).__name__}.")
    named = dict(module.named_parameters())
    if not named:
        raise ValueError(f"ti.functionalize: `module` ({type(module).__name__}) has no parameters.")
    chosen = named if trainable is None else {k: p for k, p in named.items() if trainable(k, p)}
    if not chosen:
        raise ValueError(
            f"ti.functionalize: `trainable` selected no parameter of {type(module).__name__}; "
            f"its parameters are {', '.join(repr(k) for k in named)}."
        )
    if module.training and any(isinstance(m, _STOCHASTIC_IN_TRAINING) for m in module.modules()):
        warnings.warn(
            f"ti.functionalize: {type(module).__name__} is in training mode and has dropout or batch-norm "
            "layers, so its outputs are random or depend on the whole batch; call module.eval() first.",
            stacklevel=2,
        )
    params = {k: p.detach().clone() for k, p in chosen.items()}
    check_params("ti.functionalize", params)
    frozen = {k: p.detach().clone() for k, p in named.items() if k not in chosen}
    frozen.update({k: b.detach().clone() for k, b in module.named_buffers()})

    def apply(params, *args, **kwargs):
        return functional_call(module, (params, frozen), args, kwargs, tie_weights=True, strict=False)

    apply.__doc__ = f"Pure forward of {type(module).__name__}: apply(params, *args, **kwargs)."
    return apply, params
