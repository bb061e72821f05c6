"""Benchmarks tinfluence, and the peer libraries that are installed, on the same tasks.

    python benchmarks/run.py                       # tinfluence only, digits tasks + Fashion-MNIST scaling
    python benchmarks/run.py --peers               # also every installed peer library
    python benchmarks/run.py --task digits-mlp --n-train 1000 --n-test 100 --repeats 3
    python benchmarks/run.py --peers --task fmnist-lr --task fmnist-mlp --repeats 1   # 60k train × 1000 test

On the Fashion-MNIST tasks a peer is stopped once it has run `--stop-ratio` (10) times as
long as tinfluence's process for the same method; its row then says so.

Each (task, library, method) runs in a fresh child process: it loads the task (built once
by the parent, ground truth included), records its peak RSS, runs the method `--repeats`
times, checks the scores against the method's reference, and reports wall times and the
rise of peak RSS above the RSS after loading (the high-water mark VmHWM is reset through
/proc/self/clear_refs after loading; elsewhere getrusage's ru_maxrss is used). Results are printed
and written to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

PEERS_PYTHON = os.environ.get("TINFLUENCE_PEERS_PYTHON", "/work/venv-peers/bin/python")

# Method -> (reference attribute of the task, Pearson with it required by the check).
CHECKS = {
    "exact": ("exact", 0.999999), "cg": ("exact", 0.999), "lissa": ("exact", 0.98), "arnoldi": ("exact", None),
    "ekfac": ("exact", None), "ekfac-emp": ("exact", None),
    "tracin": ("exact_tracin", 0.999999), "tracin-fast": ("exact_tracin", None), "tracin-proj": ("exact_tracin", None),
    "grad-dot": ("grad_dot", 0.999999), "empirical-if": ("grad_dot", 0.99),
}
IHVP_METHODS = ("exact", "cg", "lissa", "arnoldi", "ekfac", "ekfac-emp")
PAIRED = ("ekfac", "ekfac-emp")       # methods whose scores are compared between tinfluence and kronfluence
KEPT_ROWS = 20                        # score rows a paired child writes back for that comparison
DEFAULT_SIZES = {"digits-lr": (1000, 100), "digits-mlp": (1000, 100), "fmnist-lr": (60000, 1000), "fmnist-mlp": (60000, 1000)}


# ---------------------------------------------------------------- child

def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(float(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def _reset_peak() -> float:
    """Resets the process's RSS high-water mark (Linux: clear_refs 5) and returns the current RSS in MB.

    Without that interface, returns getrusage's ru_maxrss, so the reported rise is above the peak so far.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_mb() -> float:
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _flat_metrics(scores, reference):
    import tinfluence as ti

    s, r = scores.reshape(-1), reference.reshape(-1)
    return float(ti.pearson(s, r)), float(ti.spearman(s, r))


def child(spec: dict) -> dict:
    """Runs one (task, library, method) and returns its measurements."""
    import torch

    torch.set_num_threads(spec["threads"])
    import peers
    import tasks

    task = tasks.load(spec["task_file"])
    if spec["method"] in IHVP_METHODS and task.ihvp_test:
        task.test = tuple(t[:task.ihvp_test] for t in task.test)
    fn = peers.ADAPTERS[spec["library"]][spec["method"]]
    base = _reset_peak()
    times, scores = [], None
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        scores = fn(task)
        times.append(time.perf_counter() - start)
    scores = torch.as_tensor(scores).detach().to(torch.float64).reshape(task.n_test, task.n_train)
    out = {"times": times, "peak_mb": _peak_mb() - base}
    if spec.get("scores_out"):
        torch.save(scores[:KEPT_ROWS].clone(), spec["scores_out"])
    ref_name, threshold = CHECKS[spec["method"]]
    if (spec["library"], spec["method"]) in peers.APPROXIMATE:
        threshold = None
    reference = getattr(task, ref_name)
    if reference is None:                                                      # e.g. no exact influence on fmnist-mlp
        out["check"] = "no reference"
        return out
    scores = scores[:len(reference)]                                           # references may cover the first rows only
    factor = float((scores * reference).sum() / (scores * scores).sum())       # least-squares scale to the reference
    out["factor"] = factor
    normalized = factor * scores
    out["ref_pearson"], _ = _flat_metrics(normalized, reference)
    out["check"] = "approx." if threshold is None else ("ok" if out["ref_pearson"] >= threshold else "FAIL")
    if task.exact is not None:
        rows = min(len(task.exact), len(normalized))
        out["exact_pearson"], out["exact_spearman"] = _flat_metrics(normalized[:rows], task.exact[:rows])
    if task.loo is not None:
        out["loo_pearson"], out["loo_spearman"] = _flat_metrics(normalized[:, task.loo_ids], task.loo)
    return out


