# %% [markdown]
# # Influence in deep models: TracIn, EmpiricalIF, last-layer, EK-FAC and trajectory influence
#
# Beyond convex models the assumptions of influence functions break: the loss is not convex,
# training stops before an optimum, and retraining from scratch lands somewhere else anyway.
# Basu, Pope & Feizi (2021, "Influence functions in deep learning are fragile") found that
# estimates then agree with leave-one-out retraining only roughly, and better with weight decay
# and for shallow networks. This notebook trains an MLP and a small CNN on the 8×8 digits,
# computes three kinds of scores, and compares them with each other and with actual retraining
# for a few test points and a small set of removed training points. Then EK-FAC on the CNN, and
# the same-schedule retraining comparison with trajectory influence.

# %%
import os
import tempfile
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from IPython.display import Markdown, display
from sklearn.datasets import load_digits

warnings.filterwarnings("ignore", message="IProgress not found")  # no ipywidgets: progress bars fall back to text
import tinfluence as ti

get_ipython().run_line_magic("matplotlib", "inline")   # figures render as PNG
torch.set_num_threads(1)                  # small kernels run fastest on one thread
torch.set_default_dtype(torch.float64)

X, y = load_digits(return_X_y=True)
X, y = torch.tensor(X) / 16, torch.tensor(y)
train, test = (X[:1000], y[:1000]), (X[1000:], y[1000:])
test_points = ti.take(test, torch.tensor([0, 1, 2]))

def make(kind, seed):
    torch.manual_seed(seed)
    if kind == "mlp":
        body = nn.Sequential(nn.Linear(64, 32), nn.Tanh())
        return nn.Sequential(body, nn.Linear(32, 10))
    body = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten())
    return nn.Sequential(body, nn.Linear(72, 10))           # 8 channels × 3 × 3

# %% [markdown]
# ## Training with checkpoints
#
# Full-batch gradient descent with momentum and weight decay (the same penalty `ti.objective`'s
# `l2` describes), 200 steps from a seeded initialization, so a run is a deterministic function
# of its data. Every 20 steps the `state_dict` is saved; `ti.load_checkpoints` reads the files
# back as the `(params, lr)` pairs TracIn takes.

# %%
STEPS, LR, EVERY = 200, 0.5, 20
folder = tempfile.mkdtemp(prefix="checkpoints-")

def fit(kind, data, wd, seed=0, save=False):
    model = make(kind, seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=wd)
    paths = []
    for step in range(STEPS):
        if save and step % EVERY == 0:
            paths.append(os.path.join(folder, f"{kind}-{step:04d}.pt"))
            torch.save(model.state_dict(), paths[-1])
        opt.zero_grad()
        F.cross_entropy(model(data[0]), data[1]).backward()
        opt.step()
    return model.eval(), paths

models, paths = {}, {}
for kind in ["mlp", "cnn"]:
    tic = time.perf_counter()
    models[kind], paths[kind] = fit(kind, train, wd=1e-3, save=True)
    acc = (models[kind](test[0]).argmax(1) == test[1]).double().mean().item()
    print(f"{kind}: {sum(p.numel() for p in models[kind].parameters())} parameters, test accuracy {acc:.3f}, "
          f"{time.perf_counter() - tic:.1f} s, {len(paths[kind])} checkpoints")

# %% [markdown]
# ## Three scores
#
# * **TracIn** — gradient dot products summed over the saved checkpoints, all parameters.
# * **EmpiricalIF** — loss changes under ± a small step along each test gradient, all parameters.
# * **last-layer influence** — classic influence with only the output layer attributed
#   (`ti.functionalize(model, trainable=...)`; the body is frozen inside `apply`), curvature from
#   the Gauss-Newton matrix (`ti.ggn_vp`, positive semi-definite) plus the weight decay,
#   solved by `ti.cg` with a small damping.

# %%
def per_example_loss(apply):
    return lambda params, batch: F.cross_entropy(apply(params, batch[0]), batch[1], reduction="none")

