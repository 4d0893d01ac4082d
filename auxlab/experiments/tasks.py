"""The data of an experiment: train, validation and test splits, class names and the hierarchy.

The validation set is carved out of the training set (stratified, seeded by ``data_seed``); the
test set is only read for the final report. Every split and subset depends on ``data_seed`` alone,
so every training seed and every strategy sees exactly the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from auxlab.data import TrainingData
from auxlab.datasets import (
    FASHION_MNIST_FINE_TO_COARSE,
    FASHION_MNIST_ROOT,
    ImageDataset,
    load_digits,
    load_fashion_mnist,
    load_image_folder,
    stratified_split_indices,
    train_val_split,
)
from auxlab.experiments.config import ExperimentConfig
from auxlab.experiments.errors import ConfigError
from auxlab.hierarchy import HierarchyMask

__all__ = ["RunSplit", "TaskData", "load_task", "resolve_psi", "run_split", "stratified_subset"]

DEFAULT_PSI = 5


@dataclass(frozen=True, eq=False)
class TaskData:
    """The three splits of one task, and its fine-to-coarse map if it has human labels.

    Attributes:
        train: the training split (after the validation split and ``limit_train``).
        val: the validation split, for per-epoch monitoring.
        test: the test split, read once per run for the final number.
        fine_to_coarse: primary class of each fine label (for a strategy built from the fine labels,
            such as ``"human"``); None when the task has no fine labels.
        description: one line naming the data, for logs and the summary.
    """

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    fine_to_coarse: tuple[int, ...] | None
    description: str

    @property
    def num_classes(self) -> int:
        """C, the number of primary classes."""
        return self.train.num_classes

    @property
    def in_channels(self) -> int:
        """Channels of the images (1 grey, 3 RGB)."""
        return int(self.train.images.shape[1])

    @property
    def training_data(self) -> TrainingData:
        """What a strategy may be built from (:meth:`~auxlab.AuxLabelGenerator.kwargs_from_data`): the
        training split, its fine labels and the fine-to-coarse map, if the task has them."""
        return TrainingData(dataset=self.train, fine_labels=self.train.fine_labels, fine_to_coarse=self.fine_to_coarse)


def stratified_subset(dataset: ImageDataset, size: int | None, *, seed: int) -> ImageDataset:
    """``size`` samples of ``dataset``, stratified by label and seeded; all of it if ``size`` is None or >= its length."""
    if size is None or size >= len(dataset):
        return dataset
    return dataset.subset(subset_indices(dataset.labels, size, seed=seed))


def subset_indices(labels: Tensor, size: int, *, seed: int) -> Tensor:
    """Sorted indices of a stratified, seeded subset of ``size`` of the ``(N,)`` ``labels``; all if ``size >= N``."""
    total = int(labels.shape[0])
    if size >= total:
        return torch.arange(total)
    _, held = stratified_split_indices(labels, fraction=size / total, seed=seed)
    return held


@dataclass(frozen=True, eq=False)
class RunSplit:
    """What one run trains on: the task's training split, or its rest after a development split.

    Attributes:
        train: the samples the run trains on (the classifier's batches; the data of ``generator_kwargs``).
        dev: the development split, whose batches are the meta batches ``(x_meta, y_meta)``; None
            when the run trains on the whole training split.
        kept: ``(len(train),)`` sorted indices of ``train``'s samples in the task's training split.
    """

    train: ImageDataset
    dev: ImageDataset | None
    kept: Tensor

    def probe(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The samples of ``indices`` (into the task's training split) that this run trains on.

        Returns:
            ``(local, full)``: their indices into :attr:`train` and into the task's training split,
            in the order of ``indices``; samples of the development split are left out.
        """
        position = torch.searchsorted(self.kept, indices).clamp(max=max(self.kept.shape[0] - 1, 0))
        present = self.kept[position] == indices
        return position[present], indices[present]


def run_split(train: ImageDataset, *, dev_fraction: float | None, seed: int) -> RunSplit:
    """The whole training split (``dev_fraction=None``), or a stratified development split of
    ``dev_fraction`` of it, seeded by ``seed``, and the rest to train on.

    Raises:
        ConfigError: if the fraction leaves one of the parts empty.
    """
    if dev_fraction is None:
        return RunSplit(train, None, torch.arange(len(train)))
    try:
        kept, held = stratified_split_indices(train.labels, fraction=dev_fraction, seed=seed)
    except ValueError as error:
        raise ConfigError(f"cannot carve a development split with dev_fraction={dev_fraction} from {len(train)} training samples: {error}") from error
    return RunSplit(train.subset(kept), train.subset(held), kept)


def load_task(config: ExperimentConfig) -> TaskData:
    """Load the dataset and task that ``config`` names, split and limited as it says.

    Raises:
        FileNotFoundError: if the data is not on disk (the message says how to get it).
        ConfigError: if the data and the config do not fit together.
    """
    fine_to_coarse: tuple[int, ...] | None = None
    if config.dataset == "digits":
        full_train = load_digits(split="train", seed=config.data_seed)
        test = load_digits(split="test", seed=config.data_seed)
        where = "scikit-learn digits (8x8)"
    elif config.dataset == "fashion-mnist":
        root = config.data_root or FASHION_MNIST_ROOT
        coarse = config.task == "coarse"
        full_train = load_fashion_mnist(root, split="train", coarse=coarse)
        test = load_fashion_mnist(root, split="test", coarse=coarse)
        fine_to_coarse = FASHION_MNIST_FINE_TO_COARSE if coarse else None
        where = f"Fashion-MNIST {'coarse (5 groups)' if coarse else 'fine (10 classes)'} from {root}"
    else:
        assert config.data_root is not None  # checked by the config
        size = config.image_size
        full_train = load_image_folder(config.data_root, split="train", mode=config.image_mode, size=size)  # type: ignore[arg-type]
        test = load_image_folder(config.data_root, split="test", mode=config.image_mode, size=size)  # type: ignore[arg-type]
        if test.class_names != full_train.class_names:
            raise ConfigError(
                f"the image folder's test split has classes {list(test.class_names)} but its train split has "
                f"{list(full_train.class_names)}; both need the same class folders"
            )
        where = f"image folder {config.data_root}"
    pool = stratified_subset(full_train, config.limit_train, seed=config.data_seed)
    try:
        train, val = train_val_split(pool, val_fraction=config.val_fraction, seed=config.data_seed)
    except ValueError as error:
        raise ConfigError(f"cannot carve a validation set with val_fraction={config.val_fraction} from {len(pool)} samples: {error}") from error
    test = stratified_subset(test, config.limit_test, seed=config.data_seed)
    shape = "x".join(str(s) for s in full_train.images.shape[1:])
    description = f"{where}: {len(train)} train / {len(val)} validation / {len(test)} test images of {shape}, {full_train.num_classes} classes"
    return TaskData(train, val, test, fine_to_coarse, description)


def resolve_psi(config: ExperimentConfig, data: TaskData) -> tuple[int, ...]:
    """One sub-class count per primary class, from ``config.psi`` and the task.

    None gives the task's fine-label hierarchy when it has one (one sub-class per fine label), else
    :data:`DEFAULT_PSI` per class; one number applies to every class.

    Raises:
        ConfigError: if ``psi`` has neither one nor C entries.
    """
    num_classes = data.num_classes
    fine_psi = HierarchyMask.from_fine_to_coarse(data.fine_to_coarse).psi if data.fine_to_coarse is not None else None
    if config.psi is None:
        psi = fine_psi if fine_psi is not None else (DEFAULT_PSI,) * num_classes
    elif len(config.psi) == 1:
        psi = config.psi * num_classes
    elif len(config.psi) == num_classes:
        psi = config.psi
    else:
        raise ConfigError(
            f"psi has {len(config.psi)} entries but the task has {num_classes} classes; give one int for all classes or one per class"
        )
    return tuple(psi)
