"""Who owns a save directory: a lock file per run, owner-tagged temporary files, umask-following file modes.

A training run writes checkpoints, ``latest.json`` and logs into ``data.save_dir``. Two runs writing there at
once overwrite each other's files (and one's temp-file cleanup can delete the other's save in progress), so:

* :class:`SaveDirLock` holds ``<save_dir>/.ptl-torchreid.lock`` (JSON: pid, host, process start time, command)
  for the length of a run. A second live run is refused with :class:`SaveDirBusyError`; a lock whose owner is
  gone (same host, process no longer running) is taken over, with a line saying so.
* Temporary files carry their owner (:func:`owner_tag`), and :func:`owner_gone` says whether the process that
  made one has exited, so a cleanup removes only files nobody is still writing.
* :func:`file_mode` is the mode a plain ``open()`` would give under the current umask (``mkstemp`` and
  ``mkdtemp`` always use 0600 / 0700, which other users of a shared folder cannot read).
"""
import datetime
import errno
import hashlib
import json
import os
import os.path as osp
import re
import socket
import sys

__all__ = [
    "LOCK_NAME",
    "SaveDirError",
    "SaveDirBusyError",
    "SaveDirLock",
    "file_mode",
    "owner_tag",
    "owner_gone",
    "process_alive",
    "sha256_file",
]

LOCK_NAME = ".ptl-torchreid.lock"


class SaveDirError(OSError):
    """The save directory cannot be used (not writable, full, or in use); the message says how to fix it."""


class SaveDirBusyError(SaveDirError):
    """Another live run holds the save directory's lock."""


def _umask():
    # os.umask can only be read by setting it; restore it at once (the window is a few instructions).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(directory=False):
    """``0o666`` (files) or ``0o777`` (directories) minus the process umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def _host():
    return socket.gethostname() or "localhost"


def _start_time(pid):
    """Start time of process ``pid`` in clock ticks since boot (Linux), or None where unknown. Telling a live
    owner from a new process that reuses its pid."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in parentheses may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid, host=None, start_time=None):
    """True / False whether process ``pid`` on ``host`` still runs; None when that cannot be known (another
    host). ``start_time`` (see the lock file) tells a reused pid apart."""
    if host is not None and host != _host():
        return None
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return False
    if start_time is not None:
        now = _start_time(pid)
        if now is not None and now != int(start_time):
            return False
    return True


def owner_tag():
    """``pid<pid>@<host>``: put into temporary file names so that a cleanup can tell whose they are."""
    return f"pid{os.getpid()}@{_host()}"


_OWNER_RE = re.compile(r"\.pid(\d+)@(.+?)\.[^.]*$")


def owner_gone(name, suffix=""):
    """Whether the process that created the temporary file ``name`` (tagged with :func:`owner_tag`) has exited.
    Untagged files (older versions) count as ownerless; files of another host are never taken as gone."""
    stem = name[: -len(suffix)] if suffix and name.endswith(suffix) else name
    m = _OWNER_RE.search(stem)
    if m is None:
        return True
    return process_alive(int(m.group(1)), m.group(2)) is False


def sha256_file(path, chunk=1 << 22):
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _describe(owner):
    started = owner.get("started") or "?"
    command = owner.get("command")
    running = ": " + command if command else ""
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {started}{running}"


class SaveDirLock:
    """Exclusive use of ``save_dir`` by one run (a context manager; :meth:`acquire` / :meth:`release`).

    ``what`` names the directory in messages (e.g. ``"data.save_dir"``). A save directory that cannot be created
    or written (read-only, full) raises :class:`SaveDirError` at :meth:`acquire`, before any work starts."""

    def __init__(self, save_dir, what="the save directory", command=None):
        self.save_dir = osp.abspath(osp.expanduser(os.fspath(save_dir)))
        self.path = osp.join(self.save_dir, LOCK_NAME)
        self.what = what
        self.command = command if command is not None else " ".join(sys.argv)
        self.held = False
        self.took_over = None  # the stale owner's record, when its lock was taken over

    def _record(self):
        return {"pid": os.getpid(), "host": _host(), "start_time": _start_time(os.getpid()),
                "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": self.command}

    def _unusable(self, e):
        hint = (f"free disk space or choose another {self.what}" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                else f"make it writable or choose another {self.what}")
        return SaveDirError(e.errno, f"{self.what} '{self.save_dir}' cannot be written: {e.strerror or e} [errno "
                                     f"{e.errno}]; {hint}.")

    def _create(self):
        """Write the lock file if none exists; False when one does."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            try:
                os.remove(self.path)
            except OSError:
                pass
            raise
        return True

    def owner(self):
        """The record in the lock file, or None when there is none (an unreadable file gives ``{}``)."""
        try:
            with open(self.path, "r", encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self):
        try:
            os.makedirs(self.save_dir, exist_ok=True)
            if self._create():
                self.held = True
                return self
            owner = self.owner() or {}
            alive = process_alive(owner.get("pid"), owner.get("host"), owner.get("start_time"))
            if alive is not False:
                how = (
                    "is in use by a running training run"
                    if alive
                    else "is locked by a run on another host, which cannot be checked from here"
                )
                raise SaveDirBusyError(
                    errno.EBUSY,
                    f"{self.what} '{self.save_dir}' {how} ({_describe(owner)}). Two runs in one folder overwrite each "
                    "other's checkpoints: wait for it to finish, or choose another "
                    f"{self.what}{'' if alive else '; if that run is gone, delete ' + self.path}.",
                )
            # The owner is gone: take its lock over. Remove-then-create keeps O_EXCL's guarantee when two runs
            # find the same stale lock: only one of them creates the new file.
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            if not self._create():
                raise SaveDirBusyError(
                    errno.EBUSY,
                    f"{self.what} '{self.save_dir}' was just taken by another run ({_describe(self.owner() or {})}); "
                    "choose another "
                    f"{self.what}.",
                )
            self.held, self.took_over = True, owner
            print(
                f"Note: took over the lock of {self.what} '{self.save_dir}' from a run that is no longer running "
                f"({_describe(owner)})."
            )
            return self
        except SaveDirError:
            raise
        except OSError as e:
            raise self._unusable(e) from None

    def release(self):
        """Remove the lock file if this process still owns it."""
        if not self.held:
            return
        self.held = False
        owner = self.owner() or {}
        if owner.get("pid") == os.getpid() and owner.get("host") == _host():
            try:
                os.remove(self.path)
            except OSError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
