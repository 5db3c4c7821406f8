"""Datasets: the fixed digits split, CIFAR folders in torchvision's format, user datasets."""

import collections
import pickle

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from adasmooth_ext.data import _stratified_split, as_loader, cifar10, cifar100, digits


def write_cifar(root, kind: str, per_file: int, seed: int = 0) -> dict:
    """A tiny CIFAR folder in torchvision's pickle format; returns what went into each file."""
    rng = np.random.default_rng(seed)
    if kind == "cifar10":
        folder, classes, label_key = root / "cifar-10-batches-py", 10, "labels"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        meta_file, meta = "batches.meta", {"label_names": [f"c{i}" for i in range(10)]}
    else:
        folder, classes, label_key = root / "cifar-100-python", 100, "fine_labels"
        files = ["train", "test"]
        meta_file = "meta"
        meta = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": ["x"]}
    folder.mkdir(parents=True)
    # The real files are Python 2 pickles; cover both an old and the newest protocol.
    protocol = 2 if kind == "cifar10" else pickle.HIGHEST_PROTOCOL
    written = {}
    for index, name in enumerate(files):
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = [(index + i) % classes for i in range(per_file)]
        entry = {"batch_label": name, "data": data, label_key: labels, "filenames": ["f.png"]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol))
        written[name] = (data, labels)
    (folder / meta_file).write_bytes(pickle.dumps(meta, protocol))
    return written


def test_stratified_split_is_exact_proportional_and_seeded():
    labels = torch.arange(1000) % 7
    parts = _stratified_split(labels, (0.6, 0.15, 0.25), seed=3)
    assert [len(p) for p in parts] == [600, 150, 250]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(1000))  # disjoint, complete
    for part, fraction in zip(parts, (0.6, 0.15, 0.25), strict=True):
        counts = torch.bincount(labels[part], minlength=7)
        expected = fraction * torch.bincount(labels)
        assert (counts - expected).abs().max() <= 1
    assert all(
        torch.equal(a, b)
        for a, b in zip(parts, _stratified_split(labels, (0.6, 0.15, 0.25), 3), strict=True)
    )
    assert not torch.equal(parts[1], _stratified_split(labels, (0.6, 0.15, 0.25), 4)[1])


def test_stratified_split_tiny_classes_still_fill_every_part():
    parts = _stratified_split(torch.arange(200) % 100, (0.9, 0.1), seed=0)
    assert [len(p) for p in parts] == [180, 20]


def test_stratified_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        _stratified_split(torch.zeros(10), (0.5, 0.6), 0)


def test_digits_split_is_fixed_stratified_and_in_unit_box():
    splits = digits()
    sizes = [len(s) for s in (splits.train, splits.calibration, splits.test)]
    assert sum(sizes) == 1797 and sizes == [1078, 270, 449]
    assert splits.num_classes == 10 and splits.input_shape == (1, 8, 8)
    for split in (splits.train, splits.calibration, splits.test):
        images, labels = split.tensors
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.shape[1:] == (1, 8, 8) and 0 <= images.min() and images.max() <= 1
        assert set(labels.tolist()) == set(range(10))
    again = digits()
    assert torch.equal(again.test.tensors[0], splits.test.tensors[0])
    # Together the splits are exactly the whole dataset, class by class.
    full = load_digits()
    labels = torch.cat([s.tensors[1] for s in (splits.train, splits.calibration, splits.test)])
    assert torch.equal(torch.bincount(labels), torch.bincount(torch.tensor(full.target)))
    images = torch.cat([s.tensors[0] for s in (splits.train, splits.calibration, splits.test)])
    assert images.double().sum() * 16 == full.images.sum()


