"""K-FAC and EK-FAC against dense references built here, independently of the capture.

References: per-example gradients from an autograd loop (`ti.testing.loop_grads`), layer
inputs and output gradients from hand-written forwards with `retain_grad`, im2col patches
by slicing windows, one-hot token matrices, Gauss-Newton blocks from
`torch.autograd.functional.jacobian` and the output loss's Hessian, and dense solves with
`torch.linalg.solve`.
"""

import pytest
import torch
import torch.nn.functional as F
from models import TiedLM
from torch import nn

import tinfluence as ti
from tinfluence.solvers import ekfac, kfac
from tinfluence.testing import loop_grads


def _close(got, expected, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


def _cross_entropy(o, b):
    return F.cross_entropy(o, b[1], reduction="none")


def _squared_error(o, b):
    return 0.5 * (o - b[1]).pow(2).sum(-1)


def _fns(apply, output_loss=_cross_entropy):
    def predict(p, b):
        return apply(p, b[0])

    return (lambda p, b: output_loss(predict(p, b), b)), predict, output_loss


def _positions(params) -> dict:
    """Each parameter's entries' positions in `ti.ravel(params)` (its own leaf order)."""
    P = sum(t.numel() for t in params.values())
    return {name: t.round().long() for name, t in ti.unravel(torch.arange(P, dtype=torch.float64), params).items()}


def _frame_index(params, weight, bias=None, side=None) -> torch.Tensor:
    """Raveled-parameter positions of a layer's frame `[d0', d1']` (W as [d0, d1], the bias a column or a row)."""
    positions = _positions(params)
    index = positions[weight].reshape(params[weight].shape[0], -1)
    if side == "right":
        index = torch.cat([index, positions[bias][:, None]], 1)
    elif side == "left":
        index = torch.cat([index, positions[bias][None, :]], 0)
    return index


def _frame_grads(G: dict, weight, bias=None, side=None) -> torch.Tensor:
    """Per-example gradients `[n, d0', d1']` in a layer's frame."""
    W = G[weight].reshape(G[weight].shape[0], G[weight].shape[1], -1)
    if side == "right":
        return torch.cat([W, G[bias][:, :, None]], 2)
    if side == "left":
        return torch.cat([W, G[bias][:, None, :]], 1)
    return W


def _block_mask(params, blocks) -> torch.Tensor:
    """`[P, P]` True inside each block (a list of raveled-position index tensors)."""
    P = sum(t.numel() for t in params.values())
    mask = torch.zeros(P, P, dtype=torch.bool)
    for index in blocks:
        flat = index.reshape(-1)
        mask[flat[:, None], flat[None, :]] = True
    return mask


def _mlp(seed=0, sizes=(4, 5, 3)):
    torch.manual_seed(seed)
    return ti.functionalize(nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], sizes[2])))


def _mlp_layers(params):
    return [_frame_index(params, f"{i}.weight", f"{i}.bias", "right") for i in (0, 2)]


def _mlp_sides(params, data):
    """Hand-written forward: [(ã, g)] per layer, ã `[n, in+1]`, g `[n, out]` = ∂ℓ_n/∂(layer output)."""
    X, y = data
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    z1 = X @ params["0.weight"].T + params["0.bias"]
    z1.retain_grad()
    h = torch.tanh(z1)
    o = h @ params["2.weight"].T + params["2.bias"]
    o.retain_grad()
    F.cross_entropy(o, y, reduction="sum").backward()
    one = torch.ones(len(X), 1)
    return [(torch.cat([X, one], 1), z1.grad), (torch.cat([h.detach(), one], 1), o.grad)]


def _gauss_newton(apply, params, data, output_loss) -> torch.Tensor:
    """(1/n) Σ J_nᵀ H_n J_n, J from autograd's jacobian of the outputs in the raveled parameters."""
    flat = ti.ravel(params)
    total = 0
    for i in range(len(data[0])):
        example = ti.take(data, slice(i, i + 1))
        o = apply(params, example[0]).detach()
        J = torch.autograd.functional.jacobian(lambda f, x=example[0]: apply(ti.unravel(f, params), x).reshape(-1), flat)
        H = torch.autograd.functional.hessian(lambda q, o=o, b=example: output_loss(q.reshape(o.shape), b).sum(),
                                              o.reshape(-1))
        total = total + J.T @ H @ J
    return total / len(data[0])


