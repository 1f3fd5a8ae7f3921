"""Scan a Market-1501-style dataset directory for problems before a long run.

:func:`check_dataset_root` decodes every image of ``bounding_box_train``, ``query`` and ``bounding_box_test``
and reports unreadable, empty (0-byte) and mislabeled files (names that do not parse as ``<pid>_c<cam>...``
or whose identity/camera is out of range), counts per split, and dataset-level problems (missing splits,
fewer than two cameras in the test set, queries without a cross-camera gallery match).
"""
import os
import os.path as osp
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple, Union

from .reader import ImageReadError, read_image

__all__ = [
    "NamingPattern",
    "PATTERNS",
    "SPLITS",
    "SPLIT_DIRS",
    "IMAGE_EXTENSIONS",
    "is_image_name",
    "DatasetRootError",
    "DatasetError",
    "FileProblem",
    "SplitReport",
    "DatasetReport",
    "parse_image_name",
    "check_dataset_root",
    "cross_camera_matches",
    "format_report",
]

# split name -> sub-directory, as in Market-1501 and DukeMTMC-reID
SPLITS = (("train", "bounding_box_train"), ("query", "query"), ("gallery", "bounding_box_test"))
SPLIT_DIRS = dict(SPLITS)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def is_image_name(name):
    """Whether a directory entry called ``name`` counts as an image: an image extension and not hidden."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class NamingPattern:
    """How file names encode identity and camera. Ranges are inclusive; None means unbounded."""

    name: str
    regex: str = r"^(-?\d+)_c(\d+)"
    pid_range: Tuple[Optional[int], Optional[int]] = (0, None)
    cam_range: Tuple[Optional[int], Optional[int]] = (1, None)
    junk_pids: Tuple[int, ...] = (-1,)  # valid names that torchreid ignores (distractors)

    @property
    def description(self):
        lo, hi = self.pid_range
        clo, chi = self.cam_range
        return (f"<pid>_c<cam>... with pid in [{lo}, {hi if hi is not None else 'inf'}] and camera in "
                f"[{clo}, {chi if chi is not None else 'inf'}]")


PATTERNS: Dict[str, NamingPattern] = {
    # ranges as asserted by torchreid's dataset classes
    "market1501": NamingPattern("market1501", pid_range=(0, 1501), cam_range=(1, 6), junk_pids=(-1,)),
    "dukemtmcreid": NamingPattern("dukemtmcreid", pid_range=(0, 7140), cam_range=(1, 8), junk_pids=()),
    "market-style": NamingPattern("market-style"),
}


class DatasetRootError(FileNotFoundError):
    """The dataset directory is missing, empty, or does not have the expected layout."""


class DatasetError(ValueError):
    """The dataset loads but cannot serve the run: no training identities, an empty query or gallery, fewer than
    two cameras in the test set, ..."""


@dataclass
class FileProblem:
    path: str
    reason: str


@dataclass
class SplitReport:
    name: str
    directory: str
    exists: bool = True
    num_images: int = 0
    num_ok: int = 0
    num_junk: int = 0
    num_ignored: int = 0  # non-image files
    empty: List[str] = field(default_factory=list)
    unreadable: List[FileProblem] = field(default_factory=list)
    mislabeled: List[FileProblem] = field(default_factory=list)
    pids: Set[int] = field(default_factory=set)
    cams: Set[int] = field(default_factory=set)
    samples: List[Tuple[int, int]] = field(default_factory=list)  # (pid, cam) of readable, labelled images

    @property
    def num_bad(self):
        return len(self.empty) + len(self.unreadable) + len(self.mislabeled)


@dataclass
class DatasetReport:
    root: str
    pattern: NamingPattern
    splits: Dict[str, SplitReport] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)
    queries_without_match: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and all(s.num_bad == 0 for s in self.splits.values())

    @property
    def empty(self) -> List[str]:
        return [p for s in self.splits.values() for p in s.empty]

    @property
    def unreadable(self) -> List[FileProblem]:
        return [p for s in self.splits.values() for p in s.unreadable]

    @property
    def mislabeled(self) -> List[FileProblem]:
        return [p for s in self.splits.values() for p in s.mislabeled]

    def format_table(self, max_files: int = 20) -> str:
        return format_report(self, max_files=max_files)


def parse_image_name(filename: str, pattern: Union[str, NamingPattern] = "market1501") -> Tuple[int, int]:
    """Return ``(pid, cam)`` parsed from an image file name; ``ValueError`` saying why if it does not parse."""
    pattern = _pattern(pattern)
    base = osp.basename(filename)
    m = re.match(pattern.regex, base)
    if m is None:
        raise ValueError(f'name "{base}" does not follow {pattern.description}')
    pid, cam = int(m.group(1)), int(m.group(2))
    if pid not in pattern.junk_pids and not _in_range(pid, pattern.pid_range):
        raise ValueError(f"identity {pid} is outside {_fmt_range(pattern.pid_range)}")
    if not _in_range(cam, pattern.cam_range):
        raise ValueError(f"camera {cam} is outside {_fmt_range(pattern.cam_range)}")
    return pid, cam


def _in_range(v, rng):
    lo, hi = rng
    return (lo is None or v >= lo) and (hi is None or v <= hi)


def _fmt_range(rng):
    lo, hi = rng
    return f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"


def _pattern(pattern):
    if isinstance(pattern, NamingPattern):
        return pattern
    try:
        return PATTERNS[pattern]
    except KeyError:
        raise ValueError(f"Unknown naming pattern {pattern!r}; known: {sorted(PATTERNS)}") from None


def _layout_help(root):
    return (
        f"Expected the Market-1501 layout there: {osp.join(root, 'bounding_box_train')}, "
        f"{osp.join(root, 'query')} and {osp.join(root, 'bounding_box_test')}, holding images named "
        "<pid>_c<cam>... (e.g. 0002_c1s1_000451_03.jpg). Point the dataset root at that directory."
    )


def _find_layout(root, max_depth=2):
    """Directories under ``root`` (itself included, up to ``max_depth`` levels) holding any split folder."""
    found = []
    frontier = [root]
    for depth in range(max_depth + 1):
        nxt = []
        for d in frontier:
            if any(osp.isdir(osp.join(d, sub)) for _, sub in SPLITS):
                found.append(d)
                continue
            if depth < max_depth:
                try:
                    nxt += sorted(osp.join(d, n) for n in os.listdir(d)
                                  if not n.startswith(".") and osp.isdir(osp.join(d, n)))
                except OSError:
                    pass
        if found:
            return found
        frontier = nxt
    return found


def _check_file(path, pattern):
    """-> ('empty'|'unreadable'|'mislabeled'|'junk'|'ok', detail)"""
    try:
        size = osp.getsize(path)
    except OSError as e:
        return "unreadable", str(e)
    if size == 0:
        return "empty", None
    try:
        pid, cam = parse_image_name(path, pattern)
    except ValueError as e:
        label = ("mislabeled", str(e))
    else:
        label = ("junk", (pid, cam)) if pid in pattern.junk_pids else ("ok", (pid, cam))
    try:
        read_image(path).close()
    except ImageReadError as e:
        return "unreadable", e.reason
    return label


def check_dataset_root(dataset_dir, pattern: Union[str, NamingPattern] = "market1501",
                       num_workers: int = 4) -> DatasetReport:
    """Scan ``dataset_dir`` and return a :class:`DatasetReport` (see :func:`format_report`).

    ``dataset_dir`` is the directory holding ``bounding_box_train``, ``query`` and ``bounding_box_test``;
    if it does not, a single such directory up to two levels below is used (e.g. torchreid's
    ``<root>/market1501/Market-1501-v15.09.15``). Every image is fully decoded (``num_workers`` threads).
    Raises :class:`DatasetRootError` if the directory is missing or holds no images.
    """
    pattern = _pattern(pattern)
    root = osp.abspath(osp.expanduser(os.fspath(dataset_dir)))
    if not osp.isdir(root):
        what = "is a file, not a directory" if osp.exists(root) else "does not exist"
        raise DatasetRootError(f'Dataset directory "{root}" {what}. {_layout_help(root)}')
    candidates = _find_layout(root)
    if not candidates:
        raise DatasetRootError(
            f'Dataset directory "{root}" contains none of bounding_box_train, query, bounding_box_test '
            f"(searched two levels down). {_layout_help(root)}"
        )
    if len(candidates) > 1:
        raise DatasetRootError(
            f'Dataset directory "{root}" holds several datasets: {candidates}. Point the root at one of them.'
        )
    base = candidates[0]

    report = DatasetReport(root=base, pattern=pattern)
    jobs = []
    for split, sub in SPLITS:
        d = osp.join(base, sub)
        sr = SplitReport(name=split, directory=d, exists=osp.isdir(d))
        report.splits[split] = sr
        if not sr.exists:
            report.problems.append(f'{split}: directory "{d}" is missing')
            continue
        for n in sorted(os.listdir(d)):
            p = osp.join(d, n)
            if n.startswith(".") or not osp.isfile(p):
                continue
            if not is_image_name(n):
                sr.num_ignored += 1
                continue
            sr.num_images += 1
            jobs.append((sr, p))

    if not jobs:
        raise DatasetRootError(f'Dataset directory "{base}" holds no images. {_layout_help(base)}')

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        results = list(pool.map(lambda job: _check_file(job[1], pattern), jobs))
    for (sr, p), (kind, detail) in zip(jobs, results):
        if kind == "empty":
            sr.empty.append(p)
        elif kind == "unreadable":
            sr.unreadable.append(FileProblem(p, detail))
        elif kind == "mislabeled":
            sr.mislabeled.append(FileProblem(p, detail))
        elif kind == "junk":
            sr.num_junk += 1
            sr.num_ok += 1
        else:
            sr.num_ok += 1
            sr.pids.add(detail[0])
            sr.cams.add(detail[1])
            sr.samples.append(detail)

    for sr in report.splits.values():
        if sr.exists and sr.num_images == 0:
            report.problems.append(f'{sr.name}: directory "{sr.directory}" holds no images')
    q, g = report.splits["query"], report.splits["gallery"]
    if q.exists and g.exists and (q.num_ok or g.num_ok):
        test_cams, report.queries_without_match = cross_camera_matches(q.samples, g.samples)
        if len(test_cams) < 2:
            report.problems.append(
                f"test set (query + gallery) has {len(test_cams)} camera(s); cross-camera evaluation needs at least 2"
            )
        if q.samples and report.queries_without_match == len(q.samples):
            report.problems.append(
                "no query has a gallery image of the same identity from another camera; evaluation is impossible"
            )
    return report


def cross_camera_matches(query, gallery) -> Tuple[Set[int], int]:
    """``(cameras, unmatched)`` of a test set given as ``(pid, cam)`` pairs: the cameras of query and gallery,
    and the number of queries without a gallery image of their identity from another camera (ReID evaluation
    discards same-camera matches, so it needs two cameras and at least one matched query)."""
    gallery_cams: Dict[int, Set[int]] = {}
    for pid, cam in gallery:
        gallery_cams.setdefault(pid, set()).add(cam)
    cams = {cam for _, cam in query} | {cam for _, cam in gallery}
    return cams, sum(1 for pid, cam in query if not gallery_cams.get(pid, set()) - {cam})


def format_report(report: DatasetReport, max_files: int = 20) -> str:
    """A readable table of ``report``: counts per split, then the problem files (``max_files`` per kind)."""
    header = ("split", "images", "ok", "empty", "unreadable", "mislabeled", "junk", "ids", "cams")
    rows = []
    for sr in report.splits.values():
        if not sr.exists:
            rows.append((sr.name, "missing", "", "", "", "", "", "", ""))
            continue
        rows.append((sr.name, sr.num_images, sr.num_ok, len(sr.empty), len(sr.unreadable), len(sr.mislabeled),
                     sr.num_junk, len(sr.pids), len(sr.cams)))
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [f"Dataset: {report.root}  (names: {report.pattern.description})", line(header),
           "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]

    def block(title, items):
        if not items:
            return
        out.append(f"{title} ({len(items)}):")
        for it in items[:max_files]:
            out.append(f"  {it.path}: {it.reason}" if isinstance(it, FileProblem) else f"  {it}")
        if len(items) > max_files:
            out.append(f"  ... and {len(items) - max_files} more")

    block("Empty files", report.empty)
    block("Unreadable files", report.unreadable)
    block("Mislabeled files", report.mislabeled)
    if report.queries_without_match and "evaluation is impossible" not in " ".join(report.problems):
        out.append(f"Note: {report.queries_without_match} queries have no cross-camera gallery match "
                   "(they are skipped in evaluation).")
    for p in report.problems:
        out.append(f"Problem: {p}")
    out.append("OK: no problems found." if report.ok else
               f"{len(report.empty) + len(report.unreadable) + len(report.mislabeled)} problem file(s), "
               f"{len(report.problems)} dataset problem(s).")
    return "\n".join(out)
