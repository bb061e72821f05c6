# %% [markdown]
# # Token sequences: dict batches, masked losses and a resumable score writer
#
# Language models take batches as dicts (`input_ids`, `attention_mask`, `labels`) and average
# the loss over the tokens that count. Both fit tinfluence as they are: a data set is any pytree
# of tensors sharing a leading axis, and a per-example loss may average over masked tokens. This
# notebook trains a one-block causal transformer on a small generated language, scores training
# sequences by last-layer influence (Gauss-Newton curvature + CG), and writes one score file per
# test sequence with an index that lets an interrupted run resume.

# %%
import json
import os
import tempfile
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from IPython.display import Markdown, display

warnings.filterwarnings("ignore", message="IProgress not found")  # no ipywidgets: progress bars fall back to text
import tinfluence as ti

torch.set_num_threads(1)                  # small kernels run fastest on one thread
torch.set_default_dtype(torch.float64)

# %% [markdown]
# ## A small language
#
# Each sentence counts modulo 12 from a random start with a random stride 1–3
# (`5 7 9 11 1 3 ...`), 5 to 10 tokens long; shorter sentences are padded with token 12 and
# masked out. The task is next-token prediction; `labels` is −100 where there is no next token.

# %%
V, T, D, PAD = 12, 10, 24, 12
g = torch.Generator().manual_seed(0)
N = 600
start = torch.randint(0, V, (N, 1), generator=g)
stride = torch.randint(1, 4, (N, 1), generator=g)
tokens = (start + stride * torch.arange(T)) % V
length = torch.randint(5, T + 1, (N,), generator=g)
mask = (torch.arange(T) < length[:, None]).long()
labels = torch.where(mask.bool(), tokens.roll(-1, 1), -100)
labels[torch.arange(N), length - 1] = -100
data = {"input_ids": torch.where(mask.bool(), tokens, PAD), "attention_mask": mask, "labels": labels}
train, test = ti.take(data, slice(0, 500)), ti.take(data, slice(500, 600))
print({k: tuple(v.shape) for k, v in train.items()})
print("sentence 0:", train["input_ids"][0].tolist(), " labels:", train["labels"][0].tolist())

# %% [markdown]
# ## A one-block causal transformer
#
# Written with plain tensor operations so that it runs under `torch.func.vmap` (per-example
# gradients); `nn.GRU`, for instance, does not.

# %%
class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Embedding(V + 1, D), nn.Embedding(T, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.head = nn.Linear(D, V)

    def forward(self, input_ids, attention_mask):
        t = input_ids.shape[-1]
        h = self.emb(input_ids) + self.pos.weight[:t]
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        allowed = torch.ones(t, t, dtype=torch.bool).tril() & attention_mask[..., None, :].bool()
        attention = (q @ k.transpose(-1, -2) / D**0.5).masked_fill(~allowed, -1e9).softmax(-1)
        h = h + attention @ v
        return self.head(h + self.mlp(h))

def token_loss(logits, batch):
    """Cross entropy averaged over each sequence's labelled tokens: one value per sequence, [B]."""
    counted = (batch["labels"] != -100).to(logits.dtype)
    ce = F.cross_entropy(logits.transpose(1, 2), batch["labels"].clamp_min(0), reduction="none")   # [B, T]
    return (ce * counted).sum(1) / counted.sum(1)

torch.manual_seed(0)
model, WD = TinyLM(), 1e-3
opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=WD)
tic = time.perf_counter()
for step in range(150):
    opt.zero_grad()
    token_loss(model(train["input_ids"], train["attention_mask"]), train).mean().backward()
    opt.step()
model.eval()
with torch.no_grad():
    losses = {name: token_loss(model(d["input_ids"], d["attention_mask"]), d).mean().item()
              for name, d in (("train", train), ("test", test))}
print(f"trained in {time.perf_counter() - tic:.1f} s; mean token loss: train {losses['train']:.3f}, test {losses['test']:.3f}")

# %% [markdown]
# ## Last-layer influence with Gauss-Newton curvature
#
# Only the output layer is attributed: `trainable` picks `head.*`, and the rest of the network
# is frozen inside `apply`. `apply` takes the dict's tensors as keyword arguments, the loss
# reads the mask and labels from the same dict.

# %%
apply, head = ti.functionalize(model, trainable=lambda name, p: name.startswith("head."))

