"""embed and search round trip: features of image folders to files, then top-k retrieval from those files."""
import csv
import sys

import cv2
import numpy as np
import pytest
import torch

from ptl_torchreid.cli import main
from ptl_torchreid.cli_retrieval import load_features, search_topk
from ptl_torchreid.metrics import knn_search

with_model = ["model.name", "osnet_x0_25", "model.pretrained", "False", "use_gpu", "False", "data.height", "64",
              "data.width", "32", "data.workers", "0", "test.batch_size", "4", "train.progress_bar", "False"]


def make_images(folder, n, seed):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        cv2.imwrite(str(folder / f"img{i:02d}.jpg"), rng.integers(0, 255, (32, 16, 3), dtype=np.uint8))


def test_embed_and_search_round_trip(tmp_path, capsys):
    make_images(tmp_path / "gallery" / "sub", 6, 0)  # nested: embed walks the folder
    make_images(tmp_path / "query", 2, 1)
    torch.manual_seed(0)
    assert main(["embed", "--input", str(tmp_path / "gallery"), "--output", str(tmp_path / "g.npz")]
                + with_model) == 0
    torch.manual_seed(0)  # the same (random) model
    assert main(["embed", "--input", str(tmp_path / "query"), "--output", str(tmp_path / "q.npz")]
                + with_model) == 0
    gf, g_paths, g_pids, _ = load_features(str(tmp_path / "g.npz"))
    qf, q_paths, _, _ = load_features(str(tmp_path / "q.npz"))
    assert gf.shape[0] == 6 and qf.shape == (2, gf.shape[1]) and gf.dtype == np.float32
    assert all("/sub/img" in p for p in g_paths) and (g_pids == -1).all()

    capsys.readouterr()
    out_dir = tmp_path / "search"
    assert main(["search", "--query", str(tmp_path / "q.npz"), "--gallery", str(tmp_path / "g.npz"), "--topk",
                 "3", "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "| query | rank | gallery | distance |" in printed
    rows = list(csv.reader(open(out_dir / "results.csv")))[1:]
    assert len(rows) == 2 * 3
    # the ranking is that of the full distance matrix of the saved features
    d = ((qf[:, None, :] - gf[None, :, :]) ** 2).sum(-1)
    expected = np.argsort(d, axis=1)[:, :3]
    got = np.array([list(g_paths).index(r[2]) for r in rows]).reshape(2, 3)
    np.testing.assert_array_equal(got, expected)
    pngs = sorted(out_dir.glob("*.png"))
    assert len(pngs) == 2 and cv2.imread(str(pngs[0])).shape[1] > 4 * 64


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_search_gallery_against_itself_finds_each_image_first(backend):
    rng = np.random.default_rng(0)
    g = rng.standard_normal((50, 8)).astype(np.float32)
    idx, dist = search_topk(g, g, 4, memory_cap=5 * 50 * 16, backend=backend)  # several query blocks for torch
    np.testing.assert_array_equal(idx[:, 0], np.arange(50))
    assert np.all(np.diff(dist, axis=1) >= 0)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_knn_search_is_exact(backend, metric):
    rng = np.random.default_rng(1)
    qf, gf = rng.standard_normal((37, 24)), rng.standard_normal((300, 24))
    if metric == "cosine":
        qn, gn = qf / np.linalg.norm(qf, axis=1, keepdims=True), gf / np.linalg.norm(gf, axis=1, keepdims=True)
        d = 1 - qn @ gn.T
    else:
        d = ((qf[:, None, :] - gf[None, :, :]) ** 2).sum(-1)
    idx, dist = knn_search(qf.astype(np.float32), gf.astype(np.float32), 10, metric, backend=backend,
                           memory_cap=4 * 300 * 16)
    np.testing.assert_array_equal(idx, np.argsort(d, axis=1)[:, :10])
    np.testing.assert_allclose(dist, np.sort(d, axis=1)[:, :10], rtol=1e-4, atol=1e-4)
    # more neighbours than gallery entries: the whole gallery, ranked
    idx_all, _ = knn_search(qf[:2].astype(np.float32), gf[:5].astype(np.float32), 8, metric, backend=backend)
    np.testing.assert_array_equal(idx_all, np.argsort(d[:2, :5], axis=1))


def test_search_backend_faiss_without_faiss_is_a_clear_error(tmp_path, capsys, monkeypatch):
    np.save(tmp_path / "f.npy", np.eye(3, 4, dtype=np.float32))
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now fails, as where it is not installed
    assert main(["search", "--query", str(tmp_path / "f.npy"), "--gallery", str(tmp_path / "f.npy"), "--backend",
                 "faiss", "--out", str(tmp_path / "out")]) == 2
    assert "ptl_torchreid[retrieval]" in capsys.readouterr().err
    with pytest.raises(ImportError, match="retrieval"):
        knn_search(np.ones((2, 4)), np.ones((3, 4)), 1, backend="faiss")
    # auto falls back to torch
    idx, _ = knn_search(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), 1)
    np.testing.assert_array_equal(idx[:, 0], [0, 1, 2])


def test_search_with_missing_features_file_is_a_clear_error(tmp_path, capsys):
    assert main(["search", "--query", str(tmp_path / "none.npz"), "--gallery", str(tmp_path / "none.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
