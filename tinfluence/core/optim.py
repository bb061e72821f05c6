"""Pure optimizer steps in the optax shape: `init(params) -> state`, `step(params, state, grads) -> (params, state)`.

Nothing is updated in place: a step returns new parameters and a new state, so a training
run is a pure function of its inputs and `torch.func.vjp` differentiates through it (the
reverse pass of `ti.trajectory_influence`). Each step performs the very tensor operations
of `torch.optim`'s single-tensor implementation (the CPU default, `foreach=False`), in the
same order, so a run reproduces `torch.optim.SGD`, `Adam` and `AdamW` bit for bit.

A state is a pytree: floating tensor leaves (momenta) are differentiated through; other
leaves (the step count, a Python int) are carried along. A user's own optimizer is any
object with `init` and `step` of these signatures, e.g. `Optimizer(init=..., step=...)`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

from . import checks
from . import tree as tr

__all__ = ["AdamState", "Optimizer", "SGDState", "adam", "adamw", "sgd"]


class Optimizer(NamedTuple):
    """A pure optimizer: `init(params) -> state` and `step(params, state, grads) -> (params, state)`.

    `params` and `grads` are pytrees of one structure; `step` must not modify its inputs and
    must be differentiable with `torch.func` in `params`, the floating leaves of `state` and
    `grads` (the reverse pass takes its vector-Jacobian product).

    Attributes:
      init: `params -> state`.
      step: `(params, state, grads) -> (new params, new state)`.

    Examples:
      >>> descend = ti.optim.Optimizer(init=lambda p: (), step=lambda p, s, g: (ti.tree.add_scaled(p, -0.5, g), s))
      >>> p = {"w": torch.ones(2)}
      >>> new, _ = descend.step(p, descend.init(p), {"w": torch.ones(2)})
      >>> torch.equal(new["w"], torch.full((2,), 0.5))
      True
    """

    init: Callable[[Any], Any]
    step: Callable[[Any, Any, Any], tuple]


class SGDState(NamedTuple):
    """SGD's state: the momentum buffer shaped like the parameters (`None` without momentum)."""

    momentum: Any


class AdamState(NamedTuple):
    """Adam's state: `count` steps taken (int), first moments `mu` and second moments `nu` (pytrees like the parameters)."""

    count: int  # type: ignore[assignment]  # a NamedTuple field may shadow tuple.count (optax's name for it)
    mu: Any
    nu: Any


def _check_hyper(where: str, name: str, value, *, low: float = 0.0, high: float = math.inf,
                 open_low: bool = False, open_high: bool = False) -> float:
    """`value` as a finite float from `low` to `high` (ends open as told); `checks.number`."""
    return checks.number(where, name, value, minimum=low, exclusive=open_low,
                         maximum=None if high == math.inf else high, exclusive_max=open_high)


def sgd(lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False) -> Optimizer:
    """Stochastic gradient descent with optional heavy-ball or Nesterov momentum and L2 weight decay.

    The update of `torch.optim.SGD` (dampening 0): with g = ∇ + weight_decay·θ,
    b ← momentum·b + g (b₀ = 0, so b₁ = g), d = g + momentum·b (Nesterov) or b (heavy
    ball) or g (no momentum), θ ← θ − lr·d.

    Args:
      lr: learning rate > 0.
      momentum: in [0, 1).
      weight_decay: >= 0, added to the gradient (coupled L2, as torch.optim.SGD).
      nesterov: Nesterov momentum (needs momentum > 0).

    Returns:
      An `Optimizer`; the state is `SGDState(momentum=b)` (`None` without momentum).

    Raises:
      ArgumentError: a hyper-parameter is not a finite number in its range, or `nesterov`
        is not a bool.
      ValueError: `nesterov=True` with `momentum=0`.

    Cost: each step is O(P) time; the state holds one P-sized buffer with momentum, none without.

    Examples:
      >>> w = torch.nn.Parameter(torch.ones(3))
      >>> reference = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.01)
      >>> w.grad = torch.tensor([1., -2., 3.])
      >>> reference.step()
      >>> opt = ti.optim.sgd(lr=0.1, momentum=0.9, weight_decay=0.01)
      >>> p = {"w": torch.ones(3)}
      >>> new, state = opt.step(p, opt.init(p), {"w": torch.tensor([1., -2., 3.])})
      >>> torch.equal(new["w"], w.detach())
      True
    """
    where = "ti.optim.sgd"
    lr = _check_hyper(where, "lr", lr, open_low=True)
    momentum = _check_hyper(where, "momentum", momentum, high=1.0, open_high=True)
    weight_decay = _check_hyper(where, "weight_decay", weight_decay)
    nesterov = checks.flag(where, "nesterov", nesterov)
    if nesterov and momentum == 0:
        raise ValueError(f"{where}: `nesterov=True` needs `momentum` > 0; got momentum=0.")

    def init(params):
        return SGDState(tr.zeros_like(params) if momentum else None)

    def step(params, state, grads):
        if weight_decay:
            grads = tr.map(lambda g, p: g.add(p, alpha=weight_decay), grads, params)
        buffer = state.momentum
        if momentum:
            buffer = tr.map(lambda b, g: b.mul(momentum).add(g), buffer, grads)
            direction = tr.map(lambda g, b: g.add(b, alpha=momentum), grads, buffer) if nesterov else buffer
        else:
            direction = grads
        return tr.map(lambda p, d: p.add(d, alpha=-lr), params, direction), SGDState(buffer)

    return Optimizer(init, step)


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """√x with the value of `x.sqrt()` and a zero derivative where x = 0 (not inf).

    A coordinate whose gradient is exactly 0 (a constant input feature) has second moment
    0; its exact derivative through the second moment is 0, but autograd would form 0·∞.
    """
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def _adam(where: str, lr, b1, b2, eps, weight_decay, decoupled: bool) -> Optimizer:
    lr = _check_hyper(where, "lr", lr, open_low=True)
    b1 = _check_hyper(where, "b1", b1, high=1.0, open_high=True)
    b2 = _check_hyper(where, "b2", b2, high=1.0, open_high=True)
    eps = _check_hyper(where, "eps", eps, open_low=True)
    weight_decay = _check_hyper(where, "weight_decay", weight_decay)

    def init(params):
        return AdamState(0, tr.zeros_like(params), tr.zeros_like(params))

    def step(params, state, grads):
        count = state.count + 1
        if weight_decay and decoupled:
            params = tr.map(lambda p: p.mul(1 - lr * weight_decay), params)
        elif weight_decay:
            grads = tr.map(lambda g, p: g.add(p, alpha=weight_decay), grads, params)
        mu = tr.map(lambda m, g: m.lerp(g, 1 - b1), state.mu, grads)
        nu = tr.map(lambda v, g: v.mul(b2).addcmul(g, g, value=1 - b2), state.nu, grads)
        step_size = lr / (1 - b1 ** float(count))
        correction = (1 - b2 ** float(count)) ** 0.5
        new = tr.map(lambda p, m, v: p.addcdiv(m, (_safe_sqrt(v) / correction).add(eps), value=-step_size),
                     params, mu, nu)
        return new, AdamState(count, mu, nu)

    return Optimizer(init, step)


