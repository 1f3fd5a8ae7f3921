"""Evaluation: from test loaders to ranking results, with the test-time options fast-reid users know, at any scale.

:class:`ReIDEvaluator` extracts the query and gallery features (on disjoint shards under several ranks, gathered
in dataset order), ranks them on rank 0 and reports the results; the engine's ``test`` calls it per target.
:func:`rank_features` applies alpha-query expansion, computes distances (re-ranked with the sparse k-reciprocal
re-ranking, when asked), and ranks them: on the full matrix when it fits ``max_distmat_gb``, else query block by
query block with the same results. mINP is always computed; TPR at FPR 1e-4 / 1e-3 / 1e-2 and a ROC plot on
request.
"""
import os
import os.path as osp
import re
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ptl_torchreid._torchreid import torchreid
from ptl_torchreid.data.samplers import ShardSampler, rebuild_loader
from ptl_torchreid.metrics import (
    DEFAULT_FPRS,
    PairROC,
    alpha_query_expansion,
    clamp_ranks,
    evaluate_rank,
    evaluate_rank_chunked,
    rerank,
)
from ptl_torchreid.metrics.chunked import distmat_bytes
from ptl_torchreid.utils import distributed as pdist

__all__ = ["EvalOptions", "ReIDEvaluator", "rank_features", "file_name"]


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
            f"Applying person re-ranking (k1={options.rerank_k1}, k2={options.rerank_k2}, "
            f"lambda={options.rerank_lambda}) ..."
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
            f"Ranking {len(qf)} x {len(gf)} in blocks: the full distance matrix would exceed test.max_distmat_gb = "
            f"{options.max_distmat_gb} GB"
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


