"""tinfluence's EK-FAC beside kronfluence's, settings matched, and EK-FAC-preconditioned CG.

    python benchmarks/kfac_vs_kronfluence.py              # digits-lr and digits-mlp, writes RESULTS-kfac.md
    python benchmarks/kfac_vs_kronfluence.py --task digits-mlp --repeats 3
    python benchmarks/kfac_vs_kronfluence.py --preconditioning --task digits-lr --task fmnist-lr --out /tmp/p.md

`--preconditioning` measures instead where EK-FAC pays as a preconditioner: CG over the
Gauss-Newton matrix + l2·I (for logistic regression the Hessian itself) plain, Nyström- and
EK-FAC-preconditioned (also with 1000× the damping); on the MLP tasks (`--task digits-mlp`,
`--task fmnist-mlp --n-train 10000`) first the spectrum CG sees, the extreme eigenvalues
(Lanczos) of each symmetrically preconditioned operator, including EK-FAC followed by a Nyström
sketch of the EK-FAC-preconditioned operator; and LiSSA's true residual against its depth,
plain, EK-FAC-preconditioned and warm-started, on digits-lr and on digits-lr with badly scaled
input features. fmnist-mlp's plain CG rows take the better part of an hour on one thread.

Settings matched (strategy "ekfac"):
- Fisher labels: the given labels (tinfluence `fisher="empirical"`, kronfluence
  `FactorArguments(use_empirical_fisher=True)`; its task's training loss is the cross entropy
  summed over the batch, so per-example gradients are those of each example's loss).
- Normalization: kronfluence divides its covariance and eigenvalue-correction sums by the
  number of examples (one position per example here), as tinfluence's factors are means over
  examples: both fit the Fisher of the MEAN loss.
- Damping: kronfluence adds `damping_factor` to every corrected eigenvalue (None would mean
  0.1 × the module's mean eigenvalue, tinfluence's `damping_mode="relative", damping=0.1`);
  both get damping = l2, the objective's weight decay, so (F̂ + l2 I) stands for the
  objective's curvature.
- Scale and sign: kronfluence's pairwise score is g_testᵀ (F̂ + λI)⁻¹ g_train for the
  measurement "test cross entropy" (positive = the training example lowers the test loss,
  helpful); tinfluence's is (1/n) times that with the same sign, so tinfluence = kronfluence / n.
- dtypes: float64 for every factor, gradient and score in both; float64 eigendecompositions.

Each library runs in its own process (kronfluence from the peers' environment, /work/venv-peers
by default) on the same task file, one thread each; time is the whole fit + score call.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
PEERS_PYTHON = os.environ.get("PEERS_PYTHON", "/work/venv-peers/bin/python")


def _split(task):
    from tasks import pure

    apply, params, loss = pure(task)
    return params, loss, (lambda p, b: apply(p, b[0])), (lambda o, b: F.cross_entropy(o, b[1], reduction="none"))


def tinfluence_ekfac(task, method: str = "ekfac", fisher: str = "empirical"):
    """`(seconds, scores [n_test, n_train])`: fit (`fisher`, damping = l2) and score with `factored=True`
    (training gradients of linear layers as their captured factors, never formed per example).
    """
    import tinfluence as ti

    params, loss, predict, output_loss = _split(task)
    fit = ti.ekfac if method == "ekfac" else ti.kfac
    start = time.perf_counter()
    curv = fit(loss, params, task.train, predict=predict, output_loss=output_loss, fisher=fisher, damping=task.l2)
    scores = ti.influence(loss, params, task.train, task.test, ihvp=curv.ihvp, factored=True)
    return time.perf_counter() - start, scores


def kronfluence_ekfac(task):
    """`(seconds, scores)` of kronfluence's EK-FAC with the empirical Fisher, as the library returns them."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence_adapter import _kronfluence_task
    from peers import _batch
    from torch.utils.data import TensorDataset

    dtype = task.dtype
    start = time.perf_counter()
    ktask = _kronfluence_task(torch.Generator().manual_seed(0))      # sample=False under the empirical Fisher
    model = task.make_model()
    model = prepare_model(torch.nn.Sequential(model) if task.kind == "lr" else model, ktask)
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as folder:
        analyzer = Analyzer(analysis_name="kfac", model=model, task=ktask, cpu=True, disable_tqdm=True, output_dir=folder)
        train, test = TensorDataset(*task.train), TensorDataset(*task.test)
        factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True, activation_covariance_dtype=dtype,
                                      gradient_covariance_dtype=dtype, per_sample_gradient_dtype=dtype, lambda_dtype=dtype)
        analyzer.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=_batch(task),
                                 factor_args=factor_args)
        score_args = ScoreArguments(damping_factor=task.l2, per_sample_gradient_dtype=dtype, precondition_dtype=dtype,
                                    score_dtype=dtype)
        analyzer.compute_pairwise_scores(scores_name="ekfac", factors_name="ekfac", query_dataset=test,
                                         train_dataset=train, per_device_query_batch_size=task.n_test,
                                         per_device_train_batch_size=_batch(task), score_args=score_args)
        scores = analyzer.load_pairwise_scores("ekfac")["all_modules"]
    return time.perf_counter() - start, scores


