"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) in memory that grows as N*k, with torchreid's results.

torchreid's ``re_ranking`` builds three dense (N x N) arrays over all N = num_query + num_gallery images (about
35 GB each at MSMT17's size). Everything it derives from them is local: the k-reciprocal sets only need each
image's k1+1 nearest neighbours, the encoding ``V`` has a few dozen non-zeros per row, and the Jaccard distance
of a query to an image is non-zero only where their ``V`` rows share support. This module computes the same
quantities from an exact nearest-neighbour pass over symmetric blocks of the distance matrix (each block
computed once, used for its rows and its columns), keeps ``V`` sparse, and writes only the query x gallery
result, so memory is the output plus O(N * k). (A faiss flat index is not used here: it would compute the whole
matrix for the neighbours alone, twice this pass's arithmetic, and not give the row maxima; docs/BENCHMARKS.md.)

The arithmetic follows torchreid's step by step (squared distances divided by each image's largest squared
distance, float32 exponentials, the 2/3 expansion rule, the k2 averaging, the Jaccard expression), so results
agree to float32 rounding. Ties in the neighbour ranking are broken by index (a stable sort); torchreid uses
numpy's default, unstable, argsort, whose tie order depends on the numpy build and CPU. Without ties the
rankings, and the results, are the same.
"""
import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from tqdm import tqdm

__all__ = ["rerank", "METRICS"]

METRICS = ("euclidean", "cosine")
# Extra neighbours fetched beyond k1 + 1 so that rounding in the normalisation rarely forces a row recompute.
_MARGIN = 8
# Side of the square distance blocks of the neighbour pass (64 MiB of float32 each).
_BLOCK = 4096
# Pair distances gathered per step when weighting the k-reciprocal sets.
_PAIR_CHUNK = 1 << 16


def rerank(qf, gf, k1=20, k2=6, lambda_value=0.3, metric="euclidean", *, progress=False):
    """Re-ranked query x gallery distances, as ``torchreid.utils.re_ranking`` computes them from
    ``compute_distance_matrix(qf, gf)``, ``(qf, qf)`` and ``(gf, gf)`` with the same ``metric``.

    Args:
        qf, gf (torch.Tensor or numpy.ndarray): query / gallery features, (num_query, dim) and (num_gallery, dim).
        k1, k2 (int): the k-reciprocal neighbourhood size and the query-expansion size (torchreid's defaults).
        lambda_value (float): weight of the original distance in the result.
        metric (str): ``'euclidean'`` (squared Euclidean, torchreid's default) or ``'cosine'``.
        progress (bool): show a progress bar over the neighbour pass.

    Returns:
        numpy.ndarray: float32 distances of shape (num_query, num_gallery); smaller is closer.
    """
    if metric not in METRICS:
        raise ValueError(f"rerank: metric must be one of {METRICS}, got {metric!r}")
    if isinstance(k1, bool) or int(k1) != k1 or k1 < 1 or isinstance(k2, bool) or int(k2) != k2 or k2 < 1:
        raise ValueError(f"rerank: k1 and k2 must be positive integers, got k1={k1!r}, k2={k2!r}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"rerank: lambda_value must be in [0, 1], got {lambda_value!r}")
    qf, gf = _as_features(qf, "qf"), _as_features(gf, "gf")
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f"rerank: qf and gf have different feature sizes ({qf.shape[1]} and {gf.shape[1]})")
    k1, k2 = int(k1), int(k2)
    feats = torch.cat([qf, gf]).contiguous()
    if metric == "cosine":
        feats = F.normalize(feats, p=2, dim=1)  # what compute_distance_matrix does to each input
    nq, n = len(qf), len(feats)
    width = min(max(k1 + 1, k2), n)
    out = np.empty((nq, n - nq), dtype=np.float32)  # squared distances first, the result at the end

    cand_d2, cand_idx, row_max = _neighbour_pass(feats, nq, min(width + _MARGIN, n), metric, out, progress)
    ranking = _exact_ranking(feats, metric, cand_d2, cand_idx, row_max, width)
    v = _kreciprocal_encoding(feats, metric, ranking, row_max, k1)
    if k2 != 1:
        v = _average_over_neighbours(v, ranking[:, :k2], k2)
    _jaccard_into(out, v, nq, row_max, lambda_value)
    return out


def _as_features(x, name):
    if not torch.is_tensor(x):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if x.dim() != 2:
        raise ValueError(f"rerank: {name} must be 2-D (num_images, dim), got shape {tuple(x.shape)}")
    if len(x) == 0:
        raise ValueError(f"rerank: {name} is empty")
    return x.detach().to("cpu", torch.float32)


def _distances(a, b, metric):
    """torchreid's compute_distance_matrix on (already normalised, for cosine) features."""
    if metric == "cosine":
        return 1 - torch.mm(a, b.t())
    d = torch.pow(a, 2).sum(dim=1, keepdim=True) + torch.pow(b, 2).sum(dim=1, keepdim=True).t()
    return d.addmm_(a, b.t(), beta=1, alpha=-2)


def _pair_distances(feats, rows, cols, metric):
    a, b = feats[rows], feats[cols]
    if metric == "cosine":
        return 1 - (a * b).sum(1)
    return (a.pow(2).sum(1) + b.pow(2).sum(1)) - 2 * (a * b).sum(1)


# ---------------------------------------------------------------------------------------------------------------
# Exact nearest neighbours
# ---------------------------------------------------------------------------------------------------------------
def _merge(vals, idx, rows, new_vals, new_idx, k):
    both_v = torch.cat([vals[rows], new_vals], 1)
    both_i = torch.cat([idx[rows], new_idx], 1)
    top_v, pos = torch.topk(both_v, k, dim=1, largest=False, sorted=False)
    vals[rows] = top_v
    idx[rows] = torch.gather(both_i, 1, pos)


def _neighbour_pass(feats, nq, k, metric, out, progress):
    """One pass over the upper-triangular blocks of the squared-distance matrix: each image's ``k`` smallest
    squared distances (any tie order), its largest squared distance, and the query x gallery squared distances
    written into ``out``."""
    n = len(feats)
    vals = torch.full((n, k), float("inf"))
    idx = torch.zeros((n, k), dtype=torch.int64)
    row_max = torch.full((n,), -float("inf"))
    starts = list(range(0, n, _BLOCK))
    total = len(starts) * (len(starts) + 1) // 2
    bar = tqdm(total=total, desc="re-ranking: neighbours", disable=None if progress else True, leave=False)
    for bi, a in enumerate(starts):
        rows_a = slice(a, min(a + _BLOCK, n))
        for b in starts[bi:]:
            rows_b = slice(b, min(b + _BLOCK, n))
            d2 = _distances(feats[rows_a], feats[rows_b], metric)
            d2.mul_(d2)  # torchreid squares whatever distance it is given
            row_max[rows_a] = torch.maximum(row_max[rows_a], d2.amax(1))
            kb = min(k, d2.shape[1])
            v, i = torch.topk(d2, kb, dim=1, largest=False, sorted=False)
            _merge(vals, idx, rows_a, v, i + b, k)
            if b != a:
                d2t = d2.t().contiguous()
                row_max[rows_b] = torch.maximum(row_max[rows_b], d2t.amax(1))
                v, i = torch.topk(d2t, min(k, d2t.shape[1]), dim=1, largest=False, sorted=False)
                _merge(vals, idx, rows_b, v, i + a, k)
            # query rows x gallery columns of this block
            q_end, g_start = min(rows_a.stop, nq), max(b, nq)
            if a < nq and g_start < rows_b.stop:
                out[a:q_end, g_start - nq:rows_b.stop - nq] = d2[: q_end - a, g_start - b:].numpy()
            bar.update(1)
    bar.close()
    return vals.numpy(), idx.numpy(), row_max.numpy()


def _exact_ranking(feats, metric, cand_d2, cand_idx, row_max, width):
    """The first ``width`` entries of each row's stable argsort of the normalised squared distances.

    The candidates are each row's smallest squared distances; dividing by the row maximum can round distinct
    values to equal ones, so candidates are ordered by (normalised value, index), and a row whose ``width``-th
    value equals the normalised value of its largest candidate (an image outside the candidates could tie with
    it) is recomputed in full."""
    n, k = cand_d2.shape
    norm = cand_d2 / row_max[:, None]
    order = np.lexsort((cand_idx, norm), axis=-1)
    norm = np.take_along_axis(norm, order, 1)
    ranking = np.take_along_axis(cand_idx, order, 1)[:, :width]
    if k < n:
        boundary = norm[:, width - 1] >= norm[:, -1]
        for i in np.flatnonzero(boundary):
            d2 = _distances(feats[i:i + 1], feats, metric)[0]
            d2 = (d2 * d2).numpy()
            ranking[i] = np.argsort(d2 / row_max[i], kind="stable")[:width]
    return ranking.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# k-reciprocal encoding
# ---------------------------------------------------------------------------------------------------------------
def _reciprocal_mask(ranking, width, chunk=4096):
    """``mask[i, p]``: image i is among the first ``width`` neighbours of its ``p``-th neighbour."""
    n = len(ranking)
    top = ranking[:, :width]
    mask = np.empty(top.shape, dtype=bool)
    for s in range(0, n, chunk):
        rows = np.arange(s, min(s + chunk, n))
        mask[rows] = (top[top[rows]] == rows[:, None, None]).any(-1)
    return mask


def _expansion_sets(ranking, k1, chunk=2048):
    """torchreid's k-reciprocal expansion: each image's k-reciprocal neighbours, plus the half-size
    k-reciprocal set of any of them that shares more than 2/3 of its members with it. Returns CSR (indptr,
    indices), indices increasing within a row (torchreid's np.unique)."""
    n = len(ranking)
    kf = min(k1 + 1, n)
    kh = min(int(np.around(k1 / 2.0)) + 1, n)
    kr_mask = _reciprocal_mask(ranking, kf)
    half_mask = _reciprocal_mask(ranking, kh)
    half = np.where(half_mask, ranking[:, :kh], -1)
    half_len = half_mask.sum(1)
    kr = np.where(kr_mask, ranking[:, :kf], -2)  # -2 never equals a member or the -1 padding
    counts, members = [], []
    for s in range(0, n, chunk):
        rows = slice(s, min(s + chunk, n))
        cand = half[ranking[rows, :kf]]  # (c, kf, kh): each neighbour's half-size set
        shared = (cand[..., None] == kr[rows, None, None, :]).any(-1).sum(-1)
        # the float comparison torchreid makes: len(intersection) > 2/3 * len(candidate set)
        take = kr_mask[rows] & (shared > 2.0 / 3 * half_len[ranking[rows, :kf]])
        cand = np.where(take[..., None], cand, -1).reshape(cand.shape[0], -1)
        both = np.sort(np.concatenate([np.where(kr[rows] >= 0, kr[rows], -1), cand], 1), axis=1)
        keep = both >= 0
        keep[:, 1:] &= both[:, 1:] != both[:, :-1]
        counts.append(keep.sum(1))
        members.append(both[keep])
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))])
    return indptr, np.concatenate(members)


