"""The large-model path on CPU: compressed training gradients to a store, per-token query scores.

A >= 1M-parameter byte decoder over 64-token windows of Python's standard library; the compressed
training gradients are written to a store and 100 query sequences are scored per token.

Reports the time split (training gradients, store write, curvature, query), training tokens per
second beside the floor (one plain forward + backward of the mean loss over the same tokens, in
batches of the same size), and the peak RSS. Results go to a JSON file; benchmarks/RESULTS-lm.md
discusses them.

    OMP_NUM_THREADS=1 python benchmarks/language_model.py --quick           # 2,000 windows
    OMP_NUM_THREADS=1 python benchmarks/language_model.py                   # 50,000 windows
    python benchmarks/language_model.py --peer dattri ...                   # dattri's LoGra, same model and k
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build(args):
    from tinfluence.text import ByteDecoder, stdlib_windows
    torch.manual_seed(0)
    model = ByteDecoder(d=args.d, layers=args.layers, heads=4, context=args.T).eval()
    ids = stdlib_windows(args.T, args.n + args.queries, generator=torch.Generator().manual_seed(0))
    return model, ids[:args.n], ids[args.n:]


def _pretrain(model, ids, steps: int) -> None:
    """A few Adam steps so the gradients are those of a model that has started to learn (not timed)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = ids[torch.randint(0, len(ids), (64,), generator=g)]
        logits = model(batch)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def floor_seconds(model, ids, batch: int) -> float:
    """One plain forward + backward of the mean next-byte loss over every window, in batches."""
    start = time.perf_counter()
    for i in range(0, len(ids), batch):
        b = ids[i:i + batch]
        logits = model(b)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))
        model.zero_grad(set_to_none=True)
        loss.backward()
    return time.perf_counter() - start


