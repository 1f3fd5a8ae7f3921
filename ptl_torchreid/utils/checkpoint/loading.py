"""Safe checkpoint loading: weights-only first, then a short allow-list of numpy reconstructors, full unpickling
only on an explicit opt-in; corrupt, truncated and bit-rotten files are reported as such."""
import errno
import json
import os
import os.path as osp
import pickle
import warnings
from typing import Any, List, Tuple

import numpy as np
import torch

from ..savedir import sha256_file
from .errors import CheckpointReadError, UntrustedCheckpointError, UntrustedCheckpointWarning, _first_lines

# The pointer file CheckpointManager keeps next to its checkpoints; it records each file's SHA-256.
POINTER_NAME = "latest.json"


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


def _verify_checksum(path):
    """Compare ``path`` with the SHA-256 that its folder's ``latest.json`` recorded when it was written.

    Only while the file still has the recorded size and mtime: a file rewritten since (a later save under the
    same name, interrupted before the pointer was updated) cannot be checked, while bit rot keeps both."""
    try:
        with open(osp.join(osp.dirname(path), POINTER_NAME), "r", encoding="utf-8") as f:
            entry = (json.load(f).get("files") or {}).get(osp.basename(path))
        st = os.stat(path)
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(entry, dict) or entry.get("size") != st.st_size or entry.get("mtime_ns") != st.st_mtime_ns:
        return
    if sha256_file(path) != entry.get("sha256"):
        raise CheckpointReadError(
            f'Checkpoint file "{path}" is corrupt: its SHA-256 differs from the one recorded in '
            f'"{osp.join(osp.dirname(path), POINTER_NAME)}" when it was written, although its size and '
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


