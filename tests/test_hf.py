"""Hugging Face models under vmap: per-example gradients of padded dict batches against a plain
autograd loop over the unpadded examples (float64), tiny randomly initialised configs, no download."""

import pytest
import torch
import torch.nn.functional as F

import tinfluence as ti

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

LENGTHS = [8, 5, 3, 6]


def _gpt2(attn="sdpa"):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, num_labels=2,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=1, attn_implementation=attn)
    return transformers.GPT2ForSequenceClassification(config).double().eval()


def _bert(attn="sdpa"):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=32, num_labels=2,
                                     attn_implementation=attn)
    return transformers.BertForSequenceClassification(config).double().eval()


MODELS = {"gpt2": _gpt2, "bert": _bert, "gpt2_eager": lambda: _gpt2("eager")}


def _batch(seed=0, lengths=LENGTHS, T=8):
    """Right-padded dict batch: (input_ids, attention_mask, labels), pad id 0."""
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    ids = torch.randint(1, 64, (n, T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 2, (n,), generator=g)}


def _loss(apply):
    def loss(p, b):
        logits = apply(p, input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return F.cross_entropy(logits, b["labels"], reduction="none")
    return loss


def _reference_grads(model, batch):
    """[n, P]: each example unpadded, through the user's own model, by plain autograd."""
    rows = []
    for i, length in enumerate(batch["attention_mask"].sum(1).tolist()):
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"][i:i + 1, :length]).logits
        F.cross_entropy(logits, batch["labels"][i:i + 1]).backward()
        rows.append({k: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for k, p in model.named_parameters()})
    return ti.ravel(ti.tree.stack(rows), batch_ndim=1)


@pytest.mark.parametrize("name", MODELS)
def test_per_example_grads_of_padded_batches_match_unpadded_loop(name):
    model = MODELS[name]()
    apply, params = ti.functionalize(model)
    batch = _batch()
    got = ti.ravel(ti.per_example_grads(_loss(apply), params, batch, chunk_size=3), batch_ndim=1)
    torch.testing.assert_close(got, _reference_grads(model, batch), rtol=1e-10, atol=1e-13)


def test_grad_dot_and_model_untouched():
    model = _bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply, params = ti.functionalize(model)
    train, test = _batch(1), _batch(2, lengths=[4, 7])
    expected = _reference_grads(model, test) @ _reference_grads(model, train).T
    torch.testing.assert_close(ti.grad_dot(_loss(apply), params, train, test), expected, rtol=1e-10, atol=1e-13)
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_hvp_through_attention_matches_finite_differences():
    """The fused SDPA kernels have no second derivative; the copy that functionalize runs does."""
    model = _gpt2()
    apply, params = ti.functionalize(model)
    batch = _batch(3)
    R = ti.objective(_loss(apply), batch)
    v = ti.tree.random_like(params, generator=torch.Generator().manual_seed(0))
    v = ti.tree.scale(1 / ti.tree.norm(v), v)   # unit direction: the difference quotient errs by O(eps²)
    got = ti.ravel(ti.hvp(R, params)(v))

    def plain_grad(shift):
        rebuilt = _gpt2()
        rebuilt.load_state_dict({**model.state_dict(), **{k: params[k] + shift * v[k] for k in params}})
        rebuilt.zero_grad()
        logits = rebuilt(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        F.cross_entropy(logits, batch["labels"]).backward()
        return ti.ravel({k: p.grad for k, p in rebuilt.named_parameters()})

    eps = 1e-5
    expected = (plain_grad(eps) - plain_grad(-eps)) / (2 * eps)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)


def test_training_mode_follows_the_model_and_says_to_call_eval():
    model = _gpt2().train()
    with pytest.warns(UserWarning, match=r"call module.eval\(\) first"):
        apply, params = ti.functionalize(model)
    with pytest.raises(RuntimeError, match=r"ti.functionalize: apply: GPT2ForSequenceClassification has layers in "
                                           r"training mode .*Call model.eval\(\)"):
        ti.per_example_grads(_loss(apply), params, _batch())
    model.eval()
    ti.per_example_grads(_loss(apply), params, _batch())


def test_bert_with_eager_attention_says_what_to_change():
    model = _bert("eager")
    apply, params = ti.functionalize(model)
    with pytest.raises(RuntimeError, match=r"ti.functionalize: apply: BertForSequenceClassification \(attn_implementation "
                                           r"'eager'\) branched on tensor values.*model.set_attn_implementation\('sdpa'\) "
                                           r"before ti.functionalize"):
        ti.per_example_grads(_loss(apply), params, _batch())
    model.set_attn_implementation("sdpa")
    apply, params = ti.functionalize(model)
    got = ti.ravel(ti.per_example_grads(_loss(apply), params, _batch()), batch_ndim=1)
    torch.testing.assert_close(got, _reference_grads(model, _batch()), rtol=1e-10, atol=1e-13)


def test_causal_lm_with_tied_head_per_token_loss():
    """GPT-2 LM head tied to the token embedding; loss per example = mean next-token loss over its tokens."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=1)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    apply, params = ti.functionalize(model)
    assert "lm_head.weight" not in params   # tied: appears once, as the embedding

    def lm_loss(logits, ids, mask):
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
        return per_token.sum(1) / mask[:, 1:].sum(1)

    def loss(p, b):
        return lm_loss(apply(p, input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                       b["input_ids"], b["attention_mask"])

    batch = _batch(4)
    got = ti.ravel(ti.per_example_grads(loss, params, batch), batch_ndim=1)
    rows = []
    for i, length in enumerate(batch["attention_mask"].sum(1).tolist()):
        model.zero_grad()
        ids, mask = batch["input_ids"][i:i + 1, :length], batch["attention_mask"][i:i + 1, :length]
        lm_loss(model(input_ids=ids).logits, ids, mask).sum().backward()
        rows.append({k: p.grad.clone() for k, p in model.named_parameters()})
    torch.testing.assert_close(got, ti.ravel(ti.tree.stack(rows), batch_ndim=1), rtol=1e-10, atol=1e-13)