@pytest.mark.parametrize("fisher, output_loss", [("empirical", _cross_entropy), ("ggn", _cross_entropy),
                                                  ("ggn", _squared_error)])
def test_one_example_kfac_equals_the_exact_block_fisher(fisher, output_loss):
    """N = 1, T = 1: every Kronecker block is exact: the empirical Fisher g gᵀ, or the block of Jᵀ H J."""
    apply, params = _mlp()
    x = torch.randn(1, 4, generator=torch.Generator().manual_seed(1))
    data = (x, torch.tensor([2]) if output_loss is _cross_entropy else torch.randn(1, 3))
    loss, predict, _ = _fns(apply, output_loss)
    curv = kfac(loss, params, data, predict=predict, output_loss=output_loss, fisher=fisher, damping=1e-3)
    if fisher == "empirical":
        g = ti.ravel(loop_grads(loss, params, data), batch_ndim=1)[0]
        exact = torch.outer(g, g)
    else:
        exact = _gauss_newton(apply, params, data, output_loss)
    mask = _block_mask(params, _mlp_layers(params))
    _close(ti.to_dense(curv.operator, params), torch.where(mask, exact, torch.zeros(())))
    assert [b.kind for b in curv.kronecker] == ["linear", "linear"] and curv.diagonal == ()


@pytest.fixture(scope="module")
def mlp_fit():
    apply, params = _mlp()
    g = torch.Generator().manual_seed(3)
    data = (torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g))
    loss, predict, output_loss = _fns(apply)
    fits = {m: fn(loss, params, data, predict=predict, output_loss=output_loss, damping=1e-2, chunk_size=7)
            for m, fn in (("kfac", kfac), ("ekfac", ekfac))}
    return apply, params, data, loss, fits


def test_kfac_factors_and_matrix_equal_the_hand_built_kronecker_product(mlp_fit):
    _, params, data, _, fits = mlp_fit
    n = len(data[0])
    dense = ti.to_dense(fits["kfac"].operator, params)
    for block, (a, g), index in zip(fits["kfac"].kronecker, _mlp_sides(params, data), _mlp_layers(params)):
        A, S = a.T @ a / n, g.T @ g / n
        _close(block.A, A)
        _close(block.S, S)
        flat = index.reshape(-1)
        _close(dense[flat[:, None], flat[None, :]], torch.kron(S, A))   # row-major [out, in+1]: S ⊗ A


def test_ekfac_equals_the_dense_definition(mlp_fit):
    """Λ = mean_n (Q_Sᵀ G_n Q_A)², Q from eigh of the hand-built A and S; F̂ = Q diag(Λ) Qᵀ."""
    _, params, data, loss, fits = mlp_fit
    G = loop_grads(loss, params, data)
    dense = ti.to_dense(fits["ekfac"].operator, params)
    expected = torch.zeros_like(dense)
    for i, ((a, g), index) in enumerate(zip(_mlp_sides(params, data), _mlp_layers(params))):
        n = len(a)
        _, QA = torch.linalg.eigh(a.T @ a / n)
        _, QS = torch.linalg.eigh(g.T @ g / n)
        Gn = _frame_grads(G, f"{2 * i}.weight", f"{2 * i}.bias", "right")
        Lambda = (QS.T @ Gn @ QA).pow(2).mean(0)
        Q = torch.kron(QS, QA)
        flat = index.reshape(-1)
        expected[flat[:, None], flat[None, :]] = Q @ torch.diag(Lambda.reshape(-1)) @ Q.T
    _close(dense, expected)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_ihvp_is_the_dense_damped_solve(mlp_fit, method):
    _, params, _, _, fits = mlp_fit
    curv = fits[method]
    M = ti.to_dense(curv.operator, params) + 1e-2 * torch.eye(ti.tree.size(params))
    V = torch.randn(4, len(M), generator=torch.Generator().manual_seed(0))
    _close(ti.ravel(curv.ihvp(ti.unravel(V, params)), batch_ndim=1), torch.linalg.solve(M, V.T).T)
    _close(ti.ravel(curv(ti.unravel(V[0], params))), torch.linalg.solve(M, V[0]))
    _close(ti.ravel(curv.preconditioner(ti.unravel(V, params)), batch_ndim=1), torch.linalg.solve(M, V.T).T)
    x, info = curv.ihvp.solve(ti.unravel(V, params))          # the solve result every solver gives
    _close(ti.ravel(x, batch_ndim=1), torch.linalg.solve(M, V.T).T)
    true = (ti.ravel(x, batch_ndim=1) @ M - V).norm(dim=1) / V.norm(dim=1)
    assert bool(info.converged.all()) and info.iterations.tolist() == [0] * 4
    torch.testing.assert_close(info.relative_residual, true, rtol=0, atol=1e-12)
    assert float(info.relative_residual.max()) < 1e-12


