"""auxlab.lightning: MetaAuxModule trains MAXL under a real Lightning Trainer on CPU, logs its losses and label
diagnostics, resumes from a Lightning checkpoint bit for bit, and runs on two processes."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from helpers import TinyMLP
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning")

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision

from auxlab.data import IndexedDataset
from auxlab.datasets import load_digits
from auxlab.lightning import MetaAuxModule

PSI = 3


@pytest.fixture(scope="module")
def digits() -> TensorDataset:
    """320 of scikit-learn's digits, (1, 8, 8) images in [0, 1]."""
    data = load_digits(split="train", seed=0)
    return TensorDataset(data.images[:320], data.labels[:320])


def mlp() -> TinyMLP:
    return TinyMLP(in_features=64, hidden=32, num_classes=10)


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def trainer(**kwargs: Any) -> pl.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
        "enable_checkpointing": False, "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**{**settings, **kwargs})


def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items() if isinstance(value, torch.Tensor)}


def test_fit_trains_the_classifier_and_the_generator_and_logs_losses_and_diagnostics(digits: TensorDataset, tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = MetaAuxModule(mlp(), num_classes=10, psi=PSI, optimizer=sgd, diagnostics_every=2)
    assert module.wrapper.generator is not None
    classifier, generator = tensors(module.classifier), tensors(module.wrapper.generator)
    fit = trainer(max_epochs=2, limit_train_batches=4, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1)
    fit.fit(module, DataLoader(digits, batch_size=32, shuffle=True), DataLoader(digits, batch_size=160))

    assert fit.global_step == 8  # the model steps went through Lightning's optimizer
    assert module.wrapper.steps == {"model": 8, "meta": 8}
    assert all(not torch.equal(value, tensors(module.classifier)[name]) for name, value in classifier.items())
    assert all(not torch.equal(value, tensors(module.wrapper.generator)[name]) for name, value in generator.items())
    rows = list(csv.DictReader((tmp_path / "run" / "version_0" / "metrics.csv").open()))
    logged: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if value:
                logged.setdefault(key, []).append(float(value))
    for name in ("train/loss_step", "train/primary_loss_step", "train/auxiliary_loss_step", "train/meta_objective_step"):
        assert len(logged[name]) == 8 and all(math.isfinite(v) for v in logged[name]), name
    for name in ("train/loss_epoch", "train/label_confidence", "train/subclasses_used", "val/accuracy", "val/loss"):
        assert len(logged[name]) == 2 and all(math.isfinite(v) for v in logged[name]), name
    # the model step's loss is L_pri + aux_weight * L_aux, with the paper's aux_weight = 1
    assert logged["train/loss_step"] == pytest.approx([p + a for p, a in zip(logged["train/primary_loss_step"], logged["train/auxiliary_loss_step"])], rel=1e-5)
    assert all(1 / PSI <= v <= 1 for v in logged["train/label_confidence"])
    assert all(0 < v <= 1 for v in logged["train/subclasses_used"] + logged["val/accuracy"])


class WithEpochScheduler(MetaAuxModule):
    """Both optimizers and a learning rate halved every epoch."""

    def configure_optimizers(self) -> Any:
        optimizer = sgd(self.wrapper.parameters())
        return [optimizer, self.wrapper.generator_optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)]


def run_two_epochs(digits: TensorDataset, directory: Path, *, ckpt_path: Path | None = None) -> MetaAuxModule:
    """Two epochs of 5 shuffled batches and a validation (an exact resume needs the restored random state for the
    shuffle); the checkpoints are saved at the end of each training epoch, ModelCheckpoint's default here."""
    pl.seed_everything(0)
    module = WithEpochScheduler(mlp(), num_classes=10, psi=PSI, generator_optimizer=adam)
    torch.manual_seed(1 if ckpt_path is None else 2)  # the resumed run starts from another random state
    save = ckpt_path is None
    callbacks = [ModelCheckpoint(dirpath=directory, save_top_k=-1)] if save else []
    fit = trainer(max_epochs=2, limit_train_batches=5, enable_checkpointing=save, callbacks=callbacks)
    fit.fit(module, DataLoader(digits, batch_size=32, shuffle=True), DataLoader(digits, batch_size=160), ckpt_path=ckpt_path)
    return module


def test_fit_resumed_from_a_checkpoint_of_epoch_one_equals_the_uninterrupted_run(digits: TensorDataset, tmp_path: Path) -> None:
    uninterrupted = run_two_epochs(digits, tmp_path)
    checkpoint = tmp_path / "epoch=0-step=5.ckpt"
    assert checkpoint.exists(), sorted(p.name for p in tmp_path.iterdir())
    resumed = run_two_epochs(digits, tmp_path / "resumed", ckpt_path=checkpoint)

    expected, actual = tensors(uninterrupted), tensors(resumed)
    assert expected.keys() == actual.keys()
    assert [name for name in expected if not torch.equal(expected[name], actual[name])] == []
    assert resumed.wrapper.steps == uninterrupted.wrapper.steps == {"model": 10, "meta": 10}
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == uninterrupted.trainer.optimizers[0].param_groups[0]["lr"] == 0.1 * 0.5**2
    assert resumed.wrapper.generator_optimizer is not None and uninterrupted.wrapper.generator_optimizer is not None
    saved_state = uninterrupted.wrapper.generator_optimizer.state_dict()["state"]
    resumed_state = resumed.wrapper.generator_optimizer.state_dict()["state"]
    assert all(torch.equal(saved_state[i]["exp_avg_sq"], resumed_state[i]["exp_avg_sq"]) for i in saved_state)


