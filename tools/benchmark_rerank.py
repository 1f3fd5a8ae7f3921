#!/usr/bin/env python
"""Re-ranking and chunked ranking at real scale: ptl_torchreid.metrics against torchreid in the same run.

Features have identity structure (identity centre + camera shift + noise, 512-D like OSNet's embedding) and the
sizes of Market-1501 (3,368 x 15,913), MSMT17 (11,659 x 82,161) and Market-1501 + 100k distractors. Every
method runs in a fresh child process, so its peak memory (the kernel's peak RSS above the features already
loaded) is its own. Results are compared on the distance matrices (max abs difference) and on CMC / mAP / mINP.

    python tools/benchmark_rerank.py --case rerank-market      # ours vs torchreid's dense re_ranking
    python tools/benchmark_rerank.py --case rerank-msmt        # ours only (torchreid's needs ~3 x 35 GB)
    python tools/benchmark_rerank.py --case chunked-distractors  # chunked (2 GB cap) vs full-matrix ranking
    python tools/benchmark_rerank.py --case knn-msmt           # exact top-10 search: faiss vs torch blocks
    python tools/benchmark_rerank.py --case rerank-market --quick  # 10x smaller, seconds
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import ptl_torchreid  # noqa: F401  (before torch: the package sets OpenMP waiting, see _openmp.py)

# isort: split
import numpy as np
from benchmark_rank import make_features  # the ranking benchmark beside this one

from ptl_torchreid.benchmarking.measure import (
    load_average,
    machine_description,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)

SIZES = {
    "market": dict(num_query=3368, num_gallery=15913, num_ids=751, num_cams=6, num_distractors=2798),
    "msmt": dict(num_query=11659, num_gallery=82161, num_ids=3060, num_cams=15, num_distractors=0),
    "distractors": dict(num_query=3368, num_gallery=15913 + 100000, num_ids=751, num_cams=6,
                        num_distractors=2798 + 100000),
}
CASES = {"rerank-market": ("market", ["ours", "torchreid"]), "rerank-msmt": ("msmt", ["ours"]),
         "chunked-distractors": ("distractors", ["chunked", "full"]), "knn-msmt": ("msmt", ["faiss", "torch"])}
SEARCH_K = 10  # neighbours per query in the knn case (ptl-torchreid search's default)
FEATURES = dict(dim=512, noise=1.0, camera_shift=0.7)


def problem(name, quick, seed):
    size = dict(SIZES[name])
    if quick:
        size = {k: (v if k == "num_cams" else max(1, v // 10)) for k, v in size.items()}
    return make_features(seed=seed, **size, **FEATURES)


def child(method, name, quick, seed, out_path, cap_gb):
    """Runs one method; writes its distances (or ranking results) and measurements."""
    import torch

    from ptl_torchreid.metrics import PairROC, evaluate_rank, evaluate_rank_chunked, knn_search, rerank
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchreid
    qf, gf, q_pids, g_pids, q_camids, g_camids = problem(name, quick, seed)
    qf, gf = torch.from_numpy(qf), torch.from_numpy(gf)
    labels = (q_pids, g_pids, q_camids, g_camids)
    roc = PairROC(PairROC.count_negatives(q_pids, g_pids))
    reset_peak_rss()
    base = rss_bytes()
    t0 = time.perf_counter()
    if method in ("faiss", "torch"):
        idx, _ = knn_search(qf, gf, SEARCH_K, backend=method, memory_cap=int(cap_gb * (1 << 30)))
        seconds, peak = time.perf_counter() - t0, peak_rss_bytes() - base
        np.save(out_path + ".idx.npy", idx)
        with open(out_path + ".json", "w") as f:
            json.dump({"seconds": seconds, "peak_gb": peak / 2 ** 30}, f)
        return
    if method == "ours":
        distmat = rerank(qf, gf, progress=True)
    elif method == "torchreid":
        cd = torchreid.metrics.compute_distance_matrix
        distmat = torchreid.utils.re_ranking(cd(qf, gf).numpy(), cd(qf, qf).numpy(), cd(gf, gf).numpy())
    elif method == "chunked":
        cmc, mAP, minp = evaluate_rank_chunked(qf, gf, *labels, memory_cap=int(cap_gb * (1 << 30)), roc=roc)
        distmat = None
    else:  # full
        distmat = torchreid.metrics.compute_distance_matrix(qf, gf).numpy()
        cmc, mAP, minp = evaluate_rank(distmat, *labels, return_minp=True)
        roc.add(distmat, *labels)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes() - base
    if method in ("ours", "torchreid"):
        cmc, mAP, minp = evaluate_rank(distmat, *labels, return_minp=True)
        roc.add(distmat, *labels)
        np.save(out_path + ".npy", distmat)
    with open(out_path + ".json", "w") as f:
        json.dump({"seconds": seconds, "peak_gb": peak / 2 ** 30, "rank1": float(cmc[0]), "mAP": mAP,
                   "mINP": minp, "tpr": list(roc.tpr_at().values()), "cmc": [float(c) for c in cmc[:20]]}, f)


def cells(r):
    """Time, memory and (where the method ranks) the metrics of one result, as table cells."""
    out = [f"{r['seconds']:.1f}", f"{r['peak_gb']:.2f}"]
    if "mAP" not in r:  # a top-k search: no ranking metrics
        return out + ["-"] * 4
    return out + [f"{r['rank1']:.1%}", f"{r['mAP']:.1%}", f"{r['mINP']:.1%}",
                  " / ".join(f"{t:.1%}" for t in r["tpr"])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", choices=sorted(CASES), required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cap-gb", type=float, default=2.0, help="memory cap of the chunked ranking")
    p.add_argument("--skip", nargs="*", default=[], help="methods not to run (e.g. torchreid)")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    name, methods = CASES[args.case]
    if args.child:
        child(args.child[0], name, args.quick, args.seed, args.child[1], args.cap_gb)
        return 0

    size = problem(name, args.quick, args.seed)
    nq, ng = len(size[0]), len(size[1])
    del size
    print(f"case {args.case}: {nq} queries x {ng} gallery, {FEATURES['dim']}-D features; load average "
          f"{load_average():.2f} at the start")
    results = {}
    # The children write their results (and distance matrices) here; removed when the comparison is done.
    with tempfile.TemporaryDirectory(prefix="bench_rerank_") as tmp:
        for method in methods:
            if method in args.skip:
                continue
            out = os.path.join(tmp, method)
            cmd = [sys.executable, os.path.abspath(__file__), "--case", args.case, "--seed", str(args.seed),
                   "--cap-gb", str(args.cap_gb), "--child", method, out] + (["--quick"] if args.quick else [])
            print("running", method, "...", flush=True)
            subprocess.run(cmd, check=True)
            with open(out + ".json") as f:
                results[method] = json.load(f)
            print(f"  {method}: {' | '.join(cells(results[method]))}", flush=True)

        new, ref = methods[0], (methods[1] if len(methods) > 1 else None)
        compared = ""
        if ref in results and new in results and "mAP" in results[new]:
            same_metrics = all(results[new][k] == results[ref][k] for k in ("cmc", "mAP", "mINP", "tpr"))
            compared = f"CMC/mAP/mINP/TPR identical: {'yes' if same_metrics else 'NO'}"
            if os.path.exists(os.path.join(tmp, new + ".npy")) and os.path.exists(os.path.join(tmp, ref + ".npy")):
                a, b = np.load(os.path.join(tmp, new + ".npy")), np.load(os.path.join(tmp, ref + ".npy"))
                compared += f"; max |distance difference| {float(np.abs(a - b).max()):.2e}"
        elif ref in results and new in results:  # the knn case: compare the neighbours
            a, b = np.load(os.path.join(tmp, new + ".idx.npy")), np.load(os.path.join(tmp, ref + ".idx.npy"))
            same_rows = float((a == b).all(1).mean())
            compared = (f"top-{a.shape[1]} lists identical for {same_rows:.2%} of the queries, nearest neighbour for "
                        f"{float((a[:, 0] == b[:, 0]).mean()):.2%} (float32 rounding can swap near-equal distances)")
    header = "| case | method | time (s) | peak memory (GB) | Rank-1 | mAP | mINP | TPR@FPR 1e-4 / 1e-3 / 1e-2 |"
    rows = [header, "|---|---|---|---|---|---|---|---|"]
    for m, r in results.items():
        rows.append(f"| {args.case} ({nq} x {ng}) | {m} | " + " | ".join(cells(r)) + " |")
    if ref in results and new in results:
        rows.append(f"| | ratio {ref}/{new} | {results[ref]['seconds'] / results[new]['seconds']:.2f}x faster | "
                    f"{results[new]['peak_gb'] / max(results[ref]['peak_gb'], 1e-9):.3f} of the memory | | | | |")
    env = f"{machine_description('cpu')}; load average {load_average():.2f} at the end"
    text = "\n".join(rows) + "\n\n" + (compared + "\n\n" if compared else "") + env
    print("\n" + text)
    if args.out:
        cmd = "python tools/benchmark_rerank.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.out, "w") as f:
            f.write(f"Command: `{cmd.strip()}`\n\n{text}\n")
    ok = "NO" not in compared
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
