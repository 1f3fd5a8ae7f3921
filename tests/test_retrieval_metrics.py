"""Sparse re-ranking against torchreid's dense one; chunked ranking against full-matrix ranking; mINP, TPR@FPR and
alpha-query expansion against hand computations."""
import importlib
import tracemalloc
import warnings

import numpy as np
import pytest
import torch

from ptl_torchreid.metrics import (
    PairROC,
    alpha_query_expansion,
    evaluate_rank,
    evaluate_rank_chunked,
    rerank,
    tpr_at_fpr,
)

rerank_module = importlib.import_module("ptl_torchreid.metrics.rerank")  # the module, not the function

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torchreid


def torchreid_rerank(qf, gf, metric="euclidean", **kw):
    cd = torchreid.metrics.compute_distance_matrix
    return torchreid.utils.re_ranking(cd(qf, gf, metric).numpy(), cd(qf, qf, metric).numpy(),
                                      cd(gf, gf, metric).numpy(), **kw)


def identity_features(rng, nq, ng, num_ids=12, dim=16, noise=0.8):
    centres = rng.standard_normal((num_ids, dim))
    q_pids, g_pids = rng.integers(0, num_ids, nq), rng.integers(0, num_ids, ng)
    qf = torch.tensor(centres[q_pids] + noise * rng.standard_normal((nq, dim)), dtype=torch.float32)
    gf = torch.tensor(centres[g_pids] + noise * rng.standard_normal((ng, dim)), dtype=torch.float32)
    return qf, gf, q_pids, g_pids


@pytest.fixture
def small_blocks(monkeypatch):
    # several blocks of the neighbour pass even on tiny problems, so the block bookkeeping is exercised
    monkeypatch.setattr(rerank_module, "_BLOCK", 37)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("params", [{}, {"k1": 5, "k2": 1, "lambda_value": 0.5}, {"k1": 7, "k2": 3},
                                    {"k1": 3, "k2": 8, "lambda_value": 0.1}])
def test_rerank_equals_torchreid(small_blocks, metric, params):
    rng = np.random.default_rng(len(params) + (metric == "cosine"))
    qf, gf, q_pids, g_pids = identity_features(rng, 40, 150)
    ours = rerank(qf, gf, metric=metric, **params)
    ref = torchreid_rerank(qf, gf, metric, **params)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    # the same ranking metrics, with every image its own camera (single-camera data) and with 3 cameras
    for q_cam, g_cam in ((np.arange(40), np.arange(40, 190)), (rng.integers(0, 3, 40), rng.integers(0, 3, 150))):
        a = evaluate_rank(ours, q_pids, g_pids, q_cam, g_cam, max_rank=10, return_minp=True)
        b = evaluate_rank(ref, q_pids, g_pids, q_cam, g_cam, max_rank=10, return_minp=True)
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1:] == b[1:]


def test_rerank_with_ties_equals_torchreid_with_a_stable_sort(small_blocks, monkeypatch):
    """Integer features make exact, massive ties (every distance an exact integer). torchreid's result then
    depends on numpy's unstable argsort; with index order for ties (a stable sort) both agree."""
    rng = np.random.default_rng(3)
    qf = torch.tensor(rng.integers(-1, 2, (30, 4)), dtype=torch.float32)
    gf = torch.tensor(rng.integers(-1, 2, (90, 4)), dtype=torch.float32)
    ours = rerank(qf, gf, k1=6, k2=3)
    d = torchreid.metrics.compute_distance_matrix(torch.cat([qf, gf]), torch.cat([qf, gf])).numpy()
    d7 = np.sort(d, axis=1)
    assert (d7[:, 6] == d7[:, 7]).mean() > 0.5  # the neighbourhood boundary falls inside a tie in most rows
    stable = np.argsort
    monkeypatch.setattr(np, "argsort", lambda a, *args, **kw: stable(a, *args, **dict(kw, kind="stable")))
    ref = torchreid_rerank(qf, gf, k1=6, k2=3)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_rerank_rejects_bad_input():
    with pytest.raises(ValueError, match="metric"):
        rerank(torch.zeros(2, 3), torch.zeros(4, 3), metric="hamming")
    with pytest.raises(ValueError, match="feature sizes"):
        rerank(torch.zeros(2, 3), torch.zeros(4, 5))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_chunked_ranking_equals_full_matrix(metric):
    rng = np.random.default_rng(5)
    qf, gf, q_pids, g_pids = identity_features(rng, 53, 211, num_ids=20, noise=1.5)
    q_cam, g_cam = rng.integers(0, 3, 53), rng.integers(0, 3, 211)
    g_pids[:30] = -1  # distractors
    distmat = torchreid.metrics.compute_distance_matrix(qf, gf, metric).numpy()
    full = evaluate_rank(distmat, q_pids, g_pids, q_cam, g_cam, max_rank=20, return_minp=True)
    roc = PairROC(PairROC.count_negatives(q_pids, g_pids), max_fpr=0.5)
    # a cap of a few rows: many query blocks
    chunked = evaluate_rank_chunked(qf, gf, q_pids, g_pids, q_cam, g_cam, max_rank=20, metric=metric,
                                    memory_cap=7 * 211 * 16, roc=roc)
    np.testing.assert_array_equal(chunked[0], full[0])
    assert chunked[1:] == full[1:]
    whole = PairROC(PairROC.count_negatives(q_pids, g_pids), max_fpr=0.5)
    whole.add(distmat, q_pids, g_pids, q_cam, g_cam)
    assert roc.tpr_at((0.01, 0.1, 0.5)) == whole.tpr_at((0.01, 0.1, 0.5))


