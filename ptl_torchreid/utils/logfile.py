"""Standard output copied into a log file, as torchreid's ``Logger`` does, but as a context manager that restores
``sys.stdout``, appends, and keeps the console output (and the run's own error) when the file cannot be written.
"""
import contextlib
import os
import os.path as osp
import sys

from . import distributed as pdist
from .savedir import SaveDirError

__all__ = ["LogFile", "log_file"]


def log_file(path):
    """Standard output copied into ``path`` on rank 0; nothing on the other ranks."""
    return LogFile(path) if pdist.is_main_process() else contextlib.nullcontext()


class LogFile:
    """Copy of stdout into the file ``path`` while the ``with`` block runs (restored on exit)."""

    def __init__(self, path):
        self.path = path
        try:
            os.makedirs(osp.dirname(path), exist_ok=True)
            self.file = open(path, "a")
        except OSError as e:
            raise SaveDirError(
                e.errno,
                f"cannot write the log file '{path}': {e.strerror or e}; make data.save_dir writable or choose "
                "another one",
            ) from None
        self.console = sys.stdout

    def _file_failed(self, e):
        # The log file's disk is full (or gone): keep the console output and the run's own error message.
        file, self.file = self.file, None
        with contextlib.suppress(OSError):
            file.close()
        print(
            f"ptl-torchreid: warning: the log file '{self.path}' could not be written ({e.strerror or e}); "
            "output continues on the console only",
            file=sys.stderr,
        )

    def write(self, msg):
        self.console.write(msg)
        if self.file is not None:
            try:
                self.file.write(msg)
            except OSError as e:
                self._file_failed(e)

    def flush(self):
        self.console.flush()
        if self.file is not None:
            try:
                self.file.flush()
            except OSError as e:
                self._file_failed(e)

    def isatty(self):
        return False

    def __enter__(self):
        sys.stdout = self
        return self

    def __exit__(self, *exc):
        sys.stdout = self.console
        if self.file is not None:
            try:
                self.file.close()
            except OSError as e:
                self.file = None
                print(
                    f"ptl-torchreid: warning: the end of the log file '{self.path}' could not be written "
                    f"({e.strerror or e})",
                    file=sys.stderr,
                )
