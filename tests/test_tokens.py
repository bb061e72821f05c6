"""Per-token scores: per-token gradients against formed ones, token scores summing to sequence scores."""

import pytest
import torch

import tinfluence as ti
from tinfluence.text import ByteDecoder, stdlib_windows, token_nll

T = 12


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = ByteDecoder(d=16, layers=1, heads=2, context=T).double().eval()
    apply, params = ti.functionalize(model)
    ids = stdlib_windows(T, 40)
    mask = torch.ones_like(ids)
    mask[::4, 8:] = 0                      # every fourth sequence padded after 8 tokens
    data = {"input_ids": ids, "attention_mask": mask}

    def token_loss(p, b):
        return token_nll(apply(p, b["input_ids"], b["attention_mask"]), b["input_ids"], b["attention_mask"])

    proj = ti.projector(params, k_in=4, k_out=6, generator=torch.Generator().manual_seed(2))
    return token_loss, params, data, proj


def _formed_token_projection(token_loss, params, data, proj):
    """Ground truth: for each position t separately, the formed per-example gradients of ℓ_t, projected
    as P_out g P_inᵀ (and the fallback sketch), stacked over t."""
    n = data["input_ids"].shape[0]
    out = []
    for t in range(T):
        G = ti.per_example_grads(lambda p, b, t=t: token_loss(p, b)[:, t], params, data)
        parts = [proj.project_matrix(name, G[name]) for name in proj.matrices] + [proj.project_rest(G, (n,))]
        out.append(torch.cat(parts, -1))
    return torch.stack(out, 1)


def test_token_grads_equal_formed_per_token_gradients(lm):
    token_loss, params, data, proj = lm
    small = ti.take(data, slice(0, 6))
    got = ti.token_grads(token_loss, params, small, projector=proj, chunk_size=4)
    assert got.shape == (6, T, proj.dim)
    torch.testing.assert_close(got, _formed_token_projection(token_loss, params, small, proj), rtol=1e-10, atol=1e-10)
    seq = ti.compressed_grads(lambda p, b: token_loss(p, b).sum(-1), params, small, projector=proj)
    torch.testing.assert_close(got.sum(1), seq, rtol=1e-10, atol=1e-10)
    assert float(got[0, 7:].abs().max()) == 0.0      # padded positions (and the last) carry no loss


@pytest.mark.parametrize("on_store", [False, True])
def test_query_token_scores_sum_to_sequence_scores(lm, on_store, tmp_path):
    token_loss, params, data, proj = lm
    train, queries = ti.take(data, slice(0, 32)), ti.take(data, slice(32, 40))
    seq_loss = lambda p, b: token_loss(p, b).sum(-1)  # noqa: E731
    Z = ti.compressed_grads(seq_loss, params, train, projector=proj)
    source = ti.io.write_store(seq_loss, params, train, projector=proj, folder=tmp_path, chunk_rows=5,
                               progress=False) if on_store else Z
    curv = ti.projected_curvature(source if on_store else Z, damping=0.3)
    per_token = ti.query_token_influence(token_loss, params, queries, source, projector=proj, curvature=curv)
    assert per_token.shape == (8, T, 32)
    per_seq = ti.compressed_influence(seq_loss, params, train, queries, projector=proj, damping=0.3)
    tol = 1e-5 if on_store else 1e-10                   # the store keeps float32
    torch.testing.assert_close(per_token.sum(1).double(), per_seq, rtol=tol, atol=tol * float(per_seq.abs().max()))
    assert float(per_token[0, 7:].abs().max()) == 0.0   # query 0 (index 32) is padded after 8 tokens


def test_train_token_scores_sum_to_sequence_scores(lm):
    token_loss, params, data, proj = lm
    train, queries = ti.take(data, slice(0, 32)), ti.take(data, slice(32, 36))
    seq_loss = lambda p, b: token_loss(p, b).sum(-1)  # noqa: E731
    Z = ti.compressed_grads(seq_loss, params, train, projector=proj)
    curv = ti.projected_curvature(Z, damping=0.3)
    per_token = ti.train_token_influence(token_loss, params, train, queries, projector=proj, curvature=curv,
                                         chunk_size=7)
    assert per_token.shape == (4, 32, T)
    per_seq = ti.compressed_influence(seq_loss, params, train, queries, projector=proj, damping=0.3)
    torch.testing.assert_close(per_token.sum(2), per_seq, rtol=1e-10, atol=1e-10 * float(per_seq.abs().max()))
    assert float(per_token[:, 0, 7:].abs().max()) == 0.0      # training sequence 0 is padded after 8 tokens


def test_token_loss_must_be_per_token(lm):
    token_loss, params, data, proj = lm
    with pytest.raises(ValueError, match=r"ti.token_grads: `token_loss` must return one loss per example and token"):
        ti.token_grads(lambda p, b: token_loss(p, b).sum(-1), params, data, projector=proj)
    with pytest.raises(TypeError, match=r"ti.query_token_influence: `curvature`"):
        ti.query_token_influence(token_loss, params, data, torch.zeros(3, proj.dim), projector=proj, curvature=None)