def scores_for(model, ckpt_paths, wd, damping=1e-3):
    apply, params = ti.functionalize(model)
    loss = per_example_loss(apply)
    out = {}
    out["TracIn"] = ti.tracin(loss, ti.load_checkpoints(ckpt_paths, model, lrs=LR * EVERY), train, test_points) \
        if ckpt_paths else None
    out["EmpiricalIF"] = ti.empirical_if(loss, params, train, test_points, radius=1e-3)
    head_apply, head = ti.functionalize(model, trainable=lambda name, p: name.startswith("1."))
    head_loss = per_example_loss(head_apply)
    curvature = ti.ggn_vp(lambda p, b: head_apply(p, b[0]), head, train, l2=wd,
                          output_loss=lambda o, b: F.cross_entropy(o, b[1], reduction="none"))
    out["last layer"] = ti.influence(head_loss, head, train, test_points,
                                     ihvp=ti.cg(curvature, damping=damping, tol=1e-8, maxiter=500))
    return {k: v for k, v in out.items() if v is not None}

scores = {}
for kind in ["mlp", "cnn"]:
    tic = time.perf_counter()
    scores[kind] = scores_for(models[kind], paths[kind], wd=1e-3)
    print(f"{kind}: scores in {time.perf_counter() - tic:.1f} s")

# %% [markdown]
# How much do the three agree with each other? (Spearman rank correlation over all 3 × 1000
# scores; the three have different scales, so ranks are the fair comparison.)

# %%
lines = ["| model | TracIn vs EmpiricalIF | TracIn vs last layer | EmpiricalIF vs last layer |", "|---|---|---|---|"]
for kind, s in scores.items():
    pair = lambda a, b: ti.spearman(s[a].reshape(-1), s[b].reshape(-1)).item()
    lines.append(f"| {kind} | {pair('TracIn', 'EmpiricalIF'):.3f} | {pair('TracIn', 'last layer'):.3f} | "
                 f"{pair('EmpiricalIF', 'last layer'):.3f} |")
display(Markdown("\n".join(lines)))

# %% [markdown]
# ## Full-parameter curvature is indefinite
#
# The Hessian of a trained network has negative eigenvalues. Conjugate gradients detects the
# negative curvature and stops with a clear error rather than returning a meaningless solve;
# damping above the most negative eigenvalue, or the Gauss-Newton matrix, fixes it.

# %%
apply, params = ti.functionalize(models["mlp"])
R = ti.objective(per_example_loss(apply), train, l2=1e-3)
H = ti.hessian(R, params)
eig = torch.linalg.eigvalsh(H)
try:
    ti.cg(ti.hvp(R, params), tol=1e-8, maxiter=2000)(ti.per_example_grads(per_example_loss(apply), params, test_points))
    message = "CG converged without damping."
except ti.ConvergenceError as err:
    message = str(err).removeprefix("ti.cg: ").split(" at iteration")[0]
display(Markdown(f"MLP Hessian ({H.shape[0]} parameters): eigenvalues from {eig[0].item():.2e} to {eig[-1].item():.2e}, "
                 f"{int((eig < 0).sum())} negative. Undamped CG: *{message}*."))

# %% [markdown]
# ## Against retraining
#
# Eight training points are removed one at a time (the 4 most helpful and 4 most harmful for test
# point 0 by last-layer influence, a cheap and deliberately influential set); each removal is a
# full retraining from the same seed, and the actual change of the loss on the three test
# points is measured. Retraining noise is measured too: the same removals with another
# initialization seed. Then the comparison is repeated for two weight decays, and last-layer
# influence for several dampings. Pearson is computed per test point over the 8 removals, then
# averaged.

# %%
def actual_changes(kind, wd, removed, seed=0):
    def measure(model):
        return F.cross_entropy(model(test_points[0]), test_points[1], reduction="none").detach()
    base = measure(fit(kind, train, wd, seed)[0])
    keep = lambda i: torch.arange(1000) != i
    return torch.stack([measure(fit(kind, ti.take(train, keep(i)), wd, seed)[0]) - base for i in removed.tolist()], dim=1)

def mean_r(a, b):
    return ti.pearson(a, b).mean().item()

