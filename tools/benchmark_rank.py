#!/usr/bin/env python
"""Times ptl_torchreid.metrics.evaluate_rank against torchreid's Python fallback on the same synthetic problem.

The default problem has the size of Market-1501's test split: 3,368 queries x 15,913 gallery images, 751 gallery
identities (750 of them queried) over 6 cameras, plus distractors. Distances are squared Euclidean distances
between synthetic embeddings (identity centre + noise), so the ranking looks like a trained model's.

Both implementations run in the same process on the same matrix; the script checks that their CMC and mAP are
identical and prints a table (also written as Markdown with --out).

    python tools/benchmark_rank.py                    # full size, torchreid's fallback takes ~80 s
    python tools/benchmark_rank.py --quick            # 10x smaller, a few seconds
    python tools/benchmark_rank.py --skip-torchreid   # time only ours
"""
import argparse
import os
import platform
import sys
import time
import warnings

import numpy as np

from ptl_torchreid.metrics import evaluate_rank

MARKET = dict(num_query=3368, num_gallery=15913, num_ids=751, num_cams=6, num_distractors=2798)


def make_features(num_query, num_gallery, num_ids, num_cams, num_distractors, seed=0, dim=128, noise=1.2,
                  camera_shift=0.0):
    """Synthetic query/gallery embeddings with Market-1501's structure: identity centre + noise (+ a per-camera
    shift of scale ``camera_shift``, so that cross-camera matches are harder). Distractors (pid -1) are noise.
    Returns ``(qf, gf, q_pids, g_pids, q_camids, g_camids)`` as numpy arrays, features float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids, dim)).astype(np.float32)
    num_id_images = num_gallery - num_distractors
    if num_id_images < num_ids:
        raise ValueError("num_gallery - num_distractors must be at least num_ids")
    # Every identity has gallery images; the rest are spread at random. Distractors get pid -1.
    g_pids = np.concatenate([np.arange(num_ids), rng.integers(0, num_ids, num_id_images - num_ids)])
    g_pids = np.concatenate([g_pids, np.full(num_distractors, -1)])
    g_camids = rng.integers(0, num_cams, num_gallery)
    # Queries from all but one identity (Market-1501 queries 750 of its 751 gallery identities).
    q_pids = rng.integers(0, max(1, num_ids - 1), num_query)
    q_camids = rng.integers(0, num_cams, num_query)
    shifts = camera_shift * rng.standard_normal((num_cams, dim)) if camera_shift else None

    def embed(pids, camids):
        base = np.where(pids[:, None] >= 0, centres[np.maximum(pids, 0)], 0.0)
        if shifts is not None:
            base = base + shifts[camids]
        return (base + noise * rng.standard_normal((len(pids), dim))).astype(np.float32)

    qf, gf = embed(q_pids, q_camids), embed(g_pids, g_camids)
    return qf, gf, q_pids, g_pids, q_camids, g_camids


def make_problem(num_query, num_gallery, num_ids, num_cams, num_distractors, seed=0, dim=128, noise=1.2):
    """A synthetic query/gallery split with Market-1501's structure and a float32 distance matrix."""
    qf, gf, q_pids, g_pids, q_camids, g_camids = make_features(num_query, num_gallery, num_ids, num_cams,
                                                               num_distractors, seed=seed, dim=dim, noise=noise)
    # Squared Euclidean distance as torchreid's compute_distance_matrix(metric='euclidean').
    distmat = (qf ** 2).sum(1, keepdims=True) + (gf ** 2).sum(1)[None, :] - 2.0 * qf @ gf.T
    return distmat.astype(np.float32), q_pids, g_pids, q_camids, g_camids


def timed(fn, repeats):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a 10x smaller problem (336 x 1,591)")
    p.add_argument("--skip-torchreid", action="store_true", help="do not run torchreid's slow Python fallback")
    p.add_argument("--cuhk03", action="store_true", help="use the CUHK03 single-gallery-shot metric")
    p.add_argument("--max-rank", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3, help="runs of ours; the best time is reported")
    p.add_argument("--threads", type=int, default=None, help="threads for ours (default: all usable CPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = p.parse_args(argv)

    size = dict(MARKET)
    if args.quick:
        size = {k: max(1, v // 10) for k, v in size.items()}
        size["num_ids"] = 76
        size["num_cams"] = 6
    distmat, q_pids, g_pids, q_camids, g_camids = make_problem(seed=args.seed, **size)
    metric = "cuhk03" if args.cuhk03 else "market1501"
    print(f"problem: {distmat.shape[0]} x {distmat.shape[1]} float32, {size['num_ids']} gallery ids, "
          f"{size['num_cams']} cameras, metric {metric}")

    def ours():
        np.random.seed(args.seed)
        return evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=args.max_rank,
                             use_metric_cuhk03=args.cuhk03, num_threads=args.threads)

    t_ours, (cmc, mAP) = timed(ours, args.repeats)
    print(f"ours:      {t_ours:.3f} s (best of {args.repeats})  Rank-1 {cmc[0]:.4f}  mAP {mAP:.4f}")

    t_ref, identical = None, None
    if not args.skip_torchreid:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchreid warns that its Cython evaluation is unavailable
            import torchreid
        np.random.seed(args.seed)
        t0 = time.perf_counter()
        cmc_ref, mAP_ref = torchreid.metrics.evaluate_rank(
            distmat, q_pids, g_pids, q_camids, g_camids, max_rank=args.max_rank,
            use_metric_cuhk03=args.cuhk03, use_cython=False)
        t_ref = time.perf_counter() - t0
        identical = bool(np.array_equal(cmc_ref, cmc) and mAP_ref == mAP)
        print(f"torchreid: {t_ref:.3f} s (1 run)       Rank-1 {cmc_ref[0]:.4f}  mAP {mAP_ref:.4f}")
        print(f"identical: {identical}")

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    header = "| problem | metric | ours (s) | torchreid fallback (s) | speed-up | identical |"
    ref_seconds = f"{t_ref:.2f}" if t_ref is not None else "skipped"
    speed_up = f"{t_ref / t_ours:.0f}x" if t_ref is not None else "-"
    checked = {None: "not checked", True: "yes", False: "NO"}[identical]
    row = (f"| {distmat.shape[0]} x {distmat.shape[1]} | {metric} | {t_ours:.3f} | {ref_seconds} | {speed_up} "
           f"| {checked} |")
    table = "\n".join([header, "|---|---|---|---|---|---|", row])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    env = (f"{cpus} CPUs usable, load average {load:.1f} at the end, numpy {np.__version__}, "
           f"Python {platform.python_version()}, {platform.processor() or platform.machine()}")
    print()
    print(table)
    print()
    print(env)
    if args.out:
        cmd = "python tools/benchmark_rank.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.out, "w") as f:
            f.write(f"Command: `{cmd.strip()}`\n\n{table}\n\n{env}\n")
        print(f"written to {args.out}")
    return 0 if identical is not False else 1


if __name__ == "__main__":
    sys.exit(main())