def test_minp_by_hand():
    # One query (pid 1, camera 0). Gallery order by distance: g0 (pid 1, cam 0: discarded), g1 (pid 1, cam 1),
    # g2 (pid 2), g3 (pid 3), g4 (pid 1, cam 1). Kept list: g1, g2, g3, g4; matches at kept positions 0 and 3.
    distmat = np.array([[0.0, 1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    cmc, mAP, minp = evaluate_rank(distmat, np.array([1]), np.array([1, 1, 2, 3, 1]), np.array([0]),
                                   np.array([0, 1, 1, 1, 1]), max_rank=4, return_minp=True)
    assert minp == pytest.approx(2 / 4)  # 2 matches, the hardest at position 4
    assert mAP == pytest.approx((1 / 1 + 2 / 4) / 2)
    # second query: its only match ranked first -> INP 1; mINP is the mean
    distmat2 = np.vstack([distmat, [[5.0, 0.9, 0.5, 0.8, 0.7]]]).astype(np.float32)
    _, _, minp2 = evaluate_rank(distmat2, np.array([1, 2]), np.array([1, 1, 2, 3, 1]), np.array([0, 0]),
                                np.array([0, 1, 1, 1, 1]), max_rank=4, return_minp=True)
    assert minp2 == pytest.approx((0.5 + 1.0) / 2)


def test_tpr_at_fpr_by_hand():
    # 10 negatives, 4 positives. At FPR 0.1 at most 1 negative may be accepted: threshold = 2nd smallest
    # negative (0.3), positives strictly below it: 0.1 and 0.2 -> TPR 0.5. At FPR 0.0 the threshold is the
    # smallest negative (0.25): TPR 0.5 as well; at 0.3: threshold 0.5 -> 3 of 4 positives.
    pos = np.sort(np.array([0.1, 0.2, 0.4, 0.9]))
    neg = np.sort(np.array([0.25, 0.3, 0.5, 0.6, 0.7, 0.8, 1.0, 1.1, 1.2, 1.3]))
    assert tpr_at_fpr(pos, neg, 10, (0.0, 0.1, 0.3)) == {0.0: 0.5, 0.1: 0.5, 0.3: 0.75}
    # the same through PairROC from a distance matrix: query pid 0 cam 0 against a gallery
    g_pids = np.array([0, 0, 0, 0, 0] + [1] * 10)
    g_cams = np.array([0, 1, 1, 1, 1] + [1] * 10)
    row = np.concatenate([[0.0], pos, neg]).astype(np.float32)[None, :]
    roc = PairROC(PairROC.count_negatives(np.array([0]), g_pids), max_fpr=0.3)
    roc.add(row, np.array([0]), g_pids, np.array([0]), g_cams)
    assert roc.num_negatives == 10
    assert roc.tpr_at((0.1, 0.3)) == {0.1: 0.5, 0.3: 0.75}


def test_roc_plot_is_written(tmp_path):
    rng = np.random.default_rng(0)
    g_pids = np.concatenate([np.zeros(50, int), np.ones(1000, int)])
    row = np.concatenate([rng.random(50), rng.random(1000) + 0.5]).astype(np.float32)[None, :]
    roc = PairROC(PairROC.count_negatives(np.array([0]), g_pids), max_fpr=0.1)
    roc.add(row, np.array([0]), g_pids, np.array([0]), np.ones(1050, int))
    path = roc.plot(str(tmp_path / "roc.png"))
    assert (tmp_path / "roc.png").stat().st_size > 1000 and path.endswith("roc.png")


@pytest.mark.parametrize("rows_per_add", [1, 37, 400])
def test_pair_roc_fed_in_blocks_equals_all_pairs_at_once(rows_per_add):
    # 400 x 6000 pairs (more than PairROC handles in one step, so candidates are merged and bounded on the
    # way), distances rounded to force ties at the thresholds.
    rng = np.random.default_rng(3)
    q_pids, g_pids = rng.integers(0, 50, 400), rng.integers(-1, 50, 6000)
    q_cams, g_cams = rng.integers(0, 3, 400), rng.integers(0, 3, 6000)
    distmat = np.round(rng.random((400, 6000)) * 50, 0).astype(np.float32)
    distmat[q_pids[:, None] == g_pids[None, :]] -= 5
    same = q_pids[:, None] == g_pids[None, :]
    pos = np.sort(distmat[same & (q_cams[:, None] != g_cams[None, :])])
    neg = np.sort(distmat[~same])
    fprs = (1e-4, 1e-3, 1e-2)
    expected = tpr_at_fpr(pos, neg, len(neg), fprs)
    roc = PairROC(PairROC.count_negatives(q_pids, g_pids))
    for s in range(0, 400, rows_per_add):
        b = slice(s, s + rows_per_add)
        roc.add(distmat[b], q_pids[b], g_pids, q_cams[b], g_cams)
    assert roc.num_negatives == len(neg)
    assert roc.tpr_at(fprs) == expected
    np.testing.assert_array_equal(roc.negatives(), neg[: roc.keep])


def test_chunked_ranking_with_roc_stays_within_memory_cap():
    rng = np.random.default_rng(0)
    qf, gf, q_pids, g_pids = identity_features(rng, 1500, 20000, num_ids=100, noise=1.5)
    q_cam, g_cam = rng.integers(0, 4, 1500), rng.integers(0, 4, 20000)
    cap = 64 << 20  # the full matrix would be 120 MB of float32 alone
    roc = PairROC(PairROC.count_negatives(q_pids, g_pids))
    tracemalloc.start()  # sees numpy's buffers; the torch-owned block of distances is added below
    try:
        evaluate_rank_chunked(qf, gf, q_pids, g_pids, q_cam, g_cam, memory_cap=cap, roc=roc)
        _, numpy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    block = (cap // (20000 * 16)) * 20000 * 4
    assert numpy_peak + block <= cap, (numpy_peak, block)


def test_alpha_query_expansion_by_hand():
    # 2-D unit features; k = 2 neighbours (itself and the most similar), weights cos^alpha with alpha = 1.
    q = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    new_q, new_g = alpha_query_expansion(q, g, k=2, alpha=1.0)
    # query: itself (1.0) and g1 (cos 0.6): 1*(1,0) + 0.6*(0.6,0.8) = (1.36, 0.48)
    expected_q = torch.tensor([1.36, 0.48]) / torch.tensor([1.36, 0.48]).norm()
    # g0: itself and g1 (cos 0.8): (0,1) + 0.8*(0.6,0.8) = (0.48, 1.64)
    expected_g0 = torch.tensor([0.48, 1.64]) / torch.tensor([0.48, 1.64]).norm()
    torch.testing.assert_close(new_q[0], expected_q)
    torch.testing.assert_close(new_g[0], expected_g0)
    # alpha = 3 weights the neighbour by 0.6 ** 3
    new_q3, _ = alpha_query_expansion(q, g, k=2, alpha=3.0)
    v = torch.tensor([1 + 0.216 * 0.6, 0.216 * 0.8])
    torch.testing.assert_close(new_q3[0], v / v.norm())