def test_relative_damping_is_a_tenth_of_each_blocks_mean_eigenvalue(mlp_fit):
    apply, params, data, loss, _ = mlp_fit
    _, predict, output_loss = _fns(apply)
    curv = ekfac(loss, params, data, predict=predict, output_loss=output_loss, damping=0.1, damping_mode="relative")
    dense = ti.to_dense(curv.operator, params)
    damping = torch.zeros(len(dense))
    for block, index in zip(curv.kronecker, _mlp_layers(params)):
        flat = index.reshape(-1)
        mean = torch.linalg.eigvalsh(dense[flat[:, None], flat[None, :]]).mean()
        assert block.damping == pytest.approx(0.1 * float(mean), rel=1e-10)
        damping[flat] = 0.1 * mean
    v = torch.randn(len(dense), generator=torch.Generator().manual_seed(1))
    _close(ti.ravel(curv.ihvp(ti.unravel(v, params))), torch.linalg.solve(dense + torch.diag(damping), v))


def test_influence_and_self_influence_with_the_curvature(mlp_fit):
    """score = (1/n) g_testᵀ (F̂ + λI)⁻¹ g_z, the library's sign and scale."""
    _, params, data, loss, fits = mlp_fit
    curv, n = fits["ekfac"], len(data[0])
    test = (torch.randn(3, 4, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 1, 2]))
    M = ti.to_dense(curv.operator, params) + 1e-2 * torch.eye(ti.tree.size(params))
    G_train = ti.ravel(loop_grads(loss, params, data), batch_ndim=1)
    G_test = ti.ravel(loop_grads(loss, params, test), batch_ndim=1)
    _close(ti.influence(loss, params, data, test, ihvp=curv.ihvp), G_test @ torch.linalg.solve(M, G_train.T) / n)
    _close(ti.self_influence(loss, params, data, ihvp=curv.ihvp, chunk_size=8),
           (G_train * torch.linalg.solve(M, G_train.T).T).sum(1) / n)


def test_true_fisher_is_the_empirical_fisher_at_labels_drawn_from_the_softmax():
    apply, params = _mlp()
    g = torch.Generator().manual_seed(4)
    X = torch.randn(20, 4, generator=g)
    data = (X, torch.randint(0, 3, (20,), generator=g))
    loss, predict, output_loss = _fns(apply)
    generator = torch.Generator().manual_seed(11)
    state = generator.get_state()
    curv = ekfac(loss, params, data, predict=predict, output_loss=output_loss, fisher="true", generator=generator,
                 damping=1e-3)
    assert torch.equal(generator.get_state(), state)   # the caller's generator is not advanced
    with torch.no_grad():
        p = torch.softmax(apply(params, X), -1)
    drawn = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(11)).squeeze(1)
    empirical = ekfac(loss, params, (X, drawn), predict=predict, output_loss=output_loss, damping=1e-3)
    _close(ti.to_dense(curv.operator, params), ti.to_dense(empirical.operator, params))
    with pytest.raises(ValueError, match=r'ti.kfac: fisher="true" samples labels from softmax\(outputs\).*'
                                         r"not one-hot\). For other losses use fisher=\"ggn\""):
        kfac(lambda p, b: _squared_error(predict(p, b), b), params, (X, torch.randn(20, 3)), predict=predict,
             output_loss=_squared_error, fisher="true", generator=generator, damping=1e-3)


# ---------------------------------------------------------------- other layers

def _eigenvalues_in_own_basis(block, Gn):
    QL = torch.eye(Gn.shape[1]) if block.left_basis is None else block.left_basis
    return (QL.T @ Gn @ block.right_basis).pow(2).mean(0)


