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

    Raises:
      ValueError: more windows than the sources hold (about 9 MB).
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


def decode(ids) -> str:
    """Byte ids (a 1-d tensor or list of 0..255) back to text; undecodable bytes become U+FFFD."""
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

    def forward(self, input_ids, attention_mask=None):
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
    """
    nll = F.cross_entropy(logits[:, :-1].mT, input_ids[:, 1:], reduction="none")      # [B, T-1]
    if attention_mask is not None:
        nll = nll * attention_mask[:, 1:].to(nll.dtype)
    return F.pad(nll, (0, 1))