def preconditioned_cg(task, tol: float):
    """`(plain, preconditioned)`, each `(seconds, max iterations, scores)`: CG over the Gauss-Newton matrix + l2 I,
    without and with the EK-FAC preconditioner (fisher="ggn", damping = l2; its fit is inside the timing).
    """
    import tinfluence as ti

    params, loss, predict, output_loss = _split(task)
    out = []
    for precondition in (False, True):
        start = time.perf_counter()
        ggn = ti.ggn_vp(predict, params, task.train, output_loss=output_loss)
        pre = None
        if precondition:
            pre = ti.ekfac(loss, params, task.train, predict=predict, output_loss=output_loss, fisher="ggn",
                           damping=task.l2).preconditioner
        G = ti.per_example_grads(loss, params, task.test)
        X, info = ti.cg_solve(ggn, G, damping=task.l2, tol=tol, maxiter=2000, preconditioner=pre)
        scores = ti.tree.pairwise_vdot(X, ti.per_example_grads(loss, params, task.train)) / task.n_train
        out.append((time.perf_counter() - start, int(info.iterations.max()), scores))
    return out


def _test_rows(task):
    """The test points the inverse-HVP methods score (the first `ihvp_test` on Fashion-MNIST) and their exact rows."""
    rows = task.ihvp_test or task.n_test
    return ti_take(task.test, rows), task.exact[:rows]


def ti_take(data, rows):
    return tuple(t[:rows] for t in data)


# CG per task for --preconditioning: (relative residual tol, Nyström rank); run.py's setting where it has one.
PRECONDITIONING = {"digits-lr": (1e-2, 50), "fmnist-lr": (1e-2, 100), "digits-mlp": (1e-3, 100), "fmnist-mlp": (1e-3, 100)}
DAMPINGS = (1, 10, 100, 1000)      # EK-FAC preconditioner damping, in multiples of l2 (the system's damping)


def _reference(task, test, op, pre):
    """The exact influence rows of `test`: the task's own where it has them (dense direct solve), else
    Nyström-preconditioned CG to tol 1e-5 (the attainable accuracy of float32), scored like the rows.
    """
    import tinfluence as ti

    if task.exact is not None:
        return task.exact[: test[0].shape[0]], "the direct solve"
    params, loss, _, _ = _split(task)
    X, _ = ti.cg_solve(op, ti.per_example_grads(loss, params, test), tol=1e-5, maxiter=5000, preconditioner=pre)
    return _scores(task, X), "Nyström-preconditioned CG to tol 1e-5"


def _scores(task, X):
    """`[k, n_train]` influence of the solved test directions `X`, the training gradients 4096 at a time."""
    import tinfluence as ti

    params, loss, _, _ = _split(task)
    return torch.cat([ti.tree.pairwise_vdot(X, ti.per_example_grads(loss, params, chunk))
                      for chunk in zip(*(t.split(4096) for t in task.train))], 1) / task.n_train