def _windows(x, kernel, stride, dilation):
    """im2col by slicing: `[n, C, H, W]` (already padded) -> `[n, L, C·kh·kw]`, output locations row-major."""
    n, _, H, W = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    rows = range(0, H - dh * (kh - 1), sh)
    cols = range(0, W - dw * (kw - 1), sw)
    patches = [x[:, :, i:i + dh * (kh - 1) + 1:dh, j:j + dw * (kw - 1) + 1:dw].reshape(n, -1) for i in rows for j in cols]
    return torch.stack(patches, 1)


class ConvNet(nn.Module):
    """conv2d (stride 2, padding 1) and conv1d ("same", even kernel, dilation 2) on one image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.line = nn.Conv1d(3, 2, 4, padding="same", dilation=2, bias=False)
        self.head = nn.Linear(2 * 9, 3)

    def parts(self, x):
        a = self.conv(x)                          # [n, 3, 3, 3]
        b = self.line(torch.tanh(a).flatten(2))   # [n, 2, 9]
        return a, b, self.head(torch.tanh(b).flatten(1))

    def forward(self, x):
        return self.parts(x)[-1]


def test_convolution_factors_equal_sliced_windows_and_ekfac_the_exact_gradients():
    torch.manual_seed(0)
    model = ConvNet()
    apply, params = ti.functionalize(model)
    g = torch.Generator().manual_seed(6)
    data = (torch.randn(6, 2, 5, 5, generator=g), torch.randint(0, 3, (6,), generator=g))
    loss, predict, output_loss = _fns(apply)
    curv = ekfac(loss, params, data, predict=predict, output_loss=output_loss, damping=1e-3)
    blocks = {b.weight: b for b in curv.kronecker}
    assert [(b.weight, b.kind, b.bias) for b in curv.kronecker] == [
        ("conv.weight", "conv2d", "conv.bias"), ("line.weight", "conv1d", None), ("head.weight", "linear", "head.bias")]

    x = data[0]
    a, b, o = model.parts(x)
    a.retain_grad()
    b.retain_grad()
    F.cross_entropy(o, data[1], reduction="sum").backward()
    n = len(x)
    p2 = _windows(F.pad(x, (1, 1, 1, 1)), (3, 3), (2, 2), (1, 1))                        # [n, 9, 18]
    p2 = torch.cat([p2, torch.ones(n, p2.shape[1], 1)], 2)
    g2 = a.grad.flatten(2).transpose(1, 2)                                               # [n, 9, 3]
    _close(blocks["conv.weight"].A, torch.einsum("nti,ntj->ij", p2, p2) / n)
    _close(blocks["conv.weight"].S, torch.einsum("nti,ntj->ij", g2, g2) / (n * 9))
    # "same" with kernel 4, dilation 2: 6 padded positions, 3 before and 3 after
    h = torch.tanh(a).flatten(2).detach()
    p1 = _windows(F.pad(h, (3, 3))[:, :, None], (1, 4), (1, 1), (1, 2))                  # [n, 9, 12]
    g1 = b.grad.transpose(1, 2)
    _close(blocks["line.weight"].A, torch.einsum("nti,ntj->ij", p1, p1) / n)
    _close(blocks["line.weight"].S, torch.einsum("nti,ntj->ij", g1, g1) / (n * 9))

    G = loop_grads(loss, params, data)
    for block in curv.kronecker:
        _close(block.eigenvalues, _eigenvalues_in_own_basis(block, _frame_grads(G, block.weight, block.bias,
                                                                                block.bias_side)))


class Tokens(nn.Module):
    """Embedding with padding_idx 0, mean over the tokens, linear head; GPT-2's Conv1D on the tokens."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.mix = Conv1D(5, 4)     # nf = 5 outputs, nx = 4 inputs: weight [4, 5]
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def parts(self, ids):
        e = self.emb(ids)
        z = self.mix(e)
        return e, z, self.head(self.norm(torch.tanh(z)).mean(1))

    def forward(self, ids):
        return self.parts(ids)[-1]


