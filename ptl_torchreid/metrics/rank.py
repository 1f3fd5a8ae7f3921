"""Vectorised CMC / mAP evaluation with torchreid's protocol and bit-identical results.

torchreid's Python fallback (``torchreid.metrics.rank.eval_market1501`` / ``eval_cuhk03``) argsorts the whole
distance matrix and then walks every query in Python, which takes over a minute on a Market-1501-sized problem.
Only the positions of a query's own-identity gallery entries in its ranking matter for CMC and AP, and when none
of those distances is tied with another distance of the row, such a position is simply the number of smaller
distances in the row. Counting is a few vectorised comparisons per entry, much cheaper than sorting the row.
Rows where a relevant distance is tied (or NaN) are argsorted exactly as torchreid does, so the tie order, and
therefore every result, is the same. The final reductions (AP sums, mean, CMC average) are done with the same
numpy operations on the same arrays as torchreid, so results are bit-identical, not merely close.
"""
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["evaluate_rank", "check_labels", "rank_block", "reduce_per_query", "effective_max_rank", "clamp_ranks"]

# Counting costs about 2 comparisons per (own-id entry, gallery entry); argsorting a row costs the equivalent of a
# few hundred per gallery entry. Beyond this many own-id entries the row is argsorted instead.
_MAX_COUNTED_MEMBERS = 128
# Elements of one boolean comparison block (bounds the memory each thread uses to 4 MiB).
_BLOCK_ELEMS = 1 << 22
# Below this many distances, threads cost more than they save.
_MIN_THREADED_SIZE = 1 << 20
# Rows per chunk in the CUHK03 path (bounds its int64 work arrays to a few tens of MiB per chunk).
_CUHK03_CHUNK_ELEMS = 1 << 21
# torchreid's eval_cuhk03 averages this many random single-gallery-shot samplings.
_CUHK03_REPEATS = 10


def evaluate_rank(
    distmat,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    max_rank=50,
    use_metric_cuhk03=False,
    use_cython=True,
    *,
    num_threads=None,
    return_minp=False,
):
    """Computes the CMC curve and mAP of a query/gallery distance matrix, exactly as torchreid does.

    Drop-in replacement for ``torchreid.metrics.evaluate_rank`` with the same protocol: for each query, gallery
    entries with the query's identity *and* camera are discarded; CMC uses the first remaining correct match;
    queries whose identity has no remaining gallery entry are skipped. With ``use_metric_cuhk03=True`` the CMC
    uses the CUHK03 single-gallery-shot protocol (one random gallery image per identity, averaged over 10
    samplings); the samples are drawn from numpy's global random state in the same order as torchreid, so the
    results, and the random state afterwards, are identical for the same seed.

    Results equal torchreid's pure-Python evaluation (``use_cython=False``) bit for bit, ties in distances
    included. Differences, all where torchreid fails or is awkward:

    - raises ``ValueError`` (torchreid: ``AssertionError``) when no query has a valid match;
    - if the gallery is smaller than ``max_rank``, ``max_rank`` is reduced to the gallery size with a
      ``UserWarning`` (torchreid prints a note);
    - the returned CMC always has ``max_rank`` entries. Where fewer candidates remain than ``max_rank`` (a small
      gallery after the same-camera removal; CUHK03 with fewer gallery identities than ``max_rank``) torchreid
      returns a shorter curve, or crashes when the lengths differ between queries; here the remaining entries
      are 1.0, the value the curve has reached by then, and the entries torchreid returns are identical.

    Args:
        distmat (numpy.ndarray or torch.Tensor): distances of shape (num_query, num_gallery); smaller is closer.
        q_pids, g_pids (array-like): identity labels of the queries / gallery entries (1-D, integer).
        q_camids, g_camids (array-like): camera labels of the queries / gallery entries (1-D, integer).
        max_rank (int): number of CMC ranks to compute. Default 50.
        use_metric_cuhk03 (bool): CUHK03 single-gallery-shot CMC (classic CUHK03 split). Default False.
        use_cython (bool): accepted for compatibility with torchreid's signature; ignored.
        num_threads (int, optional): worker threads; default is the number of CPUs this process may use.
        return_minp (bool): also return the mINP (Ye et al., "Deep Learning for Person Re-identification: A
            Survey and Outlook"): the mean over valid queries of ``num_matches / (1 + position of the hardest
            match)``, positions counted in the kept gallery list from 0 (fast-reid's definition).

    Returns:
        tuple: ``(cmc, mAP)``, or ``(cmc, mAP, mINP)`` with ``return_minp``; ``cmc`` is a float32 numpy array of
        length ``max_rank`` (CMC at rank ``r`` is ``cmc[r - 1]``), ``mAP`` and ``mINP`` floats in [0, 1].
    """
    del use_cython  # torchreid's switch between its two implementations; this one is the only implementation.
    distmat = _as_distmat(distmat)
    num_q, num_g = distmat.shape
    labels = check_labels(q_pids, g_pids, q_camids, g_camids, num_q, num_g)
    max_rank = effective_max_rank(max_rank, num_g)
    per_query = rank_block(distmat, *labels, max_rank, use_metric_cuhk03, num_threads)
    return reduce_per_query([per_query], labels, max_rank, return_minp)


