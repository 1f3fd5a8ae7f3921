"""Safe, atomic, resumable checkpoints and weight loading.

Guarantees:

* **Atomic writes** (:mod:`.atomic`). :func:`save_checkpoint` writes to a temporary file in the target
  directory, flushes and fsyncs it, renames it over the target with :func:`os.replace` and fsyncs the directory.
  A crash at any moment leaves either the previous file or the new one at ``path``, never a truncated file.
* **Weights-only loading** (:mod:`.loading`). :func:`load_checkpoint` uses ``torch.load(weights_only=True)``, so
  a checkpoint cannot run code while it is read. Our own checkpoints hold only tensors and plain Python values
  (:func:`to_plain`). Files that hold numpy scalars or arrays (torchreid's own checkpoints store ``rank1`` as a
  numpy float) load through a short allow-list of numpy reconstructors, still without full unpickling.
  Anything else needs an explicit opt-in (``trust=True``, ``--trust-checkpoint``, ``model.trust_checkpoint``).
* **No silent partial loads** (:mod:`.weights`). :func:`load_weights` either loads every key
  (``mode='strict'``) or, in ``mode='match'`` (fine-tuning from another dataset), loads what matches by name and
  shape and reports what was skipped.
* **Periodic checkpoints** (:mod:`.manager`): :class:`CheckpointManager` keeps the newest ones, the best one and
  a ``latest.json`` pointer with each file's SHA-256. Errors are in :mod:`.errors`.
"""
from .atomic import TMP_SUFFIX, atomic_write_text, save_checkpoint, to_plain
from .errors import (
    TRUST_OPT_IN,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointReadError,
    CheckpointWriteError,
    NonFiniteCheckpointError,
    UntrustedCheckpointError,
    UntrustedCheckpointWarning,
)
from .loading import load_checkpoint, safe_numpy_globals
from .manager import CheckpointManager
from .weights import LoadReport, extract_state_dict, load_weights, weight_norm

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
    "atomic_write_text",
    "weight_norm",
    "load_checkpoint",
    "extract_state_dict",
    "load_weights",
    "safe_numpy_globals",
    "TRUST_OPT_IN",
    "TMP_SUFFIX",
]