class SaveEachRank(pl.Callback):
    """Each rank writes its module's state at the end of training."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(tensors(pl_module), self.directory / f"rank{trainer.global_rank}.pt")


def test_two_processes_equal_one_process_on_the_concatenated_batch(digits: TensorDataset, tmp_path: Path) -> None:
    pl.seed_everything(0)
    single = MetaAuxModule(mlp(), num_classes=10, psi=PSI, optimizer=sgd)
    pl.seed_everything(0)
    parallel = MetaAuxModule(mlp(), num_classes=10, psi=PSI, optimizer=sgd)
    start = tensors(parallel)
    # Lightning gives each rank a DistributedSampler (shuffled with seed 0): rank r takes the samples order[r::2] of one
    # permutation. The single process takes the same two per-rank batches of 16 together, as one batch of 32.
    order = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
    ranks = [order[r::2].split(16) for r in range(2)]
    concatenated = torch.cat([torch.cat(pair) for pair in zip(*ranks)]).tolist()
    trainer(max_epochs=1, limit_train_batches=3).fit(single, DataLoader(digits, batch_size=32, sampler=concatenated))
    ddp = trainer(max_epochs=1, limit_train_batches=3, devices=2, strategy="ddp_fork", callbacks=[SaveEachRank(tmp_path)])
    with mock.patch.dict(os.environ):  # Lightning sets MASTER_ADDR, MASTER_PORT, ... in this process
        ddp.fit(parallel, DataLoader(digits, batch_size=16))

    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert [name for name in rank0 if not torch.equal(rank0[name], rank1[name])] == []  # the ranks stay identical
    assert all(torch.equal(value, tensors(parallel)[name]) for name, value in rank0.items())  # rank 0's state came back
    expected = tensors(single)
    for name, value in rank0.items():
        assert not torch.equal(value, start[name]), f"{name} did not train"
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=f"{name} differs from one process")


class WithStepScheduler(MetaAuxModule):
    """A subclass with a scheduler of its own; the generator's optimizer is left to the wrapper."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.wrapper.parameters(), lr=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5), "interval": "step"}}


def test_a_subclass_adds_a_scheduler_and_fixed_label_strategies_get_the_batch_index(digits: TensorDataset) -> None:
    module = WithStepScheduler(mlp(), num_classes=10, psi=PSI, generator="random", generator_kwargs={"num_samples": len(digits)})
    fit = trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    fit.fit(module, DataLoader(IndexedDataset(digits), batch_size=32, shuffle=True))  # batches (x, y, index)
    assert module.wrapper.steps["model"] == 3
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert {"train/label_confidence", "train/subclasses_used"} <= fit.callback_metrics.keys()
    logits = fit.predict(module, DataLoader(digits, batch_size=100), return_predictions=True)
    assert logits is not None and [tuple(t.shape) for t in logits] == [(100, 10), (100, 10), (100, 10), (20, 10)]


def test_bf16_autocast_trains(digits: TensorDataset) -> None:
    module = MetaAuxModule(mlp(), num_classes=10, psi=PSI, optimizer=sgd)
    fit = trainer(max_epochs=1, limit_train_batches=2, precision="bf16-mixed")
    fit.fit(module, DataLoader(digits, batch_size=32))
    assert module.wrapper.steps == {"model": 2, "meta": 2}
    assert all(math.isfinite(float(fit.callback_metrics[name])) for name in ("train/loss", "train/meta_objective"))


def test_refusals_name_the_problem(digits: TensorDataset) -> None:
    with pytest.raises(TypeError, match="distributed=True.*strategy='ddp'"):
        MetaAuxModule(mlp(), num_classes=10, psi=PSI, distributed=True)
    with pytest.raises(ValueError, match="max_grad_norm"):
        MetaAuxModule(mlp(), num_classes=10, psi=PSI, max_grad_norm=-1.0)
    with pytest.raises(ValueError, match=r"\(x, y\) or \(x, y, index\), got a Tensor"):
        MetaAuxModule(mlp(), num_classes=10, psi=PSI).split_batch(torch.zeros(2, 64))
    scaled = trainer(max_epochs=1, limit_train_batches=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    with pytest.raises(ValueError, match="gradient scaler.*bf16-mixed"):
        scaled.fit(MetaAuxModule(mlp(), num_classes=10, psi=PSI), DataLoader(digits, batch_size=32))
    # a checkpoint of another hierarchy is refused by the wrapper's own checks, before anything is loaded
    other = MetaAuxModule(mlp(), num_classes=10, psi=2)
    before = tensors(other)
    with pytest.raises(ValueError, match="psi"):
        other.on_load_checkpoint({"state_dict": MetaAuxModule(mlp(), num_classes=10, psi=PSI).state_dict()})
    assert all(torch.equal(value, tensors(other)[name]) for name, value in before.items())


def test_auxlab_imports_without_lightning_and_auxlab_lightning_says_how_to_install_it() -> None:
    code = (
        "import sys; sys.modules['lightning'] = None\n"
        "import auxlab\n"
        "assert 'auxlab.lightning' not in sys.modules\n"
        "try:\n    import auxlab.lightning\nexcept ImportError as error:\n    print(error)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env, timeout=120)
    assert 'pip install "auxlab[lightning]"' in result.stdout
