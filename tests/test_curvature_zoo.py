"""Every curvature path against independent references, over a zoo of small layers.

Paths: `ti.hessian`, `ti.hvp` (cache on and off, one vector and stacks, compiled),
`ti.to_dense` of those operators, `ti.ggn_vp` (cache on and off, compiled), and the
per-example Hessians of `ti.newton_loo` (exact mode, and the output Hessians of its
Gauss-Newton mode). Models: Linear, Conv1d, Conv2d, Embedding, LayerNorm (affine),
RMSNorm, GroupNorm, BatchNorm in eval mode, MultiheadAttention, scaled_dot_product_attention,
GELU, SiLU, softmax, and weights tied through `ti.functionalize`.

References, built here without tinfluence's kernels:
- the Hessian of the objective from `torch.autograd.functional.hessian` (a Python loop of
  plain double backward passes, no vmap), itself checked against central differences;
- central differences of the gradient (plain `torch.autograd.grad`, one pair per
  coordinate), step h = 1e-5: the truncation error h²/6·|∂³R| is at most 3e-9 relative
  over the zoo (measured; it scales as h² from h = 1e-3 to 1e-5, largest for GroupNorm),
  the round-off ε·|∇R|/h about 1e-11 (1e-10 measured at h = 1e-6), so 1e-6 relative is a
  bound with a margin of 300 and still far below the errors of a wrong path (1e-3 to 1e0);
- the Gauss-Newton matrix (1/n) Σ_i J_iᵀ Ω_i J_i + l2·I from
  `torch.autograd.functional.jacobian` of the outputs and `torch.autograd.functional.hessian`
  of each example's output loss;
- the Newton step without one example, −(∇²R₋ᵢ)⁻¹ ∇R₋ᵢ(θ̂), with ∇²R₋ᵢ from
  `torch.autograd.functional.hessian` of the kept objective.
Agreement with torch.autograd.functional is required to 1e-8 relative (Frobenius norm)
in float64; the paths agree to ~1e-15 when right.
"""

import pytest
import torch
import torch.nn.functional as F
from models import TiedLM
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import tinfluence as ti
from tinfluence import tree as tr

N = 8          # training examples
L2 = 1e-3      # small enough that the data term dominates the curvature
EXACT = 1e-8   # relative error allowed against torch.autograd.functional
FD_TOL = 1e-6  # relative error allowed against central differences (module docstring)
FD_STEP = 1e-5


class Pooled(nn.Module):
    """`head(mean over tokens of body(x))`: a sequence body with a classifier on top."""

    def __init__(self, body, dim=4, classes=3):
        super().__init__()
        self.body = body
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.body(x).mean(1))


class SelfAttention(nn.Module):
    """nn.MultiheadAttention over a sequence, query = key = value.

    `need_weights=True` takes its explicit softmax(QKᵀ)V path: with `need_weights=False`
    it calls F.scaled_dot_product_attention on [B, heads, L, d], whose CPU kernel (flash)
    has neither a second derivative nor forward mode in torch (torch raises in every
    curvature path, never a wrong number); `MultiHeadSDPA` covers that call under the math
    backend.
    """

    def __init__(self, dim=4, heads=2):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=True)[0]