def predict(params, batch):
    return apply(params, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

def loss(params, batch):
    return token_loss(predict(params, batch), batch)

curvature = ti.ggn_vp(predict, head, train, output_loss=token_loss, l2=WD)
ihvp = ti.cg(curvature, damping=1e-3, tol=1e-8, maxiter=500)

# %% [markdown]
# ## One score file per test example, resumable
#
# For many test examples a scoring job runs long; it should survive being killed. The writer
# below keeps one file per test example (`scores_00017.pt`: the `[n_train]` scores) and an index,
# `index.jsonl`, with one line per finished example. A file is written under a temporary name and
# renamed, which is atomic, and its index line is appended (and flushed to disk) only after, so
# every example in the index has a complete file. A rerun reads the index and skips what is done.

# %%
class ScoreWriter:
    """One `.pt` file of scores per test example in `folder`, listed in `folder/index.jsonl`."""

    def __init__(self, folder):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.index = os.path.join(folder, "index.jsonl")

    def done(self):
        if not os.path.exists(self.index):
            return set()
        with open(self.index) as f:
            return {json.loads(line)["test_id"] for line in f if line.endswith("\n")}

    def write(self, test_id, scores):
        name = f"scores_{test_id:05d}.pt"
        tmp = os.path.join(self.folder, name + ".tmp")
        torch.save(scores.clone(), tmp)
        os.replace(tmp, os.path.join(self.folder, name))
        top = scores.topk(3)
        record = {"test_id": test_id, "file": name, "top_helpful": top.indices.tolist(),
                  "top_scores": [round(s, 8) for s in top.values.tolist()]}
        with open(self.index, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

def score_all(writer, test_ids, batch=4):
    """Scores the test examples the writer has not finished, `batch` at a time; returns how many it computed."""
    todo = [i for i in test_ids if i not in writer.done()]
    for k in range(0, len(todo), batch):
        ids = todo[k:k + batch]
        scores = ti.influence(loss, head, train, ti.take(test, torch.tensor(ids)), ihvp=ihvp)   # [len(ids), 500]
        for i, row in zip(ids, scores):
            writer.write(i, row)
    return len(todo)

writer = ScoreWriter(tempfile.mkdtemp(prefix="sequence-scores-"))
wanted = list(range(12))
tic = time.perf_counter()
first = score_all(writer, wanted[:5])                 # a run that stopped after 5 examples
second = score_all(writer, wanted)                    # the rerun: only the rest
third = score_all(writer, wanted)                     # nothing left
display(Markdown(f"First run scored {first} test sequences, the rerun {second}, a third run {third} "
                 f"({time.perf_counter() - tic:.1f} s in all); the folder holds "
                 f"{len([f for f in os.listdir(writer.folder) if f.endswith('.pt')])} score files and "
                 f"{len(writer.done())} index lines."))

# %% [markdown]
# The score files read back as one `[n_test, n_train]` matrix, and match a single batched call:

# %%
with open(writer.index) as f:
    records = sorted((json.loads(line) for line in f), key=lambda r: r["test_id"])
S = torch.stack([torch.load(os.path.join(writer.folder, r["file"]), weights_only=True) for r in records])
direct_call = ti.influence(loss, head, train, ti.take(test, torch.tensor(wanted)), ihvp=ihvp)
print("matrix", tuple(S.shape), " max |files − one call| =", f"{(S - direct_call).abs().max().item():.1e}")
print("index line:", json.dumps(records[0]))

# %% [markdown]
# What does a test sentence learn from? Its most helpful training sentences, by stride:

# %%
def stride_of(batch, i):
    ids = batch["input_ids"][i]
    return int((ids[1] - ids[0]) % V)

lines = ["| test sentence | stride | strides of its 5 most helpful training sentences | share of training set with that stride |",
         "|---|---|---|---|"]
all_strides = torch.tensor([stride_of(train, i) for i in range(500)])
shown = [next(t for t in wanted if stride_of(test, t) == k) for k in (1, 2, 3) if any(stride_of(test, t) == k for t in wanted)]
for t in shown:
    top = S[t].topk(5).indices.tolist()
    s = stride_of(test, t)
    sentence = " ".join(str(x) for x in test["input_ids"][t][test["attention_mask"][t].bool()].tolist())
    lines.append(f"| `{sentence}` | {s} | {[stride_of(train, i) for i in top]} | {(all_strides == s).double().mean().item():.2f} |")
display(Markdown("\n".join(lines)))