def run_tinfluence(args) -> dict:
    import tinfluence as ti
    from tinfluence.text import token_nll
    model, train_ids, query_ids = build(args)
    _pretrain(model, train_ids, args.pretrain)
    linear = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    apply, params = ti.functionalize(model, (lambda name, p: name in linear) if args.linear_only else None)
    P = sum(p.numel() for p in params.values())
    token_loss = lambda p, b: token_nll(apply(p, b["input_ids"]), b["input_ids"])  # noqa: E731
    seq_loss = lambda p, b: token_loss(p, b).sum(-1)  # noqa: E731
    proj = ti.projector(params, k_in=args.k, k_out=args.k, generator=torch.Generator().manual_seed(0))
    train = {"input_ids": train_ids}
    folder = Path(tempfile.mkdtemp(prefix="tinfluence-lm-"))
    try:
        store = ti.io.create_store(folder, projector=proj, params=params, n=args.n, dtype=args.dtype,
                                   chunk_rows=args.chunk)
        kernel = ti.compressed_grad_fn(seq_loss, proj)
        t_grad = t_write = 0.0
        for j in range(store.n_chunks):       # write_store's loop, timed in two parts
            start, stop = store.bounds(j)
            t0 = time.perf_counter()
            rows = kernel(params, ti.take(train, slice(start, stop)))
            t1 = time.perf_counter()
            store.write_chunk(j, rows)
            t_write += time.perf_counter() - t1
            t_grad += t1 - t0
        t0 = time.perf_counter()
        curvature = ti.projected_curvature(store, damping=args.damping, blocks=proj)
        t_curv = time.perf_counter() - t0
        t0 = time.perf_counter()
        queries = {"input_ids": query_ids}
        top_tokens = []
        for i in range(0, len(query_ids), args.query_batch):     # per-token scores, a batch of queries at a time
            Q = ti.token_grads(token_loss, params, ti.take(queries, slice(i, i + args.query_batch)), projector=proj)
            values, ids = store.topk(Q, 10, curvature)           # [b, T, 10] most helpful per query token
            top_tokens.append(ids)
        t_query = time.perf_counter() - t0
        t0 = time.perf_counter()
        per_sequence = store.influence(ti.compressed_grads(seq_loss, params, queries, projector=proj), curvature)
        t_query_seq = time.perf_counter() - t0
        floor_n = min(args.n, args.floor_n)
        t_floor = floor_seconds(model, train_ids[:floor_n], args.chunk) * args.n / floor_n   # linear in n
        tokens = args.n * args.T
        return {
            "library": "tinfluence", "params": P, "linear_only": args.linear_only, "n": args.n, "T": args.T,
            "k_in": args.k, "k_out": args.k,
            "dim": proj.dim, "dtype": args.dtype, "chunk": args.chunk, "queries": len(query_ids),
            "floor_measured_on": floor_n,
            "seconds": {"train_gradients": t_grad, "store_write": t_write, "curvature": t_curv,
                        "query_per_token": t_query, "query_per_sequence": t_query_seq,
                        "floor_forward_backward": t_floor},
            "tokens_per_s": tokens / (t_grad + t_write), "floor_tokens_per_s": tokens / t_floor,
            "fraction_of_floor": t_floor / (t_grad + t_write),
            "query_tokens_per_s": len(query_ids) * args.T / t_query,
            "per_sequence_shape": list(per_sequence.shape),
            "store_bytes": sum(f.stat().st_size for f in folder.glob("chunk-*.bin")),
            "peak_rss_gb": _rss_gb(), "threads": torch.get_num_threads(),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_dattri(args) -> dict:
    """Dattri's LoGraAttributor on the same model and windows, proj_dim = k² per layer (its Kronecker width)."""
    import os
    from types import SimpleNamespace

    from torch.utils.data import DataLoader
    os.chdir(tempfile.mkdtemp(prefix="dattri-"))   # dattri keeps batch_metadata.json in the working folder
    from dattri.algorithm.logra import LoGraAttributor
    from dattri.task import AttributionTask
    decoder, train_ids, query_ids = build(args)
    _pretrain(decoder, train_ids, args.pretrain)

    class WithLoss(torch.nn.Module):
        """dattri's dict-batch path reads `model(**batch).loss`: the summed next-byte loss."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            logits = self.inner(input_ids)
            return SimpleNamespace(logits=logits, loss=F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="sum"))

    model = WithLoss(decoder).eval()

    def loss_func(model_, batch, device):       # what LoGra's cache() calls: the summed loss of a batch
        return model_(batch["input_ids"].to(device)).loss

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    attributor = LoGraAttributor(task, proj_dim=args.k * args.k, damping=args.damping, offload="cpu")
    rows = lambda ids: [{"input_ids": x} for x in ids]  # noqa: E731   dict batches: dattri calls model(**batch)
    train_loader = DataLoader(rows(train_ids), batch_size=args.peer_batch, shuffle=False)
    test_loader = DataLoader(rows(query_ids), batch_size=args.peer_batch, shuffle=False)
    t0 = time.perf_counter()
    attributor.cache(train_loader)
    t_cache = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = attributor.attribute(train_loader, test_loader)
    t_query = time.perf_counter() - t0
    return {"library": "dattri LoGraAttributor", "n": args.n, "T": args.T, "proj_dim_per_layer": args.k * args.k,
            "seconds": {"cache (gradients + preconditioners)": t_cache, "attribute (per sequence)": t_query},
            "tokens_per_s": args.n * args.T / t_cache, "scores_shape": list(scores.shape), "peak_rss_gb": _rss_gb(),
            "batch_size": args.peer_batch,
            "note": "per-example projected gradients from forward/backward hooks on nn.Linear layers, one backward per batch"}


def compare(args) -> dict:
    """Times both libraries alternately in one process, `args.repeats` times each.

    Run with the interpreter that has dattri; alternating lets both see the same machine load.
    Returns the times, the median ratio and the last run of each.
    """
    import statistics
    ours, peer = [], []
    for _ in range(args.repeats):
        r = run_tinfluence(args)
        ours.append(r["seconds"]["train_gradients"] + r["seconds"]["store_write"] + r["seconds"]["curvature"])
        p = run_dattri(args)
        peer.append(p["seconds"]["cache (gradients + preconditioners)"])
    a, b = statistics.median(ours), statistics.median(peer)
    return {"n": args.n, "T": args.T, "k": args.k, "linear_only": args.linear_only,
            "tinfluence_seconds (gradients + store + curvature)": ours,
            "dattri_seconds (cache: gradients + preconditioners + ifvp)": peer,
            "median_ratio_dattri_over_tinfluence": b / a, "last_tinfluence": r, "last_dattri": p}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 training windows instead of 50,000")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--T", type=int, default=64)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--k", type=int, default=16, help="k_in = k_out per matrix (k² numbers per matrix)")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--query-batch", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=128, help="windows per store chunk (and per vectorized backward)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--pretrain", type=int, default=50)
    parser.add_argument("--floor-n", type=int, default=5000, help="windows the floor is timed on (scaled to n)")
    parser.add_argument("--linear-only", action="store_true",
                        help="attribute the nn.Linear weights only (the parameters dattri's LoGra covers)")
    parser.add_argument("--peer", choices=["dattri"], default=None)
    parser.add_argument("--peer-batch", type=int, default=32)
    parser.add_argument("--compare", action="store_true", help="tinfluence and dattri alternately, --repeats times")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    args.n = args.n or (2000 if args.quick else 50_000)
    args.out = args.out and str(Path(args.out).resolve())    # the dattri run changes the working folder
    torch.set_num_threads(1)
    if args.compare:
        result = compare(args)
    else:
        result = run_dattri(args) if args.peer == "dattri" else run_tinfluence(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
