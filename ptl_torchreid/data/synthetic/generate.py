"""Generation and the on-disk cache: the layout of who appears where, the images written into a Market-1501-style
folder, and the manifest that records the parameters so that a folder is reused only when it matches."""
import json
import os
import os.path as osp
import shutil
import tempfile
import time

import cv2
import numpy as np

from ...utils.savedir import file_mode
from ..check import SPLIT_DIRS, is_image_name
from .params import STREAM_IMAGE, STREAM_SPLIT, STREAM_TRACK, STYLES, SyntheticParams
from .people import make_identity
from .render import VIEWS, make_cameras, render_image

__all__ = ["FORMAT_VERSION", "GENERATOR", "MANIFEST", "prepare_synthetic_dataset", "list_images"]

# Bump whenever the rendering or the layout changes, so that folders written by an older version are redone.
FORMAT_VERSION = 1
GENERATOR = "ptl_torchreid.data.synthetic"  # recorded in every manifest: the mark of a folder this code may redo
MANIFEST = "manifest.json"


def _plan(params):
    """Lists (split, pid, cam_index, shot) for every image, in a fixed order."""
    lo, hi = params.cameras_per_id
    first = params.id_offset + 1
    train = range(first, first + params.num_train_ids)
    test = range(train.stop, train.stop + params.num_test_ids)
    distract = range(test.stop, test.stop + params.num_distractor_ids)
    k = params.images_per_id_per_camera
    items = []
    for pid in list(train) + list(test) + list(distract):
        rng = np.random.default_rng(np.random.SeedSequence([params.seed, STREAM_SPLIT, pid]))
        n_cams = int(rng.integers(lo, hi + 1))
        cams = sorted(int(c) for c in rng.choice(params.num_cameras, n_cams, replace=False))
        if pid in train:
            items += [("train", pid, c, s) for c in cams for s in range(k)]
            continue
        if pid in distract:
            items += [("gallery", pid, c, s) for c in cams for s in range(k)]
            continue
        # with a single image per camera, keep one camera whole so every query has a cross-camera match
        n_query = min(params.queries_per_id, n_cams if k > 1 else n_cams - 1)
        query_cams = set(int(c) for c in rng.choice(cams, n_query, replace=False))
        query_shot = {c: int(rng.integers(k)) for c in query_cams}
        for c in cams:
            for s in range(k):
                items.append(("query" if query_shot.get(c) == s else "gallery", pid, c, s))
    return items