def test_embedding_conv1d_and_fallback_equal_one_hot_and_hand_built_references():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = Tokens()
    apply, params = ti.functionalize(model)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 7, (9, 5), generator=g)
    ids[:, -1] = 0
    data = (ids, torch.randint(0, 3, (9,), generator=g))
    loss, predict, output_loss = _fns(apply)
    curv = ekfac(loss, params, data, predict=predict, output_loss=output_loss, damping=1e-3, chunk_size=4)
    blocks = {b.weight: b for b in curv.kronecker}
    assert [(b.weight, b.kind, b.bias, b.bias_side) for b in curv.kronecker] == [
        ("emb.weight", "embedding", None, None), ("mix.weight", "conv1d (GPT-2, addmm)", "mix.bias", "left"),
        ("head.weight", "linear", "head.bias", "right")]
    assert [(b.name, b.treatment) for b in curv.diagonal] == [("norm.weight", "diagonal"), ("norm.bias", "diagonal")]
    assert "norm.weight [5]: diagonal Fisher (used outside a recognised layer)" in curv.summary()

    e, z, o = model.parts(ids)
    e.retain_grad()
    z.retain_grad()
    F.cross_entropy(o, data[1], reduction="sum").backward()
    n, T = ids.shape
    onehot = F.one_hot(ids, 7).double() * (ids != 0)[..., None]
    assert blocks["emb.weight"].left_basis is None
    _close(blocks["emb.weight"].A, onehot.sum((0, 1)) / n)                                # token counts
    _close(blocks["emb.weight"].S, torch.einsum("nti,ntj->ij", e.grad, e.grad) / (n * T))
    x = torch.cat([e.detach(), torch.ones(n, T, 1)], 2)
    _close(blocks["mix.weight"].A, torch.einsum("nti,ntj->ij", x, x) / n)
    _close(blocks["mix.weight"].S, torch.einsum("nti,ntj->ij", z.grad, z.grad) / (n * T))

    G = loop_grads(loss, params, data)
    for block in curv.kronecker:
        _close(block.eigenvalues, _eigenvalues_in_own_basis(block, _frame_grads(G, block.weight, block.bias,
                                                                                block.bias_side)))
    for block in curv.diagonal:
        _close(block.diagonal, G[block.name].pow(2).mean(0))
    identity = kfac(loss, params, data, predict=predict, output_loss=output_loss, damping=1e-3, fallback="identity")
    v = ti.tree.random_like(params, generator=torch.Generator().manual_seed(0))
    _close(identity.ihvp(v)["norm.weight"], v["norm.weight"] / 1e-3)
    relative = kfac(loss, params, data, predict=predict, output_loss=output_loss, damping=0.1, damping_mode="relative",
                    fallback="identity")
    dense = ti.to_dense(relative.operator, params)
    factored = torch.cat([_frame_index(params, b.weight, b.bias, b.bias_side).reshape(-1) for b in relative.kronecker])
    mean = dense.diagonal()[factored].mean()        # Σ eigenvalues / their number over the Kronecker blocks
    assert [b.damping for b in relative.diagonal] == pytest.approx([0.1 * float(mean)] * 2, rel=1e-10)


def test_tied_embedding_and_head_add_their_positions_to_one_block():
    torch.manual_seed(0)
    model = TiedLM()
    apply, params = ti.functionalize(model)
    assert "head.weight" not in params
    g = torch.Generator().manual_seed(8)
    data = (torch.randint(0, 11, (12,), generator=g), torch.randint(0, 11, (12,), generator=g))
    loss, predict, output_loss = _fns(apply)
    curv = ekfac(loss, params, data, predict=predict, output_loss=output_loss, damping=1e-3)
    (block,) = [b for b in curv.kronecker if b.weight == "emb.weight"]
    assert block.kind == "embedding+linear" and block.left_basis is not None

    e = model.emb(data[0])
    e.retain_grad()
    h = torch.tanh(model.proj(e))
    o = h @ model.emb.weight.T
    o.retain_grad()
    F.cross_entropy(o, data[1], reduction="sum").backward()
    n = len(e)
    onehot = F.one_hot(data[0], 11).double()
    left = (onehot.T @ onehot + o.grad.T @ o.grad) / n                                  # vocab side: both uses
    right = (e.grad.T @ e.grad + h.T @ h).detach() / (2 * n)                            # dim side, 2 positions
    _close(block.left, left)
    _close(block.right, right)
    G = loop_grads(loss, params, data)
    _close(block.eigenvalues, _eigenvalues_in_own_basis(block, _frame_grads(G, "emb.weight")))


