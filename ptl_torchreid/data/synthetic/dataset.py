"""The torchreid side: reading a generated split, the :class:`SyntheticReID` image dataset, the registration of
synthetic datasets by name, and a contact sheet to look at one."""
import os
import os.path as osp
import re

import cv2
import numpy as np

from ..._torchreid import torchreid
from ..check import SPLIT_DIRS, parse_image_name
from .generate import list_images, prepare_synthetic_dataset
from .params import SyntheticParams, make_params

__all__ = ["DEFAULT_DATASETS", "SyntheticReID", "read_split", "register_synthetic_dataset",
           "registered_synthetic_datasets", "make_contact_sheet"]


def _pid_camid(name):
    """``(pid, camid)`` of a Market-1501-style name, camid counted from 0 as torchreid's datasets do."""
    pid, cam = parse_image_name(name, "market-style")
    return pid, cam - 1


def read_split(dir_path, relabel=False):
    """``[(img_path, pid, camid)]`` for a split folder, sorted by name; ``relabel`` maps pids to 0..N-1."""
    data = []
    for name in list_images(dir_path):
        pid, camid = _pid_camid(name)
        if pid == -1:  # junk, as in Market-1501
            continue
        data.append((osp.join(dir_path, name), pid, camid))
    if relabel:
        label = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in data}))}
        data = [(p, label[pid], cam) for p, pid, cam in data]
    return data


class SyntheticReID(torchreid.data.ImageDataset):
    """A generated Market-1501-style dataset under ``<root>/<dataset_dir>``.

    Registered subclasses carry their ``params`` (``SyntheticParams``), ``dataset_dir`` and ``on_mismatch``
    as class attributes; see ``register_synthetic_dataset``. torchreid passes ``root`` and its usual keyword
    arguments (``transform``, ``mode``, ``combineall``, ``verbose``...).
    """

    dataset_dir = "synthetic_reid"
    params = SyntheticParams()
    on_mismatch = "regenerate"

    def __init__(self, root="", **kwargs):
        self.root = osp.abspath(osp.expanduser(root))
        self.dataset_dir = osp.join(self.root, type(self).dataset_dir)
        self.manifest = prepare_synthetic_dataset(
            self.dataset_dir, self.params, self.on_mismatch, verbose=kwargs.get("verbose", True)
        )
        self.train_dir = osp.join(self.dataset_dir, SPLIT_DIRS["train"])
        self.query_dir = osp.join(self.dataset_dir, SPLIT_DIRS["query"])
        self.gallery_dir = osp.join(self.dataset_dir, SPLIT_DIRS["gallery"])
        self.check_before_run([self.train_dir, self.query_dir, self.gallery_dir])
        train = read_split(self.train_dir, relabel=True)
        query = read_split(self.query_dir)
        gallery = read_split(self.gallery_dir)
        super(SyntheticReID, self).__init__(train, query, gallery, **kwargs)


# Our names: (dataset_dir, parameters). The transfer pair differs in camera style and id range (disjoint people).
DEFAULT_DATASETS = {
    "synthetic_reid": ("synthetic_reid", SyntheticParams()),
    "synthetic_source": (
        "synthetic_source",
        SyntheticParams(
            num_train_ids=100, num_test_ids=40, num_cameras=4, style="indoor", id_offset=1000, num_distractor_ids=0
        ),
    ),
    "synthetic_target": (
        "synthetic_target",
        SyntheticParams(
            num_train_ids=60, num_test_ids=50, num_cameras=5, style="outdoor", id_offset=2000, num_distractor_ids=10
        ),
    ),
}

