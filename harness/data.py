"""Data sets as tensors: a training split, a held-out split and a fixed curvature batch.

Bundled with scikit-learn, usable offline: ``digits`` (8×8 images, 10 classes) and ``diabetes``
(a regression set). Loaded through ``torchvision.datasets`` from a local folder: ``mnist``,
``fashion_mnist``, ``cifar10`` and ``cifar100``. Every set is split into a seeded training and
held-out part, and the curvature batch is a seeded sample of the training part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

CLASSIFICATION = "classification"
REGRESSION = "regression"


@dataclass
class Data:
    """A data set split for training, evaluation and curvature.

    Attributes:
        train_inputs: Training inputs, ``[N_train, *input_shape]``.
        train_targets: Training targets: class indices ``[N_train]`` (int64) for classification,
            real values ``[N_train, C]`` (float32) for regression.
        val_inputs: Held-out inputs.
        val_targets: Held-out targets, as ``train_targets``.
        num_outputs: The model's output size C: the number of classes, or the target dimension.
        task: ``"classification"`` or ``"regression"``.
    """

    train_inputs: Tensor
    train_targets: Tensor
    val_inputs: Tensor
    val_targets: Tensor
    num_outputs: int
    task: str = CLASSIFICATION

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input."""
        return tuple(self.train_inputs.shape[1:])


@dataclass(frozen=True)
class VisionSpec:
    """How to load one ``torchvision.datasets`` class and normalize its images.

    ``mean`` and ``std`` are the widely used per-channel statistics of the set's training
    images, for pixel values in [0, 1], as ``transforms.Normalize`` takes them. They are
    constants, not recomputed from the files, so a subset is normalized like the full set.
    """

    class_name: str
    folder: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


