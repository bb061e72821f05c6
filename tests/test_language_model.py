"""Hugging Face language models end to end: tiny random configs (no download) trained briefly on the
standard library's sources, then functionalize → compressed gradients → store → query → top sequences as text."""

import pytest
import torch
import torch.nn.functional as F

import tinfluence as ti
from tinfluence.text import decode, stdlib_windows, token_nll

pytestmark = pytest.mark.slow   # trains small language models: the fast subset (-m "not slow") leaves it out

transformers = pytest.importorskip("transformers")

T, N_TRAIN = 32, 192
MASK_ID = 0          # byte 0 never occurs in the sources: BERT's [MASK]


def _config(name):
    common = dict(vocab_size=256, attn_implementation="eager")
    if name == "gpt2":      # Conv1D projections, LM head tied to the token embedding
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=T, n_embd=32, n_layer=2, n_head=2,
                                                                    bos_token_id=1, eos_token_id=1, **common))
    if name == "llama":     # RMSNorm, rotary embeddings, SwiGLU, grouped-query attention
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=T, bos_token_id=1, eos_token_id=1, pad_token_id=1, **common))
    return transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=T,
        pad_token_id=1, **common))


def _data(name, ids):
    """A dict batch: causal models see every byte (attention mask all ones but for a padded tail on every
    fifth window); BERT sees every fifth byte replaced by [MASK] and predicts it."""
    if name == "bert":
        where = (torch.arange(T) % 5 == 2).expand_as(ids)
        return {"input_ids": ids.masked_fill(where, MASK_ID), "labels": ids, "loss_mask": where.long()}
    mask = torch.ones_like(ids)
    mask[::5, T - 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _token_loss(name, apply):
    if name == "bert":
        def token_loss(p, b):
            logits = apply(p, input_ids=b["input_ids"]).logits
            return F.cross_entropy(logits.mT, b["labels"], reduction="none") * b["loss_mask"].to(logits.dtype)
    else:
        def token_loss(p, b):
            logits = apply(p, input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            return token_nll(logits, b["input_ids"], b["attention_mask"])
    return token_loss


@pytest.fixture(scope="module", params=["gpt2", "llama", "bert"])
def trained(request):
    """A tiny model trained for 60 Adam steps on N_TRAIN windows; returns its pieces."""
    name = request.param
    torch.manual_seed(0)
    model = _config(name).double()
    ids = stdlib_windows(T, N_TRAIN, generator=torch.Generator().manual_seed(1))
    data = _data(name, ids)
    apply, params = ti.functionalize(model.eval())
    token_loss = _token_loss(name, apply)
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(params.values(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    first = None
    for _ in range(60):
        batch = ti.take(data, torch.randint(0, N_TRAIN, (32,), generator=g))
        value = token_loss(params, batch).sum(-1).mean()
        first = float(value) if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    params = {k: v.detach() for k, v in params.items()}
    final = float(token_loss(params, data).sum(-1).mean())
    return name, token_loss, params, data, ids, first, final


def test_training_lowers_the_loss(trained):
    name, _, _, _, _, first, final = trained
    assert final < 0.8 * first, (name, first, final)


def test_compressed_gradients_equal_the_projected_formed_gradients(trained):
    name, token_loss, params, data, _, _, _ = trained
    seq_loss = lambda p, b: token_loss(p, b).sum(-1)  # noqa: E731
    small = ti.take(data, slice(0, 5))                # includes a padded window (index 0)
    proj = ti.projector(params, k_in=4, k_out=4, generator=torch.Generator().manual_seed(0))
    got = ti.compressed_grads(seq_loss, params, small, projector=proj)
    G = ti.per_example_grads(seq_loss, params, small)
    expected = torch.cat([proj.project_matrix(k, G[k]) for k in proj.matrices] + [proj.project_rest(G, (5,))], -1)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


def test_store_query_retrieves_a_training_window_from_its_copy(trained, tmp_path):
    """A query that copies training window z has z as its most helpful training sequence, from the
    store's running top-k, and the top-k agree with the full score matrix."""
    name, token_loss, params, data, ids, _, _ = trained
    seq_loss = lambda p, b: token_loss(p, b).sum(-1)  # noqa: E731
    proj = ti.projector(params, k_in=8, k_out=8, generator=torch.Generator().manual_seed(0))
    store = ti.io.write_store(seq_loss, params, data, projector=proj, folder=tmp_path, dtype="bfloat16",
                              chunk_rows=64, progress=False)
    Z = store.read().double()
    curvature = ti.projected_curvature(store, damping=0.1 * float(Z.pow(2).sum(1).mean()) / Z.shape[1])
    copied = torch.tensor([3, 50, 101, 170])
    queries = ti.compressed_grads(seq_loss, params, ti.take(data, copied), projector=proj)
    values, top = store.topk(queries, 3, curvature)
    assert torch.equal(top[:, 0], copied), (name, top)
    full = store.influence(queries, curvature)
    assert torch.equal(top, full.topk(3, dim=1).indices)
    shown = [decode(ids[int(i)]) for i in top[:, 0]]
    assert shown == [decode(ids[int(i)]) for i in copied] and all(isinstance(s, str) and len(s) > 0 for s in shown)
    per_token = ti.query_token_influence(token_loss, params, ti.take(data, copied[:2]), store, projector=proj,
                                         curvature=curvature)
    assert per_token.shape == (2, T, N_TRAIN)
    torch.testing.assert_close(per_token.sum(1), full[:2].to(per_token.dtype), rtol=1e-4,
                               atol=1e-4 * float(full.abs().max()))