def _kreciprocal_encoding(feats, metric, ranking, row_max, k1):
    """The sparse ``V`` of torchreid: on each image's expansion set, exp(-distance) normalised to sum 1."""
    n = len(feats)
    indptr, cols = _expansion_sets(ranking, k1)
    rows = np.repeat(np.arange(n), np.diff(indptr))
    dist = np.empty(len(cols), dtype=np.float32)
    for s in range(0, len(cols), _PAIR_CHUNK):
        part = slice(s, s + _PAIR_CHUNK)
        d = _pair_distances(feats, torch.from_numpy(rows[part]), torch.from_numpy(cols[part]), metric).numpy()
        dist[part] = (d * d) / row_max[rows[part]]
    weight = np.exp(-dist)
    sums = np.add.reduceat(weight, indptr[:-1]) if len(weight) else np.zeros(n, np.float32)
    sums = np.where(np.diff(indptr) > 0, sums, 1).astype(np.float32)
    values = weight / np.repeat(sums, np.diff(indptr))
    return sp.csr_matrix((values.astype(np.float32), cols, indptr), shape=(n, n))


def _average_over_neighbours(v, neighbours, k2):
    """torchreid's local query expansion: each row of ``V`` becomes the mean of its first k2 neighbours' rows."""
    n, w = neighbours.shape
    avg = sp.csr_matrix((np.ones(n * w, dtype=np.float32), neighbours.reshape(-1), np.arange(0, n * w + 1, w)),
                        shape=(n, n))
    out = (avg @ v).tocsr()
    out.data /= np.float32(w)  # torchreid: np.mean over the (up to) k2 rows
    out.sort_indices()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Jaccard distance and the result
