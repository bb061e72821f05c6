"""A text corpus that ships with Python, a byte-level tokenizer and a small causal decoder.

`stdlib_windows` cuts the standard library's own `.py` sources into fixed-length windows of
bytes (ids 0..255), so language-model examples, tests and benchmarks need no download.
`ByteDecoder` is a pre-norm causal transformer built from `nn.Linear` (so `ti.factored` and
`ti.compressed_grads` see every projection), with RMSNorm, a padding-aware attention mask and a
tied output embedding optional.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["stdlib_windows", "decode", "ByteDecoder", "token_nll"]


def _stdlib_bytes(max_bytes: int) -> bytes:
    """The standard library's top-level `.py` files, sorted by name, concatenated (first `max_bytes`)."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    out, size = [], 0
    for path in sorted(folder.glob("*.py")):
        data = path.read_bytes()
        out.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    return b"".join(out)[:max_bytes]


def stdlib_windows(length: int, count: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Returns `count` windows of `length` bytes from Python's standard-library sources, `[count, length]` int64.

    Windows are consecutive and non-overlapping in file order; with a `generator` they are drawn
    in a random order (a copy of its state is used, it is not advanced).

    Args:
      length: bytes per window.
      count: number of windows.
      generator: shuffles the windows' order when given.

    Returns:
      `[count, length]` int64 tensor of byte ids in 0..255, on the CPU.

    Raises:
      ValueError: more windows than the sources hold (about 9 MB).

    Cost: reads O(length · count) bytes of the standard library's files.

    Examples:
      >>> ids = ti.text.stdlib_windows(16, 4)
      >>> ids.shape, ids.dtype
      (torch.Size([4, 16]), torch.int64)
      >>> shuffled = ti.text.stdlib_windows(16, 4, generator=torch.Generator().manual_seed(0))
      >>> torch.equal(shuffled.sort(dim=0).values, ids.sort(dim=0).values)    # the same windows
      True
    """
    blob = _stdlib_bytes(length * count)
    if len(blob) < length * count:
        raise ValueError(f"ti.text.stdlib_windows: the standard library holds {len(blob) // length} windows of "
                         f"{length} bytes; asked for count={count}.")
    ids = torch.frombuffer(bytearray(blob), dtype=torch.uint8).long().reshape(count, length)
    if generator is not None:
        local = torch.Generator(device=generator.device)
        local.set_state(generator.get_state())
        ids = ids[torch.randperm(count, generator=local)]
    return ids


def decode(ids: Sequence[int] | torch.Tensor) -> str:
    """Byte ids back to text, as UTF-8; undecodable bytes become U+FFFD.

    Args:
      ids: a 1-d tensor or list of ints in 0..255.

    Returns:
      The decoded `str`.

    Raises:
      ValueError: an id outside 0..255.

    Examples:
      >>> ti.text.decode(torch.tensor(list(b"def f():")))
      'def f():'
    """
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, hidden, bias=False), nn.Linear(hidden, d, bias=False)

    def forward(self, x, bias):
        B, T, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.mT) / math.sqrt(d // self.heads) + bias              # [B, H, T, T]
        x = x + self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class ByteDecoder(nn.Module):
    """A causal transformer over byte ids: embedding, `layers` pre-norm blocks, RMSNorm, output layer.

    `forward(input_ids [B, T], attention_mask [B, T] or None) -> logits [B, T, vocab]`; masked
    keys are excluded from attention (an additive -1e9, no branch on values, so it runs under vmap).

    Args:
      vocab: number of token ids (256 for bytes).
      d: model width; a multiple of `heads`.
      layers: number of transformer blocks.
      heads: attention heads per block.
      hidden: width of each block's MLP (default 4·d).
      context: the longest sequence (learned positions).
      tied: share the output layer's weight with the token embedding.

    Cost: a forward pass is O(B · T · layers · (d · hidden + d² + T · d)).

    Examples:
      >>> net = ti.text.ByteDecoder(d=16, layers=1, heads=2, context=8)
      >>> ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
      >>> logits = net(ids)
      >>> logits.shape
      torch.Size([2, 8, 256])
      >>> later = ids.clone()
      >>> later[:, -1] = 0                                      # a change at the last position only
      >>> torch.allclose(net(later)[:, :-1], logits[:, :-1])    # is not seen by earlier positions
      True
    """

    def __init__(self, *, vocab: int = 256, d: int = 64, layers: int = 2, heads: int = 4, hidden: int | None = None,
                 context: int = 64, tied: bool = False):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(_Block(d, heads, hidden or 4 * d) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[B, T, vocab]` of `input_ids [B, T]`; `attention_mask [B, T]` (1 = keep) or None."""
        T = input_ids.shape[1]
        x = self.embed(input_ids) + self.pos.weight[:T]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        keep = causal if attention_mask is None else causal & attention_mask[:, None, None, :].bool()
        bias = (~keep).to(x.dtype) * -1e9
        for block in self.blocks:
            x = block(x, bias)
        return self.head(self.norm(x))


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-byte negative log-likelihood per position, `[B, T]`.

    Position t scores token t+1 given tokens ≤ t; the last position, and positions whose next
    token is masked, are 0.

    Args:
      logits: `[B, T, vocab]`, e.g. from `ByteDecoder`.
      input_ids: `[B, T]` token ids.
      attention_mask: `[B, T]` (1 = keep) or None.

    Returns:
      `[B, T]` in the dtype of `logits`; its sum over T is the sequence's loss.

    Cost: O(B · T · vocab).

    Examples:
      >>> logits = torch.randn(2, 4, 256, generator=torch.Generator().manual_seed(0))
      >>> ids = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(1))
      >>> nll = ti.text.token_nll(logits, ids)
      >>> nll.shape, bool((nll[:, -1] == 0).all())
      (torch.Size([2, 4]), True)
      >>> torch.allclose(nll[0, 1], -logits[0, 1].log_softmax(-1)[ids[0, 2]])
      True
    """
    nll = F.cross_entropy(logits[:, :-1].mT, input_ids[:, 1:], reduction="none")      # [B, T-1]
    if attention_mask is not None:
        nll = nll * attention_mask[:, 1:].to(nll.dtype)
    return F.pad(nll, (0, 1))