rows = []
tic = time.perf_counter()
for kind, wd in [("mlp", 1e-4), ("mlp", 1e-2), ("cnn", 1e-3)]:
    model, ckpts = fit(kind, train, wd, save=True)
    s = scores_for(model, ckpts, wd)
    row0 = s["last layer"][0]
    removed = torch.cat([row0.topk(4).indices, row0.topk(4, largest=False).indices])
    actual = actual_changes(kind, wd, removed)
    other_seed = actual_changes(kind, wd, removed, seed=1) if kind == "mlp" else None
    result = {"model": kind, "weight decay": wd}
    for name, v in s.items():
        result[name] = mean_r(v[:, removed], actual)
    for damping in [1e-4, 1e-2, 1e-1]:
        result[f"last layer, λ={damping:g}"] = mean_r(scores_for(model, [], wd, damping)["last layer"][:, removed], actual)
    result["seed 1 vs seed 0"] = mean_r(other_seed, actual) if other_seed is not None else float("nan")
    rows.append(result)
print(f"retraining and scoring: {time.perf_counter() - tic:.1f} s")
columns = [k for k in rows[0] if k not in ("model", "weight decay")]
display(Markdown(
    "Pearson correlation with actual retraining (mean over 3 test points, 8 removals each; last layer default λ=1e-3):\n\n"
    "| model | weight decay | " + " | ".join(columns) + " |\n|---|---|" + "---|" * len(columns) + "\n"
    + "\n".join(f"| {r['model']} | {r['weight decay']:g} | " + " | ".join(f"{r[c]:.3f}" for c in columns) + " |" for r in rows)))

# %% [markdown]
# Read the last column first: it is how well one retraining predicts another that differs only
# in the random initialization — the ceiling any estimator can reach when the "truth" is itself
# a noisy retraining. In a deep model, removing one example perturbs the training trajectory,
# and that perturbation is partly chaotic; Basu et al. call the resulting low, setting-dependent
# correlations fragility. Weight decay makes the objective better conditioned and the runs
# more repeatable; damping trades bias for stability of the solve. All estimates here are cheap
# to compute; the retraining, even for 8 points, is what costs.
# %% [markdown]
# ## EK-FAC on the CNN
#
# Conjugate gradients over the Gauss-Newton matrix is exact but costs a pass over the training
# data per iteration. EK-FAC (`ti.ekfac`, George et al. 2018) fits a Kronecker-factored
# approximation of the same curvature once, layer by layer (the convolution through its im2col
# patches), and inverts it in closed form. Here it is fitted on the trained CNN with the
# Gauss-Newton Fisher (`fisher="ggn"`) and damping equal to the weight decay, and compared with
# CG over the exact Gauss-Newton matrix plus the same damping: time, agreement per test point,
# and the training images each one calls most harmful.

# %%
apply, params = ti.functionalize(models["cnn"])
loss = per_example_loss(apply)
predict = lambda p, b: apply(p, b[0])
output_loss = lambda o, b: F.cross_entropy(o, b[1], reduction="none")
WD = 1e-3

tic = time.perf_counter()
curv = ti.ekfac(loss, params, train, predict=predict, output_loss=output_loss, fisher="ggn", damping=WD)
ekfac_scores = ti.influence(loss, params, train, test_points, ihvp=curv.ihvp)
ekfac_time = time.perf_counter() - tic
print(curv.summary())

tic = time.perf_counter()
solver = ti.cg(ti.ggn_vp(predict, params, train, output_loss=output_loss), damping=WD, tol=1e-6, maxiter=1000)
solves = []                             # keep the solve report (iterations) of the one stacked solve

def cg_ihvp(v):
    solves.append(solver.solve(v))
    return solves[-1].x

cg_scores = ti.influence(loss, params, train, test_points, ihvp=cg_ihvp)
cg_time = time.perf_counter() - tic
display(Markdown(
    f"EK-FAC fit + scores: {ekfac_time:.1f} s; CG over the Gauss-Newton matrix: {cg_time:.1f} s, "
    f"{int(solves[0].info.iterations.max())} iterations. Pearson of EK-FAC with CG per test point: "
    + ", ".join(f"{r:.3f}" for r in ti.pearson(ekfac_scores, cg_scores).tolist())
    + "; Spearman: " + ", ".join(f"{r:.3f}" for r in ti.spearman(ekfac_scores, cg_scores).tolist()) + "."))

