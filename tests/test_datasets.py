"""Tests of auxlab.datasets: digits, idx files and Fashion-MNIST, image folders, splits."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from auxlab import HierarchyMask
from auxlab.data import IndexedDataset
from auxlab.datasets import (
    DIGITS_CLASS_NAMES,
    FASHION_MNIST_CLASS_NAMES,
    FASHION_MNIST_COARSE_CLASS_NAMES,
    FASHION_MNIST_FINE_TO_COARSE,
    FASHION_MNIST_ROOT,
    ImageDataset,
    coarse_labels,
    load_digits,
    load_fashion_mnist,
    load_image_folder,
    read_idx,
    stratified_split_indices,
    train_val_split,
)

HAS_FASHION_MNIST = (Path(FASHION_MNIST_ROOT) / "t10k-images-idx3-ubyte.gz").is_file()

_IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx encoding of ``array`` (big-endian), header included."""
    big = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, _IDX_CODES[big.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + big.tobytes()


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def block_sizes(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()


# --- ImageDataset -------------------------------------------------------------------------------


def toy_dataset(num: int = 12, num_classes: int = 3) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(num) % num_classes
    return ImageDataset(torch.rand(num, 1, 4, 4, generator=g), labels, tuple(f"c{i}" for i in range(num_classes)))


def test_image_dataset_is_a_map_style_dataset() -> None:
    ds = toy_dataset()
    assert len(ds) == 12 and ds.num_classes == 3
    x, y = ds[4]
    assert x.shape == (1, 4, 4) and y.item() == 1
    xb, yb = next(iter(DataLoader(ds, batch_size=5)))
    assert xb.shape == (5, 1, 4, 4) and yb.dtype == torch.int64
    xb, yb, ib = next(
        iter(DataLoader(IndexedDataset(ds), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(0)))
    )
    assert torch.equal(yb, ds.labels[ib]) and torch.equal(xb, ds.images[ib])


def test_image_dataset_subset_keeps_names_and_fine_labels() -> None:
    names: Any = ["a", "b"]  # lists are accepted and stored as tuples
    fine_names: Any = ["f0", "f1", "f2"]
    ds = ImageDataset(
        torch.zeros(4, 1, 2, 2), torch.tensor([0, 0, 1, 1]), names, torch.tensor([0, 1, 2, 2]), fine_names
    )
    assert ds.class_names == ("a", "b") and ds.fine_class_names == ("f0", "f1", "f2")
    sub = ds.subset([3, 0])
    assert sub.labels.tolist() == [1, 0] and sub.fine_labels is not None and sub.fine_labels.tolist() == [2, 0]
    assert sub.class_names == ds.class_names and "classes=2" in repr(sub)


def test_image_dataset_rejects_wrong_types() -> None:
    with pytest.raises(TypeError, match="not one string"):
        ImageDataset(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), "ab")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="images must be a tensor"):
        ImageDataset(np.zeros((2, 1, 2, 2)), torch.tensor([0, 1]), ("a", "b"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="labels must be a 1-D int64 tensor, got list"):
        ImageDataset(torch.zeros(2, 1, 2, 2), [0, 1], ("a", "b"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images": torch.zeros(4, 2, 2)}, "shape \\(N, C, H, W\\)"),
        ({"images": torch.zeros(4, 1, 2, 2, dtype=torch.uint8)}, "floating-point"),
        ({"labels": torch.tensor([0, 1, 0])}, "3 entries but images has 4"),
        ({"labels": torch.tensor([0, 1, 0, 2])}, "label 2 but there are 2 class names"),
        ({"labels": torch.tensor([0.0, 1.0, 0.0, 1.0])}, "int64"),
        ({"fine_labels": torch.tensor([0, 1, 2, 3])}, "together"),
        (
            {"fine_labels": torch.tensor([0, 1, 2, 3]), "fine_class_names": ("x", "y")},
            "fine_labels has label 3 but there are 2 class names",
        ),
    ],
)
def test_image_dataset_rejects_bad_fields(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {
        "images": torch.zeros(4, 1, 2, 2),
        "labels": torch.tensor([0, 1, 0, 1]),
        "class_names": ("a", "b"),
    }
    fields.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ImageDataset(**fields)  # type: ignore[arg-type]


# --- splits -------------------------------------------------------------------------------------


@given(
    labels=st.lists(st.integers(0, 4), min_size=2, max_size=80),
    fraction=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**32),
)
def test_stratified_split_is_a_deterministic_stratified_partition(
    labels: list[int], fraction: float, seed: int
) -> None:
    total = len(labels)
    num_held = round(fraction * total)
    assume(0 < num_held < total)
    kept, held = stratified_split_indices(labels, fraction=fraction, seed=seed)
    assert kept.dtype == held.dtype == torch.int64
    assert len(held) == num_held and len(kept) == total - num_held
    assert torch.equal(torch.sort(torch.cat([kept, held])).values, torch.arange(total))  # disjoint and covering
    assert torch.equal(kept, kept.sort().values) and torch.equal(held, held.sort().values)
    y = torch.tensor(labels)
    for c in set(labels):
        count = int((y == c).sum())
        share = num_held * count / total
        assert int((y[held] == c).sum()) in (int(np.floor(share)), int(np.ceil(share)))
    again = stratified_split_indices(torch.tensor(labels), fraction=fraction, seed=seed)
    assert torch.equal(again[0], kept) and torch.equal(again[1], held)


def test_stratified_split_depends_on_the_seed() -> None:
    labels = torch.arange(200) % 4
    a = stratified_split_indices(labels, fraction=0.3, seed=0)[1]
    b = stratified_split_indices(labels, fraction=0.3, seed=1)[1]
    assert len(a) == len(b) == 60 and not torch.equal(a, b)


@pytest.mark.parametrize(
    ("labels", "fraction", "seed", "message"),
    [
        ([0, 1, 0, 1], 0.0, 0, "fraction must be a number in \\(0, 1\\)"),
        ([0, 1, 0, 1], 1.0, 0, "fraction must be a number in \\(0, 1\\)"),
        ([0, 1, 0, 1], 0.1, 0, "holds out 0"),
        ([0, 1, 0, 1], 0.9, 0, "holds out 4"),
        ([0, 1, 0, 1], 0.5, -1, "seed must be a non-negative integer"),
        ([0.5, 1.0], 0.5, 0, "integers"),
        ([], 0.5, 0, "non-empty"),
    ],
)
def test_stratified_split_rejects_bad_arguments(labels: list[float], fraction: float, seed: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stratified_split_indices(labels, fraction=fraction, seed=seed)  # type: ignore[arg-type]


def test_train_val_split_partitions_a_dataset() -> None:
    ds = ImageDataset(
        torch.arange(40, dtype=torch.float32).reshape(40, 1, 1, 1),
        torch.arange(40) % 2,
        ("even", "odd"),
        torch.arange(40) % 4,
        ("f0", "f1", "f2", "f3"),
    )
    train, val = train_val_split(ds, val_fraction=0.25, seed=3)
    assert len(train) == 30 and len(val) == 10
    ids = torch.cat([train.images.flatten(), val.images.flatten()]).long()
    assert torch.equal(ids.sort().values, torch.arange(40))
    assert block_sizes(val.labels, 2) == [5, 5]
    assert val.fine_labels is not None and torch.equal(val.fine_labels, ds.fine_labels[val.images.flatten().long()])  # type: ignore[index]
    again_train, again_val = train_val_split(ds, val_fraction=0.25, seed=3)
    assert torch.equal(again_val.images, val.images) and torch.equal(again_train.labels, train.labels)


# --- digits -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_all() -> ImageDataset:
    pytest.importorskip("sklearn")
    return load_digits(split="all")


def test_digits_shape_range_and_classes(digits_all: ImageDataset) -> None:
    assert digits_all.images.shape == (1797, 1, 8, 8) and digits_all.images.dtype == torch.float32
    assert digits_all.labels.shape == (1797,) and digits_all.labels.dtype == torch.int64
    assert float(digits_all.images.min()) == 0.0 and float(digits_all.images.max()) == 1.0
    assert digits_all.class_names == DIGITS_CLASS_NAMES and set(digits_all.labels.tolist()) == set(range(10))


def test_digits_split_is_deterministic_disjoint_and_stratified(digits_all: ImageDataset) -> None:
    train, test = load_digits(split="train"), load_digits(split="test")
    assert len(train) == 1348 and len(test) == 449
    kept, held = stratified_split_indices(digits_all.labels, fraction=0.25, seed=0)
    assert torch.equal(train.images, digits_all.images[kept]) and torch.equal(test.labels, digits_all.labels[held])
    total = block_sizes(digits_all.labels, 10)
    for count, held_count in zip(total, block_sizes(test.labels, 10)):
        assert abs(held_count - 449 * count / 1797) < 1
    assert torch.equal(load_digits(split="test").images, test.images)
    other = load_digits(split="test", seed=1)
    assert not torch.equal(other.labels, test.labels) or not torch.equal(other.images, test.images)
    assert len(load_digits(split="test", test_fraction=0.5)) == round(0.5 * 1797)


def test_digits_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="split must be one of 'train', 'test', 'all'; got 'val'"):
        load_digits(split="val")  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match='pip install "auxlab\\[examples\\]"'):
        load_digits()


