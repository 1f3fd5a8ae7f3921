"""Periodic checkpoints in a save directory, the best one, and an atomically rewritten ``latest`` pointer."""
import json
import os
import os.path as osp
import re
import warnings
from typing import List, Optional

from ..savedir import owner_gone, sha256_file
from .atomic import TMP_SUFFIX, _atomic_copy, atomic_write_text, save_checkpoint
from .errors import CheckpointWriteError
from .loading import POINTER_NAME
from .weights import _check_finite, _weights_summary


def _file_record(path):
    """What ``latest.json`` keeps of a checkpoint file: its SHA-256, with the size and mtime it had then."""
    st = os.stat(path)
    return {"sha256": sha256_file(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


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

    POINTER = POINTER_NAME
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
        atomic_write_text(self.pointer_path, json.dumps(pointer, indent=1))
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
                atomic_write_text(self.pointer_path, json.dumps(data, indent=1))
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