# ---------------------------------------------------------------------------------------------------------------
def _jaccard_into(out, v, nq, row_max, lambda_value, chunk=256):
    """``out`` holds squared query x gallery distances; it becomes torchreid's
    ``jaccard * (1 - lambda) + original * lambda`` with ``jaccard = 1 - m / (2 - m)``, where ``m`` sums
    ``min(V[q, l], V[g, l])`` over the columns ``l`` they share."""
    ng = out.shape[1]
    gallery = v[nq:].tocsc()
    gallery.sort_indices()
    col_len = np.diff(gallery.indptr)
    for s in range(0, nq, chunk):
        e = min(s + chunk, nq)
        block = v[s:e]
        row = np.repeat(np.arange(e - s), np.diff(block.indptr))
        col, val = block.indices, block.data
        reps = col_len[col]
        at = np.repeat(gallery.indptr[col] - np.cumsum(reps) + reps, reps) + np.arange(reps.sum())
        mins = np.minimum(np.repeat(val, reps), gallery.data[at])
        flat = np.repeat(row, reps) * ng + gallery.indices[at]
        shared = np.bincount(flat, weights=mins, minlength=(e - s) * ng).astype(np.float32).reshape(e - s, ng)
        jaccard = 1 - shared / (2. - shared)
        original = 1. * out[s:e] / row_max[s:e, None]
        out[s:e] = jaccard * (1 - lambda_value) + original * lambda_value