# ---------------------------------------------------------------- preconditioned CG

@pytest.mark.slow
def test_ekfac_preconditioned_cg_reaches_the_ggn_solve_in_fewer_iterations(digits_lr):
    """A 64-16-10 tanh MLP, squared error on one-hot digits whose 64 features are rescaled by factors in
    [e^-1.5, e^1.5] (so the layer inputs are badly scaled, what the activation factor corrects).
    Measured: plain CG 628–680 iterations per right-hand side, EK-FAC-preconditioned 248–262 (tol 1e-10)."""
    torch.manual_seed(0)
    apply, params = ti.functionalize(nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)))
    scales = torch.empty(64).uniform_(-1.5, 1.5, generator=torch.Generator().manual_seed(0)).exp()
    X, y = ti.take(digits_lr.train, slice(0, 300))
    train = (X * scales + 0.5, F.one_hot(y, 10).double())
    loss, predict, output_loss = _fns(apply, _squared_error)
    params = ti.minimize(ti.objective(loss, train, l2=1e-3), params, gtol=1e-2, maxiter=100)
    damping = 1e-3
    ggn = ti.ggn_vp(predict, params, train, output_loss=output_loss)
    curv = ekfac(loss, params, train, predict=predict, output_loss=output_loss, fisher="ggn", damping=damping)
    X_test, y_test = ti.take(digits_lr.test, slice(0, 5))
    V = ti.per_example_grads(loss, params, (X_test * scales + 0.5, F.one_hot(y_test, 10).double()))
    M = _gauss_newton(apply, params, train, output_loss) + damping * torch.eye(ti.tree.size(params))
    direct = torch.linalg.solve(M, ti.ravel(V, batch_ndim=1).T).T
    plain, plain_info = ti.cg_solve(ggn, V, damping=damping, tol=1e-10, maxiter=3000)
    pre, pre_info = ti.cg_solve(ggn, V, damping=damping, tol=1e-10, maxiter=3000, preconditioner=curv.preconditioner)
    for x, info in ((plain, plain_info), (pre, pre_info)):
        assert bool(info.converged.all())
        error = (ti.ravel(x, batch_ndim=1) - direct).norm(dim=1) / direct.norm(dim=1)
        assert float(error.max()) < 1e-6
    print("CG iterations per right-hand side, plain:", plain_info.iterations.tolist(),
          "EK-FAC-preconditioned:", pre_info.iterations.tolist())
    assert int(pre_info.iterations.max()) * 2 <= int(plain_info.iterations.max())


def test_errors(mlp_fit):
    apply, params, data, loss, _ = mlp_fit
    _, predict, output_loss = _fns(apply)
    kw = {"predict": predict, "output_loss": output_loss}
    with pytest.raises(ValueError, match=r"ti.kfac: `damping` must be a number > 0 .*; got 0"):
        kfac(loss, params, data, damping=0, **kw)
    with pytest.raises(ValueError, match=r'ti.ekfac: `fisher` must be "empirical", "true" or "ggn"; got \'fisher\''):
        ekfac(loss, params, data, damping=1e-3, fisher="fisher", **kw)
    with pytest.raises(TypeError, match=r'ti.kfac: fisher="true" samples labels and needs `generator=torch.Generator\(\)`'):
        kfac(loss, params, data, damping=1e-3, fisher="true", **kw)
    with pytest.raises(ValueError, match=r'ti.kfac: `damping_mode` must be "absolute" or "relative"; got \'mean\''):
        kfac(loss, params, data, damping=1e-3, damping_mode="mean", **kw)
    with pytest.raises(ValueError, match=r"ti.kfac: `loss\(params, batch\)` must equal `output_loss\(predict\(params, batch\), batch\)`"):
        kfac(lambda p, b: 2 * loss(p, b), params, data, damping=1e-3, **kw)
    with pytest.raises(TypeError, match=r"ti.kfac: `params` must be a dict\[str, Tensor\]"):
        kfac(loss, list(params.values()), data, damping=1e-3, **kw)
    curv = kfac(loss, params, data, damping=1e-3, **kw)
    with pytest.raises(ValueError, match=r"ti.kfac: `v` must have the structure of the parameters"):
        curv.ihvp({"0.weight": params["0.weight"]})