class ReIDEvaluator:
    """Evaluates an engine's model on query/gallery loaders with torchreid's protocol.

    ``engine`` supplies the model through torchreid's overridable ``extract_features`` and
    ``parse_data_for_eval``, plus its device, memory format and autocast; ``options``: the :class:`EvalOptions`.
    """

    def __init__(self, engine, options):
        self.engine = engine
        self.options = options

    @torch.no_grad()
    def extract_local(self, loader, desc="features"):
        """Features, pids and camids of a test loader in this process (the model must be in eval mode)."""
        e = self.engine
        feats, pids, camids = [], [], []
        for data in tqdm(loader, desc=desc, disable=e.bar_disabled(), leave=False, dynamic_ncols=True):
            imgs, p, c = e.parse_data_for_eval(data)
            imgs = imgs.to(e.device, non_blocking=True, memory_format=e.memory_format)
            with e.autocast():
                f = e.extract_features(imgs)
                if self.options.flip:  # the embedding of the image and of its mirror image, averaged
                    f = (f.float() + e.extract_features(imgs.flip(3)).float()) / 2
            feats.append(f.float().cpu())
            pids.append(torch.as_tensor(p))
            camids.append(torch.as_tensor(c))
        return torch.cat(feats), torch.cat(pids).numpy(), torch.cat(camids).numpy()

    @torch.no_grad()
    def extract(self, loader, desc="features"):
        """:meth:`extract_local` over all ranks: each rank extracts a disjoint shard of the loader's dataset
        (items ``rank, rank + world_size, ...``), the shards are gathered, and every rank gets all features, pids
        and camids in the dataset's order, as one process would compute them."""
        world = pdist.get_world_size()
        if world == 1:
            return self.extract_local(loader, desc)
        n = len(loader.dataset)
        if n < world:
            raise ValueError(
                f"the test set '{desc}' has {n} images, fewer than the {world} ranks: evaluate it with fewer processes"
            )
        feats, pids, camids = self.extract_local(rebuild_loader(loader, ShardSampler(n), drop_last=False), desc)
        device = pdist.collective_device()
        order = torch.cat([torch.arange(r, n, world) for r in range(world)])  # dataset index of each gathered row
        out = []
        for t in (feats, torch.as_tensor(pids), torch.as_tensor(camids)):
            gathered = pdist.all_gather_tensors(t.to(device)).cpu()
            restored = torch.empty_like(gathered)
            restored[order] = gathered
            out.append(restored)
        return out[0], out[1].numpy(), out[2].numpy()

    @torch.no_grad()
    def evaluate(self, dataset_name, query_loader, gallery_loader, dist_metric="euclidean",
                 normalize_feature=False, visrank=False, visrank_topk=10, save_dir="", use_metric_cuhk03=False,
                 ranks=(1, 5, 10, 20), rerank=False):
        """Features -> distances -> vectorised CMC/mAP; returns ``(rank1, mAP, result)`` with ``result``
        ``{'mAP': ..., 'mINP': ..., 'cmc': {rank: ...}}`` (and ``'tpr_at_fpr'`` with the ROC option).

        Under several ranks the distances, metrics and ranked-result images are computed on rank 0 only (one
        distance matrix in memory per run) and the results broadcast, so every rank returns the same values."""
        t0 = time.time()
        qf, q_pids, q_camids = self.extract(query_loader, "query " + dataset_name)
        gf, g_pids, g_camids = self.extract(gallery_loader, "gallery " + dataset_name)
        print(
            f"Extracted features: query {qf.size(0)}x{qf.size(1)}, gallery {gf.size(0)}x{gf.size(1)} "
            f"({time.time() - t0:.1f}s)"
        )
        outcome = None
        if pdist.is_main_process():
            outcome = self.rank_and_report(
                dataset_name, qf, gf, q_pids, g_pids, q_camids, g_camids, dist_metric=dist_metric,
                normalize_feature=normalize_feature, visrank=visrank, visrank_topk=visrank_topk, save_dir=save_dir,
                use_metric_cuhk03=use_metric_cuhk03, ranks=ranks, rerank=rerank,
            )
        return pdist.broadcast_object(outcome)

    def rank_and_report(self, dataset_name, qf, gf, q_pids, g_pids, q_camids, g_camids, dist_metric="euclidean",
                        normalize_feature=False, visrank=False, visrank_topk=10, save_dir="",
                        use_metric_cuhk03=False, ranks=(1, 5, 10, 20), rerank=False):
        """Distances, CMC/mAP, printed results and optional ranked-result images, in this process."""
        ranks = clamp_ranks(ranks, len(gf), dataset_name)
        roc_plot = osp.join(save_dir, f"roc_{file_name(dataset_name)}.png") if save_dir else None
        cmc, mAP, minp, tpr, distmat = rank_features(
            qf, gf, q_pids, g_pids, q_camids, g_camids, self.options, dist_metric=dist_metric,
            normalize_feature=normalize_feature, rerank_on=rerank, use_metric_cuhk03=use_metric_cuhk03,
            max_rank=max(ranks), need_distmat=visrank, progress=self.engine.progress_bar, roc_plot=roc_plot,
        )
        result = {"mAP": float(mAP), "cmc": {int(r): float(cmc[r - 1]) for r in ranks}, "mINP": float(minp)}
        if tpr:
            result["tpr_at_fpr"] = {f"{f:g}": float(t) for f, t in tpr.items()}
        print(f"** Results ({dataset_name}) **")
        print(f"mAP: {result['mAP']:.1%}")
        print(f"mINP: {result['mINP']:.1%}")
        for f, t in result.get("tpr_at_fpr", {}).items():
            print(f"TPR@FPR={f}: {t:.1%}")
        print("CMC curve")
        for r, v in result["cmc"].items():
            print(f"Rank-{r:<3}: {v:.1%}")

        if visrank:
            dm = self.engine.datamanager
            torchreid.utils.visualize_ranked_results(
                distmat,
                dm.fetch_test_loaders(dataset_name),
                dm.data_type,
                width=dm.width,
                height=dm.height,
                save_dir=osp.join(save_dir, "visrank_" + file_name(dataset_name)),
                topk=min(visrank_topk, distmat.shape[1]),
            )
        return float(cmc[0]), float(mAP), result
