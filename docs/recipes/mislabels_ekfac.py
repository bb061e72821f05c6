"""Recipe: find mislabeled training examples by self-influence with EK-FAC curvature.

The kronfluence workflow: fit EK-FAC once, then rank the training set by self-influence
(1/n) gᵢᵀ (F̂ + λI)⁻¹ gᵢ. A flipped label makes an example's loss large and its gradient
unlike its neighbours', so it carries high self-influence. Here 5% of the digits labels are
flipped (with a fixed generator), a small MLP is trained on the corrupted set, and the
fraction of flipped examples among the top-k of self-influence is compared with random
inspection (which finds 5%).
"""

import torch
import torch.nn.functional as F

import tinfluence as ti
from tinfluence.demo import load_digits_split

torch.manual_seed(0)                                        # the MLP's initial weights
train, _, _ = load_digits_split(1000)                       # standardized scikit-learn digits, float64
X, y = train
g = torch.Generator().manual_seed(0)
flipped = torch.randperm(len(y), generator=g)[: len(y) // 20]                    # 5% of the labels
y = y.clone()
y[flipped] = (y[flipped] + torch.randint(1, 10, (len(flipped),), generator=g)) % 10   # always a wrong class
train = (X, y)

model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).double()
apply, params = ti.functionalize(model)


def predict(params, batch):
    """The logits `[B, 10]`."""
    return apply(params, batch[0])


def output_loss(logits, batch):
    """Cross entropy of the logits, one loss per example: `[B]`."""
    return F.cross_entropy(logits, batch[1], reduction="none")


def loss(params, batch):
    """The per-example training loss `[B]`."""
    return output_loss(predict(params, batch), batch)


l2 = 1e-3
params = ti.minimize(ti.objective(loss, train, l2=l2), params, gtol=1e-4, maxiter=300)

curv = ti.ekfac(loss, params, train, predict=predict, output_loss=output_loss, damping=l2)   # fit once
print(curv.summary())
self_influence = ti.self_influence(loss, params, train, ihvp=curv.ihvp)               # [n_train]

k = 2 * len(flipped)                                        # inspect twice as many examples as were flipped
is_flipped = torch.zeros(len(y), dtype=torch.bool)
is_flipped[flipped] = True
found = is_flipped[self_influence.topk(k).indices].float().mean().item()
random = len(flipped) / len(y)
print(f"flipped labels among the top {k} of self-influence: {found:.0%} (random inspection: {random:.0%})")
recall = is_flipped[self_influence.topk(k).indices].sum().item() / len(flipped)
print(f"share of the flipped labels found by inspecting {k / len(y):.0%} of the training set: {recall:.0%}")
assert found > 5 * random
