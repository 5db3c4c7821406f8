"""Datasets as ``(image, label)`` pairs with images in ``[0, 1]``, split train/calibration/test.

Attacks clip to the ``[0, 1]`` box, so images stay unnormalised here (normalise inside the
model). The calibration split is held out from the training data, class by class with a fixed
seed, so MixedNUTS calibration and policy validation never touch the test split and every run
sees the same split.

- :func:`digits`: scikit-learn's bundled 8×8 digits, the embedded default (no download).
- :func:`cifar10` / :func:`cifar100`: a local folder in torchvision's format.
- :func:`as_loader`: any ``Dataset`` of ``(image, label)`` pairs.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["Splits", "as_loader", "cifar10", "cifar100", "digits", "split_names"]

# The attribute that names the split a dataset of :class:`Splits` is (``"train"``, ...).
SPLIT_TAG = "adasmooth_split"


@dataclass(frozen=True)
class Splits:
    """The three splits of one dataset and what a model needs to know about them."""

    train: Dataset
    calibration: Dataset
    test: Dataset
    classes: list[str]
    input_shape: tuple[int, ...]  # one image, [C, H, W]

    def __post_init__(self) -> None:
        # Tag each dataset with its split, so that code that must never see the test split
        # (MixedNUTS calibration) can refuse it however it is wrapped (see split_names).
        for name in ("train", "calibration", "test"):
            setattr(getattr(self, name), SPLIT_TAG, name)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def loaders(self, batch_size: int, seed: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
        """Train (shuffled with ``seed``), calibration and test loaders."""
        return (
            as_loader(self.train, batch_size, shuffle=True, seed=seed),
            as_loader(self.calibration, batch_size),
            as_loader(self.test, batch_size),
        )


def as_loader(
    dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A ``DataLoader`` over any dataset of ``(image, label)`` pairs, images in ``[0, 1]``.

    The first item is checked up front, so a wrong dataset fails here with a clear message
    rather than deep inside an attack. Shuffling draws from its own seeded generator, so the
    batch order is reproducible and independent of the global RNG.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len(dataset) > 0:
        _check_item(dataset[0])
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def split_names(data: object) -> set[str]:
    """The :class:`Splits` tags found in ``data``: a loader, a dataset, or wrappers of them
    (``Subset``, ``ConcatDataset``, a ``DataLoader``'s ``dataset``), searched all the way down."""
    names, stack, seen = set(), [data], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        tag = getattr(item, SPLIT_TAG, None)
        if isinstance(tag, str):
            names.add(tag)
        inner = getattr(item, "dataset", None)
        stack += [inner] if inner is not None else []
        stack += list(getattr(item, "datasets", None) or [])
    return names


def _check_item(item: object) -> None:
    if not (isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], Tensor)):
        raise TypeError(
            "dataset items must be (image tensor, label) pairs; "
            f"the first item is {type(item).__name__}"
        )
    image = item[0]
    if not image.is_floating_point() or image.numel() == 0:
        raise TypeError(f"images must be non-empty float tensors, got {image.dtype}")
    lo, hi = image.min().item(), image.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(
            f"images must lie in [0, 1] (attacks clip to that box), the first lies in "
            f"[{lo:.3g}, {hi:.3g}]: drop Normalize from the transform and normalise in the model"
        )


class _Images(Dataset):
    """uint8 ``[N, C, H, W]`` images kept compact in memory, served as float32 in ``[0, 1]``."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index].float().div_(255), self.labels[index]


def _stratified_split(labels: Tensor, fractions: Sequence[float], seed: int) -> list[Tensor]:
    """Indices of each part, cut by ``fractions`` from a seeded, class-interleaved permutation.

    Each item's place is its quantile within its own class, so every part gets each class in
    proportion (to within one item) and the part sizes are exact, even for tiny classes.
    """
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    _, classes, counts = labels[perm].unique(return_inverse=True, return_counts=True)
    grouped = torch.argsort(classes, stable=True)
    rank = torch.empty_like(perm)
    rank[grouped] = torch.arange(len(perm)) - (counts.cumsum(0) - counts)[classes[grouped]]
    order = perm[torch.argsort((rank + 0.5) / counts[classes], stable=True)]
    cuts = torch.tensor(fractions, dtype=torch.float64).cumsum(0)[:-1] * len(order)
    return [part.sort().values for part in torch.tensor_split(order, cuts.round().long().tolist())]


def digits(seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.15, 0.25)) -> Splits:
    """scikit-learn's bundled digits (1797 images, 1×8×8, 10 classes), split per class.

    ``fractions`` are the train/calibration/test shares; the default split is fixed by
    ``seed = 0``, so results are comparable across runs and machines.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).div_(16).unsqueeze(1)
    labels = torch.tensor(data.target, dtype=torch.int64)
    train, calibration, test = (
        TensorDataset(images[idx], labels[idx])
        for idx in _stratified_split(labels, fractions, seed)
    )
    classes = [str(c) for c in data.target_names]
    return Splits(train, calibration, test, classes, tuple(images.shape[1:]))


