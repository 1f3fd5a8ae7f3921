"""Safe, atomic, resumable checkpoints and weight loading.

Guarantees:

* **Atomic writes.** :func:`save_checkpoint` writes to a temporary file in the target directory, flushes and
  fsyncs it, renames it over the target with :func:`os.replace` and fsyncs the directory. A crash at any moment
  leaves either the previous file or the new one at ``path``, never a truncated file.
* **Weights-only loading.** :func:`load_checkpoint` uses ``torch.load(weights_only=True)``, so a checkpoint
  cannot run code while it is read. Our own checkpoints hold only tensors and plain Python values
  (:func:`to_plain`). Files that hold numpy scalars or arrays (torchreid's own checkpoints store ``rank1`` as a
  numpy float) load through a short allow-list of numpy reconstructors, still without full unpickling.
  Anything else needs an explicit opt-in (``trust=True``, ``--trust-checkpoint``, ``model.trust_checkpoint``).
* **No silent partial loads.** :func:`load_weights` either loads every key (``mode='strict'``) or, in
  ``mode='match'`` (fine-tuning from another dataset), loads what matches by name and shape and reports
  what was skipped.
"""
import datetime
import enum
import errno
import json
import math
import os
import os.path as osp
import pathlib
import pickle
import re
import shutil
import tempfile
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .savedir import file_mode, owner_gone, owner_tag, sha256_file

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "CheckpointReadError",
    "UntrustedCheckpointError",
    "UntrustedCheckpointWarning",
    "CheckpointMismatchError",
    "NonFiniteCheckpointError",
    "LoadReport",
    "CheckpointManager",
    "to_plain",
    "save_checkpoint",
    "weight_norm",
    "load_checkpoint",
    "extract_state_dict",
    "load_weights",
    "safe_numpy_globals",
    "TRUST_OPT_IN",
]

TRUST_OPT_IN = (
    "--trust-checkpoint on the command line, trust=True in Python, or model.trust_checkpoint: True in the config"
)

# Temporary files carry this suffix so that stale ones (left by a killed process) can be recognised.
TMP_SUFFIX = ".ptl-tmp"


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------
class CheckpointError(Exception):
    """Base class of the checkpoint errors below."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full, permission denied, ...). The previous file is intact."""

    def __init__(self, path, cause):
        self.path = str(path)
        self.cause = cause
        err = getattr(cause, "errno", None)
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        message = (
            f'Could not write checkpoint "{self.path}": {reason}'
            + (f" [errno {err}]" if err is not None else "")
            + ". The previous checkpoint at this path (if any) is unchanged. "
            + _write_hint(err)
        )
        OSError.__init__(self, err, message)
        self.message = message

    def __str__(self):
        return self.message


def _write_hint(err):
    if err == errno.ENOSPC or err == getattr(errno, "EDQUOT", None):
        return "Free disk space or point the save directory elsewhere."
    if err in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "Check that the save directory is writable."
    return "Check the save directory."


class CheckpointReadError(CheckpointError, RuntimeError):
    """A checkpoint file exists but cannot be read: truncated, corrupt, or not a checkpoint."""


class UntrustedCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The checkpoint needs full unpickling, which can execute arbitrary code; loading it was refused."""

    def __init__(self, path, reason=""):
        self.path = str(path)
        self.reason = reason
        message = (
            f'Refusing to load checkpoint "{self.path}": it cannot be read with weights_only=True (nor with the '
            "allow-list of safe numpy globals), so loading it means full unpickling, which can execute "
            "arbitrary code contained in the file. Only do this for a file from a source you trust. "
            f"To opt in, use {TRUST_OPT_IN}."
        )
        if reason:
            message += f"\nReason given by torch.load: {_first_lines(reason)}"
        super().__init__(message)


class NonFiniteCheckpointError(CheckpointError, ValueError):
    """The model weights to be saved contain NaN or inf; nothing was written."""


class UntrustedCheckpointWarning(UserWarning):
    """Emitted when a checkpoint is loaded with full unpickling because the caller trusted it."""


class CheckpointMismatchError(CheckpointError, RuntimeError):
    """The checkpoint's keys or shapes do not match the model (strict mode), or nothing matched at all."""

    def __init__(self, report, message):
        self.report = report
        super().__init__(message)


