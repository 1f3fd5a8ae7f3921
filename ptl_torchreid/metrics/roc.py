"""ROC of same-identity vs different-identity query/gallery pairs: TPR at fixed FPR and a ROC plot.

Pairs follow the ranking protocol: a gallery entry with the query's identity and camera is discarded; the
other entries with its identity are positives, every entry of another identity (distractors included) a
negative. Only the smallest ``max_fpr`` fraction of the negative distances decides a TPR at FPR <= max_fpr, so
:class:`PairROC` keeps just those (memory: all positives plus ``max_fpr`` of the negatives) and can be fed one
block of queries at a time.
"""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["PairROC", "DEFAULT_FPRS", "tpr_at_fpr"]

DEFAULT_FPRS = (1e-4, 1e-3, 1e-2)
# Pair distances :meth:`PairROC.add` handles at a time (its temporary memory is a few bytes per pair).
_ADD_PAIRS = 1 << 18


class PairROC:
    """Accumulates pair distances over query blocks; ``num_negatives`` is the total over all queries (known from
    the labels beforehand, see :meth:`count_negatives`), so the kept negatives can be bounded while adding."""

    def __init__(self, num_negatives, max_fpr=max(DEFAULT_FPRS)):
        self.num_negatives = int(num_negatives)
        self.keep = min(self.num_negatives, int(math.floor(max_fpr * self.num_negatives)) + 1)
        self.max_fpr = float(max_fpr)
        self._pos = []
        self._neg = np.zeros(0, np.float32)  # the smallest negatives merged so far, at most ``keep``
        self._pending, self._pending_len = [], 0  # candidates not merged yet
        self._neg_bound = np.inf  # once ``keep`` negatives are merged: the largest, which nothing equal replaces

    @staticmethod
    def count_negatives(q_pids, g_pids):
        ids, counts = np.unique(g_pids, return_counts=True)
        same = np.zeros(len(q_pids), np.int64)
        hit = np.isin(q_pids, ids)
        same[hit] = counts[np.searchsorted(ids, q_pids[hit])]
        return int((len(g_pids) - same).sum())

    def add(self, distmat, q_pids, g_pids, q_camids, g_camids):
        """Adds the pairs of a block of queries (rows of ``distmat``). Rows are taken a few at a time, so the
        temporary memory stays near ``_ADD_PAIRS`` distances whatever the block's size."""
        distmat = np.asarray(distmat, dtype=np.float32)
        q_pids, q_camids = np.asarray(q_pids), np.asarray(q_camids)
        g_pids, g_camids = np.asarray(g_pids)[None, :], np.asarray(g_camids)[None, :]
        step = max(1, _ADD_PAIRS // max(1, distmat.shape[1]))
        for s in range(0, len(distmat), step):
            d = distmat[s:s + step]
            same_id = q_pids[s:s + step, None] == g_pids
            self._pos.append(d[same_id & (q_camids[s:s + step, None] != g_camids)])
            neg = d[~same_id]
            neg = neg[neg < self._neg_bound]
            if len(neg):
                self._pending.append(neg)
                self._pending_len += len(neg)
            if self._pending_len > max(self.keep, _ADD_PAIRS):
                self._merge_negatives()

    def _merge_negatives(self):
        if self._pending:
            neg = np.concatenate([self._neg, *self._pending])
            if len(neg) > self.keep:
                neg = np.partition(neg, self.keep - 1)[: self.keep]
            self._neg, self._pending, self._pending_len = neg, [], 0
            if len(neg) and len(neg) == self.keep:
                self._neg_bound = neg.max()
        return self._neg

    def positives(self):
        return np.sort(np.concatenate(self._pos)) if self._pos else np.zeros(0, np.float32)

    def negatives(self):
        """The ``keep`` smallest negative distances seen so far, sorted."""
        return np.sort(self._merge_negatives())

    def tpr_at(self, fprs=DEFAULT_FPRS):
        """``{fpr: tpr}``: the fraction of positive pairs closer than the threshold at which at most
        ``fpr * num_negatives`` negative pairs are closer (a negative tied with the threshold is not accepted)."""
        return tpr_at_fpr(self.positives(), self.negatives(), self.num_negatives, fprs, self.max_fpr)

    def plot(self, path, title="ROC"):
        """Writes the ROC (log FPR axis, up to ``max_fpr``) as a PNG."""
        pos, neg = self.positives(), self.negatives()
        if not len(pos) or not len(neg):
            raise ValueError("ROC plot: no positive or no negative pairs")
        fpr = np.arange(1, len(neg) + 1) / self.num_negatives
        tpr = np.searchsorted(pos, neg, side="left") / len(pos)
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot(fpr, tpr)
        ax.set_xscale("log")
        ax.set_xlim(max(fpr[0], 1e-6), self.max_fpr)
        ax.set_ylim(0, 1)
        ax.set_xlabel("false positive rate (different-identity pairs)")
        ax.set_ylabel("true positive rate (same-identity pairs)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def tpr_at_fpr(pos_sorted, neg_sorted, num_negatives, fprs=DEFAULT_FPRS, max_fpr=1.0):
    """TPR at each FPR from sorted positive distances and the sorted smallest negative distances."""
    out = {}
    for f in fprs:
        if f > max_fpr + 1e-12:
            raise ValueError(f"TPR at FPR {f} needs negatives up to that rate; only {max_fpr} are kept")
        k = int(math.floor(f * num_negatives))
        threshold = neg_sorted[k] if k < len(neg_sorted) else np.inf
        out[f] = float(np.searchsorted(pos_sorted, threshold, side="left") / len(pos_sorted)) if len(
            pos_sorted) else float("nan")
    return out
