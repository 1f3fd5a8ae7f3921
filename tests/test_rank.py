"""ptl_torchreid.metrics.evaluate_rank must give exactly torchreid's results (its pure-Python evaluation)."""
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptl_torchreid.metrics import evaluate_rank
from ptl_torchreid.metrics import rank as rank_module

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torchreid warns that its Cython evaluation is unavailable
    import torchreid


def torchreid_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, use_metric_cuhk03=False):
    return torchreid.metrics.evaluate_rank(
        distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank,
        use_metric_cuhk03=use_metric_cuhk03, use_cython=False,
    )


def assert_same_as_torchreid(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, cuhk03=False,
                             seed=0, **kwargs):
    """Runs both from the same global numpy RNG state; results and the RNG state afterwards must be identical.

    torchreid's curve is shorter than max_rank when fewer candidates remain; ours then continues with 1.0."""
    np.random.seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_cmc, ref_map = torchreid_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, cuhk03)
    ref_state = np.random.get_state()
    np.random.seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cmc, mAP = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank,
                                 use_metric_cuhk03=cuhk03, **kwargs)
    state = np.random.get_state()
    assert cmc.dtype == np.float32 and cmc.shape == (min(max_rank, distmat.shape[1]),)
    assert isinstance(mAP, float)
    n = len(ref_cmc)
    np.testing.assert_array_equal(cmc[:n], ref_cmc)
    np.testing.assert_array_equal(cmc[n:], 1.0)
    assert mAP == ref_map  # bit-identical, not approximately equal
    np.testing.assert_array_equal(state[1], ref_state[1])
    assert state[2] == ref_state[2]
    return cmc, mAP


def random_problem(rng, num_q, num_g, num_ids, num_cams, ties=False):
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = rng.integers(0, num_ids, num_g)
    q_camids = rng.integers(0, num_cams, num_q)
    g_camids = rng.integers(0, num_cams, num_g)
    if ties:
        distmat = rng.integers(0, 6, (num_q, num_g)).astype(np.float32)
    else:
        distmat = rng.random((num_q, num_g), dtype=np.float32)
    return distmat, q_pids, g_pids, q_camids, g_camids


def has_valid_query(q_pids, g_pids, q_camids, g_camids):
    same_id = q_pids[:, None] == g_pids[None, :]
    return bool((same_id & (q_camids[:, None] != g_camids[None, :])).any())


def safe_max_rank(rng, q_pids, g_pids, q_camids, g_camids):
    """A max_rank for which every query keeps at least max_rank gallery entries (else torchreid's Market curve
    has per-query lengths that differ and it crashes)."""
    removed = ((q_pids[:, None] == g_pids[None, :]) & (q_camids[:, None] == g_camids[None, :])).sum(1).max()
    return int(rng.integers(1, max(2, len(g_pids) - removed + 1)))


@pytest.mark.parametrize("cuhk03", [False, True], ids=["market1501", "cuhk03"])
@pytest.mark.parametrize("ties", [False, True], ids=["float", "integer-ties"])
def test_matches_torchreid_on_random_problems(cuhk03, ties):
    rng = np.random.default_rng(1 + 2 * cuhk03 + ties)
    compared = 0
    for case in range(60):
        num_q, num_g = int(rng.integers(1, 30)), int(rng.integers(2, 120))
        args = random_problem(rng, num_q, num_g, int(rng.integers(1, 15)), int(rng.integers(1, 5)), ties)
        if not has_valid_query(*args[1:]):
            continue
        max_rank = int(rng.integers(1, 60)) if cuhk03 else safe_max_rank(rng, *args[1:])
        assert_same_as_torchreid(*args, max_rank=max_rank, cuhk03=cuhk03, seed=case)
        compared += 1
    assert compared >= 30


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    num_q=st.integers(1, 12),
    num_g=st.integers(1, 40),
    num_ids=st.integers(1, 6),
    num_cams=st.integers(1, 3),
    levels=st.integers(1, 4),
)
def test_matches_torchreid_hypothesis_heavy_ties(data, num_q, num_g, num_ids, num_cams, levels):
    def ints(n, hi):
        return np.array(data.draw(st.lists(st.integers(0, hi - 1), min_size=n, max_size=n)))

    q_pids, g_pids = ints(num_q, num_ids), ints(num_g, num_ids)
    q_camids, g_camids = ints(num_q, num_cams), ints(num_g, num_cams)
    distmat = ints(num_q * num_g, levels).reshape(num_q, num_g).astype(np.float32)
    if not has_valid_query(q_pids, g_pids, q_camids, g_camids):
        with pytest.raises(ValueError, match="no query has a valid match"):
            evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=5)
        return
    removed = ((q_pids[:, None] == g_pids) & (q_camids[:, None] == g_camids)).sum(1).max()
    max_rank = max(1, min(10, num_g - removed))
    cuhk03 = data.draw(st.booleans())
    assert_same_as_torchreid(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank, cuhk03=cuhk03)


