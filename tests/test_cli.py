"""Command line: flags and overrides, commands, clear errors, the README demo command (shortened)."""
import os
import os.path as osp
import subprocess
import sys
import time

import pytest
import torch

from ptl_torchreid import _torchreid
from ptl_torchreid.cli import COMMANDS, main, parse_command_line, register_command
from ptl_torchreid.config import load_config
from ptl_torchreid.engine import run
from ptl_torchreid.metrics.table import format_results_table

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO = osp.join(REPO, "configs", "synthetic_demo.yaml")

# Shrinks the demo config to seconds: tiny synthetic dataset, small images, one epoch.
SHORT = [
    "data.synthetic.num_train_ids", "4", "data.synthetic.num_test_ids", "3", "data.synthetic.num_cameras", "2",
    "data.synthetic.images_per_id_per_camera", "2", "data.height", "64", "data.width", "32", "data.workers", "0",
    "train.batch_size", "8", "sampler.num_instances", "2", "train.max_epoch", "1", "train.progress_bar", "False",
]


def demo_args(data_root, save_dir, *extra):
    return ["--config-file", DEMO, "--root", data_root] + SHORT + ["data.save_dir", str(save_dir)] + list(extra)


def test_flags_and_overrides_reach_the_config(data_root):
    command, _, cfg = parse_command_line(
        ["--config-file", DEMO, "-s", "synthetic_source", "-t", "synthetic_target", "synthetic_reid",
         "--transforms", "random_flip", "--root", data_root, "train.max_epoch", "3", "ptl.lr_mult", "5"])
    assert command == "train"
    assert cfg.data.sources == ["synthetic_source"] and cfg.data.targets == ["synthetic_target", "synthetic_reid"]
    assert cfg.data.transforms == ["random_flip"] and cfg.data.root == data_root
    assert cfg.train.max_epoch == 3 and cfg.ptl.lr_mult == 5.0
    assert cfg.model.name == "ptl_osnet_x0_25"  # from the file
    # An override right after a list flag is not taken as a dataset name.
    _, _, cfg = parse_command_line(["--config-file", DEMO, "-s", "synthetic_source", "train.max_epoch", "4"])
    assert cfg.data.sources == ["synthetic_source"] and cfg.train.max_epoch == 4


def test_commands_set_their_modes():
    _, _, cfg = parse_command_line(["test", "--config-file", DEMO])
    assert cfg.test.evaluate and not cfg.test.visrank
    _, _, cfg = parse_command_line(["visrank", "--config-file", DEMO])
    assert cfg.test.evaluate and cfg.test.visrank
    _, _, cfg = parse_command_line(["--config-file", DEMO])
    assert not cfg.test.evaluate


def test_adding_a_command_is_one_call(monkeypatch, tmp_path):
    monkeypatch.setitem(COMMANDS, "noop", None)
    calls = []
    register_command("noop", "does nothing", lambda cfg, args: calls.append(cfg.train.max_epoch),
                     overrides=["train.max_epoch", "7"])
    assert main(["noop", "--config-file", DEMO, "data.save_dir", str(tmp_path)]) == 0
    assert calls == [7]