VISION = {
    "mnist": VisionSpec("MNIST", "MNIST/raw", 10, (0.1307,), (0.3081,)),
    "fashion_mnist": VisionSpec("FashionMNIST", "FashionMNIST/raw", 10, (0.2860,), (0.3530,)),
    "cifar10": VisionSpec(
        "CIFAR10", "cifar-10-batches-py", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    "cifar100": VisionSpec(
        "CIFAR100", "cifar-100-python", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    ),
}
BUNDLED = {"digits": CLASSIFICATION, "diabetes": REGRESSION, "random": CLASSIFICATION}


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a torchvision data set's files are missing and cannot be downloaded."""


def task_of(name: str) -> str:
    """Return the task of data set ``name``: ``"classification"`` or ``"regression"``.

    Raises:
        ValueError: If the name is unknown.
    """
    if name in BUNDLED:
        return BUNDLED[name]
    if name in VISION:
        return CLASSIFICATION
    raise ValueError(f"Invalid data set {name!r}: use one of {sorted([*BUNDLED, *VISION])}.")


def load_dataset(
    name: str,
    *,
    val_fraction: float,
    standardize: bool,
    seed: int,
    images: bool = False,
    subset: Optional[int] = None,
    root: str | Path = "data",
    download: bool = False,
    shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    num_samples: int = 512,
) -> Data:
    """Load data set ``name`` and split it, as the loader of each set below describes.

    ``images`` applies to ``digits`` only, ``root`` and ``download`` to the torchvision sets,
    ``shape``, ``num_classes`` and ``num_samples`` to ``random``.

    Raises:
        ValueError: If a value is invalid for the data set.
        DatasetNotFoundError: If a torchvision set is not under ``root`` and not downloaded.
    """
    task_of(name)
    if images and name != "digits":
        raise ValueError(
            f"Invalid dataset.images=true for dataset {name!r}: only digits has a flat and an "
            "image layout. Set dataset.images=false."
        )
    if name == "digits":
        return load_digits(val_fraction, standardize, seed, images=images, subset=subset)
    if name == "diabetes":
        return load_diabetes(val_fraction, standardize, seed, subset=subset)
    if name == "random":
        return load_random(shape, num_classes, num_samples, val_fraction, seed)
    return load_vision(name, root, download, val_fraction, standardize, seed, subset=subset)


def load_digits(
    val_fraction: float, standardize: bool, seed: int, images: bool = False, subset: Optional[int] = None
) -> Data:
    """Load scikit-learn's bundled digits (1797 images of 8×8 pixels, 10 classes).

    Inputs are vectors of 64 pixels in [0, 1], or ``[1, 8, 8]`` images with ``images``. With
    ``standardize``, each pixel is shifted and scaled by the training split's mean and standard
    deviation.

    Raises:
        ValueError: If ``val_fraction`` or ``subset`` is invalid.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    pixels, labels = sklearn_digits(return_X_y=True)
    inputs = torch.as_tensor(pixels, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(labels, dtype=torch.long)
    data = _split(inputs, labels, 10, CLASSIFICATION, val_fraction, seed, subset)
    if standardize:
        data.train_inputs, data.val_inputs = _standardize(data.train_inputs, data.val_inputs)
    if images:
        data.train_inputs = data.train_inputs.reshape(-1, 1, 8, 8)
        data.val_inputs = data.val_inputs.reshape(-1, 1, 8, 8)
    return data


def load_random(shape: tuple[int, ...], num_classes: int, num_samples: int, val_fraction: float, seed: int) -> Data:
    """Draw ``num_samples`` standard Gaussian inputs of ``shape`` with uniform random labels.

    Nothing can be learned from this data. It serves to measure the curvature engine on a net
    whose real data set is not on disk, for example DeepOBS's ``3c3d`` with ``shape=[3, 32, 32]``.

    Raises:
        ValueError: If a size is not positive.
    """
    if num_samples < 1 or num_classes < 1 or any(size < 1 for size in shape):
        raise ValueError(
            f"Invalid random data set: num_samples={num_samples}, num_classes={num_classes} and "
            f"shape={list(shape)} must all be positive."
        )
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, *shape, generator=generator)
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    return _split(inputs, labels, num_classes, CLASSIFICATION, val_fraction, seed)


def load_diabetes(val_fraction: float, standardize: bool, seed: int, subset: Optional[int] = None) -> Data:
    """Load scikit-learn's bundled diabetes regression set (442 patients, 10 features, 1 target).

    The target is a measure of disease progression one year later, as targets of shape
    ``[N, 1]``. With ``standardize``, features and target are shifted and scaled by the training
    split's mean and standard deviation, so an MSE near 1 means no better than the mean.

    Raises:
        ValueError: If ``val_fraction`` or ``subset`` is invalid.
    """
    from sklearn.datasets import load_diabetes as sklearn_diabetes

    features, values = sklearn_diabetes(return_X_y=True)
    inputs = torch.as_tensor(features, dtype=torch.float32)
    targets = torch.as_tensor(values, dtype=torch.float32).unsqueeze(1)
    data = _split(inputs, targets, 1, REGRESSION, val_fraction, seed, subset)
    if standardize:
        data.train_inputs, data.val_inputs = _standardize(data.train_inputs, data.val_inputs)
        data.train_targets, data.val_targets = _standardize(data.train_targets, data.val_targets)
    return data


def load_vision(
    name: str,
    root: str | Path,
    download: bool,
    val_fraction: float,
    standardize: bool,
    seed: int,
    subset: Optional[int] = None,
) -> Data:
    """Load the training files of a torchvision data set from ``root`` as ``[N, C, H, W]`` images.

    The held-out split is a seeded ``val_fraction`` of the training files. The test files are
    not used. Pixels are scaled to [0, 1] and, with ``standardize``, normalized with the set's
    standard per-channel mean and standard deviation (``VISION``), which gives the same images
    as ``ToTensor()`` followed by ``Normalize(mean, std)``.

    Raises:
        ValueError: If ``name``, ``val_fraction`` or ``subset`` is invalid.
        DatasetNotFoundError: If the files are not in ``root`` and ``download`` is off or fails.
    """
    import torchvision.datasets

    if name not in VISION:
        raise ValueError(f"Invalid torchvision data set {name!r}: use one of {sorted(VISION)}.")
    spec = VISION[name]
    root = Path(root).expanduser().resolve()
    dataset_class = getattr(torchvision.datasets, spec.class_name)
    try:
        dataset = dataset_class(str(root), train=True, download=download)
    except (RuntimeError, OSError) as error:
        raise DatasetNotFoundError(_not_found_message(name, spec, root, download, error)) from error

    pixels = torch.as_tensor(dataset.data)
    # MNIST-like sets store [N, H, W] grayscale, CIFAR stores [N, H, W, C] channels last.
    pixels = pixels.unsqueeze(1) if pixels.dim() == 3 else pixels.permute(0, 3, 1, 2)
    inputs = pixels.to(torch.float32) / 255.0
    if standardize:
        mean = torch.tensor(spec.mean).reshape(1, -1, 1, 1)
        std = torch.tensor(spec.std).reshape(1, -1, 1, 1)
        inputs = (inputs - mean) / std
    labels = torch.as_tensor(dataset.targets, dtype=torch.long)
    return _split(inputs, labels, spec.num_classes, CLASSIFICATION, val_fraction, seed, subset)


def _not_found_message(name: str, spec: VisionSpec, root: Path, download: bool, error: Exception) -> str:
    """Return the error message for a torchvision set that could not be loaded."""
    folder = root / spec.folder
    if download:
        return (
            f"Dataset {name}: downloading into {root} failed ({error}). Either set dataset.root "
            f"to a folder that already contains {spec.folder}/, or retry with "
            "dataset.download=true on a machine with internet access."
        )
    return (
        f"Dataset {name} not found or corrupted in {folder}. Either set dataset.root "
        f"to a folder that contains {spec.folder}/ with torchvision's {spec.class_name} files, or "
        f"set dataset.download=true on a machine with internet access to download them into {root}."
    )


def _split(
    inputs: Tensor,
    targets: Tensor,
    num_outputs: int,
    task: str,
    val_fraction: float,
    seed: int,
    subset: Optional[int] = None,
) -> Data:
    """Split a seeded permutation (its first ``subset`` samples, if set) into held-out and training parts."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"Invalid dataset.val_fraction={val_fraction}: use a value in [0, 1), e.g. 0.2.")
    if subset is not None and not 1 <= subset <= len(inputs):
        raise ValueError(
            f"Invalid dataset.subset={subset}: the data set has {len(inputs)} samples, so use a "
            f"value from 1 to {len(inputs)}, or null for all of them."
        )

    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    if subset is not None:
        order = order[:subset]
    num_val = int(round(val_fraction * len(order)))
    val, train = order[:num_val], order[num_val:]
    return Data(inputs[train], targets[train], inputs[val], targets[val], num_outputs, task)


def _standardize(train: Tensor, val: Tensor) -> tuple[Tensor, Tensor]:
    """Shift and scale each feature of both splits by the training split's mean and standard deviation."""
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True)
    # A feature that is constant in the training split is only shifted, never divided by ~0.
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return (train - mean) / std, (val - mean) / std


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
