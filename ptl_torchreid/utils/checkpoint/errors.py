"""Checkpoint errors: each names the file, the cause and what to do about it."""
import errno
import pickle
import re

TRUST_OPT_IN = (
    "--trust-checkpoint on the command line, trust=True in Python, or model.trust_checkpoint: True in the config"
)


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