class MultiHeadSDPA(nn.Module):
    """Two-head attention through F.scaled_dot_product_attention, math backend (see SelfAttention)."""

    def __init__(self, dim=4, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(-3, -2)   # noqa: E731, [B, h, L, d/h]
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return out.transpose(-3, -2).flatten(-2)


class Softmax(nn.Module):
    def forward(self, x):
        return torch.softmax(x, dim=-1)


def _mlp(middle, width=6):
    return nn.Sequential(nn.Linear(4, width), *middle, nn.Linear(width, 3))


def _randomized(module, g):
    """Normalization weights and BatchNorm statistics moved off their defaults (1, 0), so
    that the elementwise weight and the running statistics take part in the curvature."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d)):
                m.weight.uniform_(0.5, 1.5, generator=g)
                if getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-0.5, 0.5, generator=g)
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
    return module


# name -> (module factory, inputs factory(generator)); every model maps a batch to [B, 3] logits
# (TiedLM to [B, 11]).
ZOO = {
    "linear": (lambda: nn.Linear(4, 3), lambda g: torch.randn(N, 4, generator=g)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)),
               lambda g: torch.randn(N, 2, 6, generator=g)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)),
               lambda g: torch.randn(N, 1, 5, 5, generator=g)),
    "embedding": (lambda: Pooled(nn.Sequential(nn.Embedding(10, 4), nn.Tanh())),
                  lambda g: torch.randint(0, 10, (N, 3), generator=g)),
    "layernorm": (lambda: _mlp([nn.LayerNorm(6), nn.Tanh()]), lambda g: torch.randn(N, 4, generator=g)),
    "rmsnorm": (lambda: _mlp([nn.RMSNorm(6), nn.Tanh()]), lambda g: torch.randn(N, 4, generator=g)),
    "groupnorm": (lambda: nn.Sequential(nn.Conv1d(2, 4, 2), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                                        nn.Linear(16, 3)),
                  lambda g: torch.randn(N, 2, 5, generator=g)),
    "batchnorm_eval": (lambda: _mlp([nn.BatchNorm1d(6), nn.Tanh()]).eval(), lambda g: torch.randn(N, 4, generator=g)),
    "multihead_attention": (lambda: Pooled(SelfAttention()), lambda g: torch.randn(N, 3, 4, generator=g)),
    "sdpa": (lambda: Pooled(MultiHeadSDPA()), lambda g: torch.randn(N, 3, 4, generator=g)),
    "gelu": (lambda: _mlp([nn.GELU()]), lambda g: torch.randn(N, 4, generator=g)),
    "silu": (lambda: _mlp([nn.SiLU()]), lambda g: torch.randn(N, 4, generator=g)),
    "softmax": (lambda: _mlp([Softmax()]), lambda g: torch.randn(N, 4, generator=g)),
    "tied": (lambda: TiedLM(), lambda g: torch.randint(0, 11, (N,), generator=g)),
}
NORMS = ["layernorm", "rmsnorm", "groupnorm", "batchnorm_eval"]


class Problem:
    """One zoo model as a float64 training problem: predict, output loss, objective, references."""

    def __init__(self, name):
        make, inputs = ZOO[name]
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        module = _randomized(make().double(), g)
        x = inputs(g)
        x = x.double() if x.is_floating_point() else x
        self.apply, self.params = ti.functionalize(module)
        classes = self.apply(self.params, x[:1]).shape[-1]
        self.data = (x, torch.randint(0, classes, (N,), generator=g))
        self.flat = tr.ravel(self.params)
        self.P = self.flat.numel()

    def predict(self, p, batch):
        return self.apply(p, batch[0])

    @staticmethod
    def output_loss(o, batch):
        return F.cross_entropy(o, batch[1], reduction="none")

    def loss(self, p, batch):
        return self.output_loss(self.predict(p, batch), batch)

    def objective(self, data=None, **kw):
        return ti.objective(self.loss, self.data if data is None else data, l2=L2, **kw)

    def on_flat(self, fn):
        return lambda v: fn(tr.unravel(v, self.params))

    def autograd_hessian(self, data=None):
        return torch.autograd.functional.hessian(self.on_flat(self.objective(data)), self.flat)

    def autograd_ggn(self, data=None):
        """(1/n) Σ_i J_iᵀ Ω_i J_i + l2·I from torch.autograd.functional, one example at a time."""
        x, y = self.data if data is None else data
        n = x.shape[0]
        total = torch.zeros(self.P, self.P)
        for i in range(n):
            one = (x[i:i + 1], y[i:i + 1])
            outputs = lambda v, one=one: self.predict(tr.unravel(v, self.params), one)[0]     # noqa: E731
            example_loss = lambda u, one=one: self.output_loss(u[None], one)[0]               # noqa: E731
            J = torch.autograd.functional.jacobian(outputs, self.flat)                         # [O, P]
            Omega = torch.autograd.functional.hessian(example_loss, outputs(self.flat).detach())  # [O, O]
            total += J.T @ Omega @ J
        return total / n + L2 * torch.eye(self.P)


def _rel(A, B):
    return ((A - B).norm() / B.norm()).item()


def _finite_difference_hessian(f, x, h=FD_STEP):
    """Central differences of the gradient, column by column, with plain torch.autograd.grad."""
    def gradient(z):
        z = z.detach().requires_grad_(True)
        return torch.autograd.grad(f(z), z)[0]

    columns = [(gradient(x + h * e) - gradient(x - h * e)) / (2 * h) for e in torch.eye(x.numel())]
    H = torch.stack(columns, 1)
    return (H + H.T) / 2


_PROBLEMS = {}


def problem(name):
    if name not in _PROBLEMS:
        _PROBLEMS[name] = Problem(name)
    return _PROBLEMS[name]


_REFERENCES = {}


def reference(name):
    """The autograd.functional Hessian of the objective, checked once against central differences."""
    if name not in _REFERENCES:
        pb = problem(name)
        H = pb.autograd_hessian()
        fd = _finite_difference_hessian(pb.on_flat(pb.objective()), pb.flat)
        assert _rel(fd, H) <= FD_TOL, f"{name}: the reference Hessian disagrees with central differences"
        _REFERENCES[name] = (H, fd)
    return _REFERENCES[name]


def _check_dense(name, C):
    H, fd = reference(name)
    assert C.shape == (problem(name).P,) * 2
    assert _rel(C, H) <= EXACT, f"{name}: relative error {_rel(C, H):.1e} against torch.autograd.functional.hessian"
    assert _rel(C, fd) <= FD_TOL, f"{name}: relative error {_rel(C, fd):.1e} against central differences"


@pytest.mark.parametrize("name", ZOO)
def test_zoo_sizes_stay_tiny(name):
    assert 10 <= problem(name).P <= 300


@pytest.mark.parametrize("name", ZOO)
def test_hessian(name):
    pb = problem(name)
    _check_dense(name, ti.hessian(pb.objective(chunk_size=3), pb.params))   # three chunks, the last shorter


@pytest.mark.parametrize("name", ZOO)
def test_direct_solves_with_the_dense_hessian(name):
    """`ti.direct(ti.hessian(...))` accepts the matrix (symmetric) and solves the right system;
    damped to a smallest eigenvalue of 1 (the zoo's random parameters are no minimum)."""
    pb = problem(name)
    H, _ = reference(name)
    damping = 1.0 - min(0.0, torch.linalg.eigvalsh(H)[0].item())
    b = torch.randn(pb.P, generator=torch.Generator().manual_seed(2))
    x = tr.ravel(ti.direct(ti.hessian(pb.objective(), pb.params), damping=damping)(tr.unravel(b, pb.params)))
    assert _rel(x, torch.linalg.solve(H + damping * torch.eye(pb.P), b)) <= EXACT


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "recompute"])
@pytest.mark.parametrize("name", ZOO)
def test_hvp(name, cache):
    """`to_dense` (stacks of basis vectors) and one random vector, for one operator."""
    pb = problem(name)
    Hv = ti.hvp(pb.objective(chunk_size=3), pb.params, cache=cache)
    _check_dense(name, ti.to_dense(Hv, pb.params))
    v = torch.randn(pb.P, generator=torch.Generator().manual_seed(1))
    H, _ = reference(name)
    assert _rel(tr.ravel(Hv(tr.unravel(v, pb.params))), H @ v) <= EXACT