def test_digits_loaders_shuffle_reproducibly():
    splits = digits()
    train, calibration, test = splits.loaders(batch_size=64, seed=1)
    images, labels = next(iter(train))
    assert images.shape == (64, 1, 8, 8) and labels.shape == (64,)
    assert torch.equal(next(iter(splits.loaders(64, seed=1)[0]))[1], labels)
    assert not torch.equal(next(iter(splits.loaders(64, seed=2)[0]))[1], labels)
    assert torch.equal(next(iter(test))[1], splits.test.tensors[1][:64])  # not shuffled
    assert sum(len(y) for _, y in calibration) == len(splits.calibration)


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_folder_loads_in_torchvision_layout(tmp_path, kind):
    per_file = 40 if kind == "cifar10" else 400
    written = write_cifar(tmp_path, kind, per_file)
    load = cifar10 if kind == "cifar10" else cifar100
    splits = load(tmp_path, calibration_fraction=0.1)
    n_train = per_file * (5 if kind == "cifar10" else 1)
    assert len(splits.train) + len(splits.calibration) == n_train
    assert len(splits.calibration) == round(0.1 * n_train)
    assert len(splits.test) == per_file and splits.input_shape == (3, 32, 32)
    assert splits.num_classes == (10 if kind == "cifar10" else 100)
    assert splits.classes[3] == ("c3" if kind == "cifar10" else "f3")
    data, labels = written["test_batch" if kind == "cifar10" else "test"]
    image, label = splits.test[5]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert torch.equal(image, torch.from_numpy(data[5].reshape(3, 32, 32)).float() / 255)
    assert label.item() == labels[5]
    # The calibration split is carved from train with a fixed seed.
    again = load(tmp_path, calibration_fraction=0.1)
    assert torch.equal(again.calibration.images, splits.calibration.images)
    # The dataset folder itself works as root too.
    inner = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(load(inner).test) == per_file


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_missing_folder_says_what_to_put_where(tmp_path, kind):
    load = cifar10 if kind == "cifar10" else cifar100
    folder = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    with pytest.raises(FileNotFoundError, match=folder) as err:
        load(tmp_path / "data")
    message = str(err.value)
    assert str(tmp_path / "data") in message and "tar xzf" in message and "test" in message


def test_cifar_missing_file_is_named(tmp_path):
    write_cifar(tmp_path, "cifar10", per_file=10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: data_batch_3\)"):
        cifar10(tmp_path)


def test_cifar_refuses_foreign_pickles_without_running_them(tmp_path):
    write_cifar(tmp_path, "cifar10", per_file=10)
    payload = pickle.dumps(collections.OrderedDict(data=1))  # any non-array class is refused
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(payload)
    with pytest.raises(ValueError, match="refusing to load collections.OrderedDict"):
        cifar10(tmp_path)


def test_cifar_rejects_wrong_shapes(tmp_path):
    write_cifar(tmp_path, "cifar10", per_file=10)
    entry = {"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps(entry))
    with pytest.raises(ValueError, match=r"data_batch_2: 'data' must be uint8 \[N, 3072\]"):
        cifar10(tmp_path)


def test_as_loader_takes_any_dataset_of_pairs():
    dataset = TensorDataset(torch.rand(10, 3, 4, 4), torch.arange(10))
    images, labels = next(iter(as_loader(dataset, batch_size=4)))
    assert images.shape == (4, 3, 4, 4) and labels.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "dataset, error, match",
    [
        (TensorDataset(torch.rand(4, 3) * 255, torch.arange(4)), ValueError, r"\[0, 1\]"),
        (TensorDataset(torch.rand(4, 3)), TypeError, "pairs"),
        (TensorDataset(torch.zeros(4, 3, dtype=torch.uint8), torch.arange(4)), TypeError, "float"),
    ],
    ids=["unnormalised", "no-labels", "uint8"],
)
def test_as_loader_rejects_wrong_datasets(dataset, error, match):
    with pytest.raises(error, match=match):
        as_loader(dataset, batch_size=2)


def test_as_loader_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        as_loader(TensorDataset(torch.rand(4, 3), torch.arange(4)), batch_size=0)
