"""Recipe: a deep model in float32: Gauss-Newton curvature, damping from the spectrum, a tolerance
float32 can reach, and the solver's own report of what it cost.

The Hessian of a non-convex model is indefinite away from a minimum; the Gauss-Newton matrix
(GGN) is positive semi-definite for convex output losses, so CG on it is well posed. Damping
λ sets how far small-curvature directions are trusted: estimate the spectrum with
`ti.eigenvalues` and pick λ a small fraction of the largest eigenvalue (here 1e-3 of it).
In float32, ask for a relative residual no tighter than about 1e-4 (CG's residual stalls near
eps·κ, eps = 1.2e-7).
"""

import torch
import torch.nn.functional as F

import tinfluence as ti
from tinfluence.demo import load_digits_split

torch.manual_seed(0)
train, test, _ = load_digits_split(1000)
train = (train[0].float(), train[1])
test = (test[0].float(), test[1])
model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for epoch in range(30):                                     # a short, ordinary training run
    for idx in torch.randperm(1000).split(100):
        optimizer.zero_grad()
        F.cross_entropy(model(train[0][idx]), train[1][idx]).backward()
        optimizer.step()

apply, params = ti.functionalize(model)                     # float32 parameters


def predict(params, batch):
    return apply(params, batch[0])


def output_loss(logits, batch):
    return F.cross_entropy(logits, batch[1], reduction="none")


def loss(params, batch):
    return output_loss(predict(params, batch), batch)


G = ti.ggn_vp(predict, params, train, output_loss=output_loss)
spectrum = ti.eigenvalues(G, k=1, generator=torch.Generator().manual_seed(0))
damping = 1e-3 * float(spectrum.largest[-1])
print(f"GGN eigenvalues: largest {float(spectrum.largest[-1]):.3g}, smallest {float(spectrum.smallest[0]):.3g}; "
      f"damping {damping:.3g}")

ihvp = ti.cg(G, damping=damping, tol=1e-4, maxiter=500)    # float32: 1e-4 is reachable, 1e-8 is not
test_points = ti.take(test, torch.arange(5))
G_test = ti.per_example_grads(loss, params, test_points)
solution = ihvp.solve(G_test)                               # the same solve, with its report
info = solution.info
print(f"CG: {int(info.iterations.max())} iterations at most, worst relative residual "
      f"{float(info.relative_residual.max()):.1e}, all converged: {bool(info.converged.all())}")
scores = ti.influence(loss, params, train, test_points, ihvp=ihvp)    # [5, 1000], + = helpful

# The same scores in float64 with a direct solve of the same damped GGN agree to float32 accuracy.
params64 = {k: v.double() for k, v in params.items()}
train64, test64 = (train[0].double(), train[1]), (test_points[0].double(), test_points[1])
G64 = ti.to_dense(ti.ggn_vp(predict, params64, train64, output_loss=output_loss), params64)
exact = ti.influence(loss, params64, train64, test64, ihvp=ti.direct(G64, damping=damping))
error = ((scores.double() - exact).norm() / exact.norm()).item()
print(f"float32 CG against float64 direct: relative error {error:.1e}")
assert bool(info.converged.all()) and error < 1e-3
