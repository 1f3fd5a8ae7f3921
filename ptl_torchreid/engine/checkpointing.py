"""Checkpoints of the PTL engines: what a checkpoint holds, where and how it is written, and resuming from one.

Every write goes through :meth:`CheckpointMixin._write_checkpoint`: atomic (a failed write leaves the previous
files intact), weights-only loadable, refused for non-finite weights, rank 0 only under several ranks.
:meth:`CheckpointMixin.resume` restores weights, optimizer, scheduler, scaler, progress, the run's seed and RNG
states, and the position inside an epoch, so a run stopped mid-epoch continues exactly (on the CPU, at the same
torch thread count: resuming at another count says so).
"""
import math
import os.path as osp

import torch
from tqdm import tqdm

from ptl_torchreid.engine.reliability import (
    DIVERGED_GROWTH,
    apply_configured_lr,
    last_good_checkpoint,
    load_optimizer_state,
)
from ptl_torchreid.utils import distributed as pdist
from ptl_torchreid.utils.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointMismatchError,
    NonFiniteCheckpointError,
    load_checkpoint,
    to_plain,
)
from ptl_torchreid.utils.resume import EpochLoader, capture_rng_state, restore_rng_state

__all__ = ["CheckpointMixin"]


class CheckpointMixin:
    """Checkpoint writing and resuming for :class:`~ptl_torchreid.engine.trainer.PTLEngineMixin` (which sets the
    attributes used here: ``net``, ``optimizer``, ``scheduler``, ``scaler``, ``seed``, progress counters)."""

    def checkpoint_state(self, epoch, rank1):
        """Everything a checkpoint taken after epoch ``epoch`` (0-based) holds, as tensors and plain Python types
        only (loads with weights_only): weights with the cells' carried states and running buffers, optimizer,
        scheduler, AMP scaler, progress, best Rank-1, the run's seed and the RNG states."""
        state = {
            "state_dict": self.net.state_dict(),  # cell running buffers and carried states included
            "epoch": epoch + 1,  # epochs completed: training resumes at this (0-based) epoch
            "batch": 0,  # batches of that epoch already trained (> 0 in iteration checkpoints)
            "iteration": self.iteration,
            "rank1": rank1,
            "best_rank1": self.best_rank1,
            "results": self.last_results,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "seed": self.seed,
            "rng": self._capture_rng_state(),
            "optimizer_type": type(self.optimizer).__name__,
            "reference_param_norm": self.reference_param_norm,
            "cpu_threads": torch.get_num_threads(),  # CPU results repeat bit for bit at this count only
        }
        state.update(self.checkpoint_extras)
        return to_plain(state)

    def save_model(self, epoch, rank1, save_dir, is_best=False):
        """torchreid's hook, called after evaluations; tracks the best Rank-1 for ``model-best``."""
        rank1 = float(rank1)
        if not math.isnan(rank1) and rank1 > self.best_rank1:
            self.best_rank1 = rank1
            is_best = True
        self.last_rank1 = rank1
        self._save_checkpoint(epoch, rank1, save_dir, is_best=is_best)

    def checkpoint_manager(self, save_dir):
        """The :class:`CheckpointManager` of ``<save_dir>/model`` (torchreid's checkpoint folder)."""
        folder = osp.join(save_dir, "model")
        if folder not in self._checkpoint_managers:
            self._checkpoint_managers[folder] = CheckpointManager(folder, keep_last=self.keep_last)
        return self._checkpoint_managers[folder]

    def _save_checkpoint(self, epoch, rank1, save_dir, is_best=False):
        """Write ``<save_dir>/model/model.pth.tar-<epoch>`` (torchreid's naming) atomically, and
        ``model-best.pth.tar`` when ``is_best``. Weights with NaN/inf are refused, keeping the last good files.
        Only rank 0 writes (the ranks hold the same weights); the others return None."""
        manager = self.checkpoint_manager(save_dir)
        path = self._write_checkpoint(
            manager, lambda: self.checkpoint_state(epoch, rank1), epoch=epoch + 1, is_best=is_best
        )
        if path is None:
            return None
        print(f'Checkpoint saved to "{path}"')
        if is_best:
            print(f'Best so far (Rank-1 {rank1:.1%}) saved to "{manager.best_path}"')
        return path

    def resume(self, path, trust=False, save_dir=None, preloaded=None):
        """Restore everything a checkpoint of this engine holds (see :meth:`load_checkpoint_state`).

        ``path`` is a checkpoint file, or ``'auto'``: the latest checkpoint in ``<save_dir>/model`` (default
        ``save_dir``: :attr:`save_dir`). Returns the epoch to start from (pass it to :meth:`run` as
        ``start_epoch``); a checkpoint taken mid-epoch makes that epoch continue after its last trained batch.
        With ``'auto'`` and no checkpoint yet, prints so and returns None (start from scratch).

        Under several ranks every rank calls it and loads the same file (rank 0's choice for ``'auto'``), so the
        ranks continue with identical weights, optimizer and cell states. ``preloaded``: ``{path: checkpoint}``
        of files already read; the one resumed from is taken out of it instead of being read again.
        """
        if path == "auto":
            save_dir = save_dir if save_dir is not None else self.save_dir
            if save_dir is None:
                raise ValueError("resume('auto') needs save_dir: where the run writes its checkpoints")
            # rank 0's choice, so that every rank resumes from the same file
            path = pdist.broadcast_object(self.checkpoint_manager(save_dir).latest() if self.is_main else None)
            if path is None:
                print(f'No checkpoint in "{osp.join(save_dir, "model")}" to resume from: starting from scratch')
                return None
        if preloaded and path in preloaded:
            state = preloaded.pop(path)
        else:
            state = load_checkpoint(path, map_location=self.device, trust=trust)
        if not isinstance(state, dict) or "state_dict" not in state or "optimizer" not in state:
            raise CheckpointMismatchError(
                None,
                f'Cannot resume from "{path}": it is not a training checkpoint of this '
                "engine (no state_dict/optimizer entries). To start from its "
                "weights, give it as model.load_weights instead.",
            )
        self.load_checkpoint_state(state, source=path)
        saved_threads, threads = state.get("cpu_threads"), torch.get_num_threads()
        if self.device.type == "cpu" and saved_threads is not None and saved_threads != threads:
            print(
                f"Note: the checkpoint was written by a run computing with {saved_threads} torch CPU threads, this "
                f"run uses {threads}: it continues faithfully, but not bit for bit as the uninterrupted run would "
                f"(sums are rounded in another order). Set train.cpu_threads {saved_threads} for an exact "
                "continuation."
            )
        batch, epoch = int(state.get("batch", 0)), int(state["epoch"]) + 1
        where = f"epoch {epoch}, after batch {batch}" if batch else f"start of epoch {epoch}"
        print(
            f'Resumed from "{path}" ({where}, iteration {self.iteration}, best Rank-1 {max(self.best_rank1, 0.0):.1%})'
        )
        return int(state["epoch"])

    def load_checkpoint_state(self, state, source="the checkpoint"):
        """Inverse of :meth:`checkpoint_state` (and of iteration checkpoints). A checkpoint of another model or
        optimizer setup raises :class:`CheckpointMismatchError` listing what does not match."""
        name = self.checkpoint_extras.get("model_name")
        if name is not None and state.get("model_name") not in (None, name):
            raise CheckpointMismatchError(
                None,
                f'Cannot resume from "{source}": it was saved for model "{state["model_name"]}", this run builds '
                f'"{name}".',
            )
        try:
            self.net.load_state_dict(state["state_dict"])
        except RuntimeError as e:
            raise CheckpointMismatchError(
                None,
                f'Cannot resume from "{source}": its weights do not fit this model (was '
                f"it saved with another model or data.height/width?).\n{e}",
            ) from None
        # the base rates this run was configured with (train.lr, ptl.lr_mult), before the checkpoint's replace them
        configured = [g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups]
        try:
            load_optimizer_state(self.optimizer, state["optimizer"], source, state.get("optimizer_type"))
        except ValueError as e:
            raise CheckpointMismatchError(None, str(e)) from None
        self.scheduler.load_state_dict(state["scheduler"])
        for name, old, new, now in apply_configured_lr(self.optimizer, self.scheduler, configured):
            print(
                f"Note: the configured base learning rate{'' if len(configured) == 1 else ' of ' + str(name)} is "
                f"{new:.3g}, the checkpoint's {old:.3g}: the configured one applies from here on (the schedule keeps "
                f"its position; the rate is now {now:.3g})."
            )
        if state.get("reference_param_norm") is not None:
            self.reference_param_norm = float(state["reference_param_norm"])
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.best_rank1 = float(state.get("best_rank1", -1.0))
        self.iteration = int(state.get("iteration", 0))
        self.last_results = state.get("results", {})
        rank1 = state.get("rank1")
        self.last_rank1 = float(rank1) if isinstance(rank1, (int, float)) else None
        self._load_resume_position(state)

    def _write_checkpoint(self, manager, state, **where):
        """The single place the engine writes checkpoints: atomically, through ``manager``; ``state`` is the
        checkpoint or a function returning it. A failed write (disk full, permission denied) or diverged weights
        stop training; nothing is reported as saved.

        Under several ranks only rank 0 builds and writes the checkpoint (the ranks hold the same weights) and the
        others return None; every rank must call this, since all of them stop together when rank 0's write
        fails (a rank left running would wait forever in its next collective)."""
        error, path = None, None
        if self.is_main:
            try:
                path = manager.save(state() if callable(state) else state, **where)
            except CheckpointError as e:
                error = e
        if isinstance(error, NonFiniteCheckpointError):
            error = NonFiniteCheckpointError(f"{error} {self.divergence_advice()}.")
        if pdist.any_rank(error is not None):
            print(
                f"Training stopped at epoch {self.epoch + 1}, iteration {self.iteration}: the checkpoint was not "
                "saved (see the error "
                "below); the previous checkpoints are intact."
            )
            if error is not None:
                raise error
            raise CheckpointError("rank 0 could not write the checkpoint (its error says why); this rank stops with it")
        self._saved_at_iteration = self.iteration
        return path

    def epoch_loader(self):
        """The :class:`~ptl_torchreid.utils.resume.EpochLoader` over :attr:`train_loader` and :attr:`seed`."""
        el = self._epoch_loader
        if el is None or el.loader is not self.train_loader or el.seed != self.seed:
            self._epoch_loader = EpochLoader(self.train_loader, self.seed)
        return self._epoch_loader

    def iteration_checkpoint_state(self, losses=None):
        """The state after the current training step, mid-epoch: the epoch in progress and the batches of it
        already trained, plus this epoch's loss meters (so the epoch's logged averages survive a resume)."""
        state = self.checkpoint_state(self.epoch, self.last_rank1)
        state["epoch"] = self.epoch
        state["batch"] = self.batch_idx + 1
        state["num_batches"] = self.num_batches
        if losses is not None:
            state["epoch_meters"] = {name: [float(m.sum), int(m.count)] for name, m in losses.meters.items()}
        return state

    def save_iteration_checkpoint(self, losses=None):
        """Write ``<save_dir>/model/model-iter<iteration>.pth.tar`` (atomic; the ``latest`` pointer follows)."""
        manager = self.checkpoint_manager(self.save_dir)
        path = self._write_checkpoint(
            manager, lambda: self.iteration_checkpoint_state(losses), iteration=self.iteration
        )
        if path is None:
            return None
        if self.progress_bar:
            tqdm.write(f'Checkpoint saved to "{path}"')
        else:
            print(f'Checkpoint saved to "{path}"')
        return path

    def _capture_rng_state(self):
        """The global RNG states for a checkpoint. All ranks are seeded alike and draw alike (their data
        randomness comes from :meth:`epoch_loader`'s per-rank seeds), so rank 0's states, the ones saved, are
        every rank's; on CUDA each rank draws from its own device, so only that device's state is kept."""
        state = capture_rng_state()
        if self.world_size > 1 and self.device.type == "cuda" and state["cuda"]:
            state["cuda"] = [torch.cuda.get_rng_state(self.device)]
        return state

    def _restore_rng_state(self, state):
        cuda = state.get("cuda") or []
        if self.world_size > 1 and self.device.type == "cuda" and len(cuda) == 1:
            restore_rng_state(dict(state, cuda=[]))
            torch.cuda.set_rng_state(cuda[0].cpu().to(torch.uint8), self.device)
        else:
            restore_rng_state(state)

    def _load_resume_position(self, state):
        seed = state.get("seed")
        if seed is not None and int(seed) != self.seed:
            print(
                f"Note: the checkpoint was trained with seed {seed} (this run: {self.seed}); continuing with {seed} "
                "so that the "
                "data order stays that of the interrupted run."
            )
            self.seed = int(seed)
        batch = int(state.get("batch", 0))
        self._resume_at = (int(state["epoch"]), batch, state.get("epoch_meters")) if batch > 0 else None
        self._pending_rng = state.get("rng")
        if batch > 0 and "num_batches" in state:
            planned = len(self.epoch_loader().plan(int(state["epoch"])))
            if planned != int(state["num_batches"]):
                print(
                    f"Warning: epoch {int(state['epoch']) + 1} now has {planned} batches but had "
                    f"{int(state['num_batches'])} when the checkpoint was taken (changed batch size, sampler or "
                    "data?); the rest of the epoch will not match the interrupted run."
                )

    def divergence_advice(self):
        """Which checkpoint to resume from after a divergence: the newest one whose weights have not blown up (a
        finite checkpoint can already hold weights a million times too large), and how."""
        manager = self.checkpoint_manager(self.save_dir) if self.save_dir is not None else None
        if manager is None or not manager.latest():
            return "No checkpoint had been written yet"
        good, diverged = last_good_checkpoint(manager, self.reference_param_norm)
        grown = ", ".join(f'"{osp.basename(p)}" ({g:.3g}x)' for p, g in diverged)
        if good is None:
            return (
                f"Every checkpoint kept holds weights more than {DIVERGED_GROWTH:g} times larger than at the start "
                "of the run "
                f"({grown}): training was diverging before it overflowed, so start again with a lower train.lr"
            )
        newer = (
            ""
            if not diverged
            else (
                f" (newer ones hold weights more than {DIVERGED_GROWTH:g} times larger than at the start of "
                f"the run, a sign of divergence: {grown})"
            )
        )
        return (
            f'The last good checkpoint, "{good}", is unchanged{newer}; once the cause is fixed, resume from it with '
            '--resume '
            f"{good} and, for instance, a lower train.lr (the configured learning rate applies on resume)"
        )