def check_labels(q_pids, g_pids, q_camids, g_camids, num_q, num_g):
    """The four label arrays as 1-D integer numpy arrays aligned with a (num_q, num_g) distance matrix."""
    return (_as_labels(q_pids, "q_pids", num_q, "rows of distmat (queries)"),
            _as_labels(g_pids, "g_pids", num_g, "columns of distmat (gallery)"),
            _as_labels(q_camids, "q_camids", num_q, "rows of distmat (queries)"),
            _as_labels(g_camids, "g_camids", num_g, "columns of distmat (gallery)"))


def rank_block(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, use_metric_cuhk03=False, num_threads=None):
    """Per-query results of the queries of ``distmat`` (rows), which may be a slice of all queries:
    ``{'cmc_rows', 'ap', 'inp'}`` for the valid queries in order. :func:`reduce_per_query` combines the results
    of consecutive slices into exactly the values of the whole matrix."""
    num_q, num_g = distmat.shape
    num_threads = _resolve_threads(num_threads, distmat.size)
    ids, codes = np.unique(np.concatenate([q_pids, g_pids]), return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    q_codes, g_codes = codes[:num_q], codes[num_q:]
    gal = _GalleryIndex(g_codes, len(ids))
    own = _OwnIdEntries(gal, q_codes, q_camids, g_camids)
    if not own.valid_query.any():
        return {"cmc_rows": np.zeros((0, max_rank), np.float32), "ap": np.zeros(0), "inp": np.zeros(0)}
    with _Workers(num_threads) as workers:
        if use_metric_cuhk03:
            cmc_rows = _cuhk03_positions_and_cmc(distmat, gal, own, max_rank, workers)
        else:
            _count_or_sort_positions(distmat, gal, own, workers)
            cmc_rows = None
    ranked = _RankedMatches(own, num_g)
    if cmc_rows is None:
        # Same 0/1 rows as torchreid's cumsum-and-clip, so the column sums (exact integers) are the same.
        cmc_rows = (np.arange(max_rank)[None, :] >= ranked.first_kept_pos[:, None]).astype(np.float32)
    return {"cmc_rows": cmc_rows, "ap": ranked.average_precisions(), "inp": ranked.inverse_negative_penalties()}


def reduce_per_query(parts, labels, max_rank, return_minp=False):
    """``(cmc, mAP[, mINP])`` from the :func:`rank_block` results of consecutive query slices."""
    cmc_rows = np.concatenate([p["cmc_rows"] for p in parts])
    if not len(cmc_rows):
        q_pids, g_pids = labels[0], labels[1]
        raise ValueError(
            "evaluate_rank: no query has a valid match: for every query, the gallery holds no image of the same "
            f"identity from a different camera (num_query={len(q_pids)}, num_gallery={len(g_pids)}, "
            f"{len(np.unique(q_pids))} query ids, {len(np.unique(g_pids))} gallery ids, "
            f"{len(np.intersect1d(q_pids, g_pids))} shared). Check that q_pids/g_pids and q_camids/g_camids are "
            "aligned with the rows/columns of "
            "distmat and that query and gallery share identities seen by other cameras."
        )
    cmc = cmc_rows.sum(0) / float(len(cmc_rows))
    if len(cmc) < max_rank:
        cmc = np.concatenate([cmc, np.ones(max_rank - len(cmc), dtype=np.float32)])
    mAP = np.mean(np.concatenate([p["ap"] for p in parts]))
    out = (cmc.astype(np.float32, copy=False), float(mAP))
    if return_minp:
        out += (float(np.mean(np.concatenate([p["inp"] for p in parts]))),)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------------------------------
def _to_numpy(x):
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds every value exactly
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _as_distmat(distmat):
    d = _to_numpy(distmat)
    if d.ndim != 2:
        raise ValueError(f"evaluate_rank: distmat must be 2-D (num_query, num_gallery), got shape {d.shape}")
    if d.dtype.kind not in "fiub":
        raise ValueError(
            f"evaluate_rank: distmat must hold real numbers, got dtype {d.dtype}; convert it with "
            "distmat.astype(np.float32)"
        )
    if d.dtype.byteorder == ">" or (d.dtype.byteorder == "=" and not np.little_endian):
        d = d.astype(d.dtype.newbyteorder("="))
    return d


def _as_labels(x, name, expected_len, what):
    a = _to_numpy(x)
    if a.ndim != 1:
        raise ValueError(f"evaluate_rank: {name} must be 1-D, got shape {a.shape}")
    if len(a) != expected_len:
        raise ValueError(f"evaluate_rank: {name} has {len(a)} entries but distmat has {expected_len} {what}")
    if a.dtype.kind in "iub":
        return a
    if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
        return a.astype(np.int64)
    raise ValueError(
        f"evaluate_rank: {name} must hold integer labels, got dtype "
        f"{a.dtype}{' with non-integer values' if a.dtype.kind == 'f' else ''}"
    )


def effective_max_rank(max_rank, num_g):
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"evaluate_rank: max_rank must be a positive integer, got {max_rank!r}")
    if num_g < max_rank:
        warnings.warn(
            f"evaluate_rank: the gallery has only {num_g} entries, fewer than max_rank={max_rank}; the CMC is "
            "computed up to "
            f"rank {num_g}",
            UserWarning,
            stacklevel=3,
        )
        return num_g
    return int(max_rank)


