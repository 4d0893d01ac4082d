"""PyTorch Lightning integration: a ``LightningModule`` that trains your classifier with MAXL or any strategy.

::

    from auxlab.lightning import MetaAuxModule

    module = MetaAuxModule(MyClassifier(), num_classes=10, psi=5)  # MetaAuxWrapper's keyword arguments
    lightning.pytorch.Trainer(max_epochs=10).fit(module, train_loader, val_loader)

Imported only when used: ``import auxlab`` does not need Lightning; install it with
``pip install "auxlab[lightning]"``. See docs/tutorials/lightning.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities.types import OptimizerLRScheduler
except ImportError as error:  # pragma: no cover - exercised in a process without lightning
    raise ImportError(
        f'auxlab.lightning needs PyTorch Lightning, which is not installed ({error}); install it with: pip install "auxlab[lightning]"'
    ) from error

from auxlab._checks import check_integer, check_number
from auxlab._seeding import random_states, set_random_states
from auxlab.diagnostics import label_statistics
from auxlab.learners.base import OptimizerFactory
from auxlab.wrapper import MetaAuxWrapper

__all__ = ["MetaAuxModule"]

#: Where :meth:`MetaAuxModule.on_save_checkpoint` puts what Lightning's checkpoint does not hold.
CHECKPOINT_KEY = "auxlab"


def _sgd(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The model's optimizer when none is given: SGD with learning rate 0.01 (the paper's inner learning rate)."""
    return torch.optim.SGD(params, lr=0.01)


