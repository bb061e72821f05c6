# %% [markdown]
# # Quickstart: from an `nn.Module` to influence scores
#
# Which training examples made the model predict this? An influence score answers for every
# training example at once: it predicts how much the loss on a test point would change if that
# example were removed and the model retrained,
#
#     score ≈ L_test(θ̂ without z) − L_test(θ̂),     positive = helpful, negative = harmful.
#
# This notebook trains a logistic regression on scikit-learn's 8×8 digits, computes scores in
# ten lines, swaps the inverse-Hessian solver in one line, writes the same computation by hand
# with `torch.func.vmap`, and looks at the training digits behind a mistake.

# %%
import time
import warnings

import torch
import torch.nn.functional as F
from IPython.display import Markdown, display
from sklearn.datasets import load_digits

warnings.filterwarnings("ignore", message="IProgress not found")  # no ipywidgets: progress bars fall back to text
import tinfluence as ti

get_ipython().run_line_magic("matplotlib", "inline")   # figures (ti.plot returns them) render as PNG
torch.set_num_threads(1)                  # small kernels run fastest on one thread
torch.set_default_dtype(torch.float64)    # influence compares tiny differences: use float64

X, y = load_digits(return_X_y=True)
X, y = torch.tensor(X), torch.tensor(y)
images = X.reshape(-1, 8, 8)
mean, std = X[:1000].mean(0), X[:1000].std(0) + 1e-6
X = (X - mean) / std
train, test = (X[:1000], y[:1000]), (X[1000:], y[1000:])   # a data set is any pytree of tensors
print(f"{len(train[1])} training digits, {len(test[1])} test digits, {X.shape[1]} pixels each")

# %% [markdown]
# ## Ten lines
#
# `ti.functionalize` turns the module into a pure function `apply(params, x)` of a parameter
# dict (the module itself is left alone). The loss returns one value per example. The training
# objective `R` is the mean loss plus weight decay; `ti.hvp(R, params)` is the Hessian-vector
# product at the trained parameters, and `ti.cg` inverts it by conjugate gradients, for many
# right-hand sides at once.

# %%
model = torch.nn.Linear(64, 10)
apply, params = ti.functionalize(model)                        # params: dict[str, Tensor]

def loss(params, batch):                                       # one loss per example, shape [B]
    x, y = batch
    return F.cross_entropy(apply(params, x), y, reduction="none")

R = ti.objective(loss, train, l2=1e-2)                         # θ ↦ mean loss + l2/2·‖θ‖²
params = ti.minimize(R, params, newton_steps=5)               # L-BFGS + Newton to gradient 1e-10
ihvp = ti.cg(ti.hvp(R, params), tol=1e-8)                      # v ↦ H⁻¹ v, many v at once
test_batch = ti.take(test, slice(0, 20))
scores = ti.influence(loss, params, train, test_batch, ihvp=ihvp)   # [n_test, n_train]
print(scores.shape)

# %% [markdown]
# One row per test point, one column per training digit. Scores of a test point sum up its
# training digits' pull; the largest positive ones are the digits the model learned this test
# point from.

# %%
accuracy = (apply(params, test[0]).argmax(1) == test[1]).double().mean().item()
row = scores[0]
display(Markdown(
    f"Test accuracy {accuracy:.3f}. Test digit 0 (label {int(test[1][0])}): scores range from "
    f"{row.min().item():.2e} to {row.max().item():.2e}; {int((row > 0).sum())} of {row.numel()} training digits "
    f"are helpful. Its top-5 helpful training digits have labels {train[1][row.topk(5).indices].tolist()}."))

# %% [markdown]
# ## Swap the solver in one line
#
# LiSSA replaces the exact solve by a stochastic recursion on mini-batches: it never touches the
# whole data set at once, which is what makes it usable on large models. The dense solve
# (`ti.direct`) is exact and fine for a few thousand parameters. The three agree closely here:

