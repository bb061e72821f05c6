"""Hugging Face `transformers` models under vmap: attention masks built without data-dependent branches.

transformers (5.x) builds a 4-D attention mask from the 2-D `attention_mask` in
`transformers.masking_utils`. Its SDPA path first asks whether the mask can be skipped
(`padding_mask.all()`, to let SDPA use `is_causal` or no mask at all); that is a Python branch
on tensor values, which `torch.func.vmap` cannot trace, so per-example gradients of a padded
batch fail with "data-dependent control flow". BERT-like (bidirectional) models ask the same
question with every attention setting, eager included. Materializing the mask always gives the
same attention and traces under vmap.

The fused SDPA kernels have a second problem: vmap has no batching rule for them (it loops over
the examples), and they have no second derivative, so Hessian-vector products through them fail
("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented").
PyTorch's math backend computes the same attention from composite ops, which batch under vmap
and differentiate twice.

`vmap_safe(module)` therefore returns, for a model whose attention is "sdpa", a copy that shares
every parameter and buffer with `module` (no tensor is copied) and runs under the attention
implementation registered here as `ATTENTION`: transformers' own SDPA attention function on the
math backend (`torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`, set for the call only), with a
mask function that never skips. The user's model and its config are never changed;
registering the name adds one entry to transformers' attention registries and changes nothing
for any other model. Other implementations are left as they are; where they fail under vmap,
`explain` turns the raw error into one that says what to change.

transformers stays optional: nothing here imports it unless a module is already one of its
models (which means transformers is imported).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["ATTENTION", "explain", "mirror_modes", "vmap_safe"]

ATTENTION = "tinfluence_sdpa"


def _pretrained_class():
    """Transformers' `PreTrainedModel`, or None when transformers has not been imported."""
    modeling = sys.modules.get("transformers.modeling_utils")
    return None if modeling is None else modeling.PreTrainedModel


def is_hf_model(module: nn.Module) -> bool:
    """Whether `module` is a transformers `PreTrainedModel` (False when transformers was never imported)."""
    cls = _pretrained_class()
    return cls is not None and isinstance(module, cls)


def _configs(module: nn.Module) -> list:
    """The configs of `module` and of every transformers model nested in it, each once."""
    cls = _pretrained_class()
    return list({id(m.config): m.config for m in module.modules() if isinstance(m, cls)}.values())


def _register() -> bool:
    """Registers `ATTENTION`: SDPA attention, with masks always materialized (idempotent).

    False when this transformers has no attention registries (releases before `masking_utils`).
    """
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    if ATTENTION in ALL_MASK_ATTENTION_FUNCTIONS:
        return True
    sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]

    def materialized_mask(*args, **kwargs):
        """Transformers' SDPA mask, never skipped (skipping reads the mask's values)."""
        return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False})

    sdpa_attention = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def math_attention(*args, **kwargs):
        """Transformers' SDPA attention on PyTorch's math backend (composite ops)."""
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa_attention(*args, **kwargs)

    AttentionInterface.register(ATTENTION, math_attention)
    AttentionMaskInterface.register(ATTENTION, materialized_mask)
    return True


def vmap_safe(module: nn.Module) -> nn.Module:
    """The module `apply` should run: `module` itself, or for a transformers model whose attention is
    "sdpa" everywhere, a copy sharing all its tensors that builds its masks without branching on data.

    Args:
      module: any `nn.Module`; never changed.

    Returns:
      `module` itself (not a transformers model, another attention setting, or a
      transformers release without attention registries), or the copy, whose attention
      is `ATTENTION`.

    Cost: for the copy, one structural `copy.deepcopy` (modules and configs; parameters
    and buffers are shared, not copied); otherwise none.

    Examples:
      >>> from tinfluence.core import hf
      >>> hf.vmap_safe(model) is model      # not a transformers model
      True
    """
    if not is_hf_model(module) or not all(c._attn_implementation == "sdpa" for c in _configs(module)):
        return module
    if not _register() or not hasattr(module, "set_attn_implementation"):
        return module
    twin: Any = copy.deepcopy(module, memo={id(t): t for t in (*module.parameters(), *module.buffers())})
    twin.set_attn_implementation(ATTENTION)
    return twin if all(c._attn_implementation == ATTENTION for c in _configs(twin)) else module


def mirror_modes(pairs: list) -> None:
    """Sets each copy's training flag to its original's, for `(original, copy)` submodule pairs.

    `apply` calls it before every forward, so the copy runs in the mode the user's model is in.

    Args:
      pairs: a list of `(original, copy)` modules.

    Returns:
      None; the copies' `training` flags are set in place.

    Cost: O(len(pairs)).

    Examples:
      >>> from tinfluence.core import hf
      >>> original, twin = torch.nn.Linear(2, 2).eval(), torch.nn.Linear(2, 2)
      >>> hf.mirror_modes([(original, twin)])
      >>> twin.training
      False
    """
    for original, twin in pairs:
        if twin.training != original.training:
            twin.training = original.training


def explain(where: str, module: nn.Module, err: RuntimeError) -> str | None:
    """A message saying what to change when a transformers model failed under vmap on data-dependent
    control flow (its attention mask code); None for any other error.

    Args:
      where: the public call the message starts with.
      module: the user's module.
      err: the error raised inside `apply`.

    Returns:
      The message (naming `attn_implementation='sdpa'` as the fix), or None when `err` is
      not that failure or `module` is not a transformers model.

    Cost: string operations only.

    Examples:
      >>> from tinfluence.core import hf
      >>> hf.explain("ti.functionalize: apply", model, RuntimeError("data-dependent control flow")) is None
      True
    """
    if "data-dependent control flow" not in str(err) or not is_hf_model(module):
        return None
    impls = sorted({str(c._attn_implementation) for c in _configs(module)})
    return (
        f"{where}: {type(module).__name__} (attn_implementation {', '.join(repr(i) for i in impls)}) branched on tensor "
        "values, which torch.func.vmap (per-example gradients) cannot trace; transformers' attention-mask code does "
        "this for padded batches. Use attn_implementation='sdpa' (transformers' default): load the model with "
        "from_pretrained(..., attn_implementation='sdpa') or call model.set_attn_implementation('sdpa') before "
        "ti.functionalize, which then runs a copy whose masks are built without branching. "
        f"torch said: {str(err).splitlines()[0]}")
