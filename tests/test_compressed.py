"""Compressed per-example gradients (LoGra) against exact per-example gradients, float64."""

import math

import numpy as np
import pytest
import torch

import tinfluence as ti
from tinfluence.text import ByteDecoder, stdlib_windows, token_nll

transformers = pytest.importorskip("transformers")


def _decoder(seed=0, **kw):
    torch.manual_seed(seed)
    model = ByteDecoder(**{"d": 16, "layers": 1, "heads": 2, "context": 16, **kw}).double().eval()
    apply, params = ti.functionalize(model)
    ids = stdlib_windows(16, 12)
    mask = torch.ones_like(ids)
    mask[:4, 11:] = 0
    data = {"input_ids": ids, "attention_mask": mask}

    def loss(p, b):
        return token_nll(apply(p, b["input_ids"], b["attention_mask"]), b["input_ids"], b["attention_mask"]).sum(-1)

    return loss, params, data


def _gpt2(seed=0):
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    apply, params = ti.functionalize(model)
    data = {"input_ids": stdlib_windows(12, 10)}

    def loss(p, b):
        return token_nll(apply(p, input_ids=b["input_ids"]).logits, b["input_ids"]).sum(-1)

    return loss, params, data


def _explicit(proj, G, n):
    """The projection applied to FORMED per-example gradients: P_out g P_inᵀ per matrix, explicit
    dense products (no factors), plus the fallback sketch of the vectors."""
    parts = []
    for name, (p_out, p_in) in proj.matrices.items():
        g = G[name].reshape(n, proj.shapes[name][0], -1)
        eye_in = torch.eye(g.shape[-1], dtype=g.dtype)
        eye_out = torch.eye(g.shape[-2], dtype=g.dtype)
        M_in, M_out = p_in(eye_in).T, p_out(eye_out).T               # [k_in, in], [k_out, out] as matrices
        parts.append((M_out @ g @ M_in.T).reshape(n, -1))
    if proj.rest:
        flat = torch.cat([G[name].reshape(n, -1) for name in proj.rest], -1)
        parts.append(flat @ proj.rest_sketch(torch.eye(flat.shape[1], dtype=flat.dtype)))
    return torch.cat(parts, -1)


@pytest.mark.parametrize("kind", ["gaussian", "sjlt"])
@pytest.mark.parametrize("make", [_decoder, _gpt2], ids=["decoder", "gpt2"])
def test_compressed_grads_equal_projection_of_formed_gradients(make, kind):
    loss, params, data = make()
    proj = ti.projector(params, k_in=3, k_out=5, kind=kind, generator=torch.Generator().manual_seed(1))
    Z = ti.compressed_grads(loss, params, data, projector=proj, chunk_size=5)
    G = ti.per_example_grads(loss, params, data)
    n = data["input_ids"].shape[0]
    assert Z.shape == (n, proj.dim)
    torch.testing.assert_close(Z, _explicit(proj, G, n), rtol=1e-10, atol=1e-10)


def test_projector_is_a_value_of_its_generator():
    _, params, _ = _decoder()
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    a = ti.projector(params, k_in=4, k_out=4, generator=g)
    assert torch.equal(g.get_state(), state)
    b = ti.projector(params, k_in=4, k_out=4, generator=g)
    c = ti.projector(params, k_in=4, k_out=4, generator=torch.Generator().manual_seed(4))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def _exact_and_draws(kind, k, draws):
    """Exact gradient dot products of a few GPT-2 examples and `draws` projected estimates of them."""
    loss, params, data = _gpt2()
    G = ti.per_example_grads(loss, params, ti.take(data, slice(0, 4)))
    exact = ti.tree.pairwise_vdot(G, G)
    iu = torch.triu_indices(4, 4, 1)
    est = []
    for seed in range(draws):
        proj = ti.projector(params, k_in=k, k_out=k, kind=kind, generator=torch.Generator().manual_seed(seed))
        Z = _explicit(proj, G, 4)
        est.append((Z @ Z.T)[iu[0], iu[1]])
    return exact[iu[0], iu[1]], torch.stack(est), exact


@pytest.mark.parametrize("kind", ["gaussian", "sjlt"])
def test_projected_dot_products_are_unbiased(kind):
    exact, est, full = _exact_and_draws(kind, 4, 400)
    mean, sem = est.mean(0), est.std(0) / math.sqrt(est.shape[0])
    assert (sem > 0).all()
    z = (mean - exact) / sem
    assert z.abs().max() < 4.5, (z, exact, mean)
    # the estimates are not trivially exact: individual draws are off by a lot at k = 4
    scale = full.diagonal().sqrt()
    assert (est - exact).abs().max() > 1e-3 * float(scale.max() ** 2)


