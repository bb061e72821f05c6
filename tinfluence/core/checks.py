"""Argument checks shared by every public function: one rule and one message format each.

Every message reads `{call}: `{argument}` must be {expected}; got {value}.` followed, where
there is one, by the fix. `call` is the public function as a user writes it (`ti.cg`); it
is passed down by the public function, never part of a public signature. Numbers follow
one rule everywhere: a bool is never an int or a float, strings and None are refused
unless None is documented, and every float must be finite.

Cost: these run once per call on Python scalars and tensor metadata, except
`finite_chunk`, one reduction per chunk of already-computed values (see docs/design.md,
"Validation").
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Literal, Sequence, overload

import optree
import torch


class ArgumentError(TypeError, ValueError):
    """A bad argument: both a TypeError and a ValueError, so either `except` catches it.

    Its message reads `{call}: `{argument}` must be {expected}; got {value}.`, then the fix
    where there is one.

    Examples:
      >>> try:
      ...     ti.objective(loss, train, l2=-1.0)
      ... except ValueError as err:
      ...     print(type(err) is ti.ArgumentError, str(err).startswith("ti.objective: `l2` must be"))
      True True
    """


__all__ = [
    "ArgumentError",
    "integer", "number", "probability", "flag", "choice", "function", "chunk_size", "ids",
    "params", "floating_like", "finite_chunk", "finite_scores", "describe", "is_int", "is_real",
]


def describe(value: Any) -> str:
    """A short description of `value` for a message: its repr for scalars, type and shape for tensors."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} {text[:57]}..."


def is_int(value: Any) -> bool:
    """True for a Python or numpy integer or a 0-d integer tensor; never for a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool and not value.is_complex()
    return isinstance(value, numbers.Integral)


def is_real(value: Any) -> bool:
    """True for a Python or numpy real or a 0-d real tensor; never for a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and value.dtype != torch.bool and not value.is_complex()
    return isinstance(value, numbers.Real)


@overload
def integer(call: str, name: str, value: Any, *, minimum: int | None = ..., maximum: int | None = ...,
            none: Literal[False] = ..., hint: str = ...) -> int: ...
@overload
def integer(call: str, name: str, value: Any, *, minimum: int | None = ..., maximum: int | None = ...,
            none: bool, hint: str = ...) -> int | None: ...
def integer(call: str, name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
            none: bool = False, hint: str = "") -> int | None:
    """`value` as a Python int in [minimum, maximum]; None passes when `none`. A bool is not an int.

    `hint`, when given, is appended to the message (the fix, e.g. "Pass chunk_size=256.").
    """
    if value is None and none:
        return None
    bounds = _bounds(minimum, maximum)
    expected = f"{'None or ' if none else ''}an int{bounds}"
    if not is_int(value):
        raise ArgumentError(_message(call, name, expected, describe(value), hint))
    out = int(value)
    if (minimum is not None and out < minimum) or (maximum is not None and out > maximum):
        raise ArgumentError(_message(call, name, expected, str(out), hint))
    return out


@overload
def number(call: str, name: str, value: Any, *, minimum: float | None = ..., exclusive: bool = ...,
           maximum: float | None = ..., exclusive_max: bool = ..., none: Literal[False] = ...,
           hint: str = ...) -> float: ...
@overload
def number(call: str, name: str, value: Any, *, minimum: float | None = ..., exclusive: bool = ...,
           maximum: float | None = ..., exclusive_max: bool = ..., none: bool,
           hint: str = ...) -> float | None: ...
def number(call: str, name: str, value: Any, *, minimum: float | None = None, exclusive: bool = False,
           maximum: float | None = None, exclusive_max: bool = False, none: bool = False,
           hint: str = "") -> float | None:
    """`value` as a finite Python float in range; None passes when `none`.

    The range is >= minimum (> with `exclusive`) and <= maximum (< with `exclusive_max`).

    Accepts Python and numpy reals and 0-d real tensors; a bool, a string, None (unless
    `none`), nan and ±inf are refused ("must be a finite number >= 0; got nan"), and a finite
    number out of range names the bound ("must be >= 0; got -1.0"). `hint` is appended.
    """
    if value is None and none:
        return None
    if minimum is not None and maximum is not None:
        bounds = f"in {'(' if exclusive else '['}{minimum:g}, {maximum:g}{')' if exclusive_max else ']'}"
    elif minimum is not None:
        bounds = f"{'>' if exclusive else '>='} {minimum:g}"
    else:
        bounds = "" if maximum is None else f"{'<' if exclusive_max else '<='} {maximum:g}"
    finite = bounds if bounds.startswith("in ") else f"a finite number {bounds}".rstrip()
    lead = "None or " if none else ""
    if not is_real(value):
        raise ArgumentError(_message(call, name, lead + finite, describe(value), hint))
    out = float(value)
    if not math.isfinite(out):
        raise ArgumentError(_message(call, name, lead + finite, repr(out), hint))
    if (minimum is not None and (out <= minimum if exclusive else out < minimum)) \
            or (maximum is not None and (out >= maximum if exclusive_max else out > maximum)):
        raise ArgumentError(_message(call, name, lead + bounds, repr(out), hint))
    return out


