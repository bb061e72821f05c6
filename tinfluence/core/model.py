"""From `nn.Module` to a pure function of a parameter dict."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call

from . import checks, hf

__all__ = ["functionalize", "Checkpoint"]

_STOCHASTIC_IN_TRAINING = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
_WHERE = "ti.functionalize: apply"
# What torch.func says when a layer in training mode runs under vmap or grad: dropout draws
# random numbers, batch norm updates its running statistics in place.
_TRAINING_MODE_MESSAGES = ("random operation", "mutate a captured Tensor", "more than 1 value per channel")


def functionalize(module: nn.Module,
                  trainable: Callable[[str, torch.Tensor], bool] | None = None) -> tuple[Callable, dict[str, torch.Tensor]]:
    """Returns `(apply, params)`: the module as a pure function of a parameter dict.

    `apply(params, *args, **kwargs)` runs `module.forward(*args, **kwargs)` with the given
    parameters through `torch.func.functional_call`. Buffers and the parameters that
    `trainable` leaves out are copied once and closed over, frozen; tied parameters appear
    once in `params` and stay tied. `apply` is strict: `params` must hold every key of the
    returned `params` with its shape, and may also hold frozen parameters and buffers by
    `state_dict` name, which override the closed-over copies for that call only (how one
    `apply` evaluates any saved checkpoint). The module itself is never changed. Call
    `module.eval()` first: dropout and batch norm in training mode cannot run per example
    (a warning says so here, and `apply` raises saying so under torch.func). A Hugging Face
    model with "sdpa" attention runs as a vmap-safe copy sharing its tensors. The design of
    each point is in docs/design.md, "Model state and checkpoints".

    Args:
      module: any `nn.Module`, with positional, keyword or dict inputs.
      trainable: `(name, parameter) -> bool` choosing the attributed parameters, e.g.
        `lambda name, p: name.startswith("fc.")`; default all parameters.

    Returns:
      apply: `(params, *args, **kwargs) -> module output`, pure. Raises TypeError when
        `params` is not a dict of tensors, ValueError on missing, unknown or misshapen
        entries, RuntimeError (saying to call `model.eval()`) when dropout or batch norm in
        training mode fails under a torch.func transform.
      params: `dict[str, Tensor]` of the chosen parameters (detached copies, same dtype
        and device as the module's).

    Raises:
      TypeError: `module` is not an `nn.Module`, or a chosen parameter is not floating point.
      ValueError: `module` has no parameters, `trainable` selects none, or a parameter is
        not finite.

    Cost: one copy of the parameters and buffers, here; each `apply` call is one forward
    pass plus a check of the keys and shapes (per call, not per example).

    Examples:
      >>> apply, p = ti.functionalize(model)
      >>> torch.allclose(apply(p, test[0]), model(test[0]))
      True
      >>> list(ti.functionalize(model, trainable=lambda name, t: name == "bias")[1])
      ['bias']
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
    if _training_layers(module):
        warnings.warn(
            f"ti.functionalize: {type(module).__name__} is in training mode and has dropout or batch-norm "
            "layers, so its outputs are random or depend on the whole batch; call module.eval() first.",
            stacklevel=2,
        )
    params = {k: p.detach().clone() for k, p in chosen.items()}
    checks.params("ti.functionalize", params)
    frozen = {k: p.detach().clone() for k, p in named.items() if k not in chosen}
    frozen.update({k: b.detach().clone() for k, b in module.named_buffers()})
    required = tuple(params)
    shapes = {k: tuple(v.shape) for k, v in {**params, **frozen}.items()}
    runner = hf.vmap_safe(module)
    pairs = [] if runner is module else list(zip(module.modules(), runner.modules()))

    def apply(params, *args, **kwargs):
        state = _state(params, required, frozen, shapes)
        hf.mirror_modes(pairs)
        try:   # `_state` checked the keys, with messages that name them
            return functional_call(runner, state, args, kwargs, tie_weights=True, strict=False)
        except RuntimeError as err:
            message = _explain(module, err)
            if message is None:
                raise
            raise RuntimeError(message) from err

    apply.__doc__ = f"Pure forward of {type(module).__name__}: apply(params, *args, **kwargs)."
    return apply, params


def _state(params, required: tuple, frozen: dict, shapes: dict) -> dict:
    """The full state for one call: `frozen` overridden by `params`, every key checked.

    `params` must hold every name in `required` and may hold names of `frozen`; each
    value a tensor of the module's shape. Raises TypeError / ValueError naming the keys.
    """
    if not isinstance(params, Mapping):
        raise TypeError(
            f"{_WHERE}: `params` must be a dict name -> tensor, like the `params` ti.functionalize returned "
            f"(keys {_names(required)}); got {type(params).__name__}. From a list of tensors in that order, "
            "build it with dict(zip(names, tensors)).")
    missing = [k for k in required if k not in params]
    unknown = [k for k in params if k not in shapes]
    if missing or unknown:
        hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(str(k), shapes, n=1))
                 else repr(k) for k in unknown]
        wrong = " and ".join(part for part in (missing and f"is missing {_names(missing)}",
                                               unknown and f"has unknown [{', '.join(hints)}]") if part)
        raise ValueError(
            f"{_WHERE}: `params` {wrong}; expected every "
            f"key of the `params` ti.functionalize returned ({_names(required)}), optionally with frozen parameters "
            f"and buffers by name ({_names([k for k in frozen])}) to override them.")
    for k, v in params.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{_WHERE}: `params[{k!r}]` must be a tensor; got {type(v).__name__}.")
        if tuple(v.shape) != shapes[k]:
            raise ValueError(f"{_WHERE}: `params[{k!r}]` has shape {tuple(v.shape)}; the module's is {shapes[k]}.")
    return {**frozen, **params} if frozen else dict(params)


