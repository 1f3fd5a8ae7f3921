"""Exact CMC / mAP / mINP (and pair ROC) for galleries too large for a full distance matrix.

Queries are processed in blocks whose query x gallery distances fit a memory cap; each block is ranked by
:func:`~ptl_torchreid.metrics.rank.rank_block` and the per-query results are combined by the same reductions
as :func:`~ptl_torchreid.metrics.evaluate_rank`, so the results are bit-identical to ranking the full matrix
(rows are ranked whole, which keeps torchreid's tie order).
"""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .rank import check_labels, effective_max_rank, rank_block, reduce_per_query

__all__ = ["evaluate_rank_chunked", "distmat_bytes", "metric_distance_fn", "BYTES_PER_DISTANCE"]

# Working memory per query x gallery distance while a block is ranked: the float32 distance, the comparison
# buffers and masks of the ranking and, with a ROC, the pair masks.
BYTES_PER_DISTANCE = 16


def distmat_bytes(num_query, num_gallery):
    """Memory a full float32 distance matrix and its ranking need."""
    return num_query * num_gallery * BYTES_PER_DISTANCE


def evaluate_rank_chunked(qf, gf, q_pids, g_pids, q_camids, g_camids, max_rank=50, metric="euclidean",
                          memory_cap=2 << 30, use_metric_cuhk03=False, roc=None, progress=False,
                          distance_fn=None):
    """``(cmc, mAP, mINP)`` of ``compute_distance_matrix(qf, gf, metric)``, as ``evaluate_rank(...,
    return_minp=True)`` gives them on the full matrix, with the distances held ``memory_cap`` bytes at a time.

    ``roc``: a :class:`~ptl_torchreid.metrics.roc.PairROC` fed with every block. ``distance_fn(qf_block, gf)``
    replaces the metric (default: torchreid's squared Euclidean or cosine distance).
    """
    qf, gf = torch.as_tensor(qf).float(), torch.as_tensor(gf).float()
    labels = check_labels(q_pids, g_pids, q_camids, g_camids, len(qf), len(gf))
    max_rank = effective_max_rank(max_rank, len(gf))
    if distance_fn is None:
        distance_fn = metric_distance_fn(metric, gf)
    rows = max(1, int(memory_cap // (len(gf) * BYTES_PER_DISTANCE)))
    q_pids, g_pids, q_camids, g_camids = labels
    parts = []
    for s in tqdm(range(0, len(qf), rows), desc="ranking", disable=None if progress else True, leave=False):
        block = slice(s, s + rows)
        distmat = distance_fn(qf[block], gf).numpy()
        parts.append(rank_block(distmat, q_pids[block], g_pids, q_camids[block], g_camids, max_rank,
                                use_metric_cuhk03))
        if roc is not None:
            roc.add(distmat, q_pids[block], g_pids, q_camids[block], g_camids)
        del distmat
    return reduce_per_query(parts, labels, max_rank, return_minp=True)


def metric_distance_fn(metric, gf):
    """``fn(qf_block, gf)``: torchreid's ``compute_distance_matrix(qf_block, gf, metric)``, with the gallery's
    share of the work (squared norms, normalisation) done once."""
    if metric == "euclidean":
        g_sq = gf.pow(2).sum(1)[None, :]
        return lambda q, g: (q.pow(2).sum(1, keepdim=True) + g_sq).addmm_(q, g.t(), beta=1, alpha=-2)
    if metric == "cosine":
        gn = F.normalize(gf, p=2, dim=1)
        return lambda q, g: 1 - torch.mm(F.normalize(q, p=2, dim=1), gn.t())
    raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