@pytest.mark.parametrize("name", ZOO)
def test_hvp_of_a_plain_function(name):
    """A function that is not an `Objective` goes through the unchunked recomputing kernel."""
    pb = problem(name)
    R = pb.objective()
    _check_dense(name, ti.to_dense(ti.hvp(lambda p: R(p), pb.params, cache=False), pb.params))


_GGN = {}


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "recompute"])
@pytest.mark.parametrize("name", ZOO)
def test_ggn_vp(name, cache):
    pb = problem(name)
    if name not in _GGN:
        _GGN[name] = pb.autograd_ggn()
    GNv = ti.ggn_vp(pb.predict, pb.params, pb.data, output_loss=pb.output_loss, l2=L2, chunk_size=3, cache=cache)
    G = ti.to_dense(GNv, pb.params)
    assert _rel(G, _GGN[name]) <= EXACT, f"{name}: relative error {_rel(G, _GGN[name]):.1e} against J^T Ω J"
    if name == "linear":   # a model linear in θ: the Gauss-Newton matrix is the Hessian
        _check_dense(name, G)


def test_gauss_newton_reference_equals_hessian_for_a_linear_model():
    """The test's own GGN construction, checked where it must equal the Hessian."""
    _check_dense("linear", problem("linear").autograd_ggn())