def cg_rows(task) -> list[str]:
    """Plain, Nyström- and EK-FAC-preconditioned CG over GGN + l2·I (= the Hessian for logistic regression), every
    test point in one stack; the sketch and the fit inside each time; Pearson with exact influence.
    """
    import tinfluence as ti

    params, loss, predict, output_loss = _split(task)
    test, _ = _test_rows(task)
    tol, rank = PRECONDITIONING[task.name]
    k = test[0].shape[0]

    def solve(name, train):
        op = ti.ggn_vp(predict, params, train, output_loss=output_loss, l2=task.l2)
        pre = None
        if name.startswith("Nyström"):
            pre = ti.nystrom(op, rank=rank, generator=torch.Generator().manual_seed(0))
        elif name.startswith("EK-FAC"):
            damping = task.l2 * (DAMPINGS[-1] if "×" in name else 1)
            pre = ti.ekfac(loss, params, train, predict=predict, output_loss=output_loss,
                           fisher="ggn" if "ggn" in name else "empirical", damping=damping)
        return op, pre, ti.cg_solve(op, ti.per_example_grads(loss, params, test), tol=tol, maxiter=5000,
                                    preconditioner=pre)

    variants = ("plain", f"Nyström rank {rank}", "EK-FAC (fisher=\"ggn\")", "EK-FAC (empirical Fisher)",
                f"EK-FAC (fisher=\"ggn\", damping {DAMPINGS[-1]}× l2)")
    for name in variants:                                   # warm-up on 256 examples, so no row pays first-call costs
        solve(name, ti_take(task.train, 256))
    rows = []
    for name in variants:
        start = time.perf_counter()
        op, pre, (X, info) = solve(name, task.train)
        scores = _scores(task, X)
        rows.append((name, int(info.iterations.max()), time.perf_counter() - start, scores))
        print(f"{task.name} {name}: {rows[-1][1]} iterations, {rows[-1][2]:.2f} s", flush=True)
        if name.startswith("Nyström"):
            exact, against = _reference(task, test, op, pre)
    plain = rows[0][1]
    lines = [f"### {task.name}: CG to relative residual {tol:g}, {k} test points ({task.n_train} training examples, "
             f"P = {ti.tree.size(params)}, l2 = {task.l2:g}, {str(task.dtype).replace('torch.', '')})", "",
             f"| CG | iterations (max over test points) | / plain | time (s) | Pearson with {against} |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {its} | {its / plain:.2f} | {seconds:.2f} | {_pearson(scores, exact):.6f} |"
              for name, its, seconds, scores in rows]
    return lines + [""]


def _half_inverse(curv):
    """V ↦ (F̂ + λI)^{-1/2} V on stacks, from the fitted blocks' eigenbases: the symmetric square root of
    `curv.preconditioner`, so that M^{1/2} A M^{1/2} (similar to M A) can be handed to Lanczos.
    """
    def frame(block, V, shape):
        W = V[block.weight].reshape(V[block.weight].shape[0], shape[0], -1)
        return torch.cat([W, V[block.bias][:, :, None]], 2) if block.bias_side == "right" else W

    def apply(V):
        out = {}
        for block in curv.kronecker:
            if block.left_basis is None or block.bias_side not in ("right", None):
                raise NotImplementedError("_half_inverse: linear and convolution layers only")
            shape = curv.params[block.weight].shape
            QL, QR = block.left_basis, block.right_basis
            Y = QL @ ((QL.mT @ frame(block, V, shape) @ QR) * (block.eigenvalues + block.damping) ** -0.5) @ QR.mT
            if block.bias_side == "right":
                Y, out[block.bias] = Y[:, :, :-1], Y[:, :, -1]
            out[block.weight] = Y.reshape(Y.shape[0], *shape)
        for block in curv.diagonal:
            out[block.name] = V[block.name] * (block.diagonal + block.damping) ** -0.5
        return {name: out[name] for name in curv.params}

    return apply


def _kappa(op, generator, iterations) -> str:
    """`smallest … largest (κ)` Ritz values of a symmetric operator after `iterations` Lanczos steps."""
    import tinfluence as ti

    e = ti.eigenvalues(op, k=1, generator=generator, iterations=iterations)
    lo, hi = float(e.smallest[0]), float(e.largest[-1])
    return f"{lo:.3g} | {hi:.3g} | {hi / lo:.3g}"