def _generate(out_dir, params, verbose):
    start = time.time()
    cams = make_cameras(params)
    for d in SPLIT_DIRS.values():
        os.makedirs(osp.join(out_dir, d))
    frame = [0] * params.num_cameras
    counts = {s: 0 for s in SPLIT_DIRS}
    pids = {s: set() for s in SPLIT_DIRS}
    identities, tracks = {}, {}
    plan = _plan(params)
    for split, pid, c, shot in plan:
        if pid not in identities:
            identities = {pid: make_identity(params.seed, pid)}  # ids come in order: keep only the current one
        cam = cams[c]
        if (pid, c) not in tracks:
            trng = np.random.default_rng(np.random.SeedSequence([params.seed, STREAM_TRACK, pid, c]))
            tracks = {
                (pid, c): dict(
                    view=VIEWS[int(trng.choice(3, p=cam.views))],
                    mirror=bool(trng.random() < cam.flip),
                    dx=float(trng.normal(0, 0.03)),
                )
            }
        rng = np.random.default_rng(np.random.SeedSequence([params.seed, STREAM_IMAGE, pid, c, shot]))
        img = render_image(identities[pid], cam, tracks[(pid, c)], rng, params)
        frame[c] += int(rng.integers(5, 60))  # frames advance like a video, names stay unique per camera
        name = f"{pid:04d}_c{c + 1}s1_{frame[c]:06d}_01.{params.image_format}"
        if params.image_format == "jpg":
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, cam.jpeg])
        else:
            ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
        if not ok:
            raise RuntimeError(f"OpenCV failed to encode {name}")
        with open(osp.join(out_dir, SPLIT_DIRS[split], name), "wb") as f:
            f.write(buf.tobytes())
        counts[split] += 1
        pids[split].add(pid)
    manifest = dict(
        generator=GENERATOR,
        format_version=FORMAT_VERSION,
        params=params.to_dict(),
        style_preset=_style_record(params.style),
        counts=counts,
        num_ids={s: len(v) for s, v in pids.items()},
        cameras=[c.describe() for c in cams],
        seconds=round(time.time() - start, 2),
    )
    # the manifest is written last: its presence marks a complete folder
    with open(osp.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    if verbose:
        print(
            f"=> Generated synthetic ReID data in {manifest['seconds']:.1f}s: {counts['train']} train / "
            f"{counts['query']} query / {counts['gallery']} gallery images"
        )
    return manifest


def _style_record(style):
    """The preset's ranges in JSON form, so that a changed preset is noticed like a changed parameter."""
    return json.loads(json.dumps(STYLES[style]))


def _read_manifest(dataset_dir):
    path = osp.join(dataset_dir, MANIFEST)
    if not osp.isfile(path):
        return None, f"no {MANIFEST} (not generated by {GENERATOR})"
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"unreadable {path} ({e})"
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR:
        return None, f"{path} was not written by {GENERATOR}"
    return manifest, ""


def _staleness(manifest, dataset_dir, params):
    """Why an existing generated folder cannot be reused as ``params`` ('' when it can)."""
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"format version {manifest.get('format_version')} on disk, {FORMAT_VERSION} expected"
    on_disk, wanted = manifest.get("params", {}), params.to_dict()
    diff = [
        f"{k}: {on_disk.get(k)!r} on disk vs {wanted[k]!r} requested" for k in wanted if on_disk.get(k) != wanted[k]
    ]
    if diff:
        return "generated with other parameters (" + "; ".join(diff) + ")"
    if manifest.get("style_preset") != _style_record(params.style):
        return f"the {params.style!r} camera style preset has changed since generation"
    for split, d in SPLIT_DIRS.items():
        path = osp.join(dataset_dir, d)
        n = len(list_images(path)) if osp.isdir(path) else 0
        if n != manifest.get("counts", {}).get(split):
            return f"{path} holds {n} images but the manifest records {manifest['counts'].get(split)}"
    return ""


def prepare_synthetic_dataset(dataset_dir, params=None, on_mismatch="regenerate", verbose=True):
    """Makes sure ``dataset_dir`` holds the synthetic dataset for ``params`` and returns its manifest.

    An up-to-date folder is reused. A folder generated by this module with other parameters, an older format
    version, or missing files is regenerated, or reported with ``on_mismatch='error'``. A folder that was not
    generated by this module is never modified.
    """
    params = params if params is not None else SyntheticParams()
    if on_mismatch not in ("regenerate", "error"):
        raise ValueError(f"on_mismatch must be 'regenerate' or 'error', got {on_mismatch!r}")
    dataset_dir = osp.abspath(osp.expanduser(dataset_dir))
    if osp.exists(dataset_dir):
        manifest, problem = _read_manifest(dataset_dir)
        if manifest is None:
            raise RuntimeError(
                f"{dataset_dir} exists but is not a generated synthetic dataset: {problem}. It is left untouched; "
                "remove it or choose another data root (or dataset_dir) for the synthetic data."
            )
        reason = _staleness(manifest, dataset_dir, params)
        if not reason:
            return manifest
        if on_mismatch == "error":
            raise RuntimeError(
                f"The synthetic dataset in {dataset_dir} does not match the requested one: {reason}. Delete the "
                "folder, use another data root, or register the dataset with on_mismatch='regenerate'."
            )
        if verbose:
            print(f"=> Regenerating {dataset_dir}: {reason}")
    parent = osp.dirname(dataset_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_leftovers(dataset_dir)
    tmp = tempfile.mkdtemp(prefix="." + osp.basename(dataset_dir) + ".tmp-", dir=parent)
    try:
        os.chmod(tmp, file_mode(directory=True))  # mkdtemp's 0700 would shut other users of a shared root out
        manifest = _generate(tmp, params, verbose)
        _move_into_place(tmp, dataset_dir, params)
    finally:
        if osp.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


LEFTOVER_AGE_S = 3600.0


def _remove_leftovers(dataset_dir):
    """Deletes temporary folders that a killed generation of ``dataset_dir`` left behind. Only old ones: a young
    one may belong to a generation still running in another process."""
    parent, base = osp.split(dataset_dir)
    now = time.time()
    for name in os.listdir(parent):
        if name.startswith("." + base + ".tmp-") or name.startswith("." + base + ".old-"):
            path = osp.join(parent, name)
            try:
                if now - os.path.getmtime(path) > LEFTOVER_AGE_S:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def _move_into_place(tmp, dataset_dir, params):
    old = None
    if osp.exists(dataset_dir):
        old = tempfile.mkdtemp(prefix="." + osp.basename(dataset_dir) + ".old-", dir=osp.dirname(dataset_dir))
        os.rmdir(old)
        os.rename(dataset_dir, old)
    try:
        os.rename(tmp, dataset_dir)
    except OSError:
        # another process finished the same folder first; keep theirs if it is what we need
        manifest, _ = _read_manifest(dataset_dir)
        if manifest is None or _staleness(manifest, dataset_dir, params):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def list_images(dir_path):
    """The image file names in ``dir_path``, sorted."""
    return sorted(n for n in os.listdir(dir_path) if is_image_name(n))