def test_unknown_key_is_an_error_naming_the_nearest_key(capsys):
    assert main(["--config-file", DEMO, "train.max_epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.max_epochs'" in err and "'train.max_epoch'" in err


def test_invalid_value_is_an_error(capsys):
    assert main(["--config-file", DEMO, "ptl.reset_policy", "sometimes"]) == 2
    err = capsys.readouterr().err
    assert "ptl.reset_policy" in err and "epoch, never, iter" in err


def test_missing_dataset_root_is_a_clear_error_without_download(tmp_path, capsys, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(_torchreid.dataset_module(), "download_url", no_download)
    t0 = time.time()
    assert main(["-s", "market1501", "-t", "dukemtmcreid", "--root", str(tmp_path / "nowhere"),
                 "model.name", "osnet_x0_25", "model.pretrained", "False",
                 "data.save_dir", str(tmp_path / "log")]) == 2
    assert time.time() - t0 < 30
    err = capsys.readouterr().err
    assert "market1501" in err and osp.join(str(tmp_path / "nowhere"), "market1501") in err
    assert "does not download" in err
    assert not (tmp_path / "log").exists()  # failed before any work started


def test_missing_weights_file_is_a_clear_error(capsys, tmp_path):
    assert main(["test", "--config-file", DEMO, "model.load_weights", str(tmp_path / "none.pth")]) == 2
    assert "model.load_weights" in capsys.readouterr().err


def test_train_then_test_and_visrank(data_root, tmp_path, capsys):
    assert main(demo_args(data_root, tmp_path / "train")) == 0
    out = capsys.readouterr().out
    assert "| target" in out and "mAP" in out and "Rank-1" in out
    best = tmp_path / "train" / "model" / "model-best.pth.tar"
    assert best.is_file()
    state = torch.load(str(best), weights_only=True)
    assert state["model_name"] == "ptl_osnet_x0_25" and "ptl:" in state["config"]
    assert any(p.name.startswith("train-") and p.name.endswith(".log") for p in (tmp_path / "train").iterdir())

    # test: evaluates the trained weights, trains nothing.
    assert main(["test"] + demo_args(data_root, tmp_path / "test", "model.load_weights", str(best))) == 0
    out = capsys.readouterr().out
    assert "Start training" not in out and "Rank-1" in out
    assert not (tmp_path / "test" / "model").exists()
    mAP = state["results"]["synthetic_reid"]["mAP"]
    assert f"{mAP:.1%}" in out  # the same weights give the same result

    assert main(["visrank"] + demo_args(data_root, tmp_path / "vis", "model.load_weights", str(best),
                                        "test.visrank_topk", "3")) == 0
    vis = tmp_path / "vis" / "visrank_synthetic_reid"
    assert vis.is_dir() and any(vis.iterdir())


def test_run_from_python_gives_the_results_of_the_train_command(data_root, tmp_path, capsys):
    """The README's "Training from Python": ``run(cfg)`` trains and evaluates as ``ptl-torchreid train`` does."""
    assert main(demo_args(data_root, tmp_path / "cli")) == 0
    printed = capsys.readouterr().out
    cli_results = torch.load(str(tmp_path / "cli" / "model" / "model.pth.tar-1"), weights_only=True)["results"]

    cfg = load_config(DEMO, SHORT + ["data.save_dir", str(tmp_path / "py")], root=data_root)
    results = run(cfg)
    assert set(results) == {"synthetic_reid"}
    assert results["synthetic_reid"]["mAP"] == pytest.approx(cli_results["synthetic_reid"]["mAP"], abs=1e-6)
    for rank, value in cli_results["synthetic_reid"]["cmc"].items():
        assert results["synthetic_reid"]["cmc"][rank] == pytest.approx(value, abs=1e-6)
    assert format_results_table(results) in printed
    assert (tmp_path / "py" / "model" / "model.pth.tar-1").is_file()  # it trained: the epoch's checkpoint


@pytest.mark.slow
def test_each_checkpoint_file_is_read_once_per_command(data_root, tmp_path, monkeypatch):
    """model.load_weights and the resume file are deserialised once: the checks before any work read them, and
    the builders and the engine's resume take what was read."""
    assert main(demo_args(data_root, tmp_path / "run")) == 0
    checkpoint = str(tmp_path / "run" / "model" / "model.pth.tar-1")
    reads = []
    torch_load = torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(osp.abspath(str(f)))
        return torch_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    assert main(["test"] + demo_args(data_root, tmp_path / "test", "model.load_weights", checkpoint)) == 0
    assert reads.count(osp.abspath(checkpoint)) == 1
    del reads[:]
    assert main(demo_args(data_root, tmp_path / "run", "train.max_epoch", "2", "--resume", checkpoint)) == 0
    assert reads.count(osp.abspath(checkpoint)) == 1
    assert osp.isfile(str(tmp_path / "run" / "model" / "model.pth.tar-2"))  # it did resume and train


def test_format_results_table():
    table = format_results_table({"market1501": {"mAP": 0.5, "cmc": {1: 0.75, 5: 0.875}}})
    lines = table.splitlines()
    assert lines[0].split("|")[1:-1] == [" target     ", " mAP   ", " Rank-1 ", " Rank-5 "]
    assert "50.0%" in lines[2] and "75.0%" in lines[2] and "87.5%" in lines[2]


def test_readme_demo_command_shortened(data_root, tmp_path):
    """``python -m ptl_torchreid --config-file configs/synthetic_demo.yaml`` (shortened), in a fresh process."""
    cmd = [sys.executable, "-m", "ptl_torchreid"] + demo_args(data_root, tmp_path / "demo")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.rindex("| target"):]
    assert "synthetic_reid" in table and "mAP" in table and "Rank-1" in table and "Rank-5" in table
