"""Strict image reading for torchreid datasets.

torchreid's ``read_image`` retries forever when PIL cannot read a file, so one corrupt JPEG hangs a training
run. :func:`read_image` here decodes the whole image and raises :class:`ImageReadError` naming the file at
once. :func:`install_strict_reader` makes torchreid's image and video datasets use it, optionally skipping
unreadable samples (``skip_corrupt=True``) with the policy described there.
"""
import multiprocessing
import os
import sys
import threading
import warnings

from PIL import Image, ImageFile

from .. import _torchreid

__all__ = [
    "ImageReadError",
    "read_image",
    "install_strict_reader",
    "uninstall_strict_reader",
    "strict_reader_installed",
    "skipped_images",
    "reset_skipped_images",
    "MAX_SUBSTITUTES",
]

# How many other samples skip mode tries before giving up on an index (bounds the cost when a whole
# directory is unreadable).
MAX_SUBSTITUTES = 16


class ImageReadError(OSError):
    """An image file is missing, empty, truncated or otherwise undecodable.

    Constructible from a single message too, so that torch's DataLoader can re-raise it in the main
    process with its original type.
    """

    def __init__(self, path, reason=None):
        if reason is None:
            message, self.path, self.reason = str(path), None, None
        else:
            self.path, self.reason = str(path), str(reason)
            message = (
                f'Cannot read image "{self.path}": {self.reason}. Replace or remove the file; run the check-data '
                "command to find every such file, or enable skipping of corrupt images."
            )
        super().__init__(message)
        self.filename = self.path

    def __str__(self):
        return self.args[0]

    def __reduce__(self):
        # default OSError pickling would rebuild from (errno, strerror)-style args
        return (_rebuild_image_read_error, (self.args[0], self.path, self.reason))


def _rebuild_image_read_error(message, path, reason):
    err = ImageReadError(message)
    err.path, err.reason, err.filename = path, reason, path
    return err


_truncation_lock = threading.Lock()


def _decode(path):
    with Image.open(path) as im:
        im.load()  # decodes every byte; a truncated stream raises here
        return im.convert("RGB")


def read_image(path):
    """Read ``path`` as an RGB ``PIL.Image``, fully decoded.

    Raises :class:`ImageReadError` naming the file when it is missing, empty, truncated, or not an image.
    Truncated images are refused even if ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` was set elsewhere.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise ImageReadError(path, "file does not exist") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot access the file ({e.strerror or e})") from None
    if os.path.isdir(path):
        raise ImageReadError(path, "is a directory, not an image file")
    if size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    try:
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            # PIL reads this module-level flag while decoding; turn it off for our read only.
            with _truncation_lock:
                saved = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = False
                try:
                    return _decode(path)
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = saved
        return _decode(path)
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image is too large to decode safely ({e})") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        reason = str(e) or type(e).__name__
        if isinstance(e, Image.UnidentifiedImageError):
            reason = "not a recognised image format (corrupt header?)"
        raise ImageReadError(path, reason) from None


# --------------------------------------------------------------------------------------------------------------
# Installation into torchreid
# --------------------------------------------------------------------------------------------------------------
class _State:
    installed = False
    skip_corrupt = False
    original_read_image = None
    original_getitem = {}  # class -> original __getitem__
    counter = None  # multiprocessing.Value shared with forked DataLoader workers


def _counter():
    if _State.counter is None:
        _State.counter = multiprocessing.Value("q", 0)
    return _State.counter


def _count_skip():
    c = _counter()
    with c.get_lock():
        c.value += 1


def skipped_images() -> int:
    """Number of unreadable samples skipped so far (each time one was drawn), in this process and its forked
    DataLoader workers."""
    return int(_counter().value) if _State.counter is not None else 0


def reset_skipped_images() -> None:
    """Reset the skip counter to zero."""
    c = _counter()
    with c.get_lock():
        c.value = 0


def _candidates(data, index):
    """Substitute indices for ``index``: the same identity first, then the following samples (wrapping)."""
    n = len(data)
    pid = data[index][1]
    same = [j for j in range(index + 1, index + n) if data[j % n][1] == pid]
    seen = set()
    for j in same[:MAX_SUBSTITUTES]:
        seen.add(j % n)
        yield j % n
    tried = len(seen)
    for j in range(index + 1, index + n):
        if tried >= MAX_SUBSTITUTES:
            return
        if j % n not in seen:
            tried += 1
            yield j % n


def _make_skipping_getitem(original):
    def __getitem__(self, index):
        if not _State.skip_corrupt:
            return original(self, index)
        if getattr(self, "mode", "train") != "train":
            # a substitute query/gallery image would change the evaluation protocol: never skip there
            try:
                return original(self, index)
            except ImageReadError as e:
                err = ImageReadError(
                    f'Cannot read {self.mode} image "{e.path}": {e.reason}. data.skip_corrupt applies to training '
                    "images only; evaluation sets are never altered, so replace or remove this file (the check-data "
                    "command lists every such file)."
                )
                err.path, err.reason, err.filename = e.path, e.reason, e.path
                raise err from None
        try:
            return original(self, index)
        except ImageReadError as first:
            failed = first
        for j in _candidates(self.data, index):
            _count_skip_warn(failed)
            try:
                return original(self, j)
            except ImageReadError as e:
                failed = e
        _count_skip_warn(failed)
        raise ImageReadError(
            f"Sample {index} and {MAX_SUBSTITUTES} substitutes are all unreadable (last: {failed}). The dataset "
            "looks broken; run the check-data command on its root."
        )

    __getitem__.__wrapped__ = original
    __getitem__._ptl_strict_reader = True
    return __getitem__


def _count_skip_warn(err):
    _count_skip()
    print(f"[ptl_torchreid] skipping unreadable image: {err.path or err}", file=sys.stderr)


def strict_reader_installed() -> bool:
    """Whether torchreid's datasets currently read through :func:`read_image`."""
    return _State.installed and _torchreid.dataset_module().read_image is read_image


