"""Data sets: bundled scikit-learn sets and torchvision sets from tiny files in their real formats."""

import numpy as np
import pytest
import torch
import torchvision
from torchvision import transforms

from harness.data import DatasetNotFoundError, VISION, curvature_indices, load_dataset
from vision_files import cifar_checksums, write_cifar, write_mnist

SPLIT = {"val_fraction": 0.25, "standardize": True, "seed": 0}


def test_digits_flat_and_images_agree():
    flat = load_dataset("digits", **SPLIT)
    images = load_dataset("digits", **SPLIT, images=True)

    assert flat.input_shape == (64,)
    assert images.input_shape == (1, 8, 8)
    assert torch.equal(images.train_inputs.flatten(start_dim=1), flat.train_inputs)
    assert torch.equal(images.train_targets, flat.train_targets)
    assert flat.num_outputs == 10
    assert flat.task == "classification"


def test_digits_split_sizes_and_subset():
    full = load_dataset("digits", **SPLIT)
    small = load_dataset("digits", **SPLIT, subset=100)

    assert len(full.train_inputs) + len(full.val_inputs) == 1797
    assert len(full.val_inputs) == round(0.25 * 1797)
    assert len(small.train_inputs) == 75
    assert len(small.val_inputs) == 25


def test_diabetes_is_standardized_regression():
    data = load_dataset("diabetes", **SPLIT)

    assert data.task == "regression"
    assert data.num_outputs == 1
    assert data.input_shape == (10,)
    assert data.train_targets.shape == (len(data.train_inputs), 1)
    assert data.train_targets.dtype == torch.float32
    assert data.train_targets.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert data.train_targets.std().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(data.train_inputs.mean(dim=0), torch.zeros(10), atol=1e-5)


def test_diabetes_raw_targets_are_sklearns():
    from sklearn.datasets import load_diabetes

    data = load_dataset("diabetes", val_fraction=0.0, standardize=False, seed=0)
    _, values = load_diabetes(return_X_y=True)

    assert sorted(data.train_targets.squeeze(1).tolist()) == pytest.approx(sorted(values.tolist()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 1.0}, "dataset.val_fraction=1.0"),
        ({"subset": 0}, "dataset.subset=0"),
        ({"subset": 5000}, "1797 samples"),
        ({"name": "diabetes", "images": True}, "dataset.images=true"),
    ],
)
def test_invalid_options_rejected(kwargs, message):
    options = {"name": "digits", **SPLIT, **kwargs}
    with pytest.raises(ValueError, match=message):
        load_dataset(options.pop("name"), **options)


def test_curvature_batch_fixed_by_seed():
    first = curvature_indices(100, 16, seed=3)

    assert torch.equal(first, curvature_indices(100, 16, seed=3))
    assert not torch.equal(first, curvature_indices(100, 16, seed=4))
    assert len(set(first.tolist())) == 16


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_files_load_through_torchvision(tmp_path, name):
    written = write_mnist(tmp_path, name, num_train=40)

    data = load_dataset(name, root=tmp_path, val_fraction=0.0, standardize=True, seed=0)

    assert data.input_shape == (1, 28, 28)
    assert data.num_outputs == 10
    assert len(data.train_inputs) == 40
    # The splits are a seeded permutation, so compare as sets of (label, first pixel) pairs.
    loaded = sorted(zip(data.train_targets.tolist(), data.train_inputs[:, 0, 0, 0].tolist()))
    spec = VISION[name]
    expected = sorted(
        zip(written["labels"].tolist(), ((written["images"][:, 0, 0] / 255.0 - spec.mean[0]) / spec.std[0]).tolist())
    )
    assert [label for label, _ in loaded] == [label for label, _ in expected]
    assert [pixel for _, pixel in loaded] == pytest.approx([pixel for _, pixel in expected], abs=1e-5)


def test_mnist_matches_torchvision_transforms(tmp_path):
    write_mnist(tmp_path, "mnist", num_train=6)
    spec = VISION["mnist"]
    reference = torchvision.datasets.MNIST(
        str(tmp_path), train=True, transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    )

    data = load_dataset("mnist", root=tmp_path, val_fraction=0.0, standardize=True, seed=0)

    references = [(image, label) for image, label in reference]
    for image, label in zip(data.train_inputs, data.train_targets):
        matches = [ref_label for ref_image, ref_label in references if torch.allclose(ref_image, image, atol=1e-5)]
        assert matches == [label.item()]


@pytest.mark.parametrize(("name", "class_name"), [("cifar10", "CIFAR10"), ("cifar100", "CIFAR100")])
def test_cifar_pickles_load_through_torchvision(tmp_path, monkeypatch, name, class_name):
    written = write_cifar(tmp_path, name, per_batch=4)
    dataset_class = getattr(torchvision.datasets, class_name)
    for attribute, value in cifar_checksums(tmp_path, dataset_class).items():
        monkeypatch.setattr(dataset_class, attribute, value)

    data = load_dataset(name, root=tmp_path, val_fraction=0.25, standardize=False, seed=0)

    assert data.input_shape == (3, 32, 32)
    assert data.num_outputs == VISION[name].num_classes
    assert len(data.train_inputs) == 15
    assert len(data.val_inputs) == 5
    inputs = torch.cat([data.train_inputs, data.val_inputs])
    targets = torch.cat([data.train_targets, data.val_targets])
    images = torch.as_tensor(written["data"]).reshape(-1, 3, 32, 32).float() / 255.0
    for image, label in zip(inputs, targets):
        matches = [i for i in range(len(images)) if torch.equal(images[i], image)]
        assert len(matches) == 1
        assert written["labels"][matches[0]] == label.item()


def test_cifar_checksum_mismatch_reported(tmp_path):
    write_cifar(tmp_path, "cifar10", per_batch=2)

    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset("cifar10", root=tmp_path, val_fraction=0.2, standardize=True, seed=0)
    assert "not found or corrupted" in str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in str(error.value)


@pytest.mark.parametrize("name", sorted(VISION))
def test_missing_files_name_folder_and_fixes(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset(name, root=tmp_path, val_fraction=0.2, standardize=True, seed=0)

    message = str(error.value)
    assert f"Dataset {name}" in message
    assert str(tmp_path / VISION[name].folder) in message
    assert "set dataset.root" in message
    assert "dataset.download=true" in message


def test_failed_download_reported(tmp_path, monkeypatch):
    # Port 9 (discard) on this machine's loopback: the connection is refused, like an offline machine.
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])

    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset("mnist", root=tmp_path, download=True, val_fraction=0.2, standardize=True, seed=0)

    message = str(error.value)
    assert "Dataset mnist: downloading into" in message
    assert str(tmp_path) in message
    assert "set dataset.root" in message
