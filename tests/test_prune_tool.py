"""tools/prune.py without a config: prune a checkpoint, print before/after, save a file that reloads."""
import importlib
import os.path as osp
import sys

import pytest
import torch

from ptl_torchreid.compress import load_pruned_model
from ptl_torchreid.models import build_model

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), "tools"))
prune_tool = importlib.import_module("prune")


def test_prunes_a_checkpoint_and_saves_a_reloadable_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("osnet_x0_25", num_classes=7)
    weights, out = str(tmp_path / "w.pth"), str(tmp_path / "pruned.pth")
    torch.save({"state_dict": model.state_dict()}, weights)
    pruned = prune_tool.main(["--arch", "osnet_x0_25", "--weights", weights, "--flops-reduction", "0.3",
                              "--preset", "faster", "--max-prune-ratio", "0.5", "--height", "64", "--width", "32",
                              "--latency-batch", "0", "--out", out])
    text = capsys.readouterr().out
    assert "max_prune_ratio=0.5" in text and "FLOPs" in text and "saved" in text
    reloaded = load_pruned_model(out).eval()
    assert reloaded.classifier.out_features == 7
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), pruned.eval()(x))


def test_bad_option_stops_before_loading_anything(tmp_path):
    with pytest.raises(SystemExit, match="max_prune_ratio=0.0 is not valid"):
        prune_tool.main(["--arch", "osnet_x0_25", "--weights", str(tmp_path / "missing.pth"),
                         "--flops-reduction", "0.3", "--max-prune-ratio", "0"])