@dataclass(frozen=True)
class _CifarFormat:
    name: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    archive: str


_CIFAR10 = _CifarFormat(
    name="CIFAR-10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    archive="cifar-10-python.tar.gz",
)
_CIFAR100 = _CifarFormat(
    name="CIFAR-100",
    folder="cifar-100-python",
    train_files=("train",),
    test_file="test",
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    archive="cifar-100-python.tar.gz",
)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's files but refuses to build anything but numpy arrays (and bytes)."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes, in protocol-2 pickles written by Python 3
        *((f"numpy.{core}.multiarray", "_reconstruct") for core in ("core", "_core")),
        *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a CIFAR file")
        return super().find_class(module, name)


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"{path} is not a readable CIFAR file: {err}") from err
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is not a CIFAR file: it holds a {type(entry).__name__}")
    return entry


def _read_batches(
    fmt: _CifarFormat, folder: str, files: Sequence[str], num_classes: int
) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for name in files:
        path = os.path.join(folder, name)
        entry = _unpickle(path)
        if "data" not in entry or fmt.label_key not in entry:
            raise ValueError(f"{path} lacks 'data' or '{fmt.label_key}': not a {fmt.name} file")
        data = np.asarray(entry["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}"
            )
        if len(entry[fmt.label_key]) != len(data):
            raise ValueError(f"{path}: {len(data)} images but {len(entry[fmt.label_key])} labels")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.tensor(entry[fmt.label_key], dtype=torch.int64))
    labels = torch.cat(labels)
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise ValueError(f"{fmt.name} labels in {folder} fall outside [0, {num_classes})")
    return torch.cat(images), labels


def _cifar(
    fmt: _CifarFormat, root: str | os.PathLike, calibration_fraction: float, seed: int
) -> Splits:
    if not 0 <= calibration_fraction < 1:
        raise ValueError(f"calibration_fraction must be in [0, 1), got {calibration_fraction}")
    root = os.fspath(root)
    # Accept the dataset folder itself as well as its parent (torchvision's `root`).
    is_folder = os.path.basename(os.path.normpath(root)) == fmt.folder
    folder = root if is_folder else os.path.join(root, fmt.folder)
    expected = [*fmt.train_files, fmt.test_file, fmt.meta_file]
    missing = [f for f in expected if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        where = os.path.dirname(os.path.normpath(folder))
        raise FileNotFoundError(
            f"{fmt.name} not found: expected the folder {folder} holding {', '.join(expected)} "
            f"(missing: {', '.join(missing)}). Download {fmt.archive} from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {where} "
            f"(tar xzf {fmt.archive} -C {where}); nothing is downloaded at run time."
        )
    meta = _unpickle(os.path.join(folder, fmt.meta_file))
    if fmt.names_key not in meta:
        raise ValueError(f"{os.path.join(folder, fmt.meta_file)} lacks '{fmt.names_key}'")
    classes = [str(c) for c in meta[fmt.names_key]]
    images, labels = _read_batches(fmt, folder, fmt.train_files, len(classes))
    fractions = (1 - calibration_fraction, calibration_fraction)
    train, calibration = (
        _Images(images[idx], labels[idx]) for idx in _stratified_split(labels, fractions, seed)
    )
    test = _Images(*_read_batches(fmt, folder, [fmt.test_file], len(classes)))
    return Splits(train, calibration, test, classes, (3, 32, 32))


def cifar10(root: str | os.PathLike, calibration_fraction: float = 0.1, seed: int = 0) -> Splits:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (torchvision's layout, never downloaded).

    ``calibration_fraction`` of each class of the training batches becomes the calibration
    split (fixed by ``seed``); the test batch is the test split.
    """
    return _cifar(_CIFAR10, root, calibration_fraction, seed)


def cifar100(root: str | os.PathLike, calibration_fraction: float = 0.1, seed: int = 0) -> Splits:
    """CIFAR-100 (fine labels) from ``root/cifar-100-python``; see :func:`cifar10`."""
    return _cifar(_CIFAR100, root, calibration_fraction, seed)
