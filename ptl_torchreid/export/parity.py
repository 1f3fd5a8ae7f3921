"""Checks that an exported model computes what PyTorch computes.

* :func:`check_parity`: features of the same images at several batch sizes; max-abs difference and the smallest
  per-image cosine similarity against PyTorch eager, each within a tolerance.
* :func:`compare_retrieval`: Rank-1 and mAP of the exported model on evaluation sets (query/gallery loaders)
  against PyTorch's, within a tolerance in points.

A failure raises :class:`ParityError` naming the runtime, the batch or set, and the size of the difference.
"""
import numpy as np
import torch

from .. import _torchreid
from ..metrics import evaluate_rank
from .graph import ExportError

__all__ = ["ParityError", "check_parity", "feature_differences", "extract", "retrieval_metrics",
           "compare_retrieval", "take_batch", "DEFAULT_BATCH_SIZES", "MAX_ABS", "MIN_COSINE", "RETRIEVAL_POINTS"]

DEFAULT_BATCH_SIZES = (1, 7, 32)
MAX_ABS = 1e-4
MIN_COSINE = 0.99999
RETRIEVAL_POINTS = 0.1  # Rank-1 / mAP tolerance, in percentage points


class ParityError(ExportError):
    """Exported outputs differ from PyTorch's by more than the tolerance."""


def feature_differences(reference, candidate):
    """``(max_abs, min_cosine)`` between two ``[N, D]`` feature arrays (rows that are both ~0 count as cosine 1)."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        return float("inf"), float("-inf")
    max_abs = float(np.max(np.abs(reference - candidate))) if reference.size else 0.0
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    dots = np.sum(reference * candidate, axis=1)
    cos = np.where(norms > 1e-24, dots / np.maximum(norms, 1e-24), 1.0)
    return max_abs, float(cos.min()) if cos.size else 1.0


def take_batch(images, size):
    """The first ``size`` images (repeated when there are fewer: still real images, one forward of ``size``)."""
    if len(images) < size:
        images = np.concatenate([images] * (-(-size // len(images))))
    return images[:size]


def check_parity(reference, candidate, images, batch_sizes=DEFAULT_BATCH_SIZES, max_abs=MAX_ABS,
                 min_cosine=MIN_COSINE, name=None):
    """Run ``reference`` and ``candidate`` (numpy-batch -> features callables) on the first ``b`` images for
    every ``b`` in ``batch_sizes``. Returns ``{b: {"max_abs": x, "min_cosine": y}}``; raises
    :class:`ParityError` at the first batch size outside the tolerances (after checking a second call of the
    candidate gives the same features, so a stateful graph is caught too)."""
    name = name or getattr(candidate, "name", "the exported model")
    images = np.asarray(images, dtype=np.float32)
    if not len(images):
        raise ValueError("check_parity needs at least one image")
    results = {}
    for b in batch_sizes:
        x = take_batch(images, int(b))
        ref = reference(x)
        got = candidate(x)
        shape_ok = np.shape(got) == np.shape(ref)
        diff, cos = feature_differences(ref, got) if shape_ok else (float("inf"), float("-inf"))
        results[int(b)] = {"max_abs": diff, "min_cosine": cos, "feature_max": float(np.abs(ref).max())}
        if not shape_ok:
            raise ParityError(
                f"{name} at batch {b}: features of shape {list(np.shape(got))} where PyTorch gives "
                f"{list(np.shape(ref))}"
            )
        if not (diff <= max_abs and cos >= min_cosine):
            raise ParityError(
                f"{name} differs from PyTorch at batch {b}: max-abs difference {diff:.3g} (limit {max_abs:.0e}), "
                f"smallest cosine similarity {cos:.7f} (limit {min_cosine})"
            )
        again, _ = feature_differences(got, candidate(x))
        if again != 0.0:
            raise ParityError(
                f"{name} gives different features for the same batch {b} on a second call (max-abs "
                f"{again:.3g}): its graph is not a fixed function"
            )
    return results


def _unpack(batch):
    if isinstance(batch, dict):
        return batch["img"], batch["pid"], batch["camid"]
    return batch[0], batch[1], batch[2]


def extract(runner, loader):
    """Features, pids and camids of every image of a loader (torchreid's test loaders, or any iterable of
    ``{'img', 'pid', 'camid'}`` dicts / ``(img, pid, camid)`` tuples)."""
    feats, pids, camids = [], [], []
    for batch in loader:
        imgs, p, c = _unpack(batch)
        imgs = imgs.numpy() if isinstance(imgs, torch.Tensor) else np.asarray(imgs)
        feats.append(np.asarray(runner(imgs), dtype=np.float32))
        pids.append(np.asarray(p).reshape(-1))
        camids.append(np.asarray(c).reshape(-1))
    return np.concatenate(feats), np.concatenate(pids), np.concatenate(camids)


def retrieval_metrics(runner, query_loader, gallery_loader, dist_metric="euclidean", normalize_feature=False):
    """``{"rank1": x, "mAP": y}`` (fractions) of ``runner`` on a query/gallery pair, with torchreid's protocol."""
    qf, q_pids, q_camids = extract(runner, query_loader)
    gf, g_pids, g_camids = extract(runner, gallery_loader)
    qf, gf = torch.from_numpy(qf), torch.from_numpy(gf)
    if normalize_feature:
        qf = torch.nn.functional.normalize(qf, p=2, dim=1)
        gf = torch.nn.functional.normalize(gf, p=2, dim=1)
    distmat = _torchreid.torchreid.metrics.compute_distance_matrix(qf, gf, dist_metric).numpy()
    cmc, mAP = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=1)
    return {"rank1": float(cmc[0]), "mAP": float(mAP)}


def compare_retrieval(
    reference_metrics,
    runner,
    eval_sets,
    points=RETRIEVAL_POINTS,
    dist_metric="euclidean",
    normalize_feature=False,
    name=None,
):
    """Rank-1/mAP of ``runner`` on each ``(set name, query loader, gallery loader)`` against
    ``reference_metrics[set name]``; :class:`ParityError` when either differs by more than ``points``.
    Returns ``{set name: {"rank1": x, "mAP": y}}``."""
    name = name or getattr(runner, "name", "the exported model")
    out = {}
    for set_name, query, gallery in eval_sets:
        got = retrieval_metrics(runner, query, gallery, dist_metric, normalize_feature)
        ref = reference_metrics[set_name]
        for key, label in (("rank1", "Rank-1"), ("mAP", "mAP")):
            gap = abs(got[key] - ref[key]) * 100
            if gap > points:
                raise ParityError(
                    f"{name} on '{set_name}': {label} {got[key]:.2%} where PyTorch gives {ref[key]:.2%} ({gap:.2f} "
                    "points apart, limit "
                    f"{points})"
                )
        out[set_name] = got
    return out
