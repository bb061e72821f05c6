"""The `tinfluence` command.

tinfluence demo                                   # Koh & Liang's Figure 2 on digits, no download
tinfluence run examples/multimodal.py --top-k 10  # the same pipeline for your own model (a task file)
tinfluence demo --method cg lissa tracin empirical --test-ids 0 1 2 --top-k 100 --out runs/demo
torchrun --standalone --nproc_per_node=2 -m tinfluence demo --distributed
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from importlib import metadata

__all__ = ["main"]

DEFAULT_TEST_IDS = (0, 1, 2)
DEFAULT_TOP_K = 100
DEFAULT_OUT = os.path.join("runs", "demo")
INTERRUPTED = 130       # the exit status of a process stopped by SIGINT (128 + 2)


def _version() -> str:
    """The installed package's version, from its metadata."""
    try:
        return metadata.version("tinfluence")
    except metadata.PackageNotFoundError:
        return "unknown (the package is not installed; run `pip install -e .` in the repository)"


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    """Returns the parser of the `tinfluence` command and those of its `demo` and `run` subcommands."""
    from .demo import METHODS, N_TRAIN

    parser = argparse.ArgumentParser(
        prog="tinfluence",
        description="Influence functions for PyTorch models, written as composable pure transforms.")
    parser.add_argument("--version", action="version", version=f"tinfluence {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo", help="reproduce Koh & Liang's Figure 2 on the bundled digits data",
        description=(
            f"Trains a logistic regression on {N_TRAIN} scikit-learn digits (L2 1e-2, float64), scores every "
            "training point for the chosen test points with each method, retrains without the top-k points "
            "by |score| (united over methods per test point; resumable through OUT/loo.jsonl) and compares "
            "predicted with actual changes in test loss. Writes figure2.png, top_examples_<method>.png, scores.npz, "
            "loo.jsonl, table.json and run.json (the settings) into OUT. A rerun with the same settings resumes; "
            "a folder holding a run with other settings is refused and left as it is (name a new --out, or "
            "pass --fresh)."))
    demo.add_argument("--method", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD",
                      help=f"methods to compare, any of: {', '.join(METHODS)} (default: all)")
    demo.add_argument("--test-ids", nargs="+", type=int, default=list(DEFAULT_TEST_IDS), metavar="ID",
                      help=f"test points to explain, ids into the test set (default: {' '.join(map(str, DEFAULT_TEST_IDS))})")
    demo.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, metavar="K",
                      help=f"training points per method and test point to retrain without (default: {DEFAULT_TOP_K})")
    demo.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                      help=f"output folder, created if missing (default: {DEFAULT_OUT})")
    demo.add_argument("--seed", type=int, default=0, help="seed of LiSSA's mini-batch sampling (default: 0)")
    demo.add_argument("--threads", type=int, default=1,
                      help="CPU threads for torch (default: 1; the demo's matrices are small, and one thread "
                           "avoids contention on a busy machine)")
    demo.add_argument("--fresh", action="store_true",
                      help="delete the demo's own files in OUT (from a run with other settings) and start afresh")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.add_argument("--distributed", action="store_true",
                      help="shard the scoring over the processes started by torchrun (gloo; same numbers as one "
                           "process); rank 0 retrains, prints and writes")
    return parser, demo, _run_parser(commands)


def _run_parser(commands) -> argparse.ArgumentParser:
    from .pipeline import METHODS

    run = commands.add_parser(
        "run", help="the pipeline for your own model, defined in a task file",
        description=(
            "Runs TASK (a Python file defining train, test, loss(params, batch) and params; see examples/ and "
            "tinfluence/tasks/digits.py): trains or loads the model, scores every chosen test point (one file per "
            "test point plus an index, OUT/scores/<method>/), retrains without the top-k training points by |score| "
            "(OUT/loo.jsonl, id -1 the base run), and writes figure2.png, top_examples_<method>.png (with `images`), "
            "table.json and changes.csv. Every stage resumes; a folder of another task or other settings is refused "
            "and left as it is (name a new --out, or pass --fresh)."))
    run.add_argument("task", metavar="TASK", help="the task file (or the name of a bundled task: digits)")
    run.add_argument("--out", metavar="DIR", help="output folder, created if missing (default: runs/<task name>)")
    run.add_argument("--method", nargs="+", choices=list(METHODS), metavar="METHOD",
                     help=f"methods, any of: {', '.join(METHODS)} (default: the task's `method`)")
    run.add_argument("--test-ids", nargs="+", type=int, metavar="ID", help="test points to explain (default: the task's)")
    run.add_argument("--top-k", type=int, metavar="K", help="training points per method and test point to retrain without")
    run.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: 1)")
    run.add_argument("--fresh", action="store_true",
                     help="delete this pipeline's own files in OUT (from a run with other settings) and start afresh")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return run