def adam(lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0) -> Optimizer:
    """Adam (Kingma & Ba 2015) with coupled L2 weight decay, as `torch.optim.Adam`.

    With g = ∇ + weight_decay·θ and c the step count after this step:
    μ ← μ + (1 − b1)(g − μ), ν ← b2·ν + (1 − b2)·g², θ ← θ − lr/(1 − b1^c) · μ / (√ν/√(1 − b2^c) + eps).

    Args:
      lr: learning rate > 0.
      b1: decay rate of the first moment, in [0, 1).
      b2: decay rate of the second moment, in [0, 1).
      eps: > 0, added to the denominator.
      weight_decay: >= 0, added to the gradient.

    Returns:
      An `Optimizer`; the state is `AdamState(count, mu, nu)`.

    Raises:
      ArgumentError: a hyper-parameter is not a finite number in its range.

    Cost: each step is O(P) time; the state holds two P-sized moment buffers.

    Examples:
      >>> w = torch.nn.Parameter(torch.ones(3))
      >>> reference = torch.optim.Adam([w], lr=0.1)
      >>> w.grad = torch.tensor([1., -2., 3.])
      >>> reference.step()
      >>> opt = ti.optim.adam(lr=0.1)
      >>> p = {"w": torch.ones(3)}
      >>> new, state = opt.step(p, opt.init(p), {"w": torch.tensor([1., -2., 3.])})
      >>> torch.equal(new["w"], w.detach()), state.count
      (True, 1)
    """
    return _adam("ti.optim.adam", lr, b1, b2, eps, weight_decay, decoupled=False)


def adamw(lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2) -> Optimizer:
    """AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay, as `torch.optim.AdamW`.

    θ is first shrunk, θ ← (1 − lr·weight_decay)·θ, then takes Adam's step on the plain gradient.

    Args:
      lr: learning rate > 0.
      b1: decay rate of the first moment, in [0, 1).
      b2: decay rate of the second moment, in [0, 1).
      eps: > 0, added to the denominator.
      weight_decay: >= 0, the decoupled decay rate.

    Returns:
      An `Optimizer`; the state is `AdamState(count, mu, nu)`.

    Raises:
      ArgumentError: a hyper-parameter is not a finite number in its range.

    Cost: each step is O(P) time; the state holds two P-sized moment buffers.

    Examples:
      >>> w = torch.nn.Parameter(torch.ones(3))
      >>> reference = torch.optim.AdamW([w], lr=0.1, weight_decay=0.1)
      >>> w.grad = torch.tensor([1., -2., 3.])
      >>> reference.step()
      >>> opt = ti.optim.adamw(lr=0.1, weight_decay=0.1)
      >>> p = {"w": torch.ones(3)}
      >>> new, _ = opt.step(p, opt.init(p), {"w": torch.tensor([1., -2., 3.])})
      >>> torch.equal(new["w"], w.detach())
      True
    """
    return _adam("ti.optim.adamw", lr, b1, b2, eps, weight_decay, decoupled=True)


def check_optimizer(where: str, optimizer) -> None:
    """Raises `ArgumentError` (a TypeError) unless `optimizer` has callable `init` and `step` (an `Optimizer` or the user's own)."""
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "step", None))):
        raise checks.ArgumentError(f"{where}: `step` must be a pure optimizer with `init(params) -> state` and "
                        "`step(params, state, grads) -> (params, state)`, e.g. ti.optim.sgd(lr=0.1) or "
                        f"ti.optim.Optimizer(init=..., step=...); got {type(optimizer).__name__}.")
