"""A small store-writing job shared by tests/test_store.py's processes: the same model, data and
projector in every process (all seeded), so stores written by any mix of processes compare bit for bit.

Run as a script, `python tests/store_job.py FOLDER DTYPE` writes the store in FOLDER, printing
"ready" once set up (a test kills it at random points and runs it again).
"""

import sys

import torch

import tinfluence as ti
from tinfluence.text import ByteDecoder, stdlib_windows, token_nll

N, T, CHUNK_ROWS = 96, 16, 4


def setup():
    """`(loss, params, train, projector)`: a one-block byte decoder over N stdlib windows."""
    torch.set_default_dtype(torch.float64)      # as tests/conftest.py: every process initializes alike
    torch.manual_seed(0)
    model = ByteDecoder(d=16, layers=1, heads=2, context=T).double().eval()
    apply, params = ti.functionalize(model)
    ids = stdlib_windows(T, N)
    mask = torch.ones_like(ids)
    mask[::3, T - 4:] = 0
    train = {"input_ids": ids, "attention_mask": mask}

    def loss(p, b):
        return token_nll(apply(p, b["input_ids"], b["attention_mask"]), b["input_ids"], b["attention_mask"]).sum(-1)

    proj = ti.projector(params, k_in=4, k_out=4, generator=torch.Generator().manual_seed(7))
    return loss, params, train, proj


def write(folder, dtype, group=None):
    loss, params, train, proj = setup()
    return ti.io.write_store(loss, params, train, projector=proj, folder=folder, dtype=dtype, chunk_rows=CHUNK_ROWS,
                             group=group, progress=False)


if __name__ == "__main__":
    torch.set_num_threads(1)
    setup()
    print("ready", flush=True)
    write(sys.argv[1], sys.argv[2])