# ---------------------------------------------------------------- parent

def _run_child(python: str, spec: dict, timeout: float, stopped: str = "timed out") -> dict:
    """Runs one measurement in a fresh process; adds its whole wall time (load and all repeats) as `wall`."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    start = time.perf_counter()
    try:
        proc = subprocess.run([python, os.path.abspath(__file__), "--child", f.name], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"{stopped} after {timeout:.0f} s"}
    finally:
        os.unlink(f.name)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": last[:160]}
    return dict(json.loads(lines[-1][len("RESULT "):]), wall=time.perf_counter() - start)


def _peer_python(library: str) -> str | None:
    """The interpreter that has `library` installed (this one, else the peers' venv), or None."""
    for python in (sys.executable, PEERS_PYTHON):
        if os.path.exists(python) and subprocess.run([python, "-c", f"import {library}"], capture_output=True).returncode == 0:
            return python
    return None


def machine(threads: int) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs; torch {torch.__version__} with torch.set_num_threads({threads}) "
            f"in every process (OMP/MKL_NUM_THREADS={threads}); Python {platform.python_version()}; {platform.platform()}")


def _fmt_t(x):
    return f"{x:.3g}" if x is not None else "—"


def _table(task_name, rows) -> list[str]:
    has_loo = any("loo_pearson" in r for r in rows)
    head = "| method | library | min s | median s | peak RSS MB | ×tinfluence time | check (ρ vs ref) | scale | ρ / rs vs exact |"
    head += " ρ / rs vs LOO |" if has_loo else ""
    out = [f"### {task_name}", "", head, "|" + "---|" * (head.count("|") - 1)]
    base = {r["method"]: min(r["times"]) for r in rows if r["library"] == "tinfluence" and "times" in r}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['method']} | {r['library']} | — | — | — | — | {r['error']} | | |" + (" |" if has_loo else ""))
            continue
        t = min(r["times"])
        ratio = f"{t / base[r['method']]:.2f}" if r["method"] in base else "—"
        vs_exact = f"{r['exact_pearson']:.4f} / {r['exact_spearman']:.4f}" if "exact_pearson" in r else "—"
        check = f"{r['check']} ({r['ref_pearson']:.6f})" if "ref_pearson" in r else r["check"]
        factor = f"{r['factor']:.3g}" if "factor" in r else "—"
        line = (f"| {r['method']} | {r['library']} | {_fmt_t(t)} | {_fmt_t(statistics.median(r['times']))} | {r['peak_mb']:.0f} | "
                f"{ratio} | {check} | {factor} | {vs_exact} |")
        if has_loo:
            line += f" {r['loo_pearson']:.4f} / {r['loo_spearman']:.4f} |" if "loo_pearson" in r else " |"
        out.append(line)
    return out + [""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child")
    parser.add_argument("--task", action="append", choices=[*DEFAULT_SIZES, "fmnist-scaling"],
                        help="default: digits-lr, digits-mlp, fmnist-scaling")
    parser.add_argument("--n-train", type=int, help="default per task: digits 1000, fmnist 60000")
    parser.add_argument("--n-test", type=int, help="default per task: digits 100, fmnist 1000")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peers", action="store_true", help="also run every installed peer library")
    parser.add_argument("--methods", help="comma-separated subset of methods")
    parser.add_argument("--loo", type=int, default=50, help="training ids retrained for leave-one-out (digits-lr)")
    parser.add_argument("--fmnist-sizes", default="1000,4000,16000,60000")
    parser.add_argument("--no-micro", action="store_true")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--stop-ratio", type=float, default=10,
                        help="on Fashion-MNIST, stop a peer after this multiple of tinfluence's process time (0: never)")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    args = parser.parse_args(argv)
    if args.child:
        with open(args.child) as f:
            spec = json.load(f)
        print("RESULT " + json.dumps(child(spec)), flush=True)
        return

    import torch

    torch.set_num_threads(args.threads)
    import peers
    import tasks

    chosen = args.task or ["digits-lr", "digits-mlp", "fmnist-scaling"]
    report = ["# tinfluence benchmarks", "", f"Machine: {machine(args.threads)}", "",
              f"Command: `python benchmarks/{' '.join(['run.py', *sys.argv[1:]])}`", ""]
    libraries = ["tinfluence"]
    missing = []
    pythons = {"tinfluence": sys.executable}
    if args.peers:
        for lib in ["dattri", "captum", "pydvl", "kronfluence", "torch_influence", "pytorch_influence_functions"]:
            python = _peer_python(lib)
            if python is None:
                missing.append(f"- {lib}: not installed; `{peers.INSTALL[lib]}` (keeping torch {torch.__version__.split('+')[0]})")
            elif lib not in peers.ADAPTERS:
                missing.append(f"- {lib}: installed, no adapter: {peers.NOT_WIRED[lib]}")
            else:
                libraries.append(lib)
                pythons[lib] = python
    report += ["Peers: " + (", ".join(libraries[1:]) or "none") + (" (run with `--peers` to include them)" if not args.peers else ""), ""]
    report += missing + ([""] if missing else [])
    for name in chosen:
        if name == "fmnist-scaling":
            report += fmnist_scaling(args, tasks, peers)
            continue
        if name.startswith("fmnist") and tasks.fmnist_files() is None:
            message = f"skipped: Fashion-MNIST not found; install it with `{tasks.FMNIST_INSTALL}`"
            print(f"{name} {message}")
            report += [f"### {name}", "", message, ""]
            continue
        n_train, n_test = args.n_train or DEFAULT_SIZES[name][0], args.n_test or DEFAULT_SIZES[name][1]
        task, path = built(tasks, name, n_train, n_test, loo=args.loo if name == "digits-lr" else 0)
        methods = peers.TASK_METHODS[name] if not args.methods else [m for m in args.methods.split(",") if m in peers.TASK_METHODS[name]]
        rows, own_walls = [], {}
        for method in methods:
            for lib in libraries:
                if method not in peers.ADAPTERS[lib]:
                    continue
                spec = {"task_file": path, "library": lib, "method": method, "repeats": args.repeats, "threads": args.threads}
                if method in PAIRED:
                    spec["scores_out"] = os.path.join(CACHE, f"scores-{name}-{lib}-{method}.pt")
                timeout, stopped = args.timeout, "timed out"
                own_wall = own_walls.get(method)
                if lib != "tinfluence" and own_wall and args.stop_ratio and name.startswith("fmnist"):
                    timeout = min(timeout, args.stop_ratio * own_wall)
                    stopped = f"stopped at {timeout / own_wall:.1f}× tinfluence's process time ({own_wall:.0f} s)"
                result = _run_child(pythons[lib], spec, timeout, stopped)
                if lib == "tinfluence" and "wall" in result:
                    own_walls[method] = result["wall"]
                result.update(library=lib, method=method)
                rows.append(result)
                shown = result.get("error") or f"{min(result['times']):.3f} s, peak {result['peak_mb']:.0f} MB, {result['check']}" + (
                    f" ({result['ref_pearson']:.6f})" if "ref_pearson" in result else "")
                print(f"  {name:10s} {method:13s} {lib:11s} {shown}", flush=True)
        report += [f"{name}: {task.n_train} train × {task.n_test} test, {str(task.dtype).replace('torch.', '')}, l2={task.l2}" +
                   (f"; leave-one-out for {len(task.loo_ids)} training ids" if task.loo is not None else "") +
                   (f"; inverse-HVP methods score the first {task.ihvp_test} test points" if task.ihvp_test else "") +
                   (f"; references cover the first {len(task.grad_dot)} test points" if len(task.grad_dot) < task.n_test else ""), ""]
        report += _table(name, rows)
        report += paired(name, rows, task.n_train)
        report += notes(rows, peers)
    if not args.no_micro:
        import micro
        report += micro.report(args.threads)
    text = "\n".join(report) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


