"""The demo as a task: Koh & Liang's Figure 2 on scikit-learn's digits (`tinfluence run digits`).

Multinomial logistic regression, L2 1e-2, float64, 1000 standardized training digits and the
other 797 for test; five methods; the top 100 training points by |score| of each method are
retrained without (warm-started Newton iterations to gradient max-norm 1e-10). The table it
prints is `tinfluence demo`'s.
"""

import torch
import torch.nn.functional as F

import tinfluence as ti
from tinfluence.demo import L2, gd_checkpoints, load_digits_split

name = "digits"
train, test, (train_images, test_images) = load_digits_split()
apply, params = ti.functionalize(torch.nn.Linear(64, 10).double())
params = ti.tree.zeros_like(params)          # trained from zero by `fit`


def loss(params, batch):
    """Cross entropy per example.

    Args:
      params: `{"weight": [10, 64], "bias": [10]}`.
      batch: `(x [B, 64], y [B])`.

    Returns:
      `[B]` losses, float64.

    Examples:
      >>> import tinfluence.tasks.digits as task
      >>> task.loss(task.params, ti.take(task.train, torch.arange(3))).shape
      torch.Size([3])
    """
    x, y = batch
    return F.cross_entropy(apply(params, x), y, reduction="none")


def fit(params, data):
    """θ̂: L-BFGS then Newton steps on the objective, to gradient max-norm 1e-12.

    Args:
      params: the starting point (the task's zeros).
      data: the training data, `(x [n, 64], y [n])`.

    Returns:
      The trained parameters, new tensors.

    Raises:
      ConvergenceError: the tolerance is not reached.

    Examples:
      >>> import tinfluence.tasks.digits as task
      >>> data = ti.take(task.train, torch.arange(100))
      >>> theta = task.fit(task.params, data)
      >>> g = torch.func.grad(ti.objective(task.loss, data, l2=task.l2))(theta)
      >>> bool(ti.ravel(g).abs().max() <= 1e-12)
      True
    """
    return ti.minimize(ti.objective(loss, data, l2=L2), params, gtol=1e-12, newton_steps=5)


def checkpoints():
    """TracIn's checkpoints: full-batch gradient descent from zero, one per step (the demo's).

    Returns:
      `ti.demo.GD_STEPS` pairs `(θ_t, lr)` (`ti.demo.gd_checkpoints`).

    Examples:
      >>> import tinfluence.tasks.digits as task
      >>> len(task.checkpoints()) == ti.demo.GD_STEPS
      True
    """
    return gd_checkpoints(ti.objective(loss, train, l2=L2), params)


l2 = L2
retrain, gtol = "newton", 1e-10
method = ["direct", "cg", "lissa", "tracin", "empirical"]
test_ids, top_k = [0, 1, 2], 100
images, labels = (train_images, test_images), (train[1], test[1])
