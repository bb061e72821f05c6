"""Recipe: large data: compressed per-example gradients written once to an on-disk store, then
any number of query batches scored against it at matrix-multiply speed.

LoGra-style projections (`ti.projector`) compress each linear layer's gradient from its
inputs and output gradients without forming it; `ti.io.write_store` writes them chunk by
chunk (memory-mapped, resumable after a kill, float16/bfloat16/float32), and the store's
`topk` keeps a running top-k so the full `[n_query, n_train]` matrix is never formed.
"""

import tempfile

import torch
import torch.nn.functional as F

import tinfluence as ti
from tinfluence.demo import load_digits_split

torch.manual_seed(0)
train, test, _ = load_digits_split(1000)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).double()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for epoch in range(20):
    for idx in torch.randperm(1000).split(100):
        optimizer.zero_grad()
        F.cross_entropy(model(train[0][idx]), train[1][idx]).backward()
        optimizer.step()
apply, params = ti.functionalize(model)


def loss(params, batch):
    x, y = batch
    return F.cross_entropy(apply(params, x), y, reduction="none")


projector = ti.projector(params, k_in=16, k_out=8, generator=torch.Generator().manual_seed(0))   # the same for train and test
with tempfile.TemporaryDirectory() as folder:
    store = ti.io.write_store(loss, params, train, projector=projector, folder=folder, dtype="float32",
                              chunk_rows=256, progress=False)               # written once; a rerun resumes
    curvature = ti.projected_curvature(store, damping=1e-3)              # damped covariance, exact inverse
    queries = ti.compressed_grads(loss, params, ti.take(test, torch.arange(20)), projector=projector)
    scores, ids = store.topk(queries, 5, curvature)                      # [20, 5] most helpful, no [20, 1000] matrix
    full = store.influence(queries, curvature)                           # [20, 1000], for the check below
    print(f"store: {len(store)} examples × {projector.dim} numbers; top helpful of query 0: {ids[0].tolist()}")
    assert torch.equal(ids, full.topk(5, dim=1).indices)

labels = train[1][ids]
agree = (labels == test[1][:20, None]).double().mean().item()
print(f"fraction of the top-5 helpful training digits with the query's label: {agree:.2f}")
assert agree > 0.5
