"""Hooks: the pieces of training that run around the engine's loop, one concern each.

A hook subclasses :class:`HookBase` and overrides the points it needs. ``self.trainer`` is the engine, set when
the hook is registered (:meth:`~ptl_torchreid.engine.trainer.PTLEngineMixin.register_hooks`); it exposes
``epoch``, ``batch_idx``, ``iteration``, ``max_epoch``, ``num_batches``, ``model``, ``net``, ``optimizer``,
``meters`` (the epoch's loss meters), ``step_summary`` (the last step's losses, name -> float), ``save_dir`` and
``epoch_summary`` (the last epoch's logged values).

The engine's :meth:`run` installs the default hooks below, in this order, then the registered ones; every point is
called on the hooks in that order. A hook that raises stops training there (that is how the non-finite-loss guard
and the signal stop work).
"""
import math
import signal

from ptl_torchreid.engine.reliability import TrainingInterrupted
from ptl_torchreid.models.bconv import RESET_POLICIES, check_reset_options
from ptl_torchreid.models.cell_sync import sync_cell_states
from ptl_torchreid.utils import distributed as pdist

__all__ = [
    "HookBase",
    "RESET_POLICIES",
    "NonFiniteLossError",
    "ResumePosition",
    "BackboneFreeze",
    "CellStateHook",
    "NonFiniteLossGuard",
    "IterationCheckpointer",
    "EpochLogger",
    "LRScheduler",
    "PeriodicEvaluation",
    "StopOnSignal",
]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; training stopped before the step changed the weights."""


class HookBase:
    """Base class of training hooks; every method does nothing unless overridden.

    Training calls ``before_train`` once, then per epoch ``before_epoch``, per step ``before_step`` (after the
    batch is loaded), ``before_backward`` (the loss computed: ``trainer.loss``, ``trainer.step_summary``; the
    weights unchanged) and ``after_step`` (the optimizer step taken, ``trainer.iteration`` counts it), then
    ``after_epoch``; ``after_train`` once training completed. ``before_test`` / ``after_test`` surround every
    evaluation (``trainer.test``), during :meth:`run` or not; ``trainer.last_results`` holds its results.
    """

    trainer = None

    def before_train(self):
        pass

    def after_train(self):
        pass

    def before_epoch(self):
        pass

    def after_epoch(self):
        pass

    def before_step(self):
        pass

    def before_backward(self):
        pass

    def after_step(self):
        pass

    def before_test(self):
        pass

    def after_test(self):
        pass


class ResumePosition(HookBase):
    """A resumed epoch: continue after its last trained batch (``trainer.first_batch``), with the epoch's loss
    meters and the RNG states of the checkpoint. Runs first, so that the hooks after it see where the epoch
    starts."""

    def before_epoch(self):
        t = self.trainer
        start, meters = 0, None
        if t._resume_at is not None and t._resume_at[0] == t.epoch:
            _, start, meters = t._resume_at
        t._resume_at = None
        t.first_batch = start
        for name, (total, count) in (meters or {}).items():
            meter = t.meters.meters[name]
            meter.sum, meter.count = float(total), int(count)
            meter.avg = meter.sum / max(meter.count, 1)
        if t._pending_rng is not None:
            t._restore_rng_state(t._pending_rng)
            t._pending_rng = None


class BackboneFreeze(HookBase):
    """torchreid's fixbase epochs (only ``open_layers`` train for the first ``fixbase_epoch`` epochs), then PTL's
    backbone freezing (``freeze_backbone_epochs``), unless fixbase already froze more than that this epoch."""

    def __init__(self, fixbase_epoch=0, open_layers=None):
        self.fixbase_epoch = fixbase_epoch
        self.open_layers = open_layers

    def before_epoch(self):
        t = self.trainer
        fixbase = self.open_layers is not None and (t.epoch + 1) <= self.fixbase_epoch
        # opens or closes layers and sets their train mode
        t.two_stepped_transfer_learning(t.epoch, self.fixbase_epoch, self.open_layers, model=t.net)
        if t.is_ptl and not fixbase:
            t.net.freeze_backbone(t.backbone_frozen(t.epoch))


class CellStateHook(HookBase):
    """The carried cell state: zeroed at every epoch start (``'epoch'``), before every ``every_n_iters``-th step
    of the run (``'iter'``) or never; after every step, averaged over the ranks of a distributed run (weighted
    by batch size), before anything is checkpointed."""

    def __init__(self, policy="epoch", every_n_iters=0):
        check_reset_options(policy, every_n_iters)
        self.policy = policy
        self.every_n_iters = int(every_n_iters)

    def before_epoch(self):
        # a resumed epoch continues with the carried state its checkpoint holds
        if self.policy == "epoch" and self.trainer.first_batch == 0:
            self.trainer.reset_state()

    def before_step(self):
        if self.policy == "iter" and self.trainer.iteration % self.every_n_iters == 0:
            self.trainer.reset_state()

    def after_step(self):
        t = self.trainer
        if t.world_size > 1 and t.is_ptl:
            sync_cell_states(t.model, batch_size=t.step_batch_size)


class NonFiniteLossGuard(HookBase):
    """Stop before a NaN/inf loss reaches the weights, saying where it happened and which checkpoint is safe."""

    def before_backward(self):
        self.check(self.trainer.loss, self.trainer.step_summary)

    def check(self, loss, summary):
        """Raise :class:`NonFiniteLossError` when ``loss`` is not finite on any rank (all ranks decide together:
        a rank that stopped alone would leave the others waiting in the gradient all-reduce)."""
        t = self.trainer
        value = float(loss.detach().float().sum())
        if not pdist.any_rank(not math.isfinite(value)):
            return
        if math.isfinite(value):
            what = "on another rank"
        else:
            what = ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if isinstance(v, float))
            what = (what or f"loss {value}") + (f" on rank {pdist.get_rank()}" if t.world_size > 1 else "")
        raise NonFiniteLossError(
            f"Non-finite loss ({what}) at epoch {t.epoch + 1}, batch {t.batch_idx + 1}/{t.num_batches} (iteration "
            f"{t.iteration + 1} of the run). Training stopped before this step changed the weights. "
            f"{t.divergence_advice()}. Usual causes: a learning rate too high (train.lr, ptl.lr_mult), fp16 "
            "overflow (train.amp_dtype bf16), or corrupt input."
        )


class IterationCheckpointer(HookBase):
    """A checkpoint every ``every_n_iters`` training steps of the run (0: none), mid-epoch included."""

    def __init__(self, every_n_iters=0):
        if every_n_iters < 0:
            raise ValueError(f"checkpoint_every_n_iters must be >= 0 (0: off), got {every_n_iters}")
        self.every_n_iters = int(every_n_iters)

    def after_step(self):
        t = self.trainer
        n = self.every_n_iters
        if n > 0 and t.iteration % n == 0 and t.save_dir is not None:
            t.save_iteration_checkpoint(t.meters)


class EpochLogger(HookBase):
    """The epoch's line (losses averaged over all ranks' samples, learning rates, state norm, time) on the
    console and as TensorBoard scalars; the values are kept as ``trainer.epoch_summary``."""

    def after_epoch(self):
        t = self.trainer
        if t.world_size > 1:
            for meter in t.meters.meters.values():
                meter.avg = pdist.all_reduce_mean(meter.avg, weight=max(meter.count, 1))
        values = {name: meter.avg for name, meter in t.meters.meters.items()}
        values.update(t.current_lrs())
        norm = t.state_norm()
        if norm is not None:
            values["state_norm"] = norm
        values["epoch_time"] = t.epoch_seconds()
        t.epoch_summary = values

        parts = []
        for name, v in values.items():
            if name == "acc":
                parts.append(f"acc {v:.1f}%")  # torchreid's accuracy is already in percent
            elif name.startswith("lr"):
                parts.append(f"{name} {v:.2e}")
            elif name == "epoch_time":
                parts.append(f"time {v:.1f}s")
            else:
                parts.append(f"{name} {v:.4f}")
        if t.is_ptl and t.backbone_frozen(t.epoch):
            parts.append("(backbone frozen)")
        print(f"epoch {t.epoch + 1}/{max(t.max_epoch, t.epoch + 1)}  {'  '.join(parts)}")

        if t.writer is not None:
            for name, v in values.items():
                tag = "PTL/" + name if name == "state_norm" else "Train/" + name
                t.writer.add_scalar(tag, v, t.epoch + 1)


class LRScheduler(HookBase):
    """The scheduler's step after each epoch (after its line is logged, before its checkpoint)."""

    def after_epoch(self):
        self.trainer.update_lr()


