"""From query/gallery features to ranking results: the test-time options fast-reid users know, at any scale.

:func:`rank_features` applies alpha-query expansion, computes distances (re-ranked with the sparse k-reciprocal
re-ranking, when asked), and ranks them: on the full matrix when it fits ``max_distmat_gb``, else query block by
query block with the same results. mINP is always computed; TPR at FPR 1e-4 / 1e-3 / 1e-2 and a ROC plot on
request.
"""
import os
import os.path as osp
import re
from dataclasses import asdict, dataclass

import torch.nn.functional as F

from ptl_torchreid._torchreid import torchreid
from ptl_torchreid.metrics import (
    DEFAULT_FPRS,
    PairROC,
    alpha_query_expansion,
    evaluate_rank,
    evaluate_rank_chunked,
    rerank,
)
from ptl_torchreid.metrics.chunked import distmat_bytes

__all__ = ["EvalOptions", "rank_features", "file_name"]


@dataclass
class EvalOptions:
    """Test-time options (the ``test.*`` config keys of the same names)."""

    rerank_k1: int = 20
    rerank_k2: int = 6
    rerank_lambda: float = 0.3
    aqe: bool = False
    aqe_k: int = 5
    aqe_alpha: float = 3.0
    flip: bool = False  # averaged with the mirrored image, in the engine's feature extraction
    roc: bool = False
    max_distmat_gb: float = 2.0  # above this, ranking goes query block by query block

    def as_dict(self):
        return asdict(self)


def file_name(dataset_name):
    """A dataset name usable in a file name (user sources are named by their paths)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset_name).strip("_") or "dataset"


def rank_features(qf, gf, q_pids, g_pids, q_camids, g_camids, options, dist_metric="euclidean",
                  normalize_feature=False, rerank_on=False, use_metric_cuhk03=False, max_rank=50,
                  need_distmat=False, roc_plot=None, progress=False):
    """Returns ``(cmc, mAP, mINP, tpr, distmat)``: ``tpr`` maps each FPR to its TPR (empty without
    ``options.roc``); ``distmat`` is None when the ranking went by blocks (unless ``need_distmat``, e.g. for
    ranked-result images). ``roc_plot``: a PNG path for the ROC curve (with ``options.roc``)."""
    if normalize_feature:
        qf, gf = F.normalize(qf, p=2, dim=1), F.normalize(gf, p=2, dim=1)
    if options.aqe:
        print(f"Applying alpha-query expansion (k={options.aqe_k}, alpha={options.aqe_alpha}) ...")
        qf, gf = alpha_query_expansion(qf, gf, k=options.aqe_k, alpha=options.aqe_alpha)
    roc = PairROC(PairROC.count_negatives(q_pids, g_pids)) if options.roc else None
    cap = options.max_distmat_gb * (1 << 30)
    distmat = None
    if rerank_on:
        print(
            f"Applying person re-ranking (k1={options.rerank_k1}, k2={options.rerank_k2}, lambda={options.rerank_lambda}) ..."
        )
        distmat = rerank(
            qf,
            gf,
            k1=options.rerank_k1,
            k2=options.rerank_k2,
            lambda_value=options.rerank_lambda,
            metric=dist_metric,
            progress=progress,
        )
    elif need_distmat or distmat_bytes(len(qf), len(gf)) <= cap:
        distmat = torchreid.metrics.compute_distance_matrix(qf, gf, dist_metric).numpy()
    if distmat is not None:
        cmc, mAP, minp = evaluate_rank(
            distmat,
            q_pids,
            g_pids,
            q_camids,
            g_camids,
            max_rank=max_rank,
            use_metric_cuhk03=use_metric_cuhk03,
            return_minp=True,
        )
        if roc is not None:
            roc.add(distmat, q_pids, g_pids, q_camids, g_camids)
    else:
        print(
            f"Ranking {len(qf)} x {len(gf)} in blocks: the full distance matrix would exceed test.max_distmat_gb = {options.max_distmat_gb} GB"
        )
        cmc, mAP, minp = evaluate_rank_chunked(
            qf,
            gf,
            q_pids,
            g_pids,
            q_camids,
            g_camids,
            max_rank=max_rank,
            metric=dist_metric,
            memory_cap=cap,
            use_metric_cuhk03=use_metric_cuhk03,
            roc=roc,
            progress=progress,
        )
    tpr = {}
    if roc is not None:
        tpr = roc.tpr_at(DEFAULT_FPRS)
        if roc_plot:
            os.makedirs(osp.dirname(roc_plot) or ".", exist_ok=True)
            roc.plot(roc_plot)
            print(f'ROC curve saved to "{roc_plot}"')
    return cmc, mAP, minp, tpr, distmat
