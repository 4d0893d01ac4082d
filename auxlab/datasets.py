"""Real image datasets, loaded from local files into memory: digits, Fashion-MNIST, image folders.

Nothing here downloads: every loader reads what is already on disk (or embedded in
scikit-learn) and says how to get it when it is missing. Each loader returns an
:class:`ImageDataset`, a map-style ``torch`` dataset of float32 images in ``[0, 1]`` and int64
labels that plugs straight into ``torch.utils.data.DataLoader`` and
:class:`auxlab.data.IndexedDataset`::

    train = load_fashion_mnist(split="train", coarse=True)       # 5 coarse classes
    train, val = train_val_split(train, val_fraction=0.1, seed=0)  # never select on the test set
    mask = auxlab.HierarchyMask.from_fine_to_coarse(FASHION_MNIST_FINE_TO_COARSE)  # psi = [4, 1, 1, 3, 1]

Every random choice (the digits train/test split, the validation split) takes a ``seed``; the
same seed gives the same split.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "DIGITS_CLASS_NAMES",
    "FASHION_MNIST_CLASS_NAMES",
    "FASHION_MNIST_COARSE_CLASS_NAMES",
    "FASHION_MNIST_FINE_TO_COARSE",
    "FASHION_MNIST_ROOT",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "coarse_labels",
    "load_digits",
    "load_fashion_mnist",
    "load_image_folder",
    "read_idx",
    "stratified_split_indices",
    "train_val_split",
]

DIGITS_CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))
"""Class names of scikit-learn's digits: ``"0"`` to ``"9"``."""

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
"""Where the Debian package ``dataset-fashion-mnist`` puts the Fashion-MNIST files."""

FASHION_MNIST_CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""The 10 fine classes of Fashion-MNIST, in label order (names from the dataset's README)."""

FASHION_MNIST_COARSE_CLASS_NAMES: tuple[str, ...] = ("tops", "bottoms", "dress", "footwear", "bag")
"""The 5 coarse classes of :data:`FASHION_MNIST_FINE_TO_COARSE`, in label order."""

FASHION_MNIST_FINE_TO_COARSE: tuple[int, ...] = (0, 1, 0, 2, 0, 3, 0, 3, 4, 3)
"""Coarse class of each fine Fashion-MNIST label.

tops (0): T-shirt/top, Pullover, Coat, Shirt; bottoms (1): Trouser; dress (2): Dress;
footwear (3): Sandal, Sneaker, Ankle boot; bag (4): Bag. With it,
``HierarchyMask.from_fine_to_coarse(FASHION_MNIST_FINE_TO_COARSE)`` has ``psi = (4, 1, 1, 3, 1)``.
"""

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")
"""File suffixes that :func:`load_image_folder` reads (compared case-insensitively)."""

_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# idx type code -> big-endian NumPy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True, eq=False)
class ImageDataset(Dataset[tuple[Tensor, Tensor]]):
    """Images and labels held in memory; item ``i`` is ``(images[i], labels[i])``.

    Args:
        images: ``(N, C, H, W)`` floating-point images (the loaders give float32 in ``[0, 1]``).
        labels: ``(N,)`` int64 labels of the primary task, in ``[0, len(class_names))``.
        class_names: name of each label, in label order.
        fine_labels: optional ``(N,)`` int64 finer labels (e.g. Fashion-MNIST's 10 classes under its 5
            coarse ones), for the ``"human"`` strategy: ``generator_kwargs={"fine_labels": ds.fine_labels, ...}``.
        fine_class_names: name of each fine label; given exactly when ``fine_labels`` is.

    Examples:
        >>> ds = ImageDataset(torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]), ("a", "b"))
        >>> len(ds), ds.num_classes, ds[1][1].item()
        (4, 2, 1)
    """

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    fine_labels: Tensor | None = None
    fine_class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.class_names, str) or isinstance(self.fine_class_names, str):
            raise TypeError("class_names and fine_class_names must be sequences of names, not one string")
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.fine_class_names is not None:
            object.__setattr__(self, "fine_class_names", tuple(self.fine_class_names))
        if not isinstance(self.images, Tensor):
            raise TypeError(f"images must be a tensor of shape (N, C, H, W), got {type(self.images).__name__}")
        if self.images.dim() != 4 or not self.images.is_floating_point():
            raise ValueError(
                "images must be a floating-point tensor of shape (N, C, H, W), "
                f"got {self.images.dtype} of shape {tuple(self.images.shape)}"
            )
        num = self.images.shape[0]
        _check_labels(self.labels, "labels", num, len(self.class_names))
        if (self.fine_labels is None) != (self.fine_class_names is None):
            raise ValueError("give fine_labels and fine_class_names together, or neither")
        if self.fine_labels is not None and self.fine_class_names is not None:
            _check_labels(self.fine_labels, "fine_labels", num, len(self.fine_class_names))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    @property
    def num_classes(self) -> int:
        """C, the number of primary classes (``len(class_names)``)."""
        return len(self.class_names)

    def subset(self, indices: Tensor | Sequence[int]) -> ImageDataset:
        """The samples at ``indices`` (``(M,)`` integers), in that order, as a new dataset with the same class names."""
        index = torch.as_tensor(indices, dtype=torch.long)
        if index.dim() != 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(index.shape)}")
        return ImageDataset(
            self.images[index],
            self.labels[index],
            self.class_names,
            None if self.fine_labels is None else self.fine_labels[index],
            self.fine_class_names,
        )

    def __repr__(self) -> str:
        fine = "" if self.fine_class_names is None else f", fine_classes={len(self.fine_class_names)}"
        return f"ImageDataset(images={tuple(self.images.shape)}, classes={self.num_classes}{fine})"


