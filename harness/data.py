"""Data sets as tensors: a training split, a held-out split and a fixed curvature batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Data:
    """A data set split for training, evaluation and curvature.

    Attributes:
        train_inputs: Training inputs, ``[N_train, *input_shape]``.
        train_labels: Training class labels, ``[N_train]``.
        val_inputs: Held-out inputs.
        val_labels: Held-out class labels.
        num_classes: Number of classes C, the model's output size.
    """

    train_inputs: Tensor
    train_labels: Tensor
    val_inputs: Tensor
    val_labels: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input."""
        return tuple(self.train_inputs.shape[1:])


def load_digits(val_fraction: float, standardize: bool, seed: int) -> Data:
    """Load scikit-learn's bundled digits (1797 images of 8×8 pixels, 10 classes) as vectors.

    The held-out split is a seeded random ``val_fraction`` of the images. With ``standardize``,
    each pixel is shifted and scaled by the training split's mean and standard deviation.

    Raises:
        ValueError: If ``val_fraction`` is not in [0, 1).
    """
    from sklearn.datasets import load_digits as sklearn_digits

    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(
            f"Invalid dataset.val_fraction={val_fraction}: use a value in [0, 1), e.g. 0.2."
        )
    images, labels = sklearn_digits(return_X_y=True)
    inputs = torch.as_tensor(images, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(labels, dtype=torch.long)
    return _split(inputs, labels, 10, val_fraction, standardize, seed)


def _split(
    inputs: Tensor, labels: Tensor, num_classes: int, val_fraction: float, standardize: bool, seed: int
) -> Data:
    """Split into seeded training and held-out parts and optionally standardize."""
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    num_val = int(round(val_fraction * len(inputs)))
    val, train = order[:num_val], order[num_val:]
    train_inputs, val_inputs = inputs[train], inputs[val]

    if standardize:
        mean = train_inputs.mean(dim=0, keepdim=True)
        std = train_inputs.std(dim=0, keepdim=True)
        # A pixel that is constant in the training split is only shifted, never divided by ~0.
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        train_inputs = (train_inputs - mean) / std
        val_inputs = (val_inputs - mean) / std

    return Data(train_inputs, labels[train], val_inputs, labels[val], num_classes)


def curvature_indices(num_train: int, batch_size: int, seed: int) -> Tensor:
    """Return the seeded indices of the curvature batch, fixed for a whole run.

    Raises:
        ValueError: If ``batch_size`` is not in [1, num_train].
    """
    if not 1 <= batch_size <= num_train:
        raise ValueError(
            f"Invalid curvature.batch_size={batch_size}: the training split has {num_train} "
            f"samples, so use a value from 1 to {num_train}."
        )
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randperm(num_train, generator=generator)[:batch_size].sort().values