# --- idx files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_reads_images_labels_and_wide_types(tmp_path: Path, compress: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = read_idx(write_idx(tmp_path / "images.idx", images, compress=compress))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4) and np.array_equal(out, images)
    assert out.flags.writeable
    wide = np.array([-70000, 1, 2**31 - 1], dtype=np.int32)
    out = read_idx(write_idx(tmp_path / "wide.idx", wide, compress=compress))
    assert out.dtype == np.int32 and out.dtype.isnative and np.array_equal(out, wide)
    floats = np.array([[0.5, -1.25]], dtype=np.float64)
    assert np.array_equal(read_idx(write_idx(tmp_path / "f.idx", floats, compress=compress)), floats)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    good = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    cases = {
        "wrong_magic": (gzip.compress(b"\x12\x34" + good[2:]), "not an idx file: its magic number is 0x1234"),
        "unknown_type": (gzip.compress(good[:2] + b"\x07" + good[3:]), "not an idx file"),
        "zero_dims": (good[:3] + b"\x00", "not an idx file"),
        "empty": (b"", "magic number is 0xempty"),
        "short_header": (good[:10], "announces 3 dimensions"),
        "truncated_data": (
            gzip.compress(good[:-5]),
            "is truncated: shape \\(3, 28, 28\\) of uint8 needs 2368 bytes, the file has 2363",
        ),
        "trailing_data": (gzip.compress(good + b"\x00"), "longer than its header says"),
        "truncated_gzip": (gzip.compress(good)[:-12], "corrupt or truncated gzip"),
        "corrupt_gzip": (gzip.compress(good)[:10] + b"\xff" * 40, "corrupt or truncated gzip"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.gz"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message):
            read_idx(path)
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "missing.gz")


# --- Fashion-MNIST ------------------------------------------------------------------------------


def fake_fashion_mnist(
    root: Path, *, num: int = 6, image_shape: tuple[int, int] = (28, 28), num_labels: int | None = None
) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        pixels = rng.integers(0, 256, size=(num, *image_shape), dtype=np.uint8)
        pixels[0, 0, 0], pixels[0, 0, 1] = 0, 255
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", pixels)
        write_idx(
            root / f"{prefix}-labels-idx1-ubyte.gz",
            (np.arange(num if num_labels is None else num_labels) % 10).astype(np.uint8),
        )
    return root


def test_fashion_mnist_from_a_directory(tmp_path: Path) -> None:
    root = fake_fashion_mnist(tmp_path / "fm", num=12)
    fine = load_fashion_mnist(root, split="test")
    assert fine.images.shape == (12, 1, 28, 28) and fine.images.dtype == torch.float32
    assert float(fine.images.min()) == 0.0 and float(fine.images.max()) == 1.0
    assert fine.labels.dtype == torch.int64 and fine.labels.tolist() == [i % 10 for i in range(12)]
    assert fine.class_names == FASHION_MNIST_CLASS_NAMES and fine.fine_labels is None
    coarse = load_fashion_mnist(str(root), split="train", coarse=True)
    assert (
        coarse.class_names == FASHION_MNIST_COARSE_CLASS_NAMES and coarse.fine_class_names == FASHION_MNIST_CLASS_NAMES
    )
    assert coarse.fine_labels is not None and coarse.fine_labels.tolist() == fine.labels.tolist()
    assert coarse.labels.tolist() == [FASHION_MNIST_FINE_TO_COARSE[i % 10] for i in range(12)]
    # Uncompressed files are found too.
    for path in root.iterdir():
        path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    assert torch.equal(load_fashion_mnist(root, split="test").images, fine.images)


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist") as info:
        load_fashion_mnist(tmp_path / "nowhere")
    assert (
        "does not exist" in str(info.value)
        and "root=" in str(info.value)
        and "train-images-idx3-ubyte.gz" in str(info.value)
    )
    root = fake_fashion_mnist(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    load_fashion_mnist(root, split="train")
    with pytest.raises(FileNotFoundError, match="has no t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist(root, split="test")
    with pytest.raises(ValueError, match="split must be one of 'train', 'test'"):
        load_fashion_mnist(root, split="val")  # type: ignore[arg-type]


def test_fashion_mnist_rejects_files_of_the_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape \\(N, 28, 28\\), got uint8 of shape \\(6, 27, 28\\)"):
        load_fashion_mnist(fake_fashion_mnist(tmp_path / "a", image_shape=(27, 28)))
    with pytest.raises(ValueError, match="should hold 6 uint8 labels"):
        load_fashion_mnist(fake_fashion_mnist(tmp_path / "b", num_labels=5))
    root = fake_fashion_mnist(tmp_path / "c")
    write_idx(root / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4, 10], dtype=np.uint8))
    with pytest.raises(ValueError, match="has label 10"):
        load_fashion_mnist(root)
    path = root / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupt or truncated gzip"):
        load_fashion_mnist(root)


@pytest.mark.skipif(
    not HAS_FASHION_MNIST,
    reason=f"Fashion-MNIST not installed at {FASHION_MNIST_ROOT} (apt-get install -y dataset-fashion-mnist)",
)
def test_real_fashion_mnist_test_split() -> None:
    ds = load_fashion_mnist(split="test", coarse=True)
    assert ds.images.shape == (10000, 1, 28, 28) and ds.images.dtype == torch.float32
    assert float(ds.images.min()) == 0.0 and float(ds.images.max()) == 1.0
    assert ds.fine_labels is not None and block_sizes(ds.fine_labels, 10) == [1000] * 10
    assert block_sizes(ds.labels, 5) == [4000, 1000, 1000, 3000, 1000]


# --- the coarse Fashion-MNIST task --------------------------------------------------------------


def test_fashion_mnist_hierarchy() -> None:
    mask = HierarchyMask.from_fine_to_coarse(FASHION_MNIST_FINE_TO_COARSE)
    assert mask.psi == (4, 1, 1, 3, 1) and mask.num_aux_classes == 10
    groups = {
        coarse: [FASHION_MNIST_CLASS_NAMES[f] for f, c in enumerate(FASHION_MNIST_FINE_TO_COARSE) if c == i]
        for i, coarse in enumerate(FASHION_MNIST_COARSE_CLASS_NAMES)
    }
    assert groups == {
        "tops": ["T-shirt/top", "Pullover", "Coat", "Shirt"],
        "bottoms": ["Trouser"],
        "dress": ["Dress"],
        "footwear": ["Sandal", "Sneaker", "Ankle boot"],
        "bag": ["Bag"],
    }
    assert mask.fine_label_columns(FASHION_MNIST_FINE_TO_COARSE) == [0, 4, 1, 5, 2, 6, 3, 7, 9, 8]


def test_coarse_labels() -> None:
    assert coarse_labels(torch.arange(10), FASHION_MNIST_FINE_TO_COARSE).tolist() == list(FASHION_MNIST_FINE_TO_COARSE)
    out = coarse_labels([9, 8, 1], FASHION_MNIST_FINE_TO_COARSE)
    assert out.dtype == torch.int64 and out.tolist() == [3, 4, 1]
    assert coarse_labels(torch.tensor([], dtype=torch.long), (0, 1)).shape == (0,)
    with pytest.raises(ValueError, match="label 10 but fine_to_coarse names 10 fine labels"):
        coarse_labels(torch.tensor([0, 10]), FASHION_MNIST_FINE_TO_COARSE)
    with pytest.raises(ValueError, match="label -1"):
        coarse_labels(torch.tensor([-1, 0]), FASHION_MNIST_FINE_TO_COARSE)
    with pytest.raises(ValueError, match="integer labels"):
        coarse_labels(torch.tensor([0.0]), FASHION_MNIST_FINE_TO_COARSE)


# --- image folders ------------------------------------------------------------------------------

# Class folders are created out of alphabetical order; each class has its own colour.
_COLOURS = {"zebra": (255, 0, 0), "apple": (0, 255, 0), "mango": (0, 0, 255)}


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    image_module = pytest.importorskip("PIL.Image")
    root = tmp_path / "images"
    for split in ("train", "test"):
        for name, colour in _COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, suffix in enumerate((".png", ".JPEG" if split == "test" else ".png")):
                image_module.new("RGB", (6, 4), colour).save(folder / f"{i}{suffix}")
            (folder / "notes.txt").write_text("not an image")
            (folder / ".hidden.png").write_bytes(b"skipped")
    (root / "train" / ".cache").mkdir()
    return root


def test_image_folder_rgb(image_root: Path) -> None:
    ds = load_image_folder(image_root, split="train", mode="RGB")
    assert ds.class_names == ("apple", "mango", "zebra")
    assert ds.images.shape == (6, 3, 4, 6) and ds.images.dtype == torch.float32
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for i in range(len(ds)):
        x, y = ds[i]
        expected = torch.tensor(_COLOURS[ds.class_names[int(y)]], dtype=torch.float32) / 255
        assert torch.equal(x[:, 0, 0], expected) and torch.equal(x, expected[:, None, None].expand(3, 4, 6))


def test_image_folder_grey_resize_and_split_none(image_root: Path) -> None:
    grey = load_image_folder(image_root, split="test", mode="L")
    assert grey.images.shape == (6, 1, 4, 6) and 0.0 <= float(grey.images.min()) and float(grey.images.max()) <= 1.0
    assert len(torch.unique(grey.images[grey.labels == 2].round(decimals=1))) == 1  # JPEG: close to one grey level
    assert load_image_folder(image_root, mode="L", size=3).images.shape == (6, 1, 3, 3)
    assert load_image_folder(image_root, size=(2, 5)).images.shape == (6, 3, 2, 5)
    assert load_image_folder(image_root / "train", split=None).images.shape == (6, 3, 4, 6)


def test_image_folder_errors(image_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(image_root / "nowhere")
    with pytest.raises(FileNotFoundError, match="split 'val' not found.*\\['test', 'train'\\]"):
        load_image_folder(image_root, split="val")
    (image_root / "empty_split").mkdir()
    with pytest.raises(ValueError, match="holds no class folders"):
        load_image_folder(image_root, split="empty_split")
    (image_root / "train" / "banana").mkdir()
    with pytest.raises(ValueError, match="class folder .*banana holds no images"):
        load_image_folder(image_root)
    (image_root / "train" / "banana").rmdir()
    Image.new("RGB", (5, 5)).save(image_root / "train" / "mango" / "2.png")
    with pytest.raises(
        ValueError, match="images differ in size: .*/apple/0.png is 6x4 .*/mango/2.png is 5x5; pass size="
    ):
        load_image_folder(image_root)
    assert load_image_folder(image_root, size=4).images.shape == (7, 3, 4, 4)
    (image_root / "train" / "mango" / "3.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*3.png"):
        load_image_folder(image_root, size=4)
    with pytest.raises(ValueError, match="mode must be 'L'"):
        load_image_folder(image_root, mode="RGBA")  # type: ignore[arg-type]
    for size in (0, (4,), (4, -1), 2.5, True):
        with pytest.raises(ValueError, match="size must be a positive integer"):
            load_image_folder(image_root, size=size)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError, match='pip install "auxlab\\[images\\]"'):
        load_image_folder(image_root)