def test_market_sized_structure_with_threads_counting_and_sorting():
    """Larger problem: counting path, tie fallback on some rows, and threads, against torchreid."""
    rng = np.random.default_rng(7)
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(rng, 150, 2500, 120, 6)
    # Ties on some rows: a member distance duplicated elsewhere in the row, or NaN.
    for i in range(0, 150, 10):
        members = np.flatnonzero(g_pids == q_pids[i])
        if len(members):
            distmat[i, (members[0] + 1) % 2500] = distmat[i, members[0]]
    distmat[3, :] = np.round(distmat[3, :] * 20)  # a whole row of ties
    distmat[5, np.flatnonzero(g_pids == q_pids[5])[:1]] = np.nan
    distmat[6, :100] = np.nan
    assert_same_as_torchreid(distmat, q_pids, g_pids, q_camids, g_camids, num_threads=2)


def test_identities_with_many_gallery_entries_use_sorting():
    rng = np.random.default_rng(3)
    num_g = 3 * rank_module._MAX_COUNTED_MEMBERS
    args = random_problem(rng, 20, num_g, 2, 3)  # about num_g / 2 entries per identity
    assert_same_as_torchreid(*args, num_threads=2)
    assert_same_as_torchreid(*args, cuhk03=True, num_threads=2)


def test_sorting_path_alone_matches_counting_path():
    """With counting disabled every row is argsorted; same results (counting is exact where used)."""
    rng = np.random.default_rng(4)
    args = random_problem(rng, 60, 500, 30, 4)
    counted = evaluate_rank(*args)
    old = rank_module._MAX_COUNTED_MEMBERS
    rank_module._MAX_COUNTED_MEMBERS = 0
    try:
        sorted_ = evaluate_rank(*args)
    finally:
        rank_module._MAX_COUNTED_MEMBERS = old
    np.testing.assert_array_equal(counted[0], sorted_[0])
    assert counted[1] == sorted_[1]


def test_queries_without_valid_match_are_skipped():
    rng = np.random.default_rng(5)
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(rng, 40, 300, 20, 3)
    q_pids[:5] = 1000  # identity absent from the gallery
    q_pids[5:10] = 999  # identity only in the query's own camera in the gallery
    q_camids[5:10] = 0
    g_pids[:4], g_camids[:4] = 999, 0
    cmc, mAP = assert_same_as_torchreid(distmat, q_pids, g_pids, q_camids, g_camids)
    # Skipped, not counted as failures: the same as evaluating only the valid queries.
    cmc_valid, mAP_valid = evaluate_rank(distmat[10:], q_pids[10:], g_pids, q_camids[10:], g_camids)
    np.testing.assert_array_equal(cmc, cmc_valid)
    assert mAP == mAP_valid


def test_single_camera():
    rng = np.random.default_rng(6)
    distmat, q_pids, g_pids, _, _ = random_problem(rng, 30, 200, 10, 1)
    one_cam_q, one_cam_g = np.zeros(30, np.int64), np.zeros(200, np.int64)
    # Everything from one camera: every own-id gallery entry is discarded, no query is valid.
    with pytest.raises(ValueError, match="no query has a valid match"):
        evaluate_rank(distmat, q_pids, g_pids, one_cam_q, one_cam_g)
    # Queries from one camera, gallery from another.
    assert_same_as_torchreid(distmat, q_pids, g_pids, one_cam_q, one_cam_g + 1)
    assert_same_as_torchreid(distmat, q_pids, g_pids, one_cam_q, one_cam_g + 1, cuhk03=True)


def test_no_valid_query_raises_clear_error():
    distmat = np.random.default_rng(0).random((3, 5), dtype=np.float32)
    with pytest.raises(AssertionError):
        torchreid_rank(distmat, np.array([1, 2, 3]), np.array([4, 4, 5, 5, 6]), np.zeros(3, int), np.ones(5, int))
    with pytest.raises(ValueError, match="no query has a valid match.*0 shared"):
        evaluate_rank(distmat, np.array([1, 2, 3]), np.array([4, 4, 5, 5, 6]), np.zeros(3, int), np.ones(5, int))


