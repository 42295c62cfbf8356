"""The shapes world's judges as evaluators (``zoo:shapes-reader``, ``zoo:shapes-detector``).

``Judge.read(images) -> {factor: (value (N,), confidence (N,))}``: the factor reader's reading of
each captioned factor, or the concept detector's presence (value 0/1, confidence = probability
of that value) of each of the six multi-object concepts. ``featinv.evaluators`` turns a judge
into per-factor agreement with the target image.
"""
from __future__ import annotations

import torch
from torch import nn

from featinv.zoo.shapes import world as W
from featinv.zoo.shapes.reader import load_detector, load_reader, read_factors, read_presence


class Judge(nn.Module):
    def __init__(self, name: str = "shapes-reader", root=None):
        super().__init__()
        self.name = f"zoo:{name}"
        self.kind = name
        self.net = load_reader(root) if name == "shapes-reader" else load_detector(root)

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        images = images.float()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if self.kind == "shapes-reader":
            values, conf = read_factors(images, self.net)
            return {k: (values[k], conf[k]) for k in W.FACTORS}
        p = read_presence(images, self.net)
        present = p > 0.5
        return {c: (present[:, k].long(), torch.where(present[:, k], p[:, k], 1 - p[:, k]))
                for k, c in enumerate(W.CONCEPTS)}