_REGISTERED = {}  # name -> class that this module registered in torchreid
_NAME_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def register_synthetic_dataset(name, dataset_dir=None, on_mismatch="regenerate", **params):
    """Registers (or re-binds) the torchreid image dataset ``name`` to a synthetic dataset and returns its class.

    Unspecified parameters take the defaults of ``name`` when it is one of ``DEFAULT_DATASETS``, otherwise those
    of ``SyntheticParams``. Re-registering a name this module registered updates the class in place, so the name
    keeps working with ``torchreid.data.ImageDataManager(sources=name, ...)``. A name that torchreid (or anyone
    else) already uses is refused. ``dataset_dir`` (default: ``name``) is the folder under the data root.
    """
    if not isinstance(name, str) or not _NAME_OK.match(name):
        raise ValueError(
            f"Synthetic dataset name must be a non-empty string of letters, digits, '_', '.', '-'; got {name!r}"
        )
    default_dir, base = DEFAULT_DATASETS.get(name, (name, SyntheticParams()))
    p = make_params(base, **params)
    dataset_dir = default_dir if dataset_dir is None else dataset_dir
    if (
        not isinstance(dataset_dir, str)
        or not dataset_dir
        or osp.isabs(dataset_dir)
        or ".." in dataset_dir.split(os.sep)
    ):
        raise ValueError(f"dataset_dir must be a relative folder name under the data root, got {dataset_dir!r}")
    if on_mismatch not in ("regenerate", "error"):
        raise ValueError(f"on_mismatch must be 'regenerate' or 'error', got {on_mismatch!r}")
    attrs = dict(params=p, dataset_dir=dataset_dir, on_mismatch=on_mismatch)
    cls = _REGISTERED.get(name)
    if cls is not None:
        for key, value in attrs.items():
            setattr(cls, key, value)
        return cls
    cls = type(
        "SyntheticReID_" + re.sub(r"\W", "_", name),
        (SyntheticReID,),
        dict(attrs, __module__=__name__, __doc__=f"Synthetic ReID dataset registered as {name!r}."),
    )
    try:
        torchreid.data.register_image_dataset(name, cls)
    except ValueError:
        raise ValueError(
            f"The dataset name {name!r} is already registered in torchreid by another dataset; only "
            "synthetic datasets registered by ptl_torchreid can be re-registered. Choose another "
            "name."
        ) from None
    _REGISTERED[name] = cls
    return cls


def registered_synthetic_datasets():
    """``{name: class}`` of the synthetic datasets registered so far."""
    return dict(_REGISTERED)


def _register_defaults():
    for name, (dataset_dir, params) in DEFAULT_DATASETS.items():
        if name not in _REGISTERED:
            register_synthetic_dataset(name, dataset_dir=dataset_dir)


def make_contact_sheet(dataset_dir, split="train", num_ids=8, pids=None, scale=2, pad=4):
    """A BGR uint8 image: one row per identity, one column per camera (first image there, blank if unseen)."""
    items = read_split(osp.join(dataset_dir, SPLIT_DIRS[split]))
    if not items:
        raise ValueError(f"No images in {osp.join(dataset_dir, SPLIT_DIRS[split])}")
    cams = sorted({c for _, _, c in items})
    first = {}
    for path, pid, cam in items:
        first.setdefault((pid, cam), path)
    if pids is None:
        by_pid = sorted({pid for _, pid, _ in items}, key=lambda p: (-sum((p, c) in first for c in cams), p))
        pids = sorted(by_pid[:num_ids])
    h0, w0 = cv2.imread(items[0][0]).shape[:2]
    h, w = h0 * scale, w0 * scale
    header = 14 * scale
    sheet = np.full((header + len(pids) * (h + pad) + pad, len(cams) * (w + pad) + pad, 3), 255, np.uint8)
    for j, cam in enumerate(cams):
        cv2.putText(
            sheet,
            f"cam {cam + 1}",
            (pad + j * (w + pad) + 2, header - 3 * scale),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.3 * scale,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
        for i, pid in enumerate(pids):
            path = first.get((pid, cam))
            if path is None:
                continue
            img = cv2.resize(cv2.imread(path), (w, h), interpolation=cv2.INTER_NEAREST)
            y, x = header + pad + i * (h + pad), pad + j * (w + pad)
            sheet[y : y + h, x : x + w] = img
    return sheet
