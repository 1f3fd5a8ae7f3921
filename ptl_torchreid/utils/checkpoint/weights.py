"""State dicts and weight loading: find the model weights in any checkpoint layout, load them strictly or by
name and shape with a report of what was skipped, and summarise them (finite, L2 norm)."""
import math
import os
import os.path as osp
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch
import torch.nn as nn

from ..distributed import unwrap
from .errors import CheckpointMismatchError, NonFiniteCheckpointError
from .loading import _load_with_mode

_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def _strip_module(key):
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def extract_state_dict(checkpoint: Any) -> "OrderedDict[str, Any]":
    """Return the model state dict held by ``checkpoint``, with ``module.`` prefixes removed.

    Accepts ``{'state_dict': ...}`` (torchreid), ``{'model': ...}``, ``{'model_state_dict': ...}``,
    a raw state dict, or a whole pickled ``nn.Module``.
    """
    if isinstance(checkpoint, nn.Module):
        checkpoint = checkpoint.state_dict()
    if not isinstance(checkpoint, dict):
        raise ValueError(f"Expected a checkpoint dict or a state dict, got {type(checkpoint).__name__}.")
    sd = checkpoint
    for key in _STATE_DICT_KEYS:
        inner = checkpoint.get(key)
        if isinstance(inner, nn.Module):
            inner = inner.state_dict()
        if isinstance(inner, dict) and inner and any(torch.is_tensor(v) for v in inner.values()):
            sd = inner
            break
    if not any(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(
            "The checkpoint holds no tensors where a state dict was expected. Top-level keys: "
            f"{sorted(map(str, checkpoint.keys()))[:20]}; a model state dict is looked for under "
            f"{list(_STATE_DICT_KEYS)} or at the top level."
        )
    out: "OrderedDict[str, Any]" = OrderedDict()
    for k, v in sd.items():
        nk = _strip_module(k)
        if nk in out:
            raise ValueError(f'Key "{k}" collides with "{nk}" once the "module." prefix is removed.')
        out[nk] = v
    return out


# Module extra state (``get_extra_state``), e.g. a BConv-Cell's carried state, whose shape depends on the batch
# rather than on the model: the module's ``set_extra_state`` decides what fits.
_EXTRA_STATE_SUFFIX = "_extra_state"


def _shape(v):
    return tuple(v.shape) if hasattr(v, "shape") else None


@dataclass
class LoadReport:
    """What :func:`load_weights` did. ``shape_mismatched`` holds ``(key, checkpoint_shape, model_shape)``."""

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shape_mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    source: Optional[str] = None
    load_mode: Optional[str] = None  # 'weights_only' | 'allow_list' | 'trusted' | None (given an object)
    mode: str = "strict"

    @property
    def ok(self) -> bool:
        """True when every model key was loaded and every checkpoint key was used."""
        return not (self.missing or self.unexpected or self.shape_mismatched)

    @property
    def skipped(self) -> List[str]:
        """Checkpoint keys that were not loaded (unexpected or shape-mismatched)."""
        return list(self.unexpected) + [k for k, _, _ in self.shape_mismatched]

    def summary(self, limit: int = 50) -> str:
        src = f' from "{self.source}"' if self.source else ""
        how = f" [{self.load_mode}]" if self.load_mode else ""
        total = len(self.loaded) + len(self.missing)
        lines = [f"Loaded {len(self.loaded)}/{total} model tensors{src}{how}."]

        def block(title, items, fmt=str):
            if not items:
                return
            lines.append(f"  {title} ({len(items)}):")
            for item in items[:limit]:
                lines.append("    " + fmt(item))
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit} more")

        block(
            "shape mismatch, checkpoint vs model",
            self.shape_mismatched,
            lambda t: f"{t[0]}: {list(t[1]) if t[1] is not None else '?'} vs {list(t[2])}",
        )
        block("missing from the checkpoint (left as initialised)", self.missing)
        block("in the checkpoint but not in the model (ignored)", self.unexpected)
        return "\n".join(lines)

    def __str__(self):
        return self.summary()


