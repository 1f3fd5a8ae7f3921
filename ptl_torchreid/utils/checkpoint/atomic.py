"""Atomic checkpoint writing, and the conversion that makes a state loadable with ``weights_only=True``.

A file is written to a temporary file in the target directory, flushed and fsynced, renamed over the target with
:func:`os.replace`, and the directory is fsynced: a crash at any moment leaves either the previous file or the new
one at the path, never a truncated file.
"""
import datetime
import enum
import errno
import os
import os.path as osp
import pathlib
import shutil
import tempfile
from collections import Counter, OrderedDict
from typing import Any, Union

import numpy as np
import torch
import torch.nn as nn

from ..savedir import file_mode, owner_tag
from .errors import CheckpointWriteError

# Temporary files carry this suffix so that stale ones (left by a killed process) can be recognised.
TMP_SUFFIX = ".ptl-tmp"

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


def atomic_write_text(path, text):
    """Atomically write ``text`` (UTF-8) to ``path``, as :func:`save_checkpoint` writes a checkpoint."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))