def _newton_reference(pb, ids, curvature):
    """Columns Δ_i = −C₋ᵢ⁻¹ ∇R₋ᵢ(θ̂), `[P, k]`: the Newton step on the objective without example i,
    C₋ᵢ = `curvature(kept data)` (its Hessian or Gauss-Newton matrix, from torch.autograd.functional)."""
    steps = []
    for i in ids:
        kept = ti.take(pb.data, torch.tensor([j for j in range(N) if j != i]))
        gradient = tr.ravel(torch.func.grad(pb.objective(kept))(pb.params))
        steps.append(-torch.linalg.solve(curvature(kept), gradient))
    return torch.stack(steps, 1)


IDS = [0, 5]


@pytest.mark.parametrize("factors", ["exact", "gauss_newton"])
@pytest.mark.parametrize("name", ZOO)
def test_newton_per_example_curvature(name, factors):
    """`ti.newton_loo`, measured on the coordinates of θ, returns the Newton steps. Exact mode
    (no `predict`): A from `ti.hessian`, the removed example's Hessian from the per-example
    kernel. Gauss-Newton mode: per-example Jacobians and output Hessians."""
    pb = problem(name)
    read = lambda p, b: b @ tr.ravel(p)                                   # noqa: E731
    kw = {} if factors == "exact" else dict(predict=pb.predict, output_loss=pb.output_loss)
    delta = ti.newton_loo(pb.loss, pb.params, pb.data, torch.eye(pb.P), l2=L2, indices=IDS, measure=read,
                          chunk_size=3, **kw)
    expected = _newton_reference(pb, IDS, pb.autograd_hessian if factors == "exact" else pb.autograd_ggn)
    assert _rel(delta, expected) <= EXACT, f"{name}: relative error {_rel(delta, expected):.1e}"


def test_tied_weight_is_one_parameter():
    """The tied model's shared Parameter appears once, so its curvature sums both uses."""
    pb = problem("tied")
    assert pb.P == 11 * 5 + 5 * 5 + 5


@pytest.mark.slow
@pytest.mark.parametrize("operator", ["hvp", "ggn_vp"])
def test_compiled_operators(operator):
    """compile=True (one chunk, one stacked kernel compiled: 5 to 20 s) on the LayerNorm model."""
    name = "layernorm"
    pb = problem(name)
    torch._dynamo.reset()
    if operator == "hvp":
        _check_dense(name, ti.to_dense(ti.hvp(pb.objective(), pb.params, compile=True), pb.params))
    else:
        GNv = ti.ggn_vp(pb.predict, pb.params, pb.data, output_loss=pb.output_loss, l2=L2, compile=True)
        G = ti.to_dense(GNv, pb.params)
        assert _rel(G, pb.autograd_ggn()) <= EXACT


def test_hessian_of_a_layer_norm_with_its_weight_as_parameter():
    """The reported case: f(shift, weight) = Σ tanh(layer_norm(x + shift, weight) W)², both as parameters."""
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(6, generator=g), torch.randn(6, 3, generator=g)
    params = {"shift": torch.randn(6, generator=g), "weight": torch.randn(6, generator=g)}

    def f(p):
        return torch.tanh(F.layer_norm(x + p["shift"], (6,), weight=p["weight"]) @ W).pow(2).sum()

    flat = tr.ravel(params)
    on_flat = lambda v: f(tr.unravel(v, params))                                # noqa: E731
    H = torch.autograd.functional.hessian(on_flat, flat)
    assert _rel(_finite_difference_hessian(on_flat, flat), H) <= FD_TOL
    assert _rel(ti.hessian(f, params), H) <= EXACT
    assert _rel(ti.to_dense(ti.hvp(f, params, cache=False), params), H) <= EXACT