def clamp_ranks(ranks, num_gallery, dataset_name=""):
    """Ranks that a gallery of ``num_gallery`` images can give; says which requested ranks are dropped."""
    ranks = sorted({int(r) for r in ranks})
    valid = [r for r in ranks if r <= num_gallery]
    dropped = [r for r in ranks if r > num_gallery]
    if dropped:
        print(
            f"Note: the gallery of {dataset_name or 'this dataset'} has only {num_gallery} images, so "
            f"{', '.join(f'Rank-{r}' for r in dropped)} cannot be computed and {'is' if len(dropped) == 1 else 'are'} "
            f"skipped (set test.ranks to ranks <= {num_gallery})."
        )
    if num_gallery < 1:
        raise ValueError(f"the gallery of {dataset_name or 'this dataset'} is empty: nothing to rank")
    return valid or [1]


def _resolve_threads(num_threads, size):
    if num_threads is None:
        try:
            num_threads = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            num_threads = os.cpu_count() or 1
        if size < _MIN_THREADED_SIZE:
            num_threads = 1
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
        raise ValueError(f"evaluate_rank: num_threads must be a positive integer, got {num_threads!r}")
    return int(num_threads)


class _Workers:
    """A thread pool (numpy releases the GIL in sorting, comparisons and gathers) or inline execution."""

    def __init__(self, num_threads):
        self.num_threads = num_threads
        self._pool = None

    def __enter__(self):
        if self.num_threads > 1:
            self._pool = ThreadPoolExecutor(self.num_threads)
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown()

    def map(self, fn, items):
        if self._pool is None:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))

    def split(self, items, per_worker=4):
        """Splits ``items`` into about ``per_worker`` batches per thread, keeping their order."""
        n_batches = max(1, min(len(items), self.num_threads * per_worker))
        return [b for b in np.array_split(np.asarray(items), n_batches) if len(b)]


# ---------------------------------------------------------------------------------------------------------------
# Own-identity gallery entries of every query
# ---------------------------------------------------------------------------------------------------------------
class _GalleryIndex:
    """Gallery entries grouped by identity code: group ``c`` is ``order[starts[c]:starts[c + 1]]``."""

    def __init__(self, g_codes, n_codes):
        self.codes = g_codes
        self.order = np.argsort(g_codes, kind="stable")
        self.counts = np.bincount(g_codes, minlength=n_codes)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.present = np.flatnonzero(self.counts)  # codes of the identities present in the gallery

    def members(self, code):
        return self.order[self.starts[code] : self.starts[code + 1]]