def spectrum_rows(task, iterations: int = 100) -> list[str]:
    """Extreme eigenvalues (Lanczos, `iterations` steps, float64) of GGN + l2·I, plain and symmetrically
    preconditioned (P^{-1/2} A P^{-1/2}, the spectrum CG sees): EK-FAC at several dampings, Nyström, and the
    composite that sketches the EK-FAC-preconditioned operator with Nyström and deflates its top.
    """
    import tinfluence as ti

    task = _in_float64(task)
    params, loss, predict, output_loss = _split(task)
    _, rank = PRECONDITIONING[task.name]
    g = torch.Generator().manual_seed(0)
    A = ti.ggn_vp(predict, params, task.train, output_loss=output_loss, l2=task.l2)
    lines = [f"### {task.name}: the spectrum CG sees ({iterations} Lanczos steps, float64)", "",
             "| operator | smallest | largest | κ |", "|---|---|---|---|",
             f"| GGN + l2 I | {_kappa(A, g, iterations)} |"]

    def preconditioned(name, half, base=A):
        op = ti.LinearOperator(lambda v: one(half)(base(one(half)(v))), like=params)
        lines.append(f"| {name} | {_kappa(op, g, iterations)} |")
        print(lines[-1], flush=True)

    def one(on_stacks):
        return lambda v: ti.tree.map(lambda leaf: leaf[0], on_stacks(ti.tree.map(lambda leaf: leaf[None], v)))

    def nystrom_half(operator):
        """The symmetric square root of ti.nystrom's P⁻¹ = I + U diag(c) Uᵀ, I + U diag(√(1 + c) − 1) Uᵀ, with U
        and c recovered from P⁻¹ − I on r + 10 random directions (its range is U's).
        """
        pre = ti.nystrom(operator, rank=rank, generator=torch.Generator().manual_seed(0))
        minus_identity = lambda X: ti.ravel(pre(ti.unravel(X, params)), batch_ndim=1) - X  # noqa: E731
        omega = torch.randn(rank + 10, ti.tree.size(params), generator=torch.Generator().manual_seed(1), dtype=task.dtype)
        Q = torch.linalg.qr(minus_identity(omega).T).Q                              # [P, r + 10]
        c, W = torch.linalg.eigh((lambda C: (C + C.T) / 2)(minus_identity(Q.T) @ Q))
        U, root = Q @ W, (1 + c).clamp_min(0).sqrt() - 1
        return lambda V: (lambda X: ti.unravel(X + ((X @ U) * root) @ U.T, params))(ti.ravel(V, batch_ndim=1))

    for multiple in DAMPINGS:
        curv = ti.ekfac(loss, params, task.train, predict=predict, output_loss=output_loss, fisher="ggn",
                        damping=task.l2 * multiple)
        half = _half_inverse(curv)
        preconditioned(f"EK-FAC (fisher=\"ggn\", damping {multiple}× l2)", half)
        if multiple == 1:
            B = ti.LinearOperator(lambda v, half=half: one(half)(A(one(half)(v))), like=params,
                                  many=lambda V, half=half: half(A(half(V))))
            preconditioned(f"EK-FAC, then Nyström rank {rank} of the EK-FAC-preconditioned operator",
                           nystrom_half(B), base=B)
    preconditioned(f"Nyström rank {rank}", nystrom_half(A))
    return lines + [""]


def _in_float64(task):
    """The task with its data and parameters in float64 (Lanczos's small Ritz values need it)."""
    import dataclasses

    cast = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    return dataclasses.replace(task, train=tuple(map(cast, task.train)), test=tuple(map(cast, task.test)),
                               state={k: cast(v) for k, v in task.state.items()})


def _rescaled(task, low: float = -1.5, high: float = 1.5):
    """The logistic-regression task with its input features multiplied by factors 10^low … 10^high (a fixed
    permutation), retrained to its optimum: the ill-conditioning that layer-input statistics cause.
    """
    import tinfluence as ti

    scales = torch.logspace(low, high, task.train[0].shape[1], dtype=task.dtype)
    scales = scales[torch.randperm(len(scales), generator=torch.Generator().manual_seed(0))]
    train, test = (task.train[0] * scales, task.train[1]), (task.test[0] * scales, task.test[1])
    params, loss, _, _ = _split(task)
    params = ti.minimize(ti.objective(loss, train, l2=task.l2), ti.tree.zeros_like(params), gtol=1e-10, newton_steps=5)
    return params, train, test


