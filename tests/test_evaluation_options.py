"""The engine's test-time options: re-ranking, AQE, ROC, chunked ranking and the flip test, from the config."""
import pytest
import torch
from tiny import run_opts

from ptl_torchreid.config import load_config
from ptl_torchreid.engine import build_engine, run


def config(data_root, save_dir, *extra):
    return load_config(None, run_opts(data_root, save_dir, "test.evaluate", "True", *extra))


def test_chunked_ranking_in_the_engine_gives_the_full_matrix_results(data_root, tmp_path, capsys):
    torch.manual_seed(0)
    full = run(config(data_root, tmp_path / "a"))
    torch.manual_seed(0)
    chunked = run(config(data_root, tmp_path / "b", "test.max_distmat_gb", "1e-6"))
    assert "in blocks" in capsys.readouterr().out
    assert full == chunked
    assert 0 < full["synthetic_reid"]["mINP"] <= 1  # always reported


def test_rerank_aqe_and_roc_from_the_config(data_root, tmp_path, capsys):
    torch.manual_seed(0)
    res = run(config(data_root, tmp_path, "test.rerank", "True", "test.rerank_k1", "4", "test.rerank_k2", "2",
                     "test.aqe", "True", "test.aqe_k", "2", "test.roc", "True"))["synthetic_reid"]
    out = capsys.readouterr().out
    assert "re-ranking (k1=4, k2=2, lambda=0.3)" in out and "alpha-query expansion (k=2" in out
    assert set(res["tpr_at_fpr"]) == {"0.0001", "0.001", "0.01"}
    assert all(0 <= v <= 1 for v in res["tpr_at_fpr"].values())
    assert (tmp_path / "roc_synthetic_reid.png").stat().st_size > 0


def test_flip_averages_the_image_and_its_mirror(data_root, tmp_path):
    engine = build_engine(config(data_root, tmp_path, "test.flip", "True"))
    engine.model.eval()
    # a model whose embedding is the first image row of channel 0: the mirror reverses it
    engine.extract_features = lambda x: x[:, 0, 0, :]
    imgs = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    loader = [{"img": imgs, "pid": torch.tensor([0, 1]), "camid": torch.tensor([0, 1])}]
    feats, pids, camids = engine.extract_features_from(loader)
    row = imgs[:, 0, 0, :]
    torch.testing.assert_close(feats, (row + row.flip(1)) / 2)
    engine.evaluation.flip = False
    torch.testing.assert_close(engine.extract_features_from(loader)[0], row)


@pytest.mark.parametrize("key,value", [("test.rerank_lambda", "1.5"), ("test.rerank_k1", "0"),
                                       ("test.max_distmat_gb", "0")])
def test_invalid_test_options_name_the_key(key, value, tmp_path, data_root):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config(data_root, tmp_path, key, value)