class _OwnIdEntries:
    """For every query, its own-identity gallery entries, flattened row after row.

    ``gidx[offsets[i]:offsets[i + 1]]`` are the gallery indices with query ``i``'s identity (increasing),
    ``removed`` marks those from the query's camera (discarded by the protocol), and ``pos`` receives their
    positions in the query's argsort order (filled for valid queries only).
    """

    def __init__(self, gal, q_codes, q_camids, g_camids):
        self.num_q = len(q_codes)
        self.q_codes = q_codes
        lens = gal.counts[q_codes]
        self.offsets = np.concatenate([[0], np.cumsum(lens)])
        self.row = np.repeat(np.arange(self.num_q), lens)
        within = np.arange(self.offsets[-1]) - self.offsets[self.row]
        self.gidx = gal.order[gal.starts[q_codes][self.row] + within]
        self.removed = g_camids[self.gidx] == q_camids[self.row]
        self.num_kept = np.bincount(self.row[~self.removed], minlength=self.num_q)
        self.valid_query = self.num_kept > 0
        self.pos = np.full(len(self.gidx), -1, dtype=np.int64)

    def slice(self, i):
        return slice(self.offsets[i], self.offsets[i + 1])


def _count_or_sort_positions(distmat, gal, own, workers):
    """Fills ``own.pos`` for every valid query: by counting smaller distances where that is exact and cheaper,
    else by argsorting the row like torchreid."""
    valid_rows = np.flatnonzero(own.valid_query)
    n_members = gal.counts[own.q_codes[valid_rows]]
    counted = valid_rows[n_members <= _MAX_COUNTED_MEMBERS]
    to_sort = [valid_rows[n_members > _MAX_COUNTED_MEMBERS]]

    # Queries sharing an identity share their own-id entries: count them together in blocks.
    num_g = distmat.shape[1]
    by_code = counted[np.argsort(own.q_codes[counted], kind="stable")]
    bounds = np.flatnonzero(np.diff(own.q_codes[by_code])) + 1
    tasks = []
    for rows in np.split(by_code, bounds) if len(by_code) else []:
        members = gal.members(own.q_codes[rows[0]])
        per_block = max(1, _BLOCK_ELEMS // (len(members) * num_g))
        tasks.extend((rows[s : s + per_block], members) for s in range(0, len(rows), per_block))
    local = threading.local()

    def count_batch(batch):
        return [_count_positions(distmat, rows, members, local) for rows, members in batch]

    batches = np.array_split(np.arange(len(tasks)), max(1, min(len(tasks), workers.num_threads * 4)))
    results = workers.map(count_batch, [[tasks[j] for j in b] for b in batches if len(b)])
    for (rows, _), (pos, tied) in zip(tasks, (r for batch in results for r in batch)):
        for i, p, t in zip(rows, pos, tied):
            if not t:
                own.pos[own.slice(i)] = p
        to_sort.append(rows[tied])

    to_sort = np.sort(np.concatenate(to_sort))
    if len(to_sort):
        _sorted_positions(distmat, own, to_sort, workers)


def _count_positions(distmat, rows, members, local):
    """Positions of the ``members`` entries in the ranking of each row of ``rows``, as counts of strictly smaller
    distances, and a flag for rows where that is not exact (a member distance tied with another, or NaN)."""
    x = distmat[rows]
    thresholds = x[:, members]
    r, m, n = len(rows), len(members), x.shape[1]
    words, n_pad = _count_layout(n)
    buf = getattr(local, "buf", None)
    if buf is None or buf.size < r * m * n_pad:
        buf = local.buf = np.empty(max(r * m * n_pad, _BLOCK_ELEMS), dtype=bool)
    padded = buf[: r * m * n_pad].reshape(r, m, n_pad)
    padded[:, :, n:] = False
    cmp = padded[:, :, :n]
    np.less(x[:, None, :], thresholds[:, :, None], out=cmp)
    less = _count_true(padded, words)
    np.less_equal(x[:, None, :], thresholds[:, :, None], out=cmp)
    less_equal = _count_true(padded, words)
    tied = (less_equal - less > 1).any(axis=1)
    if thresholds.dtype.kind == "f":
        tied |= np.isnan(thresholds).any(axis=1)
    return less, tied


def _count_layout(n):
    """Row length padded so that a row of booleans is whole blocks of ``words`` uint64 words, ``words <= 255``."""
    words = min(255, -(-n // 8))
    return words, -(-n // (8 * words)) * 8 * words


def _count_true(padded, words):
    """Number of True values along the last axis of a C-contiguous boolean array laid out by _count_layout.

    Each uint64 word holds 8 booleans (bytes of 0 or 1); summing at most 255 words keeps every byte lane below
    256, so there is no carry between lanes and the lane bytes add up to the count."""
    lead = padded.shape[:-1]
    lanes = padded.view(np.uint64).reshape(lead + (-1, words)).sum(axis=-1, dtype=np.uint64)
    return lanes.view(np.uint8).reshape(lead + (-1,)).sum(axis=-1, dtype=np.int64)


def _sorted_positions(distmat, own, rows, workers):
    """Fills ``own.pos`` for ``rows`` from torchreid's ranking, ``np.argsort(row)`` with the default kind.

    Each row is argsorted in place as a view of ``distmat``, exactly as ``np.argsort(distmat, axis=1)`` does,
    so tied distances come out in the same order."""
    num_g = distmat.shape[1]
    arange = np.arange(num_g)

    def work(chunk):
        out = []
        for i in chunk:
            inverse = np.empty(num_g, dtype=np.int64)
            inverse[np.argsort(distmat[i])] = arange
            out.append(inverse[own.gidx[own.slice(i)]])
        return out

    chunks = workers.split(rows)
    for chunk, positions in zip(chunks, workers.map(work, chunks)):
        for i, p in zip(chunk, positions):
            own.pos[own.slice(i)] = p


# ---------------------------------------------------------------------------------------------------------------
# CMC and AP from the positions
# ---------------------------------------------------------------------------------------------------------------
class _RankedMatches:
    """Valid queries with their correct matches in ranking order, positions counted among kept entries."""

    def __init__(self, own, num_g):
        valid = own.valid_query[own.row]
        row, pos, removed = own.row[valid], own.pos[valid], own.removed[valid]
        order = np.argsort(row * np.int64(num_g) + pos, kind="stable")
        row, pos, removed = row[order], pos[order], removed[order]
        # Position in the kept list = position in the ranking minus the discarded entries ranked before it.
        pos_kept = pos - _cumsum_within(removed.astype(np.int64), row, exclusive=True)
        keep = ~removed
        self.row_of_match = row[keep]
        self.pos_kept = pos_kept[keep]
        self.rows, first, self.num_rel = np.unique(self.row_of_match, return_index=True, return_counts=True)
        self.first_kept_pos = self.pos_kept[first]
        self.match_rank = _cumsum_within(np.ones(len(self.pos_kept), dtype=np.int64), self.row_of_match)
        self.num_kept_gallery = num_g - (own.offsets[self.rows + 1] - own.offsets[self.rows]) + own.num_kept[self.rows]

    def average_precisions(self):
        # torchreid: AP = sum_i(cumsum(matches)[i] / (i + 1) * matches[i]) / num_rel over the kept list, summed
        # with numpy's pairwise summation. The same array is rebuilt per query (zeros except at the matches)
        # and summed the same way, so the float64 result is bit-identical.
        precision = self.match_rank.astype(np.float64) / (self.pos_kept + 1).astype(np.float64)
        bounds = np.concatenate([[0], np.cumsum(self.num_rel)])
        buf = np.zeros(int(self.num_kept_gallery.max()), dtype=np.float64)
        aps = np.empty(len(self.rows), dtype=np.float64)
        for j in range(len(self.rows)):
            s = slice(bounds[j], bounds[j + 1])
            at = self.pos_kept[s]
            buf[at] = precision[s]
            aps[j] = buf[: self.num_kept_gallery[j]].sum() / self.num_rel[j]
            buf[at] = 0.0
        return aps

    def inverse_negative_penalties(self):
        # INP = num_rel / (1 + kept position of the last match); matches are sorted by position within a row
        last = np.concatenate([[0], np.cumsum(self.num_rel)])[1:] - 1
        return self.num_rel / (self.pos_kept[last] + 1.0)


def _cumsum_within(values, groups, exclusive=False):
    """Cumulative sum of ``values`` restarting at each new value of the sorted ``groups``."""
    total = np.cumsum(values)
    starts = np.concatenate([[True], groups[1:] != groups[:-1]]) if len(groups) else np.zeros(0, bool)
    start_idx = np.maximum.accumulate(np.where(starts, np.arange(len(groups)), 0)) if len(groups) else starts
    result = total - total[start_idx] + values[start_idx]
    return result - values if exclusive else result


# ---------------------------------------------------------------------------------------------------------------
# CUHK03 single-gallery-shot CMC
# ---------------------------------------------------------------------------------------------------------------
def _cuhk03_positions_and_cmc(distmat, gal, own, max_rank, workers):
    """Fills ``own.pos`` for valid queries and returns their CUHK03 CMC rows, reproducing torchreid's
    ``eval_cuhk03``: for each valid query in order, 10 times, for each gallery identity in order of its first
    kept entry in the ranking, one ``np.random.choice`` among that identity's kept entries (in ranking order).
    ``np.random.randint`` with an array of upper bounds draws the same numbers from the same global state."""
    num_g = distmat.shape[1]
    n_ids = len(gal.present)
    width = min(max_rank, n_ids)  # torchreid's curve length: one sampled entry per gallery identity
    compact = np.full(len(gal.counts), -1, dtype=np.int64)
    compact[gal.present] = np.arange(n_ids)
    id_starts = gal.starts[gal.present]
    id_counts = gal.counts[gal.present]
    code_dtype = np.int16 if n_ids < np.iinfo(np.int16).max else np.int32  # int16: radix sort below
    g_ids = compact[gal.codes].astype(code_dtype)
    arange = np.arange(num_g)

    def rank_rows(rows):
        """Argsorts each row like torchreid; returns member positions and each row's entries grouped by
        identity (grouped as in gal.order) in ranking order."""
        grouped = np.empty((len(rows), num_g), dtype=np.int64)
        member_pos = []
        for j, i in enumerate(rows):
            order = np.argsort(distmat[i])
            inverse = np.empty(num_g, dtype=np.int64)
            inverse[order] = arange
            member_pos.append(inverse[own.gidx[own.slice(i)]])
            # Stable sort of the ranked identity codes: positions grouped by identity, increasing in each group.
            grouped[j] = np.argsort(g_ids[order], kind="stable")
        return member_pos, grouped

    valid_rows = np.flatnonzero(own.valid_query)
    chunk_rows = max(1, _CUHK03_CHUNK_ELEMS // max(num_g, n_ids * _CUHK03_REPEATS))
    cmc_rows = []
    for start in range(0, len(valid_rows), chunk_rows):
        rows = valid_rows[start : start + chunk_rows]
        parts = workers.split(rows, per_worker=1)
        grouped = []
        for part, (member_pos, grp) in zip(parts, workers.map(rank_rows, parts)):
            for i, p in zip(part, member_pos):
                own.pos[own.slice(i)] = p
            grouped.append(grp)
        grouped = np.concatenate(grouped)
        cmc_rows.append(_cuhk03_sample(grouped, rows, own, compact, id_starts, id_counts, width))
    return np.concatenate(cmc_rows).astype(np.float32)


def _cuhk03_sample(grouped, rows, own, compact, id_starts, id_counts, width):
    c, n_ids = len(rows), len(id_starts)
    q_id = compact[own.q_codes[rows]]
    # The query identity's kept entries, in ranking order (its discarded entries are not sampled).
    kept_lists = []
    for i in rows:
        s = own.slice(i)
        kept_lists.append(np.sort(own.pos[s][~own.removed[s]]))
    longest = max(len(k) for k in kept_lists)
    q_kept = np.zeros((c, longest), dtype=np.int64)
    for j, k in enumerate(kept_lists):
        q_kept[j, : len(k)] = k

    first = grouped[:, id_starts]
    first[np.arange(c), q_id] = q_kept[:, 0]
    counts = np.broadcast_to(id_counts, (c, n_ids)).copy()
    counts[np.arange(c), q_id] = own.num_kept[rows]
    # Identities in order of first appearance in the kept ranking: the order of torchreid's dict.
    draw_ids = np.argsort(first, axis=1)
    highs = np.take_along_axis(counts, draw_ids, axis=1)
    draws = np.random.randint(0, np.broadcast_to(highs[:, None, :], (c, _CUHK03_REPEATS, n_ids)))

    sampled = np.take_along_axis(grouped, (id_starts[draw_ids][:, None, :] + draws).reshape(c, -1), axis=1).reshape(
        c, _CUHK03_REPEATS, n_ids
    )
    q_slot = np.argmax(draw_ids == q_id[:, None], axis=1)
    q_draw = draws[np.arange(c), :, q_slot]
    q_sampled = np.take_along_axis(q_kept, q_draw, axis=1)
    sampled[np.arange(c), :, q_slot] = q_sampled
    # Rank of the correct identity among the sampled entries = number of sampled entries ranked before it.
    first_hit = (sampled < q_sampled[:, :, None]).sum(axis=2)
    hits = (first_hit[:, :, None] <= np.arange(width)).sum(axis=1)
    cmc = hits.astype(np.float32)
    cmc /= _CUHK03_REPEATS  # torchreid: float32 sum of 0/1 over the repeats, then /= num_repeats
    return cmc