def load_weights(
    model: nn.Module,
    path_or_checkpoint,
    mode: str = "strict",
    trust: bool = False,
    verbose: bool = True,
    map_location="cpu",
) -> LoadReport:
    """Load weights from a checkpoint file (or an already loaded checkpoint/state dict) into ``model``.

    ``mode='strict'``: every model key must be present with the same shape and every checkpoint key must
    be used; otherwise :class:`CheckpointMismatchError` lists the offending keys and the model is left
    untouched. ``mode='match'``: loads the keys that match by name and shape (the mode for fine-tuning from
    another dataset, e.g. a different classifier size) and prints what was skipped when ``verbose``. Even in
    match mode, a checkpoint of which nothing matches is an error.
    """
    if mode not in ("strict", "match"):
        raise ValueError(f"mode must be 'strict' or 'match', got {mode!r}")
    source, load_mode = None, None
    if isinstance(path_or_checkpoint, (str, os.PathLike)):
        source = osp.abspath(osp.expanduser(os.fspath(path_or_checkpoint)))
        checkpoint, load_mode = _load_with_mode(source, map_location, trust)
    else:
        checkpoint = path_or_checkpoint
    state_dict = extract_state_dict(checkpoint)

    target = unwrap(model)
    upgrade = getattr(target, "upgrade_state_dict", None)  # a model's own renaming of older key names
    if upgrade is not None:
        state_dict = upgrade(state_dict)
    model_sd = target.state_dict()
    report = LoadReport(source=source, load_mode=load_mode, mode=mode)
    to_load = OrderedDict()
    for k, v in state_dict.items():
        if k not in model_sd:
            report.unexpected.append(k)
        elif _shape(v) != _shape(model_sd[k]) and not k.endswith(_EXTRA_STATE_SUFFIX):
            report.shape_mismatched.append((k, _shape(v), _shape(model_sd[k])))
        else:
            to_load[k] = v
            report.loaded.append(k)
    report.missing = [k for k in model_sd if k not in state_dict]

    what = f'checkpoint "{source}"' if source else "the given checkpoint"
    hint_of = getattr(target, "mismatch_hint", None)  # a model's own advice on checkpoints of its other shapes
    hint = hint_of(state_dict) if hint_of is not None and not report.ok else None
    if not report.loaded:
        raise CheckpointMismatchError(
            report,
            f"No tensor of {what} matches {type(target).__name__} by name and shape; it was probably saved "
            f"from a different model.\n{report.summary(limit=20)}",
        )
    if mode == "strict" and not report.ok:
        raise CheckpointMismatchError(
            report,
            f"{what.capitalize()} does not match {type(target).__name__}; nothing was loaded. "
            + (f"{hint[0].upper()}{hint[1:]}. " if hint else "")
            + "To load only the tensors that match by name and shape (e.g. fine-tuning with a different number "
            f"of identities), use mode='match'.\n{report.summary()}",
        )
    result = target.load_state_dict(to_load, strict=False)
    # load_state_dict can still report keys (e.g. from custom _load_from_state_dict hooks); surface them.
    for k in result.unexpected_keys:
        if k not in report.unexpected:
            report.unexpected.append(k)
    if verbose:
        print(report.summary() + (f"\n  note: {hint}" if hint else ""))
    return report


def _weights_summary(state):
    """``(non-finite keys, L2 norm over the floating-point tensors)`` of the model weights in ``state``."""
    try:
        sd = extract_state_dict(state)
    except ValueError:
        return [], None  # no model weights in this state: nothing to check
    bad, total = [], 0.0
    for k, v in sd.items():
        if torch.is_tensor(v) and v.is_floating_point():
            if not bool(torch.isfinite(v).all()):
                bad.append(k)
            else:
                total += float(v.detach().double().pow(2).sum())
    return bad, math.sqrt(total)


def weight_norm(state) -> Optional[float]:
    """L2 norm over the floating-point model weights in ``state`` (a checkpoint or a state dict); None when it
    holds no weights. :class:`CheckpointManager` records it per file; a large growth means divergence."""
    return _weights_summary(state)[1]


def _check_finite(state, path):
    bad, norm = _weights_summary(state)
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise NonFiniteCheckpointError(
            f'Not saving "{path}": the model weights contain NaN or inf ({shown}). Training has diverged; the '
            "previous checkpoints are left as they are."
        )
    return norm