# ---------------------------------------------------------------- sharded

def _sharded_fit(rank, world, port, data, out):
    import os

    import torch.distributed as dist
    from test_distributed import exit_rank

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        apply, params = _mlp()
        loss, predict, output_loss = _fns(apply)
        curv = ekfac(loss, params, ti.distributed.shard(data, rank, world), predict=predict, output_loss=output_loss,
                     damping=0.1, damping_mode="relative", chunk_size=4, group=dist.group.WORLD)
        torch.save((curv.n, ti.to_dense(curv.operator, params), [b.damping for b in curv.kronecker]),
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_rank()


@pytest.mark.slow
def test_sharded_fit_equals_one_process(mlp_fit, tmp_path):
    import socket

    import torch.multiprocessing as mp

    apply, params, data, loss, _ = mlp_fit
    _, predict, output_loss = _fns(apply)
    one = ekfac(loss, params, data, predict=predict, output_loss=output_loss, damping=0.1, damping_mode="relative")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sharded_fit, args=(2, port, data, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        n, dense, dampings = torch.load(tmp_path / f"rank{rank}.pt")
        assert n == len(data[0])
        _close(dense, ti.to_dense(one.operator, params))
        assert dampings == pytest.approx([b.damping for b in one.kronecker], rel=1e-12)


@pytest.mark.parametrize("m_l, m_r", [(4, 1), (1, 4), (4, 4), (1, 1)])
def test_rank_one_corrected_sums_equal_the_squared_gradients(m_l, m_r):
    """The single-position EK-FAC pass sums (l rᵀ)² without forming the per-example gradients: equal to the
    definition Σ_n Σ_c ((l_nc r_ncᵀ)²) with the side lacking the cotangent axis broadcast."""
    from tinfluence.solvers._kfac import _outer_squares

    g = torch.Generator().manual_seed(0)
    L, R = torch.randn(6, m_l, 1, 5, generator=g), torch.randn(6, m_r, 1, 3, generator=g)
    expected = (L.mT @ R).pow(2).sum((0, 1))                                          # [B, m, 5, 3] formed
    _close(_outer_squares(L, R), expected, rtol=1e-12, atol=1e-12)


def test_ggn_fisher_in_float32_accepts_the_round_off_of_confident_softmax_hessians():
    """Confident float32 predictions give softmax Hessians diag p − ppᵀ whose eigendecomposition has round-off
    eigenvalues of order −eps (a convex loss, not a concave one): fitted like the float64 model, not refused."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(6, 4)
    with torch.no_grad():
        model.weight.copy_(8 * torch.randn(4, 6, generator=g))
    apply, params = ti.functionalize(model.float())
    data = (torch.randn(64, 6, generator=g, dtype=torch.float32), torch.randint(0, 4, (64,), generator=g))
    loss, predict, output_loss = _fns(apply)
    curv = ekfac(loss, params, data, predict=predict, output_loss=output_loss, fisher="ggn", damping=1e-3)
    wide = ti.tree.map(lambda t: t.double(), params)
    apply64, _ = ti.functionalize(model.double())
    loss64, predict64, _ = _fns(apply64)
    curv64 = ekfac(loss64, wide, (data[0].double(), data[1]), predict=predict64, output_loss=output_loss, fisher="ggn",
                   damping=1e-3)
    dense, dense64 = ti.to_dense(curv.operator, params), ti.to_dense(curv64.operator, wide)
    assert float((dense.double() - dense64).norm() / dense64.norm()) < 1e-4


def test_ggn_fisher_refuses_a_concave_output_loss(mlp_fit):
    apply, params, data, _, _ = mlp_fit
    _, predict, _ = _fns(apply)
    concave = lambda o, b: -0.5 * o.pow(2).sum(-1)                           # noqa: E731
    loss = lambda p, b: concave(predict(p, b), b)                            # noqa: E731
    with pytest.raises(ValueError, match=r'ti.ekfac: fisher="ggn" needs an output loss convex in the outputs'):
        ekfac(loss, params, data, predict=predict, output_loss=concave, fisher="ggn", damping=1e-3)
