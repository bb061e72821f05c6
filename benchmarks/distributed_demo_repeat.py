"""Runs the distributed demo N times under torchrun and counts the runs that fail.

    python benchmarks/distributed_demo_repeat.py --runs 20                # the README command
    python benchmarks/distributed_demo_repeat.py --runs 20 --quick        # one method, top 5: ~2x faster

Each run is `torchrun --standalone --nproc_per_node=2 -m tinfluence demo --distributed`
into a fresh temporary folder. A run fails when torchrun exits non-zero or either rank's
output mentions a signal or `terminate called`; the failing runs' output tails are printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

SIGNS = ("terminate called", "Signal", "SIGABRT", "SIGSEGV", "Traceback")


def run_once(quick: bool, timeout: float) -> tuple[bool, str, float]:
    """One torchrun launch; returns (ok, combined output, seconds)."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "-m", "tinfluence", "demo", "--distributed", "--no-progress", "--out", out]
        if quick:
            command += ["--method", "cg", "--top-k", "5"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        tic = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        except subprocess.TimeoutExpired as err:
            return False, f"timed out after {timeout:.0f} s\n{err.stdout or ''}{err.stderr or ''}", timeout
        text = done.stdout + done.stderr
        ok = done.returncode == 0 and not any(sign in text for sign in SIGNS)
        return ok, text, time.perf_counter() - tic


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="one method (cg), top 5")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it counts as hung")
    args = parser.parse_args()
    failed = 0
    for i in range(args.runs):
        ok, text, seconds = run_once(args.quick, args.timeout)
        failed += not ok
        print(f"run {i + 1}/{args.runs}: {'ok' if ok else 'FAILED'} ({seconds:.1f} s)", flush=True)
        if not ok:
            print("  " + "\n  ".join(text.strip().splitlines()[-15:]), flush=True)
    print(f"{failed} of {args.runs} runs failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
