# %% [markdown]
# # A language model: which training sequences taught it a token?
#
# This notebook trains a small byte-level decoder on Python's own standard-library sources, writes
# the compressed per-example gradients of every training window to an on-disk store once
# (LoGra: each linear layer's inputs and output gradients projected separately, the gradient never
# formed), and asks, for one token of a held-out query, which training sequences most lowered and
# most raised its loss, and which of their bytes carried that influence.
#
# Scores follow tinfluence's one sign: `score ≈ L_query(θ̂ without z) − L_query(θ̂)`. A positive
# score means that removing z would raise the query token's loss: training on z **lowered** it
# (a proponent). A negative score means training on z **raised** it (an opponent).

# %%
import tempfile
import warnings

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display

warnings.filterwarnings("ignore", message="IProgress not found")  # no ipywidgets: progress bars fall back to text
import tinfluence as ti
from tinfluence.text import ByteDecoder, decode, stdlib_windows, token_nll

torch.set_num_threads(1)     # small kernels run fastest on one thread

# %% [markdown]
# ## The corpus and the model
#
# 3,000 windows of 48 bytes cut from the standard library (ids are bytes, 0–255; no tokenizer,
# no download), in random order; 2,900 train the model and 100 are held out as queries. The model
# is a two-block pre-norm causal transformer built from `nn.Linear` layers (about 60k parameters).

# %%
T = 48
ids = stdlib_windows(T, 3000, generator=torch.Generator().manual_seed(0))
train_ids, query_ids = ids[:2900], ids[2900:]
print(repr(decode(train_ids[0])))

torch.manual_seed(0)
model = ByteDecoder(d=48, layers=2, heads=4, context=T)
print(f"{sum(p.numel() for p in model.parameters()):,} parameters")

# %%
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
g = torch.Generator().manual_seed(1)
for step in range(400):
    batch = train_ids[torch.randint(0, len(train_ids), (64,), generator=g)]
    loss = token_nll(model(batch), batch)[:, :-1].mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 0 or step == 399:
        print(f"step {step:3d}  next-byte loss {loss.item():.3f} nats")
model.eval();

# %% [markdown]
# ## Compressed training gradients, written once
#
# `ti.projector` draws the random projections from an explicit generator (the same for training
# and query gradients); `ti.io.write_store` writes one bfloat16 row of `dim` numbers per training
# window, chunk by chunk, resumable if interrupted. The curvature is the damped covariance of the
# stored rows, one block per layer, inverted exactly.

# %%
apply, params = ti.functionalize(model)
token_loss = lambda p, b: token_nll(apply(p, b["input_ids"]), b["input_ids"])   # [B, T], one loss per byte
sequence_loss = lambda p, b: token_loss(p, b).sum(-1)                         # [B]
train, queries = {"input_ids": train_ids}, {"input_ids": query_ids}

proj = ti.projector(params, k_in=16, k_out=16, generator=torch.Generator().manual_seed(0))
folder = tempfile.mkdtemp(prefix="lm-store-")
store = ti.io.write_store(sequence_loss, params, train, projector=proj, folder=folder, dtype="bfloat16",
                          chunk_rows=256, progress=False)
Z = store.read().float()
curvature = ti.projected_curvature(store, damping=0.1 * float(Z.pow(2).sum(1).mean()) / Z.shape[1], blocks=proj)
print(store)

# %% [markdown]
# ## One query token
#
# Take a held-out query and the byte where the model is most sure of itself: the next-byte
# prediction with the lowest loss that is not whitespace. `ti.query_token_influence` gives the
# influence of every training window on every query position, `[n_query, T, n_train]`; its sum over
# positions is the per-sequence score.

# %%
q = 7
query = ti.take(queries, slice(q, q + 1))
with torch.no_grad():
    query_nll = token_loss(params, query)[0]
nonspace = torch.tensor([chr(int(b)) not in " \n" for b in query_ids[q, 1:]] + [False])
t_star = int(torch.where(nonspace, query_nll, torch.inf)[:-1].argmin())
text = decode(query_ids[q])
print(repr(text))
print(f"chosen position {t_star}: after {text[max(0, t_star - 12):t_star + 1]!r} the model predicts "
      f"{chr(int(query_ids[q, t_star + 1]))!r} with loss {query_nll[t_star]:.3f}")