# %%
g = torch.Generator().manual_seed(0)
solvers = {
    "cg": ihvp,
    "direct": ti.direct(ti.hessian(R, params)),
    "lissa": ti.lissa(loss, params, train, l2=1e-2, depth=500, batch_size=50, generator=g),
}
results, seconds = {}, {}
for name, solver in solvers.items():
    tic = time.perf_counter()
    results[name] = ti.influence(loss, params, train, test_batch, ihvp=solver)
    seconds[name] = time.perf_counter() - tic
for name in solvers:
    r = ti.pearson(results[name], results["direct"]).mean().item()
    print(f"{name:<7} {seconds[name]:6.2f} s   Pearson with direct (mean over 20 test points) {r:.6f}")

# %% [markdown]
# ## The same, by hand, with `torch.func.vmap`
#
# Everything is a pure function of pytrees, so it composes with `torch.func`. Write the score of
# ONE test point: its gradient, the CG solve, the dot product with every training gradient. Then
# `vmap` it over a test batch. Under `vmap` the solver must not branch on data, so CG runs a fixed
# number of iterations (`tol=None, maxiter=...`). The library's batched call does the same work in
# one stack of right-hand sides and must give the same numbers.

# %%
fixed = ti.cg(ti.hvp(R, params), tol=None, maxiter=40)        # no data-dependent stopping: vmappable
G_train = ti.per_example_grads(loss, params, train)            # leaves [1000, ...], computed once
n = len(train[1])

def score_one(x, label):
    example = (x[None], label[None])
    g_test = torch.func.grad(lambda p: loss(p, example)[0])(params)
    u = fixed(g_test)                                          # (H)⁻¹ ∇L_test
    return ti.tree.pairwise_vdot(ti.tree.map(lambda leaf: leaf[None], u), G_train)[0] / n

by_hand = torch.func.vmap(score_one)(*test_batch)              # [20, 1000]
batched = ti.influence(loss, params, train, test_batch, ihvp=fixed)
print("max |vmap − batched| =", (by_hand - batched).abs().max().item(),
      "  max |score| =", batched.abs().max().item())
print("max |40 fixed CG iterations − tol 1e-8| =", (batched - scores).abs().max().item())

# %% [markdown]
# ## The training digits behind a mistake
#
# Take a test digit the model gets wrong and show its most helpful training digits (removing
# them would raise its loss) and its most harmful ones (removing them would lower it).

# %%
predicted = apply(params, test[0]).argmax(1)
wrong = torch.nonzero(predicted != test[1]).flatten()
t = int(wrong[0])
one = ti.take(test, slice(t, t + 1))
row = ti.influence(loss, params, train, one, ihvp=ihvp)[0]
fig = ti.plot.top_examples(images[:1000], row, images[1000 + t], k=6, labels=train[1], test_label=int(test[1][t]),
                           title=f"test digit {t}: true {int(test[1][t])}, predicted {int(predicted[t])}")
display(fig)
harmful = row.topk(6, largest=False).indices
display(Markdown(
    f"{len(wrong)} of {len(test[1])} test digits are misclassified. Test digit {t} is a {int(test[1][t])} "
    f"predicted as {int(predicted[t])}. Its six most harmful training digits are labelled "
    f"{train[1][harmful].tolist()}: removing the most harmful one alone is predicted to lower its loss by "
    f"{-row[harmful[0]].item():.3f} (its loss is {loss(params, one).item():.3f})."))

# %% [markdown]
# Removing the most harmful digit and retraining checks the prediction (`ti.leave_one_out`
# retrains warm-started from θ̂ and measures the actual change of the test loss):

# %%
train_fn = ti.newton_trainer(loss, params, train, l2=1e-2)   # Newton iterations, warm-started
actual = ti.leave_one_out(train_fn, params, train, one, harmful[:3], measure=loss, progress=False)[0]
for i, a in zip(harmful[:3].tolist(), actual.tolist()):
    print(f"training digit {i}: predicted change {row[i].item():+.4f}, actual after retraining {a:+.4f}")
