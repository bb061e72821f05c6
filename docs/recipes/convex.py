"""Recipe: a convex model (logistic regression), exact influence checked against retraining.

For a convex objective trained to its optimum, classic influence is accurate: the dense
Hessian (P up to a few thousand) or CG on Hessian-vector products, then a leave-one-out
check on the most influential points.
"""

import torch
import torch.nn.functional as F

import tinfluence as ti
from tinfluence.demo import load_digits_split

torch.set_default_dtype(torch.float64)                      # tight optimum, tight solves
train, test, _ = load_digits_split(1000)         # standardized scikit-learn digits
apply, params = ti.functionalize(torch.nn.Linear(64, 10))


def loss(params, batch):                                    # one loss per example: [B]
    x, y = batch
    return F.cross_entropy(apply(params, x), y, reduction="none")


R = ti.objective(loss, train, l2=1e-2)                      # mean loss + l2/2·‖θ‖²
params = ti.minimize(R, params, gtol=1e-10, newton_steps=5)  # influence assumes θ̂ at the optimum
test_points = ti.take(test, torch.arange(3))

exact = ti.influence(loss, params, train, test_points, ihvp=ti.direct(ti.hessian(R, params)))
cg = ti.influence(loss, params, train, test_points, ihvp=ti.cg(ti.hvp(R, params), tol=1e-8))
print(f"CG vs dense solve: max difference {(cg - exact).abs().max():.1e} (largest score {exact.abs().max():.1e})")

# Retrain without the 20 most influential points of test point 0 and compare.
top = exact[0].abs().topk(20).indices
actual = ti.leave_one_out(ti.newton_trainer(loss, params, train, l2=1e-2), params, train,
                          ti.take(test_points, slice(0, 1)), top, measure=loss, progress=False)
r = ti.pearson(exact[0, top], actual[0]).item()
print(f"Pearson(influence, actual leave-one-out change) over the top 20: {r:.4f}")
assert r > 0.95
