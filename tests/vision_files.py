"""Tiny torchvision data sets written in their real on-disk formats, for tests without downloads.

MNIST and Fashion-MNIST: the four uncompressed idx files in ``<root>/<Class>/raw/``, which is
what torchvision 0.29's ``MNIST`` looks for (it checks only that they exist). CIFAR-10 and
CIFAR-100: the pickled batches and meta file in ``<root>/cifar-10-batches-py/`` or
``<root>/cifar-100-python/``. torchvision's ``CIFAR10`` checks each file against the MD5 of the
published archive, with no parameter to skip it, so ``cifar_checksums`` returns the tables that
make it verify the tiny files instead.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np

MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the idx format: magic 0x0000 08 <ndim>, big-endian int32 sizes, data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, name: str = "mnist", num_train: int = 40, num_test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny MNIST-format set (28×28 images, labels 0–9) and return its training arrays."""
    rng = np.random.default_rng(seed)
    raw = root / MNIST_FOLDERS[name] / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)
    return {"images": arrays["train"][0], "labels": arrays["train"][1]}


def write_cifar(root: Path, name: str = "cifar10", per_batch: int = 8, num_test: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny CIFAR-10 (5 training batches) or CIFAR-100 (one ``train`` file) set and return its training arrays.

    Images are rows of 3072 bytes (1024 red, 1024 green, 1024 blue, each row-major), as in the
    published pickles.
    """
    rng = np.random.default_rng(seed)
    num_classes = 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)

    def batch(count: int) -> dict:
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, size=count).tolist()
        if name == "cifar10":
            return {"batch_label": "tiny", "labels": labels, "data": data, "filenames": [f"{i}.png" for i in range(count)]}
        return {"fine_labels": labels, "coarse_labels": [label // 5 for label in labels], "data": data}

    if name == "cifar10":
        train_files = {f"data_batch_{i}": batch(per_batch) for i in range(1, 6)}
        files = {**train_files, "test_batch": batch(num_test), "batches.meta": {"label_names": [f"class{i}" for i in range(10)]}}
    else:
        train_files = {"train": batch(5 * per_batch)}
        meta = {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]}
        files = {**train_files, "test": batch(num_test), "meta": meta}
    for filename, content in files.items():
        with open(folder / filename, "wb") as handle:
            pickle.dump(content, handle, protocol=2)

    data = np.concatenate([content["data"] for content in train_files.values()])
    label_key = "labels" if name == "cifar10" else "fine_labels"
    labels = np.concatenate([content[label_key] for content in train_files.values()])
    return {"data": data, "labels": labels}


def cifar_checksums(root: Path, dataset_class: type) -> dict[str, object]:
    """Return ``train_list``, ``test_list`` and ``meta`` of ``dataset_class`` with the MD5s of the files in ``root``."""
    folder = root / dataset_class.base_folder

    def md5(filename: str) -> str:
        return hashlib.md5((folder / filename).read_bytes()).hexdigest()

    return {
        "train_list": [[filename, md5(filename)] for filename, _ in dataset_class.train_list],
        "test_list": [[filename, md5(filename)] for filename, _ in dataset_class.test_list],
        "meta": {**dataset_class.meta, "md5": md5(dataset_class.meta["filename"])},
    }