class PeriodicEvaluation(HookBase):
    """torchreid's schedule: evaluate and checkpoint every ``eval_freq`` epochs from ``start_eval`` on (the last
    epoch excepted), then a final evaluation, checkpointed when an epoch was trained. ``test_kwargs``: the
    arguments of ``trainer.test``."""

    def __init__(self, start_eval=0, eval_freq=-1, test_kwargs=None):
        self.start_eval = start_eval
        self.eval_freq = eval_freq
        self.test_kwargs = dict(test_kwargs or {})
        self.trained = False

    def before_train(self):
        self.trained = False

    def after_epoch(self):
        t = self.trainer
        self.trained = True
        done = t.epoch + 1
        if done >= self.start_eval and self.eval_freq > 0 and done % self.eval_freq == 0 and done != t.max_epoch:
            rank1 = t.test(**self.test_kwargs)
            t.save_model(t.epoch, rank1, t.save_dir)

    def after_train(self):
        t = self.trainer
        if t.max_epoch > 0:
            print("=> Final test")
            rank1 = t.test(**self.test_kwargs)
            if self.trained:
                t.save_model(t.epoch, rank1, t.save_dir)


class StopOnSignal(HookBase):
    """The safe points of a run for SIGINT/SIGTERM (``trainer.stop_signals``): after a training step, and after
    an epoch and its evaluation. When a signal arrived (on any rank), write a checkpoint unless this point's
    state is already saved, then raise :class:`~ptl_torchreid.engine.reliability.TrainingInterrupted`."""

    def __init__(self):
        self.trained = False

    def before_train(self):
        self.trained = False

    def after_step(self):
        self.stop_if_signalled(self.trainer.meters)

    def after_epoch(self):
        self.trained = True
        self.stop_if_signalled()

    def after_train(self):
        if self.trained:
            self.stop_if_signalled()

    def stop_if_signalled(self, meters=None):
        """``meters``: the epoch's loss meters at a point mid-epoch; None once the epoch is complete."""
        t = self.trainer
        if not pdist.any_rank(t.stop_signals.requested):
            return
        signum = t.stop_signals.signum or signal.SIGTERM
        path = None
        if t.save_dir is not None:
            manager = t.checkpoint_manager(t.save_dir)
            if t._saved_at_iteration == t.iteration:
                path = manager.latest()
            elif meters is not None:
                path = t.save_iteration_checkpoint(meters)
            else:  # the epoch is complete (its LR step taken): resuming starts the next one
                path = t._save_checkpoint(t.epoch, t.last_rank1, t.save_dir)
        raise TrainingInterrupted(signum, path, t.epoch + 1, t.iteration)
