"""Small models of every shape the core must handle, each with a per-example loss and a data set."""

import torch
import torch.nn.functional as F
from torch import nn

import tinfluence as ti


class TextModel(nn.Module):
    """Embedding + mean pooling over the non-masked tokens; dict inputs."""

    def __init__(self, vocab=20, dim=6, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask[..., None]
        return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, u, v):
        return self.out(torch.tanh(self.a(u) + self.b(v)))


class TiedLM(nn.Module):
    """Output head tied to the input embedding."""

    def __init__(self, vocab=11, dim=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.proj(self.emb(tokens))))


def cases(n=12):
    """Model cases: (name, module, inputs, targets, data).

    `inputs(batch) -> (args, kwargs)` for the forward call, `targets(batch)` the class labels;
    the per-example loss is cross entropy of the output against the targets.
    """
    g = torch.Generator().manual_seed(0)
    pair = (lambda b: ((b[0],), {}), lambda b: b[1])
    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        bn[1].running_mean.uniform_(-1, 1, generator=g)
        bn[1].running_var.uniform_(0.5, 2, generator=g)
    bn.eval()
    cnn = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    ids = torch.randint(0, 20, (n, 7), generator=g)
    mask = (torch.rand(n, 7, generator=g) > 0.3).double()
    mask[:, 0] = 1
    labels = lambda k: torch.randint(0, k, (n,), generator=g)  # noqa: E731
    return [
        ("logreg", nn.Linear(4, 3), *pair, (torch.randn(n, 4, generator=g), labels(3))),
        ("mlp", nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), *pair, (torch.randn(n, 4, generator=g), labels(3))),
        ("cnn", cnn, *pair, (torch.randn(n, 1, 6, 6, generator=g), labels(3))),
        ("batchnorm_eval", bn, *pair, (torch.randn(n, 4, generator=g), labels(3))),
        ("text_dict", TextModel(), lambda b: ((b["input_ids"], b["attention_mask"]), {}), lambda b: b["labels"],
         {"input_ids": ids, "attention_mask": mask, "labels": labels(3)}),
        ("two_inputs", TwoInputs(), lambda b: ((b[0][0],), {"v": b[0][1]}), lambda b: b[1],
         ((torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)), labels(2))),
        ("tied", TiedLM(), *pair, (torch.randint(0, 11, (n,), generator=g), labels(11))),
    ]


def build(case):
    """(apply, params, loss, data) for a case, in float64."""
    _, module, inputs, targets, data = case
    apply, params = ti.functionalize(module.double())

    def loss(p, batch):
        args, kwargs = inputs(batch)
        return F.cross_entropy(apply(p, *args, **kwargs), targets(batch), reduction="none")

    return apply, params, loss, data


def digits_mlp(hidden: int, seed: int = 0):
    """A fresh 64-`hidden`-10 tanh MLP for digits, seeded: `(apply, params, loss)`, loss the
    per-example cross-entropy of a batch `(x, y)`."""
    torch.manual_seed(seed)
    apply, params = ti.functionalize(nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)))

    def loss(p, batch):
        return F.cross_entropy(apply(p, batch[0]), batch[1], reduction="none")

    return apply, params, loss


def loop_grad_rows(loss, params, data) -> torch.Tensor:
    """`[n, P]` reference per-example gradients from an explicit autograd loop (`ti.testing.loop_grads`), raveled."""
    from tinfluence.testing import loop_grads

    return ti.ravel(loop_grads(loss, params, data), batch_ndim=1)


def class0_probability(apply):
    """A test measure m(θ, z) = w · softmax(f_θ(x))[0] on a dict batch {"x", "w"}: no label, and
    another structure than the training batches `(x, y)`."""
    def measure(p, batch):
        return batch["w"] * apply(p, batch["x"]).softmax(1)[:, 0]
    return measure