@pytest.mark.parametrize("kind", ["gaussian", "sjlt"])
def test_relative_error_falls_as_one_over_sqrt_k(kind):
    """Every block's relative error of projected dot products, k_in = k_out = k_rest = k: the slope of
    log error against log k is -1/2 (a matrix block's variance is ≈ (1/k_in + 1/k_out)·‖g‖²‖h‖²)."""
    loss, params, data = _gpt2()
    G = ti.per_example_grads(loss, params, ti.take(data, slice(0, 4)))
    ks, errs = [4, 8, 16, 32], []
    for k in ks:
        rel = []
        for seed in range(30):
            proj = ti.projector(params, k_in=k, k_out=k, k_rest=k, kind=kind, generator=torch.Generator().manual_seed(seed))
            Z = _explicit(proj, G, 4)
            for name, cols in proj.blocks.items():
                names = proj.rest if name == "rest" else (name,)
                exact = ti.tree.pairwise_vdot({m: G[m] for m in names}, {m: G[m] for m in names})
                norms = exact.diagonal().sqrt()
                est = Z[:, cols] @ Z[:, cols].T
                rel.append(((est - exact) / (norms[:, None] * norms[None, :])).pow(2).mean())
        errs.append(float(torch.stack(rel).mean().sqrt()))
    slope = np.polyfit(np.log(ks), np.log(errs), 1)[0]
    assert -0.65 < slope < -0.4, (slope, errs)


def _exact_influence(G, Gt, damping):
    """(1/n) g_testᵀ (C + λI)⁻¹ g_z, C = (1/n) GᵀG over the full parameter space, by the push-through
    identity (C + λI)⁻¹ Gᵀ = Gᵀ (GGᵀ/n + λI)⁻¹ (an n × n solve instead of P × P)."""
    n = G.shape[0]
    K = G @ G.T / n
    return Gt @ G.T @ torch.linalg.inv(K + damping * torch.eye(n, dtype=K.dtype)) / n


def test_compressed_influence_correlates_with_exact_damped_covariance_influence():
    """Documented setting (docs/design.md): k_in = k_out = 32, one block per layer, λ = the top
    eigenvalue of C: Pearson >= 0.9 on this one-block decoder (P = 11k, 140 training windows)."""
    loss, params, _ = _decoder(d=16)
    ids = stdlib_windows(16, 160)
    ones = torch.ones_like(ids)
    train, test = {"input_ids": ids[:140], "attention_mask": ones[:140]}, {"input_ids": ids[140:], "attention_mask": ones[140:]}
    G = torch.cat([v.reshape(140, -1) for v in ti.per_example_grads(loss, params, train).values()], 1)
    Gt = torch.cat([v.reshape(20, -1) for v in ti.per_example_grads(loss, params, test).values()], 1)
    damping = float(torch.linalg.eigvalsh(G @ G.T / 140)[-1])
    exact = _exact_influence(G, Gt, damping)
    proj = ti.projector(params, k_in=32, k_out=32, generator=torch.Generator().manual_seed(0))
    approx = ti.compressed_influence(loss, params, train, test, projector=proj, damping=damping, per_layer=True)
    assert approx.shape == (20, 140)
    r = float(ti.pearson(approx.flatten(), exact.flatten()))
    assert r >= 0.9, r


def test_projected_curvature_inverse_is_exact():
    Z = torch.randn(50, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    curv = ti.projected_curvature(list(Z.split(16)), damping=0.3)
    C = Z.T @ Z / 50 + 0.3 * torch.eye(7, dtype=torch.float64)
    Q = torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(curv.precondition(Q), torch.linalg.solve(C, Q.T).T)


def test_errors_name_the_call_and_argument():
    loss, params, data = _decoder()
    with pytest.raises(ValueError, match=r"ti.projector: `kind`"):
        ti.projector(params, k_in=2, k_out=2, kind="dense", generator=torch.Generator())
    with pytest.raises(TypeError, match=r"ti.projector: `generator`"):
        ti.projector(params, k_in=2, k_out=2, generator=0)
    with pytest.raises(ValueError, match=r"ti.projector: `k_in`"):
        ti.projector(params, k_in=0, k_out=2, generator=torch.Generator())
    other = ti.projector({"w": torch.zeros(2, 2)}, k_in=2, k_out=2, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"ti.compressed_grads: `projector` was drawn for other parameters"):
        ti.compressed_grads(loss, params, data, projector=other)
    with pytest.raises(ValueError, match=r"ti.projected_curvature: `damping`"):
        ti.projected_curvature(torch.zeros(3, 2), damping=0.0)


def test_project_rest_without_vector_parameters_names_the_call():
    proj = ti.projector({"w": torch.zeros(3, 2)}, k_in=2, k_out=2, generator=torch.Generator().manual_seed(0))
    assert proj.rest == () and proj.rest_sketch is None
    with pytest.raises(ValueError, match=r"ti.Projector.project_rest: this projector has no vector parameters"):
        proj.project_rest({}, (4,))