def test_cuhk03_depends_on_global_seed_like_torchreid():
    rng = np.random.default_rng(8)
    args = random_problem(rng, 25, 150, 12, 3)
    first = assert_same_as_torchreid(*args, cuhk03=True, seed=1)
    second = assert_same_as_torchreid(*args, cuhk03=True, seed=2)
    assert not np.array_equal(first[0], second[0])  # the sampling is random
    assert first[1] == second[1]  # AP does not sample


def test_torch_tensor_input():
    rng = np.random.default_rng(9)
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(rng, 30, 200, 15, 3)
    expected = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids)
    tensors = [torch.from_numpy(a) for a in (distmat, q_pids, g_pids, q_camids, g_camids)]
    tensors[0] = tensors[0].clone().requires_grad_(True)
    cmc, mAP = evaluate_rank(*tensors)
    np.testing.assert_array_equal(cmc, expected[0])
    assert mAP == expected[1]
    assert_same_as_torchreid(distmat, q_pids, g_pids, q_camids, g_camids)


def test_layouts_and_dtypes():
    rng = np.random.default_rng(10)
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(rng, 30, 300, 15, 3)
    labels = (q_pids, g_pids, q_camids, g_camids)
    assert_same_as_torchreid(np.asfortranarray(distmat), *labels)
    assert_same_as_torchreid(distmat.astype(np.float64), *labels)
    assert_same_as_torchreid(distmat.astype(np.float16), *labels)  # float16 rounding creates ties
    assert_same_as_torchreid((distmat * 50).astype(np.int32), *labels)
    assert_same_as_torchreid(distmat[:, ::-1], *(q_pids, g_pids[::-1], q_camids, g_camids[::-1]))


def test_small_gallery_warns_and_shrinks_max_rank():
    rng = np.random.default_rng(11)
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(rng, 10, 12, 3, 4)
    args = (distmat, q_pids, g_pids, np.zeros(10, int), g_camids + 1)  # nothing discarded: full-length curves
    with pytest.warns(UserWarning, match="only 12 entries, fewer than max_rank=50"):
        cmc, _ = evaluate_rank(*args, max_rank=50)
    assert len(cmc) == 12
    assert_same_as_torchreid(*args, max_rank=50)


def test_fewer_candidates_than_max_rank_continue_with_ones():
    """Where torchreid's per-query curves would have different lengths (it crashes), the curve is the mean over
    queries of 1[rank >= first kept match], i.e. each query's curve continued with 1.0."""
    rng = np.random.default_rng(12)
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(rng, 20, 30, 2, 2)
    with pytest.raises(ValueError):
        torchreid_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=30)
    cmc, _ = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=30)
    firsts = []
    for i in range(20):
        order = np.argsort(distmat[i])
        keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
        hits = np.flatnonzero(g_pids[order][keep] == q_pids[i])
        if len(hits):
            firsts.append(hits[0])
    expected = (np.arange(30)[None, :] >= np.array(firsts)[:, None]).astype(np.float32).sum(0) / float(len(firsts))
    np.testing.assert_array_equal(cmc, expected)
    # On the ranks where every query still has candidates, torchreid agrees.
    assert_same_as_torchreid(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=12)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: (a[0][0],) + a[1:], "distmat must be 2-D"),
        (lambda a: (a[0],) + (a[1][:-1],) + a[2:], "q_pids has 3 entries but distmat has 4 rows"),
        (lambda a: a[:2] + (a[2][:-1],) + a[3:], "g_pids has 4 entries but distmat has 5 columns"),
        (lambda a: a[:3] + (a[3].reshape(2, 2),) + a[4:], "q_camids must be 1-D"),
        (lambda a: a[:4] + (a[4] + 0.5,), "g_camids must hold integer labels"),
        (lambda a: (a[0].astype(complex),) + a[1:], "distmat must hold real numbers"),
    ],
)
def test_invalid_inputs_are_reported(change, message):
    args = (np.zeros((4, 5), np.float32), np.arange(4), np.arange(5), np.zeros(4, int), np.ones(5, int))
    with pytest.raises(ValueError, match=message):
        evaluate_rank(*change(args))


def test_invalid_max_rank_and_threads():
    args = (np.zeros((2, 3), np.float32), np.arange(2), np.arange(3), np.zeros(2, int), np.ones(3, int))
    with pytest.raises(ValueError, match="max_rank must be a positive integer"):
        evaluate_rank(*args, max_rank=0)
    with pytest.raises(ValueError, match="num_threads must be a positive integer"):
        evaluate_rank(*args, num_threads=0)