# %% [markdown]
# EK-FAC agrees with CG on the largest scores (Pearson) far better than on the ordering of the
# many small ones (Spearman): the Kronecker factors average the per-example output Hessians and
# drop the coupling between layers, which matters little for the examples that dominate a test
# point and much for the bulk near zero. Its fit is a fraction of CG's time. The most harmful
# images are the ones to inspect first: below, for each test point, EK-FAC's five most helpful
# and five most harmful training images.

# %%
ti.plot.top_examples(train[0], ekfac_scores, test_points[0], k=5, labels=train[1], test_label=test_points[1],
                     image_shape=(8, 8), title="CNN, EK-FAC influence: most helpful and most harmful training images")

# %% [markdown]
# ## Against retraining with the same schedule
#
# Retraining from scratch mixes two things: the effect of the removed example and the chaos of
# a different trajectory. `ti.training_run` makes a mini-batch run a pure function of per-example
# data weights, with its schedule fixed by a generator; removing z is then the same run with
# w_z = 0, every other example in its place (`ti.replay_effect`, exact). Trajectory influence
# (`ti.trajectory_influence`) is the exact derivative of the test loss in those weights, by
# reverse mode through the replayed run. Beside it: TracIn over the run's epoch checkpoints,
# and EK-FAC and Gauss-Newton (CG) influence at the final parameters, each scored against the
# same replays. The CNN is trained by plain SGD (lr 0.5, 10 epochs of batches of 100); per test
# point the removals are the union of each method's 8 largest |scores|, so no method picks the
# set alone.

# %%
LR_RUN, DAMPING = 0.5, 1e-2
_, params0 = ti.functionalize(make("cnn", 0))
tic = time.perf_counter()
run = ti.training_run(loss, params0, train, ti.optim.sgd(LR_RUN), epochs=10, batch_size=100,
                      generator=torch.Generator().manual_seed(0))
final = run.final_params()
acc = (apply(final, test[0]).argmax(1) == test[1]).double().mean().item()
methods = {
    "trajectory": ti.trajectory_influence(run, test_points),
    "TracIn": ti.tracin(loss, [(p, LR_RUN) for p in run.params_at(range(0, run.steps, 10))], train, test_points),
    "EK-FAC": ti.influence(loss, final, train, test_points, ihvp=ti.ekfac(
        loss, final, train, predict=predict, output_loss=output_loss, fisher="ggn", damping=DAMPING).ihvp),
    "GGN (CG)": ti.influence(loss, final, train, test_points, ihvp=ti.cg(
        ti.ggn_vp(predict, final, train, output_loss=output_loss), damping=DAMPING, tol=1e-6, maxiter=1000)),
}
removed = [torch.cat([s[t].abs().topk(8).indices for s in methods.values()]).unique() for t in range(3)]
ids = torch.cat(removed).unique()
effects = ti.replay_effect(run, test_points, [[int(i)] for i in ids])      # [3, len(ids)], exact
column = {int(i): c for c, i in enumerate(ids)}
actual = [effects[t, [column[int(i)] for i in removed[t]]] for t in range(3)]
predicted = {name: [s[t, removed[t]] for t in range(3)] for name, s in methods.items()}
print(f"CNN run: test accuracy {acc:.3f}; scores and {len(ids)} replays in {time.perf_counter() - tic:.1f} s")
ti.plot.loo_scatter(actual, predicted, scale_free=["TracIn"],
                    title=f"CNN, plain SGD lr {LR_RUN}: predicted vs actual change when one example's weight is set to 0 "
                          "(same schedule)")

# %% [markdown]
# Trajectory influence sits on the y = x line for every test point: it is the derivative of
# exactly what the replay measures, and plain SGD at a stable learning rate is smooth enough in
# the weights for first order to hold example by example. On this small CNN, Gauss-Newton
# influence at the final parameters comes close in rank and in scale; EK-FAC, its
# Kronecker-factored approximation, ranks the large effects but overshoots their size; TracIn
# has its own scale and ranks worst. How learning rate, momentum, Adam and epochs move these
# numbers, the MLPs, and LDS over random removal subsets: `benchmarks/RESULTS-trajectory.md`.