CACHE = os.path.join(HERE, ".cache")


def built(tasks, name: str, n_train: int, n_test: int, **kw):
    """`(task, path)`: the task built once and kept in benchmarks/.cache, keyed by its sizes and tasks.py's source."""
    with open(tasks.__file__, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    extra = "".join(f"-{k}{v}" for k, v in sorted(kw.items()))
    path = os.path.join(CACHE, f"{name}-{n_train}-{n_test}{extra}-{digest}.pt")
    if os.path.exists(path):
        print(f"{name}: reusing {os.path.relpath(path)}", flush=True)
        return tasks.load(path), path
    print(f"building {name} ({n_train} train × {n_test} test) ...", flush=True)
    start = time.perf_counter()
    task = tasks.build(name, n_train, n_test, **kw)
    os.makedirs(CACHE, exist_ok=True)
    tasks.save(task, path + ".part")
    os.replace(path + ".part", path)
    print(f"  built in {time.perf_counter() - start:.0f} s", flush=True)
    return task, path


def paired(name: str, rows: list, n_train: int) -> list[str]:
    """Tinfluence beside kronfluence for each method in PAIRED that both ran: time and peak-memory ratios and the
    relative difference of the scores' first KEPT_ROWS rows (tinfluence = kronfluence / n, the same sign).
    """
    import torch

    found = {(r["library"], r["method"]): r for r in rows if "times" in r}
    out = []
    for method in PAIRED:
        ours, theirs = found.get(("tinfluence", method)), found.get(("kronfluence", method))
        if ours is None or theirs is None:
            continue
        a = torch.load(os.path.join(CACHE, f"scores-{name}-tinfluence-{method}.pt"))
        b = torch.load(os.path.join(CACHE, f"scores-{name}-kronfluence-{method}.pt")) / n_train
        difference = float((a - b).norm() / b.norm())
        pearson = float(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1])
        out.append(f"| {method} | {min(theirs['times']) / min(ours['times']):.1f}× | {theirs['peak_mb']:.0f} / "
                   f"{ours['peak_mb']:.0f} | {difference:.1e} | {pearson:.6f} |")
    if not out:
        return []
    head = ["tinfluence beside kronfluence (scores of the first "
            f"{KEPT_ROWS} test points; kronfluence's divided by n):", "",
            "| method | kronfluence time / tinfluence time | peak RSS MB kronfluence / tinfluence | "
            "rel. difference of scores | Pearson between them |", "|---|---|---|---|---|"]
    return head + out + [""]


