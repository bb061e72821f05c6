"""A task for `tinfluence run`: Fashion-MNIST logistic regression, from Debian's `dataset-fashion-mnist`.

    sudo apt-get install dataset-fashion-mnist             # the gzipped idx files, /usr/share/datasets/fashion-mnist
    tinfluence run examples/mnist_like.py                  # writes runs/fashion-mnist/
    TINFLUENCE_EXAMPLE_N=2000 tinfluence run examples/mnist_like.py   # a reduced size (first 2000 training images)

Multinomial logistic regression on the 784 standardized pixels, L2 1e-2, float64, trained
by L-BFGS; classic influence by conjugate gradients on Hessian-vector products (no P×P
matrix: P = 7850); leave-one-out by L-BFGS warm-started from θ̂. Another folder of the
four files can be named with TINFLUENCE_FASHION_MNIST.
"""

import gzip
import os

import numpy as np
import torch
import torch.nn.functional as F

import tinfluence as ti

FOLDER = os.environ.get("TINFLUENCE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
N_TRAIN = int(os.environ.get("TINFLUENCE_EXAMPLE_N", 60000))
N_TEST = min(10000, max(100, N_TRAIN // 10))
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")


def _idx(name: str) -> torch.Tensor:
    """One gzipped idx file as a uint8 tensor (images [n, 28, 28], labels [n])."""
    with gzip.open(os.path.join(FOLDER, name)) as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape).copy())


missing = [name for name in FILES if not os.path.exists(os.path.join(FOLDER, name))]
if missing:
    raise FileNotFoundError(f"Fashion-MNIST is not installed ({', '.join(missing)} missing in {FOLDER}); install it "
                            "with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set "
                            "TINFLUENCE_FASHION_MNIST to a folder holding the four gzipped idx files.")

name = "fashion-mnist"
images_train, y_train = _idx(FILES[0])[:N_TRAIN], _idx(FILES[1])[:N_TRAIN].long()
images_test, y_test = _idx(FILES[2])[:N_TEST], _idx(FILES[3])[:N_TEST].long()
x_train, x_test = images_train.reshape(len(y_train), -1).double(), images_test.reshape(len(y_test), -1).double()
mean, std = x_train.mean(0), x_train.std(0) + 1e-6
train, test = ((x_train - mean) / std, y_train), ((x_test - mean) / std, y_test)
apply, params = ti.functionalize(torch.nn.Linear(784, 10).double())
params = ti.tree.zeros_like(params)


def loss(params, batch):
    """Cross entropy per example, `[B]`."""
    x, y = batch
    return F.cross_entropy(apply(params, x), y, reduction="none")


l2, method, damping = 1e-2, "cg", 0.0
cg_tol, cg_maxiter = 1e-8, 500
fit = ti.lbfgs_trainer(loss, l2=l2, gtol=1e-10, newton_steps=5)   # training and (warm-started) leave-one-out
test_ids, top_k = [0, 1, 2], 10
images, labels = (images_train, images_test), (y_train, y_test)
