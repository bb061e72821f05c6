"""A task for `tinfluence run`: a small model over dict batches mixing image tokens with text tokens.

Each example is a digit (scikit-learn's 8×8 digits) cut into four 4×4 patches, the image
tokens, plus a three-token "caption", the text tokens: one word names the digit (right 60 %
of the time, else a random digit word) and two are filler words. A linear patch embedding
with position embeddings and a word embedding map both kinds of token into one width-8
space; the model pools all seven tokens through tanh and classifies. It is trained here by
L-BFGS in a few seconds (float64, L2 1e-2).

    tinfluence run examples/multimodal.py                 # writes runs/multimodal/
    TINFLUENCE_EXAMPLE_N=300 tinfluence run examples/multimodal.py --top-k 4   # a reduced size

A batch is a dict `{"patches": [B, 4, 16], "text": [B, 3], "y": [B]}`: any pytree of tensors
sharing the leading example axis is a data set.
"""

import os

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import tinfluence as ti

N_TRAIN = int(os.environ.get("TINFLUENCE_EXAMPLE_N", 1000))   # training examples; the rest of 1797 (<= 400) are test
WIDTH, VOCAB, FILLERS = 8, 16, 6                                # words 0-9 name digits, 10-15 are fillers


def _examples(n_train: int, generator: torch.Generator):
    """(train, test, images): dict data sets and the raw 8×8 images for the figures."""
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float64), torch.tensor(y)
    n = min(len(y), n_train + max(50, min(400, n_train // 2)))
    X, y = X[:n], y[:n]
    images = X.reshape(-1, 8, 8)
    z = (X - X[:n_train].mean(0)) / (X[:n_train].std(0) + 1e-6)
    patches = z.reshape(-1, 2, 4, 2, 4).permute(0, 1, 3, 2, 4).reshape(-1, 4, 16)    # 4 patches of 4×4 pixels
    right = torch.rand(n, generator=generator, dtype=torch.float64) < 0.6
    word = torch.where(right, y, torch.randint(0, 10, (n,), generator=generator))
    fillers = 10 + torch.randint(0, FILLERS, (n, 2), generator=generator)
    text = torch.cat([word[:, None], fillers], dim=1)[:, torch.randperm(3, generator=generator)]
    data = {"patches": patches, "text": text, "y": y}
    cut = lambda part: {k: v[part] for k, v in data.items()}  # noqa: E731
    return cut(slice(0, n_train)), cut(slice(n_train, n)), (images[:n_train], images[n_train:])


class ImageText(torch.nn.Module):
    """Image tokens and text tokens in one space, pooled through tanh, then a linear classifier."""

    def __init__(self, dtype=torch.float64):     # explicit dtypes: the same weights whatever the default dtype
        super().__init__()
        self.patch = torch.nn.Linear(16, WIDTH, dtype=dtype)
        self.position = torch.nn.Parameter(0.1 * torch.randn(4, WIDTH, dtype=dtype))
        self.words = torch.nn.Embedding(VOCAB, WIDTH, dtype=dtype)
        self.head = torch.nn.Linear(WIDTH, 10, dtype=dtype)

    def forward(self, patches, text):
        """Logits `[B, 10]` of patches `[B, 4, 16]` and word ids `[B, 3]`."""
        tokens = torch.cat([self.patch(patches) + self.position, self.words(text)], dim=-2)   # [B, 7, WIDTH]
        return self.head(torch.tanh(tokens).mean(-2))


name = "multimodal"
generator = torch.Generator().manual_seed(0)
train, test, (train_images, test_images) = _examples(N_TRAIN, generator)
torch.manual_seed(0)                                        # the initial weights
apply, params = ti.functionalize(ImageText())


def loss(params, batch):
    """Cross entropy per example, `[B]`."""
    return F.cross_entropy(apply(params, batch["patches"], batch["text"]), batch["y"], reduction="none")


def fit(params, data):
    """θ̂ from the initial weights: L-BFGS then Newton-CG steps, to gradient max-norm 1e-10."""
    return ti.minimize(ti.objective(loss, data, l2=l2), params, gtol=1e-10, maxiter=3000, newton_steps=10)


l2 = 1e-2
method = "cg"                          # classic influence; e.g. ["cg", "grad_dot"] compares the gradient dot product
damping = 1e-2                        # the model is not convex: H may have small negative eigenvalues at θ̂
retrain = fit                         # leave-one-out: the same training, warm-started from θ̂
test_ids, top_k = [0, 1, 2], 10
images, labels = (train_images, test_images), (train["y"], test["y"])