def notes(rows, peers) -> list[str]:
    lines = ["Settings and normalization: `scale` is the least-squares factor c that maps a library's scores onto the "
             "method's reference (exact influence in tinfluence's sign, positive = helpful, for exact/CG/LiSSA/Arnoldi; "
             "the closed-form TracIn sum for TracIn; the closed-form gradient dot product for grad-dot and EmpiricalIF); "
             "correlations are of c × scores. c ≈ 1 means same sign and scale; c ≈ −1/n a library that reports "
             "−n × (the change of the test loss), i.e. the up-weighting derivative."]
    seen = {(r["library"], r["method"]) for r in rows}
    lines += [f"- {lib} {method}: {text}" for (lib, method), text in peers.NOTES.items() if (lib, method) in seen]
    return lines + [""]


def fmnist_scaling(args, tasks, peers) -> list[str]:
    """Time and peak memory of tinfluence CG influence as n_train grows (10 test points)."""
    out = ["### fmnist-scaling (logistic regression, n_train from 1k to 60k)", ""]
    if tasks.fmnist_files() is None:
        message = f"skipped: Fashion-MNIST not found; install it with `{tasks.FMNIST_INSTALL}`"
        print("fmnist-lr " + message)
        return out + [message, ""]
    tol, rank = peers.CG["fmnist-lr"]
    out += [f"tinfluence `ti.influence` with `ti.cg(ti.hvp(R, params), tol={tol:g}, preconditioner=ti.nystrom(..., rank={rank}))`, 10 test points, "
            "logistic regression 784→10 (P = 7850), l2=1e-2, float32; checked against float64 textbook CG on the closed-form "
            "Hessian. Peak RSS is the rise above the process's RSS after loading the task.", "",
            "| n_train | min s | peak RSS MB | s per 1k train | MB per 1k train | check (ρ vs ref) |", "|---|---|---|---|---|---|"]
    for n in [int(s) for s in args.fmnist_sizes.split(",")]:
        _, path = built(tasks, "fmnist-scaling", n, 10)
        spec = {"task_file": path, "library": "tinfluence", "method": "cg", "repeats": 1, "threads": args.threads}
        r = _run_child(sys.executable, spec, args.timeout)
        if "error" in r:
            out.append(f"| {n} | {r['error']} | | | | |")
            continue
        t = min(r["times"])
        out.append(f"| {n} | {t:.3g} | {r['peak_mb']:.0f} | {1000 * t / n:.3g} | {1000 * r['peak_mb'] / n:.3g} | "
                   f"{r['check']} ({r['ref_pearson']:.6f}) |")
        print("  " + out[-1], flush=True)
    return out + [""]


if __name__ == "__main__":
    main()