def _check_labels(labels: object, name: str, num: int, num_classes: int) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a 1-D int64 tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64 or labels.dim() != 1:
        raise ValueError(f"{name} must be a 1-D int64 tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
    if labels.shape[0] != num:
        raise ValueError(f"{name} has {labels.shape[0]} entries but images has {num}; give one label per image")
    if num and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise ValueError(
            f"{name} has label {bad} but there are {num_classes} class names; labels must lie in [0, {num_classes})"
        )


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_split(split: object, allowed: tuple[str, ...]) -> str:
    if split not in allowed:
        raise ValueError(f"split must be one of {', '.join(repr(s) for s in allowed)}; got {split!r}")
    return str(split)


def _to_images(pixels: np.ndarray, scale: float) -> Tensor:
    """``(N, H, W)`` or ``(N, H, W, C)`` pixel array -> ``(N, C, H, W)`` float32 tensor divided by ``scale``."""
    array = pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)
    images = torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32)
    return images.div_(scale)


# --- splits -------------------------------------------------------------------------------------


def stratified_split_indices(
    labels: Tensor | Sequence[int], *, fraction: float, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Split sample indices into a kept part and a held-out part, class by class, reproducibly.

    The held-out part has ``round(fraction * N)`` samples, shared out among the classes in
    proportion to their sizes (largest remainder; each class within one sample of its exact
    share), drawn at random within each class with ``numpy.random.default_rng(seed)``.

    Args:
        labels: ``(N,)`` integer class labels.
        fraction: share of the samples to hold out, in ``(0, 1)``.
        seed: the same seed gives the same split.

    Returns:
        ``(kept, held)``: two sorted ``(N - M,)`` and ``(M,)`` int64 index tensors, disjoint, that
        together cover ``0 .. N-1``.

    Raises:
        ValueError: if ``fraction`` is outside ``(0, 1)`` or leaves one of the parts empty.
    """
    y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    if y.ndim != 1 or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D sequence of integers, got {y.dtype} of shape {y.shape}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"fraction must be a number in (0, 1), got {fraction!r}")
    rng = np.random.default_rng(_check_seed(seed))
    total = int(y.size)
    num_held = round(fraction * total)
    if not 0 < num_held < total:
        raise ValueError(
            f"fraction={fraction} of {total} samples holds out {num_held}, leaving one part empty; "
            "use a fraction that gives each part at least one sample"
        )
    classes, counts = np.unique(y, return_counts=True)
    # Largest-remainder apportionment in exact integer arithmetic: class c gets floor or ceil of num_held * n_c / N.
    shares = num_held * counts
    held_counts = shares // total
    leftover = num_held - int(held_counts.sum())
    by_remainder = np.argsort(-(shares % total), kind="stable")
    held_counts[by_remainder[:leftover]] += 1
    held = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, held_counts)]
    held_mask = np.zeros(total, dtype=bool)
    held_mask[np.concatenate(held)] = True
    return torch.from_numpy(np.flatnonzero(~held_mask)), torch.from_numpy(np.flatnonzero(held_mask))


def train_val_split(
    dataset: ImageDataset, *, val_fraction: float = 0.1, seed: int = 0
) -> tuple[ImageDataset, ImageDataset]:
    """Carve a validation set out of a training set, stratified by ``dataset.labels``.

    Use the validation set for model selection (early stopping, hyper-parameters) so that the test
    set is touched only once, for the final number. See :func:`stratified_split_indices` for how the
    samples are drawn.

    Args:
        dataset: the training set, ``N`` samples.
        val_fraction: share of the samples that go to the validation set, in ``(0, 1)``.
        seed: the same seed gives the same split.

    Returns:
        ``(train, val)`` with ``N - round(val_fraction * N)`` and ``round(val_fraction * N)``
        samples, each in the original order, sharing ``dataset``'s class names.
    """
    kept, held = stratified_split_indices(dataset.labels, fraction=val_fraction, seed=seed)
    return dataset.subset(kept), dataset.subset(held)


def coarse_labels(fine_labels: Tensor | Sequence[int], fine_to_coarse: Sequence[int]) -> Tensor:
    """Map fine labels to coarse ones: ``coarse[i] = fine_to_coarse[fine_labels[i]]``.

    Args:
        fine_labels: ``(N,)`` integer labels in ``[0, len(fine_to_coarse))``.
        fine_to_coarse: coarse class of each fine label, e.g. :data:`FASHION_MNIST_FINE_TO_COARSE`.

    Returns:
        ``(N,)`` int64 coarse labels, on ``fine_labels``' device.
    """
    fine = torch.as_tensor(fine_labels)
    if fine.dim() != 1 or fine.dtype.is_floating_point or fine.dtype == torch.bool:
        raise ValueError(
            f"fine_labels must be a 1-D tensor of integer labels, got {fine.dtype} of shape {tuple(fine.shape)}"
        )
    table = torch.as_tensor(list(fine_to_coarse), dtype=torch.long, device=fine.device)
    if table.dim() != 1 or table.numel() == 0:
        raise ValueError("fine_to_coarse must be a non-empty sequence of integers")
    if fine.numel() and (int(fine.min()) < 0 or int(fine.max()) >= table.numel()):
        bad = int(fine.min()) if int(fine.min()) < 0 else int(fine.max())
        raise ValueError(
            f"fine_labels has label {bad} but fine_to_coarse names {table.numel()} fine labels; labels must lie in [0, {table.numel()})"
        )
    return table[fine.long()]


# --- scikit-learn digits ------------------------------------------------------------------------


def load_digits(
    *, split: Literal["train", "test", "all"] = "train", test_fraction: float = 0.25, seed: int = 0
) -> ImageDataset:
    """scikit-learn's embedded 8x8 handwritten digits: 1,797 images, 10 classes, no download.

    The train/test split is stratified and fixed by ``seed`` (see :func:`stratified_split_indices`):
    ``split="train"`` and ``split="test"`` with the same ``test_fraction`` and ``seed`` are disjoint
    and together give all 1,797 samples (1,348 and 449 with the defaults).

    Args:
        split: ``"train"``, ``"test"`` or ``"all"`` (every sample, in scikit-learn's order).
        test_fraction: share of the samples in the test split, in ``(0, 1)``.
        seed: seed of the train/test split.

    Returns:
        An :class:`ImageDataset` with ``images`` ``(N, 1, 8, 8)`` float32 in ``[0, 1]`` (the raw
        0..16 grey levels divided by 16), ``labels`` ``(N,)`` int64 in ``[0, 10)`` and
        ``class_names`` :data:`DIGITS_CLASS_NAMES`.

    Raises:
        ImportError: if scikit-learn is not installed.
    """
    which = _check_split(split, ("train", "test", "all"))
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits  # type: ignore[import-untyped]
    except ImportError as error:
        raise ImportError(
            'load_digits needs scikit-learn, which is not installed: pip install "auxlab[examples]" (or pip install scikit-learn)'
        ) from error
    bunch = sklearn_load_digits()
    images = _to_images(np.asarray(bunch.images), 16.0)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    dataset = ImageDataset(images, labels, DIGITS_CLASS_NAMES)
    if which == "all":
        return dataset
    train, test = stratified_split_indices(labels, fraction=test_fraction, seed=seed)
    return dataset.subset(train if which == "train" else test)


# --- idx files and Fashion-MNIST ----------------------------------------------------------------


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one file in the idx format of MNIST and Fashion-MNIST, gzip-compressed or not.

    The header is checked against the file: two zero bytes, a known type code, the number of
    dimensions, then one big-endian int32 size per dimension; the data must fill exactly the
    product of the sizes.

    Args:
        path: the file (gzip is recognised by its content, not its name).

    Returns:
        The array, with the shape of the header's sizes and the dtype of its type code
        (``uint8`` for MNIST-style images and labels), in native byte order.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a valid idx file, or is truncated or corrupt.
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as error:
            raise ValueError(f"{path} is a corrupt or truncated gzip file ({error}); fetch it again") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or data[3] == 0:
        raise ValueError(
            f"{path} is not an idx file: its magic number is 0x{data[:4].hex() or 'empty'}, expected 0x0000TTDD "
            "with a type code TT in {08, 09, 0b, 0c, 0d, 0e} and DD >= 1 dimensions (e.g. 0x00000803 for images)"
        )
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{path} is truncated: its header announces {ndim} dimensions but the file has only {len(data)} bytes"
        )
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "longer than its header says"
        raise ValueError(
            f"{path} is {problem}: shape {shape} of {dtype.name} needs {expected} bytes, the file has {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # a writable copy in native byte order


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    files = ", ".join(f"{name}.gz" for pair in _FASHION_MNIST_FILES.values() for name in pair)
    where = f"{root} has no {stem}.gz" if root.is_dir() else f"the directory {root} does not exist"
    raise FileNotFoundError(
        f"Fashion-MNIST not found: {where}. Install it with `apt-get install -y dataset-fashion-mnist` "
        f"(Debian/Ubuntu; the files go to {FASHION_MNIST_ROOT}), or pass root= a directory holding "
        f"{files} (gzip-compressed or not), as published at github.com/zalandoresearch/fashion-mnist. "
        "auxlab never downloads data."
    )


def load_fashion_mnist(
    root: str | os.PathLike[str] = FASHION_MNIST_ROOT,
    *,
    split: Literal["train", "test"] = "train",
    coarse: bool = False,
) -> ImageDataset:
    """Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017) from local idx files: 28x28 grey images, 10 classes.

    Reads ``train-*`` (60,000 images) or ``t10k-*`` (10,000 images) from ``root``; the default
    ``root`` is where the Debian package ``dataset-fashion-mnist`` installs them.

    Args:
        root: directory holding ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
            ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz`` (or the same without ``.gz``).
        split: ``"train"`` or ``"test"``.
        coarse: if True, the primary task is the 5 coarse classes of
            :data:`FASHION_MNIST_FINE_TO_COARSE` (tops, bottoms, dress, footwear, bag) and the 10
            fine classes come along as ``fine_labels``, the "human" auxiliary labels.

    Returns:
        An :class:`ImageDataset` with ``images`` ``(N, 1, 28, 28)`` float32 in ``[0, 1]`` and
        ``labels`` ``(N,)`` int64: fine labels in ``[0, 10)`` named by
        :data:`FASHION_MNIST_CLASS_NAMES`, or with ``coarse=True`` coarse labels in ``[0, 5)``
        named by :data:`FASHION_MNIST_COARSE_CLASS_NAMES` plus ``fine_labels``.

    Raises:
        FileNotFoundError: if ``root`` or one of the split's two files is missing; the message says
            how to install them.
        ValueError: if a file is corrupt, truncated, or not shaped like Fashion-MNIST.
    """
    which = _check_split(split, ("train", "test"))
    root = Path(root)
    images_stem, labels_stem = _FASHION_MNIST_FILES[which]
    images_path, labels_path = _find_idx(root, images_stem), _find_idx(root, labels_stem)
    pixels, fine = read_idx(images_path), read_idx(labels_path)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[1:] != (28, 28):
        raise ValueError(
            f"{images_path} should hold uint8 images of shape (N, 28, 28), got {pixels.dtype} of shape {pixels.shape}"
        )
    if fine.dtype != np.uint8 or fine.ndim != 1 or fine.shape[0] != pixels.shape[0]:
        raise ValueError(
            f"{labels_path} should hold {pixels.shape[0]} uint8 labels to match {images_path.name}, "
            f"got {fine.dtype} of shape {fine.shape}"
        )
    if fine.size and int(fine.max()) >= len(FASHION_MNIST_CLASS_NAMES):
        raise ValueError(f"{labels_path} has label {int(fine.max())}; Fashion-MNIST labels lie in [0, 10)")
    images = _to_images(pixels, 255.0)
    fine_labels = torch.from_numpy(fine.astype(np.int64))
    if not coarse:
        return ImageDataset(images, fine_labels, FASHION_MNIST_CLASS_NAMES)
    return ImageDataset(
        images,
        coarse_labels(fine_labels, FASHION_MNIST_FINE_TO_COARSE),
        FASHION_MNIST_COARSE_CLASS_NAMES,
        fine_labels,
        FASHION_MNIST_CLASS_NAMES,
    )


# --- image folders ------------------------------------------------------------------------------


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    split: str | None = "train",
    mode: Literal["L", "RGB"] = "RGB",
    size: int | tuple[int, int] | None = None,
) -> ImageDataset:
    """Images stored one file each as ``root/<split>/<class>/<image>.png``, read with Pillow.

    This is the usual layout of image dumps of CIFAR-10, MNIST, SVHN and the like. Class names
    are the class folders' names sorted alphabetically, and label ``i`` is ``class_names[i]``.
    Files with a suffix in :data:`IMAGE_EXTENSIONS` are read in name order; other files and hidden
    entries (starting with ``.``) are skipped.

    Args:
        root: the dataset directory.
        split: sub-directory of ``root`` to read (``"train"``, ``"test"``, ...); None reads class
            folders directly under ``root``.
        mode: ``"L"`` for 1 grey channel or ``"RGB"`` for 3 channels; every image is converted.
        size: resize every image (bilinear) to ``size x size``, or to ``(height, width)``; None keeps
            the files' size, which must then be the same for all images.

    Returns:
        An :class:`ImageDataset` with ``images`` ``(N, C, H, W)`` float32 in ``[0, 1]`` (C = 1 for
        ``"L"``, 3 for ``"RGB"``), ``labels`` ``(N,)`` int64 and ``class_names`` sorted.

    Raises:
        ImportError: if Pillow is not installed.
        FileNotFoundError: if ``root`` or ``root/split`` does not exist.
        ValueError: if there are no class folders, a class folder holds no image, an image cannot
            be read, or images differ in size and ``size`` is None.
    """
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' (grey, 1 channel) or 'RGB' (3 channels), got {mode!r}")
    target = _check_size(size)
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as error:
        raise ImportError(
            'load_image_folder needs Pillow, which is not installed: pip install "auxlab[images]" (or pip install pillow)'
        ) from error

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {root} does not exist or is not a directory")
    folder = root if split is None else root / split
    if not folder.is_dir():
        splits = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise FileNotFoundError(
            f"split {split!r} not found: {folder} is not a directory; the splits under {root} are {splits}"
        )
    class_dirs = sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name
    )
    if not class_dirs:
        raise ValueError(
            f"{folder} holds no class folders; expected one sub-directory of images per class, {folder}/<class>/<image>.png"
        )

    resample = getattr(Image, "Resampling", Image).BILINEAR
    pixels: list[np.ndarray] = []
    labels: list[int] = []
    first: Path | None = None
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            (
                p
                for p in class_dir.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
            ),
            key=lambda p: p.name,
        )
        if not files:
            raise ValueError(
                f"class folder {class_dir} holds no images; expected files ending in {', '.join(IMAGE_EXTENSIONS)}"
            )
        for file in files:
            try:
                with Image.open(file) as image:
                    converted = image.convert(mode)
            except (UnidentifiedImageError, OSError) as error:
                raise ValueError(f"cannot read image {file}: {error}") from error
            if target is not None and converted.size != (target[1], target[0]):
                converted = converted.resize((target[1], target[0]), resample=resample)
            array = np.asarray(converted, dtype=np.uint8)
            if first is not None and array.shape != pixels[0].shape:
                raise ValueError(
                    f"images differ in size: {first} is {pixels[0].shape[1]}x{pixels[0].shape[0]} (width x height) but "
                    f"{file} is {array.shape[1]}x{array.shape[0]}; pass size=(height, width) to resize them all"
                )
            if first is None:
                first = file
            pixels.append(array)
            labels.append(label)
    return ImageDataset(
        _to_images(np.stack(pixels), 255.0),
        torch.tensor(labels, dtype=torch.long),
        tuple(p.name for p in class_dirs),
    )


def _check_size(size: object) -> tuple[int, int] | None:
    """``None``, ``s`` or ``(h, w)`` -> ``None`` or ``(h, w)`` with positive integers."""
    if size is None:
        return None
    pair = (size, size) if isinstance(size, (int, np.integer)) else size
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in pair)
    ):
        raise ValueError(
            f"size must be a positive integer or a (height, width) pair of positive integers, got {size!r}"
        )
    return int(pair[0]), int(pair[1])
