"""The user's own data as torchreid datasets, named by where it is: no Python needed.

A source name (``-s``/``-t``, ``data.sources``/``data.targets``) may be

- ``folder:DIR`` or just ``DIR`` (an existing directory): a Market-1501-style folder (``bounding_box_train``,
  ``query``, ``bounding_box_test``; names ``<pid>_c<cam>...``), or a folder holding list files ``train.txt``,
  ``query.txt`` and ``gallery.txt``;
- ``list:FILE`` or a ``FILE`` ending in ``.txt``: one of those list files; its siblings ``train.txt``,
  ``query.txt`` and ``gallery.txt`` are the splits. Each line is ``path pid camid`` (path relative to the list
  file; blank lines and ``#`` comments are skipped);
- ``nocam:`` before either: data without camera ids (list lines ``path pid``; folder names ``<pid>_...``).

Without cameras every image counts as its own camera. That changes the protocol: the ranking discards only the
query image itself (where it is also in the gallery), not the other images of its camera, so the gallery's
same-camera images of the query's identity count as correct matches. Results are therefore higher than under
the cross-camera protocol whenever the gallery holds near-duplicate frames of the query's camera.
"""
import os
import os.path as osp
import re
from concurrent.futures import ThreadPoolExecutor

from .. import _torchreid
from .check import (
    SPLIT_DIRS,
    DatasetError,
    DatasetReport,
    DatasetRootError,
    FileProblem,
    NamingPattern,
    SplitReport,
    is_image_name,
    parse_image_name,
)
from .reader import ImageReadError, read_image

__all__ = ["is_user_source", "register_user_sources", "UserSource", "parse_source", "read_list_file",
           "check_user_source", "NO_CAMERA_NOTE", "LIST_FILES"]

PREFIXES = ("folder:", "list:", "nocam:")
LIST_FILES = {"train": "train.txt", "query": "query.txt", "gallery": "gallery.txt"}
NO_CAMERA_NOTE = ("without camera ids every image counts as its own camera: only the query image itself is "
                  "discarded from its ranking, so same-camera images of its identity count as correct matches "
                  "(higher results than the cross-camera protocol when the gallery holds near-duplicate frames)")
_PID = re.compile(r"^(-?\d+)")
_REGISTERED = {}


class UserSource:
    """A parsed source name: ``kind`` 'folder' or 'list', its ``path`` (the dataset folder) and ``no_camera``."""

    def __init__(self, name, kind, path, no_camera):
        self.name, self.kind, self.path, self.no_camera = name, kind, path, no_camera

    def split_path(self, split):
        if self.kind == "list":
            return osp.join(self.path, LIST_FILES[split])
        return osp.join(self.path, SPLIT_DIRS[split])


def is_user_source(name):
    """Whether a dataset name points at the user's own data (a prefix, a path, or an existing folder)."""
    return isinstance(name, str) and (name.startswith(PREFIXES) or os.sep in name or name.endswith(".txt")
                                      or osp.isdir(name))


def parse_source(name):
    """The :class:`UserSource` a name describes; :class:`DatasetRootError` saying what is missing."""
    spec, no_camera = name, False
    if spec.startswith("nocam:"):
        spec, no_camera = spec[len("nocam:"):], True
    kind = None
    if spec.startswith("folder:"):
        spec, kind = spec[len("folder:"):], "folder"
    elif spec.startswith("list:"):
        spec, kind = spec[len("list:"):], "list"
    path = osp.abspath(osp.expanduser(spec))
    if kind == "list" or (kind is None and path.endswith(".txt")):
        if not osp.isfile(path):
            raise DatasetRootError(f'data source "{name}": list file "{path}" does not exist')
        path, kind = osp.dirname(path), "list"
    if not osp.isdir(path):
        raise DatasetRootError(f'data source "{name}": folder "{path}" does not exist')
    if kind is None:
        kind = "list" if all(osp.isfile(osp.join(path, f)) for f in LIST_FILES.values()) else "folder"
    source = UserSource(name, kind, path, no_camera)
    missing = [source.split_path(s) for s in LIST_FILES if not osp.exists(source.split_path(s))]
    if missing:
        layout = ("list files train.txt, query.txt and gallery.txt (lines 'path pid camid')" if kind == "list"
                  else "folders bounding_box_train, query and bounding_box_test (Market-1501 layout)")
        quoted = ", ".join(f'"{m}"' for m in missing)
        raise DatasetRootError(f'data source "{name}": {quoted} missing; expected {layout} in "{path}"')
    return source


def read_list_file(path, no_camera=False):
    """``[(image path, pid, camid or None)]`` of a list file; a malformed line is a :class:`DatasetError`
    naming the file and the line."""
    base = osp.dirname(osp.abspath(path))
    items = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            fields = text.split()
            want = "'path pid'" if no_camera else "'path pid camid'"
            if len(fields) not in ((2, 3) if no_camera else (3,)):
                hint = (" (data without camera ids: prefix the source with nocam:)" if len(fields) == 2 else "")
                raise DatasetError(f'list file "{path}", line {lineno}: expected {want}, got {text!r}{hint}')
            try:
                pid = int(fields[1])
                camid = None if no_camera else int(fields[2])
            except ValueError:
                raise DatasetError(
                    f'list file "{path}", line {lineno}: pid and camid must be integers, got {text!r}'
                ) from None
            if pid < -1:
                raise DatasetError(
                    f'list file "{path}", line {lineno}: pid {pid} is invalid (>= 0, or -1 for a distractor)'
                )
            image = fields[0] if osp.isabs(fields[0]) else osp.join(base, fields[0])
            if not osp.isfile(image):
                raise DatasetError(f'list file "{path}", line {lineno}: image "{image}" does not exist')
            items.append((image, pid, camid))
    return items