class MetaAuxModule(pl.LightningModule):
    """A ``LightningModule`` that trains a classifier with a :class:`~auxlab.MetaAuxWrapper` (MAXL by default).

    Give it your classifier and the wrapper's keyword arguments, and hand it to a ``Trainer``::

        module = MetaAuxModule(MyClassifier(), num_classes=10, psi=5, optimizer=partial(torch.optim.SGD, lr=0.05))
        Trainer(max_epochs=10).fit(module, train_loader, val_loader)

    Why a ``LightningModule`` and not a callback or a mixin: MAXL's meta step must run inside ``training_step``,
    between two model steps, under manual optimisation (``automatic_optimization = False``), and the optimizers
    must come from ``configure_optimizers``. A callback owns neither, and a mixin would leave the user to write
    both (and to keep them consistent with the wrapper). As a module it needs no line in the user's code: build
    it from the classifier, or subclass it to change one part: :meth:`configure_optimizers` for another
    optimizer or a scheduler, :meth:`split_batch` for another batch layout.

    What it does:

    - ``training_step`` calls :meth:`MetaAuxWrapper.step <auxlab.MetaAuxWrapper.step>` on the batch: the model
      step goes through Lightning's optimizer (so ``trainer.global_step``, ``on_before_optimizer_step`` and the
      precision plugin see it), the meta step steps the strategy's own optimizer (the generator's). The
      schedulers of :meth:`configure_optimizers` are stepped at their ``interval`` and ``frequency``.
    - It logs ``train/loss`` (the model step's loss), its parts ``train/primary_loss`` and
      ``train/auxiliary_loss``, ``train/meta_objective`` and, every ``diagnostics_every`` batches, the label
      diagnostics of :func:`auxlab.diagnostics.label_statistics` on the batch as epoch means:
      ``train/label_confidence`` and ``train/subclasses_used`` (the fraction of the ``K`` sub-classes in use).
    - ``validation_step`` and ``test_step`` log the primary head's ``val/accuracy`` and ``val/loss``
      (``test/...``); ``predict_step`` returns its logits.
    - Checkpoints: ``state_dict()`` holds the wrapper's (classifier, auxiliary head, generator, and in
      ``wrapper._extra_state`` the meta learner's optimizer and the step counters); :meth:`on_save_checkpoint`
      adds the torch, NumPy and Python random states; :meth:`on_load_checkpoint` loads the wrapper's part
      through :meth:`MetaAuxWrapper.load_state_dict <auxlab.MetaAuxWrapper.load_state_dict>` (which checks it
      first) and, when resuming a fit, restores the random states. ``Trainer.fit(module, ckpt_path=...)`` from a
      checkpoint saved at the end of a training epoch (``ModelCheckpoint``'s default when validation runs once
      per epoch, or not at all) then continues, on CPU, bit for bit as the run that was not interrupted.
    - Several processes (``strategy="ddp"``, ``"ddp_spawn"``, ``"ddp_fork"``): :meth:`setup` rebuilds the wrapper
      on the same classifier with ``distributed=True``, so that auxlab averages each step over the ranks
      (docs/distributed.md); the ``DistributedDataParallel`` that Lightning puts around the module synchronises
      nothing under manual optimisation. The auxiliary head and the generator are built anew from ``seed``
      there: state given to them before ``fit`` is lost (resume with ``ckpt_path=`` instead).

    Args:
        model: the classifier, an ``nn.Module`` mapping ``x`` to ``(B, C)`` logits through a final ``nn.Linear``;
            trained in place.
        num_classes: C, the number of primary classes.
        optimizer: ``params -> Optimizer`` for the model step (the classifier and the auxiliary head), e.g.
            ``functools.partial(torch.optim.SGD, lr=0.05)``; default ``SGD(lr=0.01)``.
        max_grad_norm: clip the model step's gradient to this total 2-norm (Lightning refuses its own
            ``gradient_clip_val`` under manual optimisation).
        diagnostics_every: log the label diagnostics on every ``diagnostics_every``-th training batch of an epoch
            (the first included; one forward pass of the generator each); 0: never.
        **wrapper_kwargs: the other keyword arguments of :class:`~auxlab.MetaAuxWrapper` (``psi``, ``mask``,
            ``generator``, ``engine``, ``seed``, ...); not ``distributed``, which follows the ``Trainer``.

    Attributes:
        wrapper: the :class:`~auxlab.MetaAuxWrapper` being trained.
    """

    def __init__(
        self, model: nn.Module, *, num_classes: int, optimizer: OptimizerFactory | None = None,
        max_grad_norm: float | None = None, diagnostics_every: int = 50, **wrapper_kwargs: Any,
    ) -> None:
        super().__init__()
        if "distributed" in wrapper_kwargs:
            raise TypeError(
                "MetaAuxModule sets MetaAuxWrapper's distributed= itself from the Trainer's strategy; "
                f"remove distributed={wrapper_kwargs['distributed']!r} and pass strategy='ddp' to the Trainer"
            )
        self.automatic_optimization = False
        self.wrapper: MetaAuxWrapper = MetaAuxWrapper(model, num_classes=num_classes, **wrapper_kwargs)
        self.optimizer_factory: OptimizerFactory = _sgd if optimizer is None else optimizer
        self.max_grad_norm = None if max_grad_norm is None else check_number(max_grad_norm, "max_grad_norm", positive=True)
        self.diagnostics_every = check_integer(diagnostics_every, "diagnostics_every", minimum=0)
        self._wrapper_kwargs = dict(wrapper_kwargs, num_classes=num_classes)
        self._distributed = False

    @property
    def classifier(self) -> nn.Module:
        """The classifier being trained (``wrapper.model``); after training it alone is the trained model."""
        return self.wrapper.model

    def forward(self, x: Tensor) -> Tensor:
        """The classifier's primary logits ``(B, C)``: exactly ``model(x)``."""
        return cast(Tensor, self.wrapper(x))

    def split_batch(self, batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(x, y, index)`` of a batch: ``(x, y)``, or ``(x, y, index)`` from :class:`auxlab.data.IndexedDataset`
        (for the strategies with fixed labels per sample). Override it for another layout.

        Args:
            batch: what the ``DataLoader`` yields.

        Returns:
            ``x``: ``(B, ...)`` inputs; ``y``: ``(B,)`` labels; ``index``: ``(B,)`` dataset indices, or None.
        """
        if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
            return batch[0], batch[1], batch[2] if len(batch) == 3 else None
        received = f"a {type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}"
        raise ValueError(f"a batch must be (x, y) or (x, y, index), got {received}; override MetaAuxModule.split_batch for another layout")

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """The model step's optimizer over ``wrapper.parameters()`` and, when the strategy learns, its own optimizer
        (the generator's, built by the wrapper), so that Lightning checkpoints both and can attach schedulers.

        Override it to add schedulers; the model step's optimizer must come first.
        """
        optimizers = [self.optimizer_factory(self.wrapper.parameters())]
        learner = self.wrapper.meta_learner
        if learner is not None:
            optimizers.append(learner.optimizer)
        return optimizers

    def setup(self, stage: str) -> None:
        """Refuse a precision plugin with a gradient scaler; under a ``Trainer`` of several processes, rebuild the
        wrapper with ``distributed=True`` on the same classifier (once: the process group exists only from here on)."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"MetaAuxModule does not support Trainer(precision={self.trainer.precision!r}): its gradient scaler would "
                "rescale gradients that the wrapper computes unscaled; use precision='bf16-mixed' or '32-true'"
            )
        if self.trainer.world_size > 1 and not self._distributed:
            self.wrapper = MetaAuxWrapper(self.wrapper.model, **self._wrapper_kwargs, distributed=True)
            self._distributed = True

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One :meth:`MetaAuxWrapper.step <auxlab.MetaAuxWrapper.step>` on the batch, its losses logged.

        Returns:
            The model step's loss, detached.
        """
        x, y, index = self.split_batch(batch)
        self._step_schedulers(epochs_done=self.trainer.current_epoch)  # those that a resumed run still owes
        optimizers = self.optimizers()
        model_optimizer = optimizers[0] if isinstance(optimizers, list) else optimizers
        # A LightningOptimizer subclasses its optimizer's class at run time; stepping it counts the global step.
        loss = self.wrapper.step(x, y, cast(torch.optim.Optimizer, model_optimizer), index=index, max_grad_norm=self.max_grad_norm)
        self._step_schedulers(epochs_done=self.trainer.current_epoch)
        self.log_losses(loss, batch_size=x.shape[0])
        if self.diagnostics_every and batch_idx % self.diagnostics_every == 0:
            self.log_label_statistics(x, y, index)
        return loss

    def on_train_epoch_end(self) -> None:
        """Step the schedulers whose interval is ``"epoch"``, ``ReduceLROnPlateau`` on its monitored value."""
        self._step_schedulers(epochs_done=self.trainer.current_epoch + 1, epoch_end=True)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Log ``val/accuracy`` and ``val/loss`` of the primary head."""
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Log ``test/accuracy`` and ``test/loss`` of the primary head."""
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """The primary logits ``(B, C)`` of the batch's inputs (a batch ``x`` or ``(x, ...)``)."""
        return cast(Tensor, self(batch[0] if isinstance(batch, (tuple, list)) else batch))

    def log_losses(self, loss: Tensor, *, batch_size: int) -> None:
        """Log the model step's ``loss`` and the parts of the latest step (``wrapper.last_losses``).

        Args:
            loss: the model step's loss, as :meth:`MetaAuxWrapper.step <auxlab.MetaAuxWrapper.step>` returned it.
            batch_size: the batch's size, for the epoch means.
        """
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True, batch_size=batch_size)
        parts = self.wrapper.last_losses
        for key, name in (("primary", "primary_loss"), ("auxiliary", "auxiliary_loss")):
            if key in parts:
                self.log(f"train/{name}", parts[key], on_step=True, on_epoch=True, sync_dist=True, batch_size=batch_size)
        if self.wrapper.last_meta_objective is not None:  # this step took a meta step
            self.log("train/meta_objective", self.wrapper.last_meta_objective, on_step=True, on_epoch=True, sync_dist=True, batch_size=batch_size)

    def log_label_statistics(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> None:
        """Log how the strategy's labels of the batch use the sub-classes (:func:`~auxlab.diagnostics.label_statistics`):
        ``train/label_confidence`` (mean largest probability, ``1/psi`` flat to 1 hard) and ``train/subclasses_used``
        (the fraction of the ``K`` sub-classes in use), as epoch means over the ranks. Nothing for single task or a
        strategy that augments the batch.

        Args:
            x: ``(B, ...)`` inputs; y: ``(B,)`` labels; index: ``(B,)`` dataset indices, for strategies that need them.
        """
        generator = self.wrapper.generator
        if generator is None or generator.augments:
            return
        distribution = self.wrapper.aux_targets(x, y, index=index, distribution=True)
        stats = label_statistics(distribution, y, self.wrapper.mask)
        for name, key in (("label_confidence", "confidence"), ("subclasses_used", "used_fraction")):
            self.log(f"train/{name}", float(stats[key]), on_step=False, on_epoch=True, sync_dist=True, batch_size=x.shape[0])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the torch, NumPy and Python random states (the wrapper's own state is in ``checkpoint["state_dict"]``)."""
        checkpoint[CHECKPOINT_KEY] = {"rng": random_states()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Load the wrapper's part of ``checkpoint["state_dict"]`` through its own checks (a ValueError, with nothing
        changed, for a checkpoint of another hierarchy, strategy or model) and, when resuming a fit, restore the
        random states saved with it (not when loading outside ``fit``)."""
        prefix = "wrapper."
        self.wrapper.load_state_dict({key[len(prefix):]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)})
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is not None and self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            set_random_states(saved["rng"])

    def _evaluate(self, batch: Any, stage: str) -> None:
        x, y, _ = self.split_batch(batch)
        logits = self(x)
        accuracy = (logits.argmax(1) == y).float().mean()
        self.log(f"{stage}/accuracy", accuracy, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        self.log(f"{stage}/loss", nn.functional.cross_entropy(logits, y), on_epoch=True, sync_dist=True, batch_size=x.shape[0])

    def _step_schedulers(self, *, epochs_done: int, epoch_end: bool = False) -> None:
        """Step the schedulers of :meth:`configure_optimizers` (manual optimisation leaves it to us): one step per
        ``frequency`` epochs done or model steps taken, by ``interval``. A scheduler takes only the steps still due by
        its own count (restored from a checkpoint), so a resumed run has the uninterrupted run's learning rates wherever
        the checkpoint was saved.
        ``ReduceLROnPlateau`` steps at the end of an epoch (``epoch_end``) on its ``monitor``, as under Lightning."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if epoch_end and epochs_done % config.frequency == 0:
                    metric = self.trainer.callback_metrics.get(config.monitor or "")
                    if metric is None:
                        raise ValueError(
                            f"the ReduceLROnPlateau scheduler monitors {config.monitor!r}, which is not logged; "
                            f"logged are {sorted(self.trainer.callback_metrics)}"
                        )
                    scheduler.step(metric)
            elif scheduler.last_epoch < (epochs_done if config.interval == "epoch" else self.trainer.global_step) // config.frequency:
                scheduler.step()