def lissa_rows(task, depths=(30, 100, 300, 1000), batch_size: int = 256) -> list[str]:
    """LiSSA's TRUE relative residual ‖(H + l2 I)x − v‖/‖v‖ (max and median over 10 test points) against depth: plain,
    preconditioned by EK-FAC (fisher="ggn", damping = l2), and preconditioned with the EK-FAC solution as warm start;
    on the task and on its rescaled-input variant. scale="auto" for each (its estimate inside the time).
    """
    import tinfluence as ti

    params, loss, predict, output_loss = _split(task)
    lines = [f"### LiSSA on {task.name}: true relative residual against depth (batch {batch_size}, 10 test points)", "",
             "| inputs | κ(H + l2 I) | variant | " + " | ".join(f"depth {d}: max / median (s)" for d in depths) + " |",
             "|---|---|---|" + "---|" * len(depths)]
    for inputs, (p, train, test) in (("standardized", (params, task.train, task.test)),
                                     ("rescaled 10^±1.5", _rescaled(task))):
        H = ti.hessian(ti.objective(loss, train, l2=task.l2), p)
        evals = torch.linalg.eigvalsh(H)
        curv = ti.ekfac(loss, p, train, predict=predict, output_loss=output_loss, fisher="ggn", damping=task.l2)
        G = ti.per_example_grads(loss, p, ti_take(test, 10))
        for variant, options in (("plain", {}), ("EK-FAC-preconditioned", {"preconditioner": curv}),
                                 ("EK-FAC-preconditioned, warm start x0 = EK-FAC solution",
                                  {"preconditioner": curv, "x0": curv.ihvp})):
            cells = []
            for depth in depths:
                start = time.perf_counter()
                _, info = ti.lissa_solve(loss, p, train, G, l2=task.l2, depth=depth, batch_size=batch_size,
                                         generator=torch.Generator().manual_seed(0), **options)
                r = info.relative_residual
                cells.append(f"{float(r.max()):.3f} / {float(r.median()):.3f} ({time.perf_counter() - start:.1f})")
            lines.append(f"| {inputs} | {float(evals[-1] / evals[0]):.0f} | {variant} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
        V, X = ti.ravel(G, batch_ndim=1), ti.ravel(curv.ihvp(G), batch_ndim=1)
        r = (X @ H - V).norm(dim=1) / V.norm(dim=1)                        # H is symmetric
        lines.append(f"| {inputs} | | EK-FAC alone, x = (F̂ + l2 I)⁻¹ v | {float(r.max()):.3f} / {float(r.median()):.3f}"
                     + " |" * len(depths))
    return lines + [""]


def preconditioning(args) -> None:
    import run
    import tasks

    lines = ["## Where EK-FAC preconditioning pays", "",
             "Command: `python benchmarks/kfac_vs_kronfluence.py " + " ".join(sys.argv[1:]) + "`", ""]
    for name in args.task or ["digits-lr", "fmnist-lr"]:
        sizes = (args.n_train or run.DEFAULT_SIZES[name][0], args.n_test or run.DEFAULT_SIZES[name][1])
        task, _ = run.built(tasks, name, *sizes, **({"loo": 0} if name == "digits-lr" else {}))
        if task.kind == "mlp":
            lines += spectrum_rows(task)
        lines += cg_rows(task)
        if name == "digits-lr":
            lines += lissa_rows(task)
    print("\n".join(lines), flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


def _pearson(a, b) -> float:
    a, b = a.double(), b.double()
    a, b = a.reshape(-1) - a.mean(), b.reshape(-1) - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _child(path: str, out: str, repeats: int) -> None:
    import tasks

    torch.set_num_threads(1)
    task = tasks.load(path)
    torch.save(min((kronfluence_ekfac(task) for _ in range(repeats)), key=lambda r: r[0]), out)


def _kronfluence_in_peers(path: str, repeats: int) -> tuple:
    """Kronfluence's best `(seconds, scores)` of `repeats` calls in one process of the peers' environment."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "scores.pt")
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
        proc = subprocess.run([PEERS_PYTHON, os.path.abspath(__file__), "--child", path, out, str(repeats)], env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3)
    parser.add_argument("--task", action="append", choices=["digits-lr", "digits-mlp", "fmnist-lr", "fmnist-mlp"])
    parser.add_argument("--preconditioning", action="store_true", help="the preconditioning section instead")
    parser.add_argument("--n-train", type=int, help="with --preconditioning: training-set size (default: run.py's)")
    parser.add_argument("--n-test", type=int, help="with --preconditioning: test-set size (default: run.py's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS-kfac.md"))
    args = parser.parse_args()
    if args.child:
        return _child(args.child[0], args.child[1], int(args.child[2]))
    torch.set_num_threads(1)
    if args.preconditioning:
        return preconditioning(args)
    import run
    import tasks

    from tinfluence import __file__ as where

    lines = ["# EK-FAC: tinfluence beside kronfluence", "",
             f"Machine: {run.machine(1)}; tinfluence from `{os.path.dirname(where)}`", "",
             "Command: `python benchmarks/kfac_vs_kronfluence.py " + " ".join(sys.argv[1:]) + "`", "",
             "Settings matched as in the script's docstring (empirical Fisher, damping = l2 = 1e-2, float64, "
             "tinfluence = kronfluence / n). Time: best of the repeats (each library's repeats in one process), each the "
             "whole fit + score call, one thread.", ""]
    for name in args.task or ["digits-lr", "digits-mlp"]:
        task, path = run.built(tasks, name, 1000, 100)
        t_ti, s_ti = min((tinfluence_ekfac(task) for _ in range(args.repeats)), key=lambda r: r[0])
        t_kf, s_kf = _kronfluence_in_peers(path, args.repeats)
        t_k, s_k = min((tinfluence_ekfac(task, "kfac") for _ in range(args.repeats)), key=lambda r: r[0])
        t_g, s_g = min((tinfluence_ekfac(task, "ekfac", "ggn") for _ in range(args.repeats)), key=lambda r: r[0])
        s_kf = s_kf.to(s_ti.dtype) / task.n_train
        lines += [f"## {name} ({task.n_train} train × {task.n_test} test, P = "
                  f"{sum(v.numel() for v in task.state.values())})", "",
                  "| method | fit + score (s) | vs kronfluence | rel. diff. to kronfluence | Pearson with exact |",
                  "|---|---|---|---|---|",
                  f"| tinfluence EK-FAC | {t_ti:.3f} | {t_kf / t_ti:.1f}× faster | {_relative(s_ti, s_kf):.1e} | "
                  f"{_pearson(s_ti, task.exact):.4f} |",
                  f"| tinfluence K-FAC | {t_k:.3f} | {t_kf / t_k:.1f}× faster | {_relative(s_k, s_kf):.1e} | "
                  f"{_pearson(s_k, task.exact):.4f} |",
                  f"| tinfluence EK-FAC, fisher=\"ggn\" (exact output Hessian) | {t_g:.3f} | {t_kf / t_g:.1f}× faster | "
                  f"— | {_pearson(s_g, task.exact):.4f} |",
                  f"| kronfluence EK-FAC | {t_kf:.3f} | 1 | 0 | {_pearson(s_kf, task.exact):.4f} |", "",
                  f"max |tinfluence − kronfluence/n| / max |kronfluence/n| = "
                  f"{float((s_ti - s_kf).abs().max() / s_kf.abs().max()):.1e}", ""]
        if task.kind == "mlp":
            lines += ["Conjugate gradients over the Gauss-Newton matrix + l2·I (the exact reference's matrix), all "
                      "test points as one stack; EK-FAC fitted with fisher=\"ggn\", damping = l2, its fit inside the time:",
                      "", "| CG | tol | iterations | time (s) | Pearson with exact |", "|---|---|---|---|---|"]
            for tol in (1e-3, 1e-8):
                (t0, i0, s0), (t1, i1, s1) = preconditioned_cg(task, tol)
                lines += [f"| plain | {tol:g} | {i0} | {t0:.2f} | {_pearson(s0, task.exact):.6f} |",
                          f"| EK-FAC-preconditioned | {tol:g} | {i1} | {t1:.2f} | {_pearson(s1, task.exact):.6f} |"]
            lines.append("")
        print("\n".join(lines), flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