def _first_lines(text, n=6):
    # torch's weights-only messages are long; keep the informative part (the WeightsUnpickler error).
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text))
    lines = [ln for ln in text.splitlines() if ln.strip()]
    keep = [
        ln.strip()
        for ln in lines
        if "Please file an issue" not in ln
        and any(s in ln for s in ("GLOBAL", "Unsupported", "Trying to", "Can only", "reduce"))
    ]
    return " | ".join((keep or lines)[:n])


# --------------------------------------------------------------------------------------------------------------
# Plain conversion
# --------------------------------------------------------------------------------------------------------------
# Containers that torch's weights-only unpickler rebuilds itself; they keep their type (a scheduler's
# ``milestones`` must stay a Counter, for instance).
_KEEP_DICT_TYPES = (dict, OrderedDict, Counter)
_SCALARS = (bool, int, float, complex, str, bytes, bytearray, type(None))


def to_plain(obj: Any, _where: str = "state") -> Any:
    """Return a copy of ``obj`` that ``torch.load(weights_only=True)`` can read.

    numpy scalars become Python numbers, numpy arrays become tensors (object/string arrays become lists),
    tensor subclasses become plain tensors, other dict subclasses (e.g. yacs ``CfgNode``) become dicts,
    named tuples become tuples, paths become strings, enums their values, dates ISO strings. Anything else
    raises ``TypeError`` naming where it sits in ``obj``.
    """
    if isinstance(obj, torch.Tensor):
        if type(obj) in (torch.Tensor, nn.Parameter):
            return obj
        return obj.as_subclass(torch.Tensor)
    if isinstance(obj, np.generic):
        return to_plain(obj.item(), _where)
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "biufc":
            return torch.from_numpy(np.ascontiguousarray(obj).copy())
        return to_plain(obj.tolist(), _where)
    if isinstance(obj, enum.Enum):
        return to_plain(obj.value, _where)
    if isinstance(obj, bool) or type(obj) in _SCALARS:
        return obj
    if isinstance(obj, (int, float, str, bytes)):
        # subclasses of builtins (IntEnum handled above, str subclasses, ...) collapse to the builtin
        for base in (bool, int, float, str, bytes):
            if isinstance(obj, base):
                return base(obj)
    if isinstance(obj, (torch.dtype, torch.device, torch.Size)):
        return obj
    if isinstance(obj, (pathlib.PurePath,)):
        return str(obj)
    if isinstance(obj, (datetime.datetime, datetime.date, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, dict):
        out_type = type(obj) if type(obj) in _KEEP_DICT_TYPES else dict
        out = out_type()
        for k, v in obj.items():
            key = to_plain(k, f"{_where} (key {k!r})")
            out[key] = to_plain(v, f"{_where}[{k!r}]")
        return out
    if isinstance(obj, tuple):  # named tuples included: their class would be an unknown global
        return tuple(to_plain(v, f"{_where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, list):
        return [to_plain(v, f"{_where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return {to_plain(v, f"{_where} (set item)") for v in obj}
    if hasattr(obj, "__dict__") and type(obj).__name__ == "Namespace":  # argparse.Namespace
        return to_plain(vars(obj), _where)
    hint = " Store its .state_dict() instead." if hasattr(obj, "state_dict") else ""
    raise TypeError(
        f"{_where} is a {type(obj).__module__}.{type(obj).__qualname__}, which a weights-only checkpoint "
        f"cannot hold. Convert it to tensors or plain Python values.{hint}"
    )


# --------------------------------------------------------------------------------------------------------------
# Atomic writing
# --------------------------------------------------------------------------------------------------------------
def _fsync_dir(dirname):
    # Makes the rename itself durable. Not every platform can open a directory (Windows); there the rename
    # is still atomic, only its durability on power loss is weaker.
    try:
        fd = os.open(dirname, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path, write_fn):
    """Run ``write_fn(fileobj)`` on a temporary file next to ``path``, then move it onto ``path``.

    The temporary file is named after its owner (see :func:`~ptl_torchreid.utils.savedir.owner_tag`) and gets
    the mode a plain ``open()`` would (umask), not ``mkstemp``'s 0600."""
    path = osp.abspath(osp.expanduser(os.fspath(path)))
    dirname = osp.dirname(path)
    tmp = None
    try:
        os.makedirs(dirname, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dirname, prefix=f".{osp.basename(path)}.{owner_tag()}.", suffix=TMP_SUFFIX)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(dirname)
    except OSError as e:
        raise CheckpointWriteError(path, e) from e
    except RuntimeError as e:
        # torch.save reports a failed write (a full disk, typically) as a RuntimeError from its zip writer
        # ("enforce fail at inline_container.cc ... unexpected pos") and loses the errno.
        raise CheckpointWriteError(path, _runtime_write_cause(dirname, e)) from e
    finally:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass
    return path


# Below this much free space, a failed torch.save is taken as a full disk.
_LOW_SPACE_BYTES = 64 << 20


def _runtime_write_cause(dirname, e):
    try:
        free = shutil.disk_usage(dirname).free
    except OSError:
        free = None
    detail = " ".join(str(e).split())
    if free is not None and free < _LOW_SPACE_BYTES:
        return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({_human_bytes(free)} free; torch.save: {detail})")
    return OSError(None, f"torch.save failed: {detail}")


def _human_bytes(n):
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024.0


def save_checkpoint(state: Any, path: Union[str, os.PathLike]) -> str:
    """Atomically write ``to_plain(state)`` to ``path``; return the absolute path.

    On a failed write (disk full, permission denied, ...) the temporary file is removed, the previous file
    at ``path`` is left untouched, and :class:`CheckpointWriteError` names the path and the cause.
    """
    plain = to_plain(state)
    return _atomic_write(path, lambda f: torch.save(plain, f))


def _atomic_copy(src, dst):
    def copy(f):
        with open(src, "rb") as s:
            while True:
                chunk = s.read(1 << 22)
                if not chunk:
                    break
                f.write(chunk)

    return _atomic_write(dst, copy)


def _atomic_write_text(path, text):
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
def _numpy_multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


def safe_numpy_globals() -> List[Any]:
    """The allow-list used for files holding numpy scalars/arrays (torchreid stores ``rank1`` as one).

    Each entry only rebuilds a number or a numeric array from bytes; no entry can call arbitrary code.
    Object, void and datetime dtypes are deliberately absent (object arrays could smuggle other objects).
    Both the numpy 2 (``numpy._core``) and numpy 1 (``numpy.core``) names are accepted.
    """
    ma = _numpy_multiarray()
    allowed: List[Any] = [np.dtype, np.ndarray]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        allowed.append((ma.scalar, f"{mod}.scalar"))
        allowed.append((ma._reconstruct, f"{mod}._reconstruct"))
    codes = "?bhilqBHILQefdgFDGUS"
    for c in codes:
        dtype_cls = type(np.dtype(c))
        if dtype_cls not in allowed:
            allowed.append(dtype_cls)
    return allowed


def _torch_load(path, map_location, weights_only, encoding=None):
    kwargs = {}
    if encoding is not None:
        kwargs["encoding"] = encoding
    with warnings.catch_warnings():
        # torch warns that encoding is ignored with weights_only (it is not) and about protocol > 2 pickles;
        # neither helps the user.
        warnings.filterwarnings("ignore", message="pickle_load_args only works")
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location=map_location, weights_only=weights_only, **kwargs)


def _read(path, map_location, weights_only):
    """torch.load with a latin1 retry for files pickled by Python 2 (as torchreid does)."""
    try:
        return _torch_load(path, map_location, weights_only)
    except UnicodeDecodeError:
        return _torch_load(path, map_location, weights_only, encoding="latin1")


def _corrupt(path, e):
    return CheckpointReadError(
        f'Could not read checkpoint "{path}": {type(e).__name__}: {_first_lines(e, 3) or "(no message)"}. '
        "The file looks truncated or corrupt (an interrupted copy or download?), or is not a PyTorch "
        "checkpoint. Use another copy or an earlier checkpoint."
    )


def _load_with_mode(path, map_location="cpu", trust=False) -> Tuple[Any, str]:
    """Load ``path``; return ``(object, mode)`` with mode 'weights_only', 'allow_list' or 'trusted'."""
    if path is None:
        raise ValueError("Checkpoint path is None; give the path of a checkpoint file.")
    path = osp.abspath(osp.expanduser(os.fspath(path)))
    if not osp.exists(path):
        err = FileNotFoundError(errno.ENOENT, f'Checkpoint file not found: "{path}"')
        err.filename = path
        raise err
    if osp.isdir(path):
        err = IsADirectoryError(errno.EISDIR, f'Checkpoint path "{path}" is a directory, not a file')
        err.filename = path
        raise err
    if osp.getsize(path) == 0:
        raise CheckpointReadError(f'Checkpoint file "{path}" is empty (0 bytes); it was never fully written.')
    _verify_checksum(path)

    try:
        return _read(path, map_location, True), "weights_only"
    except pickle.UnpicklingError as e:
        refusal = e
    except (RuntimeError, EOFError, ValueError, OSError, UnicodeDecodeError) as e:
        raise _corrupt(path, e) from e

    try:
        with torch.serialization.safe_globals(safe_numpy_globals()):
            return _read(path, map_location, True), "allow_list"
    except pickle.UnpicklingError as e:
        refusal = e
    except (RuntimeError, EOFError, ValueError, OSError, UnicodeDecodeError) as e:
        raise _corrupt(path, e) from e

    if not trust:
        raise UntrustedCheckpointError(path, str(refusal)) from None

    warnings.warn(
        f'Loading checkpoint "{path}" with full unpickling (weights_only=False) because it was marked as '
        "trusted. Unpickling can execute arbitrary code contained in the file; do this only for files from a "
        "source you trust.",
        UntrustedCheckpointWarning,
        stacklevel=3,
    )
    try:
        return _read(path, map_location, False), "trusted"
    except Exception as e:  # full unpickling can fail in any way (missing classes, garbage bytes, ...)
        raise _corrupt(path, e) from e


def _file_record(path):
    """What ``latest.json`` keeps of a checkpoint file: its SHA-256, with the size and mtime it had then."""
    st = os.stat(path)
    return {"sha256": sha256_file(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verify_checksum(path):
    """Compare ``path`` with the SHA-256 that its folder's ``latest.json`` recorded when it was written.

    Only while the file still has the recorded size and mtime: a file rewritten since (a later save under the
    same name, interrupted before the pointer was updated) cannot be checked, while bit rot keeps both."""
    try:
        with open(osp.join(osp.dirname(path), CheckpointManager.POINTER), "r", encoding="utf-8") as f:
            entry = (json.load(f).get("files") or {}).get(osp.basename(path))
        st = os.stat(path)
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(entry, dict) or entry.get("size") != st.st_size or entry.get("mtime_ns") != st.st_mtime_ns:
        return
    if sha256_file(path) != entry.get("sha256"):
        raise CheckpointReadError(
            f'Checkpoint file "{path}" is corrupt: its SHA-256 differs from the one recorded in '
            f'"{osp.join(osp.dirname(path), CheckpointManager.POINTER)}" when it was written, although its size and '
            "time stamp are unchanged (bit rot on the disk, or a damaged copy). Use another copy or an earlier "
            "checkpoint."
        )


def load_checkpoint(path, map_location="cpu", trust: bool = False) -> Any:
    """Load a checkpoint safely.

    Tries ``torch.load(weights_only=True)``, then the same with :func:`safe_numpy_globals` allowed. If the
    file still needs full unpickling, raises :class:`UntrustedCheckpointError` unless ``trust=True``, in
    which case it is loaded with ``weights_only=False`` and an :class:`UntrustedCheckpointWarning` is emitted.

    Raises ``FileNotFoundError`` (missing file) and :class:`CheckpointReadError` (truncated/corrupt file).
    """
    return _load_with_mode(path, map_location, trust)[0]


# --------------------------------------------------------------------------------------------------------------
# State dicts and weight loading
# --------------------------------------------------------------------------------------------------------------
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


def _unwrap(model):
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


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

    target = _unwrap(model)
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
    if not report.loaded:
        raise CheckpointMismatchError(
            report,
            f"No tensor of {what} matches {type(target).__name__} by name and shape; it was probably saved "
            f"from a different model.\n{report.summary(limit=20)}",
        )
    if mode == "strict" and not report.ok:
        raise CheckpointMismatchError(
            report,
            f"{what.capitalize()} does not match {type(target).__name__}; nothing was loaded. To load only "
            "the tensors that match by name and shape (e.g. fine-tuning with a different number of "
            f"identities), use mode='match'.\n{report.summary()}",
        )
    result = target.load_state_dict(to_load, strict=False)
    # load_state_dict can still report keys (e.g. from custom _load_from_state_dict hooks); surface them.
    for k in result.unexpected_keys:
        if k not in report.unexpected:
            report.unexpected.append(k)
    if verbose:
        print(report.summary())
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


# --------------------------------------------------------------------------------------------------------------
# Periodic checkpoints with a "latest" pointer
# --------------------------------------------------------------------------------------------------------------
_EPOCH_RE = re.compile(r"^model\.pth\.tar-(\d+)$")
_ITER_RE = re.compile(r"^model-iter(\d+)\.pth\.tar$")


class CheckpointManager:
    """Periodic checkpoints in ``save_dir`` (torchreid's naming), the best one, and a ``latest`` pointer.

    * ``save(state, epoch=e)`` writes ``model.pth.tar-<e>``; ``save(state, iteration=k)`` writes
      ``model-iter<k>.pth.tar`` (mid-epoch saves). Writes are atomic.
    * ``is_best=True`` also writes ``model-best.pth.tar`` (atomically, as a copy of the new file).
    * ``latest.json`` is then rewritten atomically to name the new file; only after that are periodic
      checkpoints beyond the ``keep_last`` most recent ones deleted. ``keep_last=None`` keeps all.
    * :meth:`latest` returns the path a resume should use, or None.

    If a write fails, :class:`CheckpointWriteError` propagates and nothing else changes: the pointer still
    names the previous checkpoint and no old checkpoint is deleted.
    """

    POINTER = "latest.json"
    BEST = "model-best.pth.tar"

    def __init__(self, save_dir, keep_last: Optional[int] = 3):
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"keep_last must be a positive integer or None (keep all), got {keep_last!r}")
        self.save_dir = osp.abspath(osp.expanduser(os.fspath(save_dir)))
        self.keep_last = keep_last
        self._history: List[str] = self._recover_history()
        self._remove_stale_temp_files()

    # -- naming --------------------------------------------------------------------------------------------
    @staticmethod
    def filename(epoch=None, iteration=None) -> str:
        if iteration is not None:
            return f"model-iter{int(iteration)}.pth.tar"
        if epoch is not None:
            return f"model.pth.tar-{int(epoch)}"
        raise ValueError("CheckpointManager.save needs an epoch or an iteration to name the checkpoint.")

    @staticmethod
    def is_periodic(name: str) -> bool:
        return bool(_EPOCH_RE.match(name) or _ITER_RE.match(name))

    @property
    def pointer_path(self) -> str:
        return osp.join(self.save_dir, self.POINTER)

    @property
    def best_path(self) -> str:
        return osp.join(self.save_dir, self.BEST)

    # -- state ---------------------------------------------------------------------------------------------
    def _read_pointer(self) -> Optional[dict]:
        try:
            with open(self.pointer_path, "r", encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def _on_disk(self) -> List[str]:
        try:
            names = [n for n in os.listdir(self.save_dir) if self.is_periodic(n)]
        except OSError:
            return []

        def age(n):
            m = _EPOCH_RE.match(n) or _ITER_RE.match(n)
            try:
                mtime = osp.getmtime(osp.join(self.save_dir, n))
            except OSError:
                mtime = 0.0
            return (mtime, int(m.group(1)))

        return sorted(names, key=age)

    def _recover_history(self) -> List[str]:
        """Save order: the pointer's history, preceded by periodic files it does not know (oldest first)."""
        data = self._read_pointer() or {}
        known = [n for n in data.get("history", []) if isinstance(n, str) and self.is_periodic(n)]
        disk = self._on_disk()
        known = [n for n in known if n in disk]
        return [n for n in disk if n not in known] + known

    def _remove_stale_temp_files(self):
        try:
            names = os.listdir(self.save_dir)
        except OSError:
            return
        for n in names:
            # only files whose writer has exited: another run may be saving into this folder right now
            if n.startswith(".") and n.endswith(TMP_SUFFIX) and owner_gone(n, TMP_SUFFIX):
                try:
                    os.remove(osp.join(self.save_dir, n))
                except OSError:
                    pass

    # -- API -----------------------------------------------------------------------------------------------
    def save(
        self,
        state,
        epoch: Optional[int] = None,
        iteration: Optional[int] = None,
        is_best: bool = False,
        require_finite: bool = True,
    ) -> str:
        """Write ``state``; return the path of the periodic checkpoint written.

        With ``require_finite`` (default), model weights holding NaN/inf raise
        :class:`NonFiniteCheckpointError` before anything is written, so a diverged model never replaces
        the last good checkpoint.
        """
        name = self.filename(epoch, iteration)
        if require_finite:
            norm = _check_finite(state, osp.join(self.save_dir, name))
        else:
            norm = _weights_summary(state)[1]
        path = save_checkpoint(state, osp.join(self.save_dir, name))
        prev = self._read_pointer() or {}
        files = {n: r for n, r in (prev.get("files") or {}).items() if n in self._history or n == self.BEST}
        files[name] = dict(_file_record(path), param_norm=norm)
        if is_best:
            _atomic_copy(path, self.best_path)
            files[self.BEST] = dict(_file_record(self.best_path), param_norm=norm, copy_of=name)
        history = [n for n in self._history if n != name] + [name]
        pointer = {"latest": name, "epoch": epoch, "iteration": iteration, "history": history}
        if is_best or osp.exists(self.best_path):
            pointer["best_epoch"] = epoch if is_best else prev.get("best_epoch")
        pointer["files"] = files
        _atomic_write_text(self.pointer_path, json.dumps(pointer, indent=1))
        self._history = history
        self._prune()
        return path

    def _prune(self):
        if self.keep_last is None:
            return
        while len(self._history) > self.keep_last:
            old = self._history.pop(0)
            try:
                os.remove(osp.join(self.save_dir, old))
            except FileNotFoundError:
                pass
            except OSError as e:
                warnings.warn(f'Could not delete old checkpoint "{osp.join(self.save_dir, old)}": {e}')
        data = self._read_pointer()
        if data is not None and data.get("history") != self._history:
            data["history"] = list(self._history)
            data["files"] = {n: r for n, r in (data.get("files") or {}).items() if n in self._history or n == self.BEST}
            try:
                _atomic_write_text(self.pointer_path, json.dumps(data, indent=1))
            except CheckpointWriteError as e:
                # the pointer still names the newest file; only its history is stale
                warnings.warn(str(e))

    def checkpoints(self) -> List[str]:
        """Paths of the periodic checkpoints kept, oldest first."""
        return [osp.join(self.save_dir, n) for n in self._history if osp.exists(osp.join(self.save_dir, n))]

    def latest(self) -> Optional[str]:
        """Path of the newest complete checkpoint, or None when there is none.

        Uses the pointer file; falls back to the newest periodic file on disk when the pointer is missing
        (e.g. a directory written by torchreid itself) or names a file that no longer exists.
        """
        data = self._read_pointer()
        if data is not None:
            name = data.get("latest")
            if isinstance(name, str) and self.is_periodic(name) and osp.isfile(osp.join(self.save_dir, name)):
                return osp.join(self.save_dir, name)
        disk = self._on_disk()
        return osp.join(self.save_dir, disk[-1]) if disk else None

    def record(self, name_or_path) -> Optional[dict]:
        """What ``latest.json`` holds about a checkpoint of this folder (``sha256``, ``size``, ``mtime_ns``,
        ``param_norm``: the L2 norm of its weights), or None."""
        entry = ((self._read_pointer() or {}).get("files") or {}).get(osp.basename(os.fspath(name_or_path)))
        return entry if isinstance(entry, dict) else None

    def best(self) -> Optional[str]:
        """Path of ``model-best.pth.tar`` if it exists."""
        return self.best_path if osp.isfile(self.best_path) else None