def probability(call: str, name: str, value: Any) -> float:
    """`value` as a float in [0, 1]."""
    return number(call, name, value, minimum=0.0, maximum=1.0)


def flag(call: str, name: str, value: Any) -> bool:
    """`value`, which must be True or False (not 0/1, not None)."""
    if not isinstance(value, bool):
        raise ArgumentError(f"{call}: `{name}` must be True or False; got {describe(value)} ({type(value).__name__}).")
    return value


def choice(call: str, name: str, value: Any, options: Sequence) -> Any:
    """`value`, which must be one of `options`."""
    if not any(value == option and type(value) is type(option) for option in options):
        listed = ", ".join(repr(o) for o in options)
        raise ArgumentError(f"{call}: `{name}` must be one of {listed}; got {describe(value)}.")
    return value


@overload
def function(call: str, name: str, value: Any, shape: str, *, none: Literal[False] = ...) -> Callable: ...
@overload
def function(call: str, name: str, value: Any, shape: str, *, none: bool) -> Callable | None: ...
def function(call: str, name: str, value: Any, shape: str, *, none: bool = False) -> Callable | None:
    """`value`, which must be callable; `shape` is its expected signature, e.g. "(params, batch) -> Tensor[B]"."""
    if value is None and none:
        return None
    if not callable(value):
        raise ArgumentError(f"{call}: `{name}` must be {'None or ' if none else ''}a function {shape}; got {describe(value)}.")
    return value


def chunk_size(call: str, value: Any) -> int | None:
    """`chunk_size`: None (the default, 1024) or an int >= 1."""
    return integer(call, "chunk_size", value, minimum=1, none=True)


def ids(call: str, name: str, value: Any, n: int, *, unique: bool = False, empty: bool = False) -> torch.Tensor:
    """Training ids: a list, range, array or 1-D integer tensor of values in [0, n), as a LongTensor `[m]`.

    Refused, each with its own message: another type, not 1-D, empty (unless `empty`),
    not integers (floats, bools), out of range (the first bad id and its position), and,
    with `unique`, a repeated id. Cost: one pass over the ids.
    """
    expected = f"a list or 1-D integer tensor of training ids in [0, n={n})"
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        raise ArgumentError(_message(call, name, expected, describe(value), ""))
    else:
        try:
            tensor = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise ArgumentError(_message(call, name, expected, describe(value), "")) from None
    if tensor.dim() != 1:
        raise ArgumentError(f"{call}: `{name}` must be 1-D (a list of training ids); got shape {list(tensor.shape)}.")
    if tensor.numel() == 0:
        if empty:
            return torch.empty(0, dtype=torch.long, device=tensor.device)
        raise ArgumentError(f"{call}: `{name}` is empty; it must hold at least one training id.")
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise ArgumentError(f"{call}: `{name}` must hold integer training ids; got dtype {tensor.dtype}. "
                            "Pass ints, e.g. ids.long() (a bool mask becomes ids with mask.nonzero().flatten()).")
    bad = (tensor < 0) | (tensor >= n)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ArgumentError(f"{call}: `{name}` ids must lie in [0, n={n}); got {int(tensor[pos])} at position {pos}.")
    if unique and torch.unique(tensor).numel() != tensor.numel():
        raise ArgumentError(f"{call}: `{name}` repeats a training id; give each id once (e.g. with torch.unique).")
    return tensor.long()