def _names(keys, limit: int = 8) -> str:
    """`['a', 'b', ...]`, at most `limit` names shown."""
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}]"


def _training_layers(module: nn.Module) -> list:
    """`(name, layer)` of every dropout or batch-norm layer of `module` in training mode."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, _STOCHASTIC_IN_TRAINING) and m.training]


def _explain(module: nn.Module, err: RuntimeError) -> str | None:
    """What to change, when `err` is torch.func refusing layers in training mode or a Hugging Face
    attention mask; None for any other error.
    """
    if any(text in str(err) for text in _TRAINING_MODE_MESSAGES) and _training_layers(module):
        return _training_mode_message(module, err)
    return hf.explain(_WHERE, module, err)


def _training_mode_message(module: nn.Module, err: RuntimeError) -> str:
    layers = ", ".join(f"{name or '(root)'}: {type(m).__name__}" for name, m in _training_layers(module)[:4])
    return (
        f"{_WHERE}: {type(module).__name__} has layers in training mode ({layers}), which cannot run per example "
        "under torch.func (dropout draws random numbers, batch norm updates its running statistics in place and "
        "normalizes over the batch). Call model.eval() before ti.functionalize (apply runs the module in the mode "
        "it is in when called). Per-example gradients with dropout on are not offered (they would need "
        "vmap(randomness='different')); to keep dropout deliberately, draw the masks outside with an explicit "
        "generator, pass the masks in the batch and multiply by them in forward. "
        f"torch said: {str(err).splitlines()[0]}")


class Checkpoint(tuple):
    """One saved training state: the pair `(params, lr)`, with the rest of the state as `.frozen`.

    Estimators evaluate the checkpoint as `loss({**frozen, **p}, batch)` and differentiate
    over `p` only, so the user's `loss(params, batch)` must hand its `params` to `apply`
    unchanged. Built as `ti.Checkpoint(params, lr, frozen=None)`; it unpacks as the pair,
    `params, lr = checkpoint`.

    Attributes:
      params: the dict that `ti.functionalize(model, trainable)`'s `apply` takes (the
        attributed subset).
      lr: the learning rate in force after this checkpoint (a Python number).
      frozen: the checkpoint's other parameters and its buffers (e.g. batch-norm running
        statistics) by `state_dict` name; None (as for a plain `(params, lr)` pair): the
        state closed over by `apply`.

    Examples:
      >>> checkpoint = ti.Checkpoint(params, 0.1)
      >>> p, lr = checkpoint
      >>> p is params and lr == 0.1 and checkpoint.frozen is None
      True
    """

    frozen: dict | None

    def __new__(cls, params, lr, frozen: dict | None = None):
        """The pair `(params, lr)` carrying `frozen`."""
        self = super().__new__(cls, (params, lr))
        self.frozen = frozen
        return self

    @property
    def params(self) -> Any:
        """The differentiated parameters."""
        return self[0]

    @property
    def lr(self) -> float:
        """The learning rate in force after this checkpoint."""
        return self[1]

    def __repr__(self) -> str:
        frozen = "None" if self.frozen is None else f"<{len(self.frozen)} tensors>"
        return f"Checkpoint(params=<{len(self.params)} tensors>, lr={self.lr!r}, frozen={frozen})"
