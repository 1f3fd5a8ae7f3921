"""tools/prune.py without a config: prune a checkpoint, print before/after, save a file that reloads."""
import argparse

import torch
from tiny import run_tool

from ptl_torchreid.cli_prune import add_cop_arguments, prune_options
from ptl_torchreid.compress import load_pruned_model, prune_cop
from ptl_torchreid.models import build_model

COP_ARGS = ["--flops-reduction", "0.3", "--preset", "faster", "--max-prune-ratio", "0.5"]


def test_prunes_a_checkpoint_and_saves_a_reloadable_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("osnet_x0_25", num_classes=7)
    weights, out = str(tmp_path / "w.pth"), str(tmp_path / "pruned.pth")
    torch.save({"state_dict": model.state_dict()}, weights)
    proc = run_tool("prune.py", "--arch", "osnet_x0_25", "--weights", weights, *COP_ARGS, "--height", "64",
                    "--width", "32", "--latency-batch", "0", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max_prune_ratio=0.5" in proc.stdout and "FLOPs" in proc.stdout and "saved" in proc.stdout
    reloaded = load_pruned_model(out).eval()
    assert reloaded.classifier.out_features == 7
    # the saved model is the one COP makes of these weights with the tool's options
    parser = argparse.ArgumentParser()
    add_cop_arguments(parser, target_required=True)
    pruned = prune_cop(model.eval(), input_size=(64, 32), **prune_options(parser.parse_args(COP_ARGS)))
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), pruned.eval()(x))


def test_bad_option_stops_before_loading_anything(tmp_path):
    proc = run_tool("prune.py", "--arch", "osnet_x0_25", "--weights", tmp_path / "missing.pth",
                    "--flops-reduction", "0.3", "--max-prune-ratio", "0")
    assert proc.returncode != 0 and "max_prune_ratio=0.0 is not valid" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_compensate_flag_takes_a_mode_and_alone_means_ls():
    parser = argparse.ArgumentParser()
    add_cop_arguments(parser, target_required=True)
    assert prune_options(parser.parse_args(COP_ARGS + ["--compensate", "bn+ls"]), has_data=True)["compensate"] == \
        "bn+ls"
    assert prune_options(parser.parse_args(COP_ARGS + ["--compensate"]), has_data=True)["compensate"] == "ls"
    assert prune_options(parser.parse_args(COP_ARGS), has_data=True)["compensate"] is None  # the default decides


def test_compensation_without_data_stops_with_a_clear_error():
    proc = run_tool("prune.py", "--arch", "osnet_x0_25", "--flops-reduction", "0.3", "--compensate", "bn")
    assert proc.returncode == 2 and "compensate='bn' works on calibration data" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_missing_checkpoint_is_named_without_a_traceback(tmp_path):
    proc = run_tool("prune.py", "--arch", "osnet_x0_25", "--weights", tmp_path / "missing.pth", *COP_ARGS)
    assert proc.returncode == 2 and "missing.pth" in proc.stderr and "Traceback" not in proc.stderr


def test_a_ptl_checkpoint_is_pruned_in_the_shape_it_was_saved_in(tmp_path):
    """There is no mode option here: a branch-mode checkpoint (the default before rectify) is rebuilt as a branch
    model, not loaded partly into a rectify model."""
    torch.manual_seed(0)
    model = build_model("ptl_osnet_x0_25", num_classes=7, mode="branch", input_size=(64, 32))
    torch.nn.init.normal_(model.side_proj.weight, 0, 0.1)  # the side stream reaches the embedding
    weights, out = str(tmp_path / "w.pth"), str(tmp_path / "pruned.pth")
    torch.save({"state_dict": model.state_dict()}, weights)
    proc = run_tool("prune.py", "--arch", "ptl_osnet_x0_25", "--weights", weights, "--prune-rate", "0",
                    "--height", "64", "--width", "32", "--latency-batch", "0", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: this checkpoint" not in proc.stdout  # it loaded whole
    reloaded = load_pruned_model(out).eval()
    assert reloaded.mode == "branch"
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model.eval()(x))
