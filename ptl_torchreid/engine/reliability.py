"""What the engine does when a run is stopped or resumed under other settings.

* :class:`StopSignals`: SIGINT / SIGTERM during training ask for a stop at the next safe point (after a training
  step, or after an epoch's evaluation), where the engine writes a checkpoint and raises
  :class:`TrainingInterrupted`; a second signal stops at once, without one.
* :func:`load_optimizer_state`: a checkpoint of another optimizer (Adam state into SGD) is refused at resume with
  what does not fit, instead of a ``KeyError`` at the first step.
* :func:`apply_configured_lr`: the configured base learning rates (``train.lr``, ``ptl.lr_mult``) win over the
  checkpoint's; the schedule keeps its position (the current rate is rescaled by new / old base rate).
* :func:`last_good_checkpoint`: after a non-finite loss, the newest checkpoint whose weights have not blown up.
"""
import math
import signal
import sys
import threading

__all__ = [
    "DIVERGED_GROWTH",
    "StopSignals",
    "TrainingInterrupted",
    "apply_configured_lr",
    "last_good_checkpoint",
    "load_optimizer_state",
    "optimizer_mismatch",
]

# A checkpoint whose weights' L2 norm is more than this many times that at the start of the run is taken as
# diverged: normal training (weight decay on) changes the norm by a small factor, a learning rate that is far too
# high multiplies it by orders of magnitude before the loss overflows.
DIVERGED_GROWTH = 10.0

_SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class TrainingInterrupted(KeyboardInterrupt):
    """Training was stopped by SIGINT or SIGTERM. ``checkpoint``: the checkpoint written at the stop (None when
    there was none to write, e.g. on a second signal); the command line exits with ``128 + signum``."""

    def __init__(self, signum, checkpoint=None, epoch=None, iteration=None):
        self.signum = int(signum)
        self.checkpoint = checkpoint
        self.epoch = epoch
        self.iteration = iteration
        where = "" if epoch is None else f" at epoch {epoch}, iteration {iteration}"
        saved = (f'; checkpoint saved to "{checkpoint}"' if checkpoint else "; no checkpoint was written")
        super().__init__(f"{self.signal_name}{where}{saved}")

    @property
    def signal_name(self):
        return _SIGNAL_NAMES.get(self.signum, f"signal {self.signum}")

    @property
    def exit_status(self):
        return 128 + self.signum


class StopSignals:
    """While active (a context manager), SIGINT and SIGTERM set :attr:`signum` instead of killing the process; the
    owner polls :attr:`requested` at its safe points. A second signal raises :class:`TrainingInterrupted` at once.
    Only the main thread can install handlers; elsewhere this does nothing."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    @property
    def requested(self):
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise TrainingInterrupted(signum)
        self.signum = signum
        try:
            print(
                f"\nReceived {_SIGNAL_NAMES.get(signum, signum)}: stopping after the current step with a checkpoint "
                "(send it again to stop at once, "
                "without one).",
                file=sys.stderr,
                flush=True,
            )
        except (OSError, RuntimeError, ValueError):
            pass  # a print interrupted by the signal; the stop itself still happens

    def __enter__(self):
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNAL_NAMES:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):
                    pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}


def optimizer_mismatch(optimizer, saved_state):
    """Why ``saved_state`` (an optimizer ``state_dict``) cannot drive ``optimizer``, or None when it fits: the
    hyper-parameters ``optimizer`` needs that the saved groups lack, and the ones the saved groups have that
    ``optimizer`` does not use."""
    groups = saved_state.get("param_groups") if isinstance(saved_state, dict) else None
    if not isinstance(groups, list) or not groups:
        return "it holds no parameter groups"
    needed = set(optimizer.defaults) - _OPTIONAL_KEYS
    fresh = {k for g in optimizer.param_groups for k in g}
    saved = {k for g in groups if isinstance(g, dict) for k in g}
    missing = sorted(needed - saved)
    if not missing:
        return None
    unused = sorted(saved - fresh - _OPTIONAL_KEYS - {"params", "initial_lr", "name"})
    instead = f"; the saved state has {', '.join(unused)} instead" if unused else ""
    return f"this run's {type(optimizer).__name__} needs {', '.join(missing)} that the saved state lacks{instead}"


# Flags that optimizers' __setstate__ fills in when an older checkpoint lacks them (they do not tell optimizers
# apart, and a checkpoint of an older torch must still resume).
_OPTIONAL_KEYS = {
    "foreach",
    "maximize",
    "capturable",
    "differentiable",
    "fused",
    "decoupled_weight_decay",
    "amsgrad",
    "nesterov",
}


def load_optimizer_state(optimizer, saved_state, source, saved_type=None):
    """``optimizer.load_state_dict(saved_state)``, refusing (``ValueError`` with what does not fit, optimizer left
    as it was) a state of another kind of optimizer or of other parameter groups."""
    why = optimizer_mismatch(optimizer, saved_state)
    if why is None:
        try:
            optimizer.load_state_dict(saved_state)
            return
        except (ValueError, KeyError) as e:
            why = str(e)
    raise ValueError(
        f'Cannot resume from "{source}": its optimizer state{f" ({saved_type})" if saved_type else ""} does not fit '
        f'this run\'s optimizer ({type(optimizer).__name__}): {why}. '
        "Resume with the optimizer settings it was saved with (train.optim, ptl.lr_mult groups), or "
        "start a new run from its weights with model.load_weights."
    )


def apply_configured_lr(optimizer, scheduler, configured):
    """After a resume: make ``configured`` (the base learning rate per group, as the config built them) the
    schedule's base rates, scaling each group's current rate by new / old base so the schedule keeps its position.
    Returns ``[(group name, old base, new base, current rate)]`` for the groups that changed."""
    changed = []
    base_lrs = list(getattr(scheduler, "base_lrs", []))
    for i, (group, new) in enumerate(zip(optimizer.param_groups, configured)):
        old = group.get("initial_lr", base_lrs[i] if i < len(base_lrs) else group["lr"])
        if math.isclose(old, new, rel_tol=1e-9, abs_tol=0.0):
            continue
        group["lr"] = group["lr"] * (new / old) if old > 0 else new
        group["initial_lr"] = new
        if i < len(base_lrs):
            base_lrs[i] = new
        changed.append((group.get("name", f"group {i}"), old, new, group["lr"]))
    if changed:
        scheduler.base_lrs = base_lrs
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports
    return changed


def last_good_checkpoint(manager, reference_norm):
    """``(path, diverged)``: the newest checkpoint of ``manager`` (periodic ones, then ``model-best``) whose
    weights' norm is at most :data:`DIVERGED_GROWTH` times ``reference_norm`` (that at the start of the run), and
    ``[(path, growth)]`` of the newer ones that are not. A checkpoint without a recorded norm counts as good."""
    candidates = list(reversed(manager.checkpoints()))
    if manager.best() is not None:
        candidates.append(manager.best())
    diverged = []
    for path in candidates:
        norm = (manager.record(path) or {}).get("param_norm")
        if reference_norm and norm is not None and norm > DIVERGED_GROWTH * reference_norm:
            diverged.append((path, norm / reference_norm))
            continue
        return path, diverged
    return None, diverged
