"""Handwritten digits: scikit-learn's bundled 8x8 images (1797 of them, no download).

The held-out split is fixed for good: a permutation of the 1797 indices from
numpy.random.default_rng(0); its first round(eval_fraction * 1797) are "eval", the rest
"train". It does not depend on the run's seed, so every run is scored on the same images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import Dataset

SPLITS = ("train", "eval")


class Digits(Dataset):
    """One split of the digits: items are (pixels float32 [64] in [0, 1], label int64 []).
    With augment, half the training images are moved by -1..1 pixels on each axis."""

    def __init__(self, split: str = "train", augment: bool = False,
                 eval_fraction: float = 0.2):
        if split not in SPLITS:
            raise ValueError(f"Digits split must be one of {SPLITS}, got {split!r}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"Digits eval_fraction must be in (0, 1), got {eval_fraction}")
        digits = load_digits()
        order = np.random.default_rng(0).permutation(len(digits.target))
        num_eval = round(eval_fraction * len(order))
        chosen = order[:num_eval] if split == "eval" else order[num_eval:]
        self.split = split
        # The held-out images are never augmented: eval must score the same inputs every run.
        self.augment = augment and split == "train"
        self.images = torch.from_numpy(digits.images[chosen] / 16.0).float()  # [N, 8, 8]
        self.labels = torch.from_numpy(digits.target[chosen]).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        # Only half the training images move: the held-out digits are all centred, and a
        # shift crops a row or column of a digit that fills the frame (shifting every image
        # cost ~1 point of held-out accuracy at the example's budget).
        if self.augment and torch.rand(()) < 0.5:
            image = _shift(image)
        return image.reshape(-1), self.labels[index]

    def describe(self) -> dict[str, float | int | str]:
        """Sizes, logged at the start of a run."""
        return {f"digits_{self.split}_samples": len(self), "digits_augment": int(self.augment)}


def _shift(image: torch.Tensor) -> torch.Tensor:
    # The offsets, -1..1 pixels on each axis, come from the global torch RNG: the trainer
    # seeds it per item, so an item's shift does not depend on the number of workers.
    dy, dx = torch.randint(-1, 2, (2,)).tolist()
    # Zero padding then an 8x8 crop: a pixel pushed off one edge does not come back on the
    # other, as a roll would make it.
    padded = F.pad(image, (1, 1, 1, 1))
    return padded[1 - dy:9 - dy, 1 - dx:9 - dx]


class DigitsMLP(nn.Module):
    """num_layers Linear+GELU hidden layers of hidden_dim units, then linear logits
    [B, num_classes]. No dropout or batch norm, so a step depends only on its batch."""

    def __init__(self, in_dim: int = 64, hidden_dim: int = 256, num_layers: int = 2,
                 num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.GELU()]
            width = hidden_dim
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