def install_strict_reader(skip_corrupt: bool = False) -> None:
    """Make torchreid's datasets read images with :func:`read_image` (idempotent).

    ``skip_corrupt=False``: an unreadable image raises :class:`ImageReadError` naming the file.
    ``skip_corrupt=True``: the sample is replaced by another readable sample, preferring the same identity
    (so labels stay correct and identity-balanced batches keep their shape), then the following samples;
    each skip is counted (:func:`skipped_images`) and reported on stderr. After :data:`MAX_SUBSTITUTES`
    unreadable substitutes the error is raised after all. Query and gallery images (datasets whose ``mode`` is
    not ``'train'``) are never replaced, since that would change the evaluation: an unreadable one raises
    :class:`ImageReadError` naming it, in both settings.

    The patch is visible in DataLoader workers started by ``fork`` (the Linux default). With the ``spawn``
    or ``forkserver`` start method, call this function in the DataLoader's ``worker_init_fn`` too.
    """
    module = _torchreid.dataset_module()
    if not _State.installed:
        _State.original_read_image = module.read_image
        for cls in (module.ImageDataset, module.VideoDataset):
            if "__getitem__" in vars(cls) and not getattr(vars(cls)["__getitem__"], "_ptl_strict_reader", False):
                _State.original_getitem[cls] = vars(cls)["__getitem__"]
                cls.__getitem__ = _make_skipping_getitem(vars(cls)["__getitem__"])
        _counter()  # create the shared counter before workers fork
        _State.installed = True
    module.read_image = read_image
    _State.skip_corrupt = bool(skip_corrupt)


def uninstall_strict_reader() -> None:
    """Restore torchreid's own reader and dataset classes (no-op when not installed)."""
    if not _State.installed:
        return
    module = _torchreid.dataset_module()
    if module.read_image is read_image:
        module.read_image = _State.original_read_image
    else:
        warnings.warn("torchreid's read_image was replaced by someone else since install; leaving it as is.")
    for cls, original in _State.original_getitem.items():
        cls.__getitem__ = original
    _State.original_getitem = {}
    _State.original_read_image = None
    _State.skip_corrupt = False
    _State.installed = False