def params(call: str, value: Any, name: str = "params") -> torch.Tensor:
    """Checks parameters and returns the first leaf, the reference for `floating_like`.

    Parameters are a dict (or another mapping or pytree, not a bare list) of finite
    floating tensors of ONE dtype on ONE device.

    Cost: one `isfinite(...).all()` per leaf (P numbers read once per call).
    """
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        raise ArgumentError(
            f"{call}: `{name}` must be a dict[str, Tensor] (name -> tensor, like the `params` of "
            f"ti.functionalize(model)); got {type(value).__name__} of {len(value)} items. From tensors in the "
            "module's order, build it with dict(zip(names, tensors)).")
    paths, leaves, _ = optree.tree_flatten_with_path(value, namespace="")
    if not leaves:
        raise ArgumentError(f"{call}: `{name}` has no tensors; expected a dict of parameter tensors, e.g. the "
                            f"`params` of ti.functionalize(model); got {describe(value)}.")
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise ArgumentError(f"{call}: `{name}` leaf {_name(path)} must be a tensor; got {type(leaf).__name__}.")
        if not leaf.is_floating_point():
            raise ArgumentError(f"{call}: `{name}` leaf {_name(path)} must be floating point; got {leaf.dtype}. "
                            "Cast it, e.g. params = {k: v.double() for k, v in params.items()}.")
    kinds = {(leaf.dtype, leaf.device) for leaf in leaves}
    if len(kinds) > 1:
        listed = ", ".join(f"{_name(p)}: {leaf.dtype} on {leaf.device}" for p, leaf in zip(paths, leaves))
        raise ArgumentError(f"{call}: every `{name}` leaf must have one dtype and device; got {listed}. Cast them "
                        "alike, e.g. model.double() before ti.functionalize, or {k: v.to(torch.float64) ...}.")
    for path, leaf in zip(paths, leaves):
        if not bool(torch.isfinite(leaf).all()):
            raise ArgumentError(f"{call}: `{name}` leaf {_name(path)} has non-finite values (nan or inf); "
                                "pass finite parameters (retrain, or check how they were loaded).")
    return leaves[0]


def floating_like(call: str, name: str, data: Any, reference: torch.Tensor) -> None:
    """Every tensor of `data` on `reference`'s device, and every floating one of its dtype."""
    paths, leaves, _ = optree.tree_flatten_with_path(data, namespace="")
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            continue
        if leaf.device != reference.device:
            raise ArgumentError(f"{call}: `{name}` leaf {_name(path)} is on {leaf.device}, the parameters on "
                             f"{reference.device}; move it, e.g. {name} = ti.tree.map(lambda t: t.to('{reference.device}'), {name}).")
        if leaf.is_floating_point() and leaf.dtype != reference.dtype:
            raise ArgumentError(f"{call}: `{name}` leaf {_name(path)} is {leaf.dtype}, the parameters {reference.dtype}; "
                            f"cast the data to the parameters' dtype (or the model to the data's), e.g. "
                            f"x.to({reference.dtype}).")


def finite_chunk(call: str, name: str, values: Any, start: int, what: str = "gradients", hint: str = "") -> None:
    """Raises `ArgumentError` naming the example ids and the leaf if a stack `[c, ...]` holds nan or inf.

    `values` are already computed per-example quantities of `name`'s examples `start`,
    `start + 1`, ... (gradients, losses); `what` says which, `hint` replaces the default fix.

    One reduction per leaf (`isfinite(leaf.sum())` is false exactly when the leaf has a nan or
    inf, or when its finite values overflow on summation); the ids are looked up only then.
    """
    paths, leaves, _ = optree.tree_flatten_with_path(values, namespace="")
    for path, leaf in zip(paths, leaves):
        if bool(torch.isfinite(leaf.sum())):
            continue
        bad = (~torch.isfinite(leaf.reshape(leaf.shape[0], -1))).any(1).nonzero().flatten()
        if bad.numel() == 0:
            continue
        shown = ", ".join(str(int(i) + start) for i in bad[:10]) + (", ..." if bad.numel() > 10 else "")
        raise ArgumentError(f"{call}: the {what} of {bad.numel()} example(s) of `{name}` are not finite (nan or inf)"
                            f"{f' in leaf {_name(path)}' if path else ''}: ids {shown}. "
                            + (hint or f"Check those rows of `{name}` (and the loss at them) for nan/inf, or drop them."))


def finite_scores(call: str, name: str, out: torch.Tensor, grads: Any, start: int) -> None:
    """Raises `ArgumentError` naming the ids if a chunk's result `out` (last axis: its c examples) is not finite.

    One reduction over `out` (e.g. `[n_test, c]` scores, far fewer numbers than the c·P
    gradients `grads` they come from): a nan or inf gradient makes its column non-finite.
    Only then are `grads` searched (the ids and the leaf), and if they are finite the
    columns of `out` itself are named (finite gradients whose products overflow).
    """
    if bool(torch.isfinite(out.sum())):
        return
    finite_chunk(call, name, grads, start)
    finite_chunk(call, name, out.reshape(-1, out.shape[-1]).T, start,
                 what="scores (finite gradients whose products overflow)")


def _message(call: str, name: str, expected: str, got: str, hint: str) -> str:
    """The one message format: `{call}: `{name}` must be {expected}; got {got}.` and the fix."""
    return f"{call}: `{name}` must be {expected}; got {got}." + (f" {hint}" if hint else "")


def _name(path: tuple) -> str:
    """A leaf's path as every message prints it (optree's path tuple, e.g. `('fc.weight',)`)."""
    return str(path)


def _bounds(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    return "" if maximum is None else f" <= {maximum}"
