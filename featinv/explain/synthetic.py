"""The synthetic world of the EDDP paper (arXiv 2509.23926, synthetic experiment), with its ground truth.

Activations x_p = S alpha_p + D beta_p + 10 (all dims): D_model = 16, 3 concepts with random unit encoding
directions (columns of S), 2 distractors with random unit directions (columns of D); a concept is "on" at a
position when its signal value is drawn from U(2.5, 5), "off" from U(0, 2.5); beta ~ U(0, 5).
An image has 2 positions (W = 2, H = 1); class a = concepts (0, 1), b = (0, 2), c = (1, 2): one position holds
the first concept on, the other the second (in random order; the pooled network cannot see the order), and
every other concept is off. The network is avg-pool + linear, trained with Adam (lr 0.005, batch 1024).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

CLASSES = ((0, 1), (0, 2), (1, 2))
ON_LOW, ON_HIGH, OFF_HIGH, BETA_HIGH, BIAS = 2.5, 5.0, 2.5, 5.0, 10.0


@dataclass
class World:
    """Ground truth: S (D, n_concepts) and distractors Dist (D, n_distractors), unit columns."""
    S: Tensor
    Dist: Tensor
    seed: int

    @property
    def dim(self) -> int:
        return self.S.shape[0]

    @property
    def true_filters(self) -> Tensor:
        """The ideal decoding directions (D, n_concepts): rows of [S Dist]^+, so w_i^T s_i = 1, w_i orthogonal
        to the other s_j and to every distractor direction."""
        return torch.linalg.pinv(torch.cat([self.S, self.Dist], 1))[: self.S.shape[1]].T


@dataclass
class Sample:
    """X (N, 2, D) activations, alpha (N, 2, C) signal values, beta (N, 2, F), on (N, 2, C) bool concept
    masks, labels (N,) in {0, 1, 2}."""
    X: Tensor
    alpha: Tensor
    beta: Tensor
    on: Tensor
    labels: Tensor


def make_world(seed: int, dim: int = 16, n_concepts: int = 3, n_distractors: int = 2) -> World:
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(dim, n_concepts, generator=g)
    Dist = torch.randn(dim, n_distractors, generator=g)
    return World(S / S.norm(dim=0), Dist / Dist.norm(dim=0), seed)


def sample(world: World, n_per_class: int, generator: torch.Generator, absent: str = "off") -> Sample:
    """``n_per_class`` images of each class, shuffled.

    ``absent``: the signal value of a concept that is in neither position of the image. "off" (the notes'
    reading, the default): U(0, 2.5) like any off value; then no pooled linear classifier gets much above
    ~93 % test accuracy (the two on/off sums of a class overlap). "zero": 0, which makes the classes
    linearly separable (the paper reports 99 % test accuracy, which the "off" reading cannot reach)."""
    if absent not in ("off", "zero"):
        raise ValueError(f"absent must be 'off' or 'zero', got {absent!r}")
    C, F = world.S.shape[1], world.Dist.shape[1]
    labels = torch.arange(len(CLASSES)).repeat_interleave(n_per_class)
    labels = labels[torch.randperm(len(labels), generator=generator)]
    N = len(labels)
    pairs = torch.tensor(CLASSES)[labels]                                     # (N, 2) concepts on
    flip = torch.rand(N, generator=generator) < 0.5                           # random position order
    pairs = torch.where(flip[:, None], pairs.flip(1), pairs)
    on = torch.nn.functional.one_hot(pairs, C).bool()                         # (N, 2, C)
    u = torch.rand(N, 2, C, generator=generator)
    alpha = torch.where(on, ON_LOW + (ON_HIGH - ON_LOW) * u, OFF_HIGH * u)
    if absent == "zero":
        alpha = torch.where(on.any(1, keepdim=True), alpha, torch.zeros_like(alpha))
    beta = BETA_HIGH * torch.rand(N, 2, F, generator=generator)
    X = alpha @ world.S.T + beta @ world.Dist.T + BIAS
    return Sample(X, alpha, beta, on, labels)


class PooledLinear(nn.Module):
    """The paper's synthetic network: average pooling over positions, then a linear classifier.
    ``forward`` takes activations (N, P, D) and returns logits (N, classes), so it is also f+."""

    def __init__(self, dim: int = 16, n_classes: int = 3):
        super().__init__()
        self.fc = nn.Linear(dim, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean(1))


def train_network(train: Sample, test: Sample, seed: int = 0, epochs: int = 2000, lr: float = 0.005,
                  batch_size: int = 1024, target_accuracy: float = 0.99) -> tuple[PooledLinear, dict]:
    """Adam (lr 0.005, batch 1024) for up to ``epochs`` epochs (the paper's 2000), stopping early once the
    test accuracy reaches ``target_accuracy``. Returns the network (eval mode, frozen) and a report."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = PooledLinear(train.X.shape[-1], len(CLASSES))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    acc, epoch = 0.0, 0
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(train.labels), generator=g)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(net(train.X[idx]), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 10 == 0 or epoch == epochs:
            acc = accuracy(net, test)
            if acc >= target_accuracy:
                break
    net.eval().requires_grad_(False)
    return net, {"epochs": epoch, "test_accuracy": accuracy(net, test), "train_accuracy": accuracy(net, train)}


@torch.no_grad()
def accuracy(net: nn.Module, s: Sample) -> float:
    return (net(s.X).argmax(1) == s.labels).float().mean().item()
