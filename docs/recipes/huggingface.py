"""Recipe: a Hugging Face language model (a tiny, randomly initialised GPT-2; no download).

Batches are dicts (input_ids, attention_mask) with right padding. `ti.functionalize` runs
SDPA attention through a vmap-safe copy (the user's model is untouched), so per-example
gradients of padded batches are exact. The per-example loss is the mean next-token loss
over each sequence's real tokens.
"""

import inspect
import json

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import tinfluence as ti

torch.manual_seed(0)
text = inspect.getsource(json).encode()                     # offline text: a standard-library module's source
windows = torch.tensor(list(text[: 48 * 24]), dtype=torch.long).reshape(48, 24)
lengths = torch.randint(12, 25, (48,))
mask = (torch.arange(24)[None, :] < lengths[:, None]).long()  # right padding
data = {"input_ids": windows * mask, "attention_mask": mask}
train, test = ti.take(data, slice(0, 40)), ti.take(data, slice(40, 44))

config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=32, bos_token_id=0, eos_token_id=0)
model = GPT2LMHeadModel(config).eval()                      # eval: no dropout, per example
apply, params = ti.functionalize(model)


def predict(params, batch):
    return apply(params, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def output_loss(logits, batch):
    targets, real = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:].to(logits.dtype)
    token = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")   # [B, T-1]
    return (token * real).sum(1) / real.sum(1)                                           # [B]


def loss(params, batch):
    return output_loss(predict(params, batch), batch)


similarity = ti.grad_cos(loss, params, train, test)          # [4, 40], cheap first look
G = ti.ggn_vp(predict, params, train, output_loss=output_loss)
ihvp = ti.cg(G, damping=1e-2, tol=1e-3, maxiter=200)
scores = ti.influence(loss, params, train, test, ihvp=ihvp)  # [4, 40], + = helpful
top = scores[0].topk(3).indices.tolist()
print("most helpful training windows for query 0:")
for i in top:
    print(f"  #{i} {scores[0, i]:+.2e}  {bytes(windows[i, : lengths[i]].tolist()).decode(errors='replace')!r}")
assert scores.shape == (4, 40) and bool(torch.isfinite(scores).all())