per_token = ti.query_token_influence(token_loss, params, query, store, projector=proj, curvature=curvature)
print("shape", tuple(per_token.shape))
scores = per_token[0, t_star]                        # [n_train]: influence on the chosen token's loss
lowered = scores.topk(5).indices                     # proponents: training on them lowered the loss
raised = (-scores).topk(5).indices                   # opponents: training on them raised it

# %%
def table(title, ids_):
    rows = "\n".join(f"| {int(i)} | {scores[i]:+.2e} | `{decode(train_ids[i])!r}` |" for i in ids_)
    display(Markdown(f"**{title}**\n\n| window | score | text |\n|---|---|---|\n{rows}"))


table("Most lowered the chosen token's loss (highest scores)", lowered)
table("Most raised the chosen token's loss (lowest scores)", raised)

# %% [markdown]
# ## Which bytes of those windows carried the influence?
#
# `ti.train_token_influence` splits each training window's score into its bytes' next-byte
# losses, `[n_query, n_train, T]`, summing to the window's score. The query measure here is the
# chosen token's loss alone (the per-token loss times a one-hot mask), so each row below sums to
# the score in the tables. Red bytes lowered the chosen token's loss, blue bytes raised it.

# %%
one_hot = F.one_hot(torch.tensor(t_star), T).to(torch.get_default_dtype())
chosen = lambda p, b: (token_loss(p, b) * one_hot).sum(-1)      # the query measure: the chosen token's loss
picked = torch.cat([lowered, raised])
by_byte = ti.train_token_influence(token_loss, params, ti.take(train, picked), query, projector=proj,
                                   curvature=curvature, query_loss=chosen)[0]          # [10, T]
print("rows sum to the window scores:", torch.allclose(by_byte.sum(1), scores[picked].to(by_byte.dtype),
                                                        rtol=0.05, atol=0.05 * float(scores.abs().max())))


def heatmap(ax, values, windows, title):
    """Each training window as a row of bytes, colored by that byte's share of the score."""
    lim = float(values.abs().max())
    ax.imshow(values.detach(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for r, w in enumerate(windows):
        for c, b in enumerate(train_ids[w].tolist()):
            ch = chr(b) if 32 < b < 127 else {10: "⏎", 32: "·"}.get(b, "?")
            ax.text(c, r, ch, ha="center", va="center", fontsize=7, family="monospace")
    ax.set_yticks(range(len(windows)), [f"#{int(w)} {float(scores[w]):+.1e}" for w in windows], fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)


fig, axes = plt.subplots(2, 1, figsize=(11, 5.5))
heatmap(axes[0], by_byte[:5], lowered, "windows that most LOWERED the chosen token's loss (score > 0)")
heatmap(axes[1], by_byte[5:], raised, "windows that most RAISED the chosen token's loss (score < 0)")
fig.suptitle(f"query {q}: {text[max(0, t_star - 20):t_star + 1]!r} → {chr(int(query_ids[q, t_star + 1]))!r}",
             fontsize=10)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## And the other way round: every query position against one training window
#
# The row of `per_token` for the strongest proponent shows which positions of the query that
# window helped (red) or hurt (blue); the chosen position is boxed.

# %%
top = int(lowered[0])
row = per_token[0, :, top]                         # [T]
fig, ax = plt.subplots(figsize=(11, 1.6))
lim = float(row.abs().max())
ax.imshow(row[None].detach(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
for c, b in enumerate(query_ids[q].tolist()):
    ch = chr(b) if 32 < b < 127 else {10: "⏎", 32: "·"}.get(b, "?")
    ax.text(c, 0, ch, ha="center", va="center", fontsize=8, family="monospace")
ax.add_patch(plt.Rectangle((t_star - 0.5, -0.5), 1, 1, fill=False, lw=2))
ax.set_yticks([])
ax.set_xticks([])
ax.set_title(f"influence of training window #{top} on each next-byte loss of query {q} "
             f"(position t scores byte t+1)", fontsize=9)
fig.tight_layout()
plt.show()
print(f"sum over positions {float(row.sum()):+.3e} = the per-sequence score of window #{top} on the whole query")