def _read_folder(directory, no_camera):
    items = []
    for n in sorted(os.listdir(directory)):
        p = osp.join(directory, n)
        if not is_image_name(n) or not osp.isfile(p):
            continue
        try:
            if no_camera:
                m = _PID.match(n)
                if m is None:
                    raise ValueError(f'name "{n}" does not start with <pid>')
                pid, cam = int(m.group(1)), None
            else:
                pid, cam = parse_image_name(n, "market-style")
        except ValueError as e:
            raise DatasetError(f'image "{p}": {e} (use nocam: for names without a camera)') from None
        items.append((p, pid, cam))
    return items


def read_source(source):
    """``{'train', 'query', 'gallery'}`` lists of ``(path, pid, camid)`` in torchreid's form: train pids
    relabelled 0..N-1, pid -1 dropped from train (and from query); without cameras each distinct image path
    gets its own camera id."""
    splits = {}
    for split in LIST_FILES:
        where = source.split_path(split)
        splits[split] = (
            read_list_file(where, source.no_camera) if source.kind == "list" else _read_folder(where, source.no_camera)
        )
    if source.no_camera:
        cams = {}
        for split in LIST_FILES:
            splits[split] = [(p, pid, cams.setdefault(osp.realpath(p), len(cams))) for p, pid, _ in splits[split]]
    splits["train"] = [x for x in splits["train"] if x[1] != -1]
    splits["query"] = [x for x in splits["query"] if x[1] != -1]
    label = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in splits["train"]}))}
    splits["train"] = [(p, label[pid], cam) for p, pid, cam in splits["train"]]
    return splits


def _dataset_class(source):
    base = _torchreid.torchreid.data.ImageDataset

    class UserDataset(base):
        dataset_dir = source.path

        def __init__(self, root="", **kwargs):
            splits = read_source(source)
            if source.no_camera:
                print(f'Note: "{source.name}": {NO_CAMERA_NOTE}.')
            base.__init__(self, splits["train"], splits["query"], splits["gallery"], **kwargs)

    UserDataset.__name__ = "UserDataset"
    return UserDataset


def register_user_sources(names):
    """Registers every user-data name of ``names`` in torchreid (idempotent); returns those names."""
    registered = []
    for name in names:
        if not is_user_source(name):
            continue
        if name not in _REGISTERED:
            source = parse_source(name)
            _REGISTERED[name] = source
            _torchreid.torchreid.data.register_image_dataset(name, _dataset_class(source))
        registered.append(name)
    return registered


def check_user_source(name, num_workers=4):
    """check-data for a user source: a :class:`~ptl_torchreid.data.check.DatasetReport` (every image decoded);
    a malformed list line or file name is a :class:`DatasetError` naming it."""
    source = parse_source(name)
    splits = read_source(source)
    report = DatasetReport(root=source.path, pattern=_pattern_for(source))
    for split, items in splits.items():
        sr = SplitReport(name=split, directory=source.split_path(split), num_images=len(items))
        report.splits[split] = sr

        def decode(item):
            try:
                read_image(item[0]).close()
                return None
            except ImageReadError as e:
                return FileProblem(item[0], e.reason)

        with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
            problems = list(pool.map(decode, items))
        for (p, pid, cam), problem in zip(items, problems):
            if problem is not None:
                (sr.empty if problem.reason.startswith("file is empty") else sr.unreadable).append(
                    p if problem.reason.startswith("file is empty") else problem
                )
                continue
            sr.num_ok += 1
            sr.pids.add(pid)
            sr.cams.add(cam)
            sr.samples.append((pid, cam))
        if not items:
            report.problems.append(f'{split}: "{sr.directory}" holds no images')
    q, g = report.splits["query"], report.splits["gallery"]
    gallery_cams = {}
    for pid, cam in g.samples:
        gallery_cams.setdefault(pid, set()).add(cam)
    report.queries_without_match = sum(1 for pid, cam in q.samples if not gallery_cams.get(pid, set()) - {cam})
    if q.samples and report.queries_without_match == len(q.samples):
        report.problems.append(
            "no query has a gallery image of the same identity from another camera; evaluation is impossible"
        )
    if not source.no_camera and len(q.cams | g.cams) < 2 and (q.samples or g.samples):
        report.problems.append(
            "test set (query + gallery) has 1 camera; cross-camera evaluation needs at least 2 "
            "(for data without camera ids use nocam:)"
        )
    return report


class _Described(NamingPattern):
    @property
    def description(self):
        return self.name


def _pattern_for(source):
    if source.kind == "list":
        return _Described(f"list files, lines 'path pid{'' if source.no_camera else ' camid'}'")
    if source.no_camera:
        return _Described("<pid>... without camera ids (every image its own camera)")
    return NamingPattern("market-style")