def _task_path(name: str) -> str:
    """A path as given, or the file of a bundled task (`digits` -> tinfluence/tasks/digits.py)."""
    bundled = os.path.join(os.path.dirname(__file__), "tasks", f"{name}.py")
    return bundled if not os.path.exists(name) and os.path.isfile(bundled) else name


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`tinfluence run`: loads the task, checks and claims OUT, runs the pipeline."""
    import torch

    from .pipeline import TaskError, load_task, run_task, task_folder

    if args.threads < 1:
        parser.error(f"argument --threads: must be >= 1; got {args.threads}.")
    torch.set_num_threads(args.threads)
    given = {"method": args.method, "test_ids": args.test_ids, "top_k": args.top_k}
    try:
        task = load_task(_task_path(args.task), **{k: v for k, v in given.items() if v is not None})
    except TaskError as err:
        print(err, file=sys.stderr, flush=True)
        return 2
    out = args.out or os.path.join("runs", task.name)
    folder = task_folder(out, task)
    try:
        state = folder.check(args.fresh)
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        parser.error(f"argument --out: cannot write to {out!r} ({err.strerror or err}); choose a folder you can write to.")
    folder.claim(args.fresh)
    if state == "resume":
        print(f"{out} holds a run with the same task and settings (run.json): resuming it.", flush=True)
    elif state == "fresh":
        print(f"--fresh: deleted this pipeline's earlier files in {out}; starting afresh.", flush=True)
    run_task(task, out, progress=not args.no_progress, echo=lambda line: print(line, flush=True))
    return 0


def _check_demo(demo: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits with a usage error for arguments the parser cannot check alone."""
    from .demo import N_TRAIN, FolderError, check_out, load_digits_split, settings
    from .pipeline import TOP_K_HINT

    if len(set(args.method)) != len(args.method):
        demo.error(f"argument --method: each method may appear once; got {' '.join(args.method)}.")
    n_test = load_digits_split()[1][1].shape[0]
    bad = [i for i in args.test_ids if not 0 <= i < n_test]
    if bad:
        demo.error(f"argument --test-ids: {bad[0]} is out of range; the digits test set has {n_test} points "
                   f"(ids 0 to {n_test - 1}).")
    if len(set(args.test_ids)) != len(args.test_ids):
        demo.error(f"argument --test-ids: each id may appear once; got {' '.join(map(str, args.test_ids))}.")
    if not 2 <= args.top_k <= N_TRAIN:
        demo.error(f"argument --top-k: must be between 2 and {N_TRAIN} (the training set size); got {args.top_k}. "
                   f"{TOP_K_HINT}")
    if args.distributed and "RANK" not in os.environ:
        demo.error("argument --distributed: start the processes with torchrun, e.g. "
                   "`torchrun --standalone --nproc_per_node=2 -m tinfluence demo --distributed`.")
    if args.threads < 1:
        demo.error(f"argument --threads: must be >= 1; got {args.threads}.")
    try:
        args.folder = check_out(args.out, settings(args.method, args.test_ids, args.top_k, args.seed), args.fresh)
    except FolderError as err:
        demo.error(f"argument --out: {err}")
    try:
        os.makedirs(args.out, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.out):
            pass
    except OSError as err:
        demo.error(f"argument --out: cannot write to {args.out!r} ({err.strerror or err}); choose a folder you can "
                   "write to.")


def _claim_out(args: argparse.Namespace) -> None:
    """Makes OUT this run's (on the first process only) and says whether the run resumes."""
    from .demo import claim_out, settings

    if args.distributed and os.environ.get("RANK") != "0":
        return
    claim_out(args.out, settings(args.method, args.test_ids, args.top_k, args.seed), args.fresh)
    if args.folder == "resume":
        print(f"{args.out} holds a run with the same settings (run.json): resuming it; retrained models in "
              "loo.jsonl are reused.", flush=True)
    elif args.folder == "fresh":
        print(f"--fresh: deleted the demo's earlier files in {args.out}; starting afresh.", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Runs the `tinfluence` command with `argv` (default: the process's arguments); returns the exit status.

    Ctrl-C (SIGINT) stops it with status 130 and a line saying how to resume: the result
    files are consistent at every moment, and the same command picks up where it stopped. A
    result folder that must not be touched ends it with status 2 and a message.
    """
    from .core.errors import ConvergenceError
    from .pipeline import FolderError

    parser, demo_parser, run_parser = _parsers()
    args = parser.parse_args(argv)
    try:
        return _run(run_parser, args) if args.command == "run" else _demo(demo_parser, args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr, flush=True)
        return INTERRUPTED
    except FolderError as err:          # found before anything in OUT was changed
        print(f"tinfluence {args.command}: error: {err}", file=sys.stderr, flush=True)
        return 2
    except ConvergenceError as err:     # training or a retraining did not converge: the finished results stay
        print(f"tinfluence {args.command}: error: {err} The finished results stay in the output folder; change the "
              "task's settings (a new folder) or rerun the same command to resume.", file=sys.stderr, flush=True)
        return 1


def _demo(demo_parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`tinfluence demo`."""
    import torch

    from . import demo

    _check_demo(demo_parser, args)
    _claim_out(args)
    torch.set_num_threads(args.threads)
    group, lead = None, True
    if args.distributed:
        import torch.distributed as dist

        from .distributed import init

        group = init("gloo")
        lead = dist.get_rank() == 0
    try:
        demo.run(args.method, args.test_ids, args.top_k, args.out, seed=args.seed,
                 progress=lead and not args.no_progress, group=group,
                 echo=(lambda line: print(line, flush=True)) if lead else (lambda line: None))
    finally:
        if group is not None:
            dist.destroy_process_group()
    if group is not None:
        # References to the group that outlive `run` (not visible to the garbage collector) keep gloo's
        # C++ process group alive to interpreter shutdown, where its destructor races the backend's
        # threads and aborts the process (SIGABRT, "terminate called without an active exception").
        # A torchrun worker has nothing left to finalize: it ends here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
