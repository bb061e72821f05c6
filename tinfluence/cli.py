"""The `tinfluence` command.

    tinfluence demo                                   # Koh & Liang's Figure 2 on digits, no download
    tinfluence demo --method cg lissa tracin empirical --test-ids 0 1 2 --top-k 100 --out runs/demo
    torchrun --standalone --nproc_per_node=2 -m tinfluence demo --distributed
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

__all__ = ["main"]

DEFAULT_TEST_IDS = (0, 1, 2)
DEFAULT_TOP_K = 100
DEFAULT_OUT = os.path.join("runs", "demo")


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Returns the parser of the `tinfluence` command and that of its `demo` subcommand."""
    from .demo import METHODS, N_TRAIN

    parser = argparse.ArgumentParser(
        prog="tinfluence",
        description="Influence functions for PyTorch models, written as composable pure transforms.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo", help="reproduce Koh & Liang's Figure 2 on the bundled digits data",
        description=(
            f"Trains a logistic regression on {N_TRAIN} scikit-learn digits (L2 1e-2, float64), scores every "
            "training point for the chosen test points with each method, retrains without the top-k points "
            "by |score| (united over methods per test point; resumable through OUT/loo.jsonl) and compares "
            "predicted with actual changes in test loss. Writes figure2.png, top_examples.png, scores.npz, "
            "loo.jsonl and table.json into OUT."))
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
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.add_argument("--distributed", action="store_true",
                      help="shard the scoring over the processes started by torchrun (gloo; same numbers as one "
                           "process); rank 0 retrains, prints and writes")
    return parser, demo


def _check_demo(demo: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits with a usage error for arguments the parser cannot check alone."""
    from .demo import N_TRAIN, load_digits_split

    if len(set(args.method)) != len(args.method):
        demo.error(f"argument --method: each method may appear once; got {' '.join(args.method)}.")
    n_test = load_digits_split()[1][1].shape[0]
    bad = [i for i in args.test_ids if not 0 <= i < n_test]
    if bad:
        demo.error(f"argument --test-ids: {bad[0]} is out of range; the digits test set has {n_test} points "
                   f"(ids 0 to {n_test - 1}).")
    if len(set(args.test_ids)) != len(args.test_ids):
        demo.error(f"argument --test-ids: each id may appear once; got {' '.join(map(str, args.test_ids))}.")
    if not 1 <= args.top_k <= N_TRAIN:
        demo.error(f"argument --top-k: must be between 1 and {N_TRAIN} (the training set size); got {args.top_k}.")
    if args.distributed and "RANK" not in os.environ:
        demo.error("argument --distributed: start the processes with torchrun, e.g. "
                   "`torchrun --standalone --nproc_per_node=2 -m tinfluence demo --distributed`.")
    if args.threads < 1:
        demo.error(f"argument --threads: must be >= 1; got {args.threads}.")
    try:
        os.makedirs(args.out, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.out):
            pass
    except OSError as err:
        demo.error(f"argument --out: cannot write to {args.out!r} ({err.strerror or err}); choose a folder you can "
                   "write to.")


def main(argv: list[str] | None = None) -> int:
    """Runs the `tinfluence` command with `argv` (default: the process's arguments); returns the exit status."""
    parser, demo_parser = _parsers()
    args = parser.parse_args(argv)
    if args.command == "demo":
        import torch

        from . import demo

        _check_demo(demo_parser, args)
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
