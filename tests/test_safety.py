"""Safe loading and bad input through the command line: malicious pickles, shape mismatches, corrupt images,
check-data, dataset problems and config problems, each a clear error before (or instead of) any work."""
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import run_opts

from ptl_torchreid.cli import main, parse_command_line
from ptl_torchreid.config import ConfigError, load_config
from ptl_torchreid.data import DatasetError
from ptl_torchreid.engine import build_datamanager, build_model
from ptl_torchreid.engine.defaults import check_datamanager
from ptl_torchreid.utils.checkpoint import UntrustedCheckpointWarning, load_checkpoint, save_checkpoint


def args_for(root, save_dir, *extra):
    return run_opts(root, save_dir, "test.ranks", "[1]", *extra)


# ----------------------------------------------------------------------------------------------------------------
# Safe loading
# ----------------------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def malicious_checkpoint(path, marker):
    torch.save({"state_dict": {"classifier.weight": torch.zeros(2, 2)}, "epoch": 1, "optimizer": {},
                "payload": _Payload(marker)}, str(path))
    return str(path)


@pytest.mark.parametrize("how", ["load_weights", "resume"])
def test_malicious_pickle_is_refused_without_side_effects(tmp_path, capsys, how):
    marker = tmp_path / "marker"
    evil = malicious_checkpoint(tmp_path / "evil.pth", marker)
    root, save_dir = tmp_path / "data", tmp_path / "log"
    if how == "load_weights":
        argv = ["test"] + args_for(root, save_dir, "model.load_weights", evil)
    else:
        argv = ["--resume", evil] + args_for(root, save_dir)
    t0 = time.time()
    assert main(argv) == 2
    assert time.time() - t0 < 30
    err = capsys.readouterr().err
    assert "Refusing to load checkpoint" in err and evil in err and "--trust-checkpoint" in err
    assert "arbitrary code" in err and "GLOBAL exec" in err
    assert not marker.exists()  # nothing ran
    assert not root.exists() and not save_dir.exists()  # refused before any work: no dataset, no log

    # Control: the payload is real, and runs when the file is trusted.
    with pytest.warns(UntrustedCheckpointWarning, match="arbitrary code"):
        load_checkpoint(evil, trust=True)
    assert marker.read_text() == "code ran"


def test_trust_checkpoint_flag_states_the_risk_and_opts_in(tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = malicious_checkpoint(tmp_path / "evil.pth", marker)
    _, _, cfg = parse_command_line(["--trust-checkpoint"] + args_for(tmp_path / "data", tmp_path / "log",
                                                                        "model.load_weights", evil))
    assert cfg.model.trust_checkpoint is True
    err = capsys.readouterr().err
    assert "model.trust_checkpoint is on" in err and "runs any code" in err
    assert marker.exists()  # the opt-in is what let it run
    _, _, cfg = parse_command_line(args_for(tmp_path / "data", tmp_path / "log"))
    assert cfg.model.trust_checkpoint is False


def test_resume_flag_forms(tmp_path):
    base = args_for(tmp_path / "data", tmp_path / "log")
    assert parse_command_line(["--resume"] + base)[2].train.resume == "auto"
    assert parse_command_line(base)[2].train.resume == ""
    ckpt = tmp_path / "c.pth"
    save_checkpoint({"x": torch.zeros(1)}, str(ckpt))
    assert parse_command_line(["--resume", str(ckpt)] + base)[2].train.resume == str(ckpt)
    with pytest.raises(ConfigError, match="name different checkpoints"):
        load_config(opts=["train.resume", "a.pth", "model.resume", "b.pth"])


def test_load_weights_is_strict_by_default_and_match_mode_lists_what_it_skips(data_root, tmp_path, capsys):
    cfg = load_config(opts=args_for(data_root, tmp_path / "log"))
    other = build_model(cfg, num_classes=7)  # another dataset: another classifier size
    path = save_checkpoint({"state_dict": other.state_dict()}, str(tmp_path / "other.pth"))

    assert main(["test"] + args_for(data_root, tmp_path / "a", "model.load_weights", path)) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "nothing was loaded" in err
    assert "classifier.weight: [7, 512] vs [4, 512]" in err and "classifier.bias" in err
    assert "mode='match'" in err

    assert main(["test"] + args_for(data_root, tmp_path / "b", "model.load_weights", path,
                                    "model.load_weights_mode", "match")) == 0
    out = capsys.readouterr().out
    assert "shape mismatch, checkpoint vs model (2)" in out and "classifier.weight" in out and "Rank-1" in out


def test_checkpoint_of_another_model_cannot_be_resumed(data_root, tmp_path, capsys):
    cfg = load_config(opts=args_for(data_root, tmp_path / "log", "model.name", "osnet_x0_25"))
    other = build_model(cfg, num_classes=4)
    path = save_checkpoint({"state_dict": other.state_dict(), "optimizer": {}, "epoch": 1,
                            "model_name": "osnet_x0_25"}, str(tmp_path / "plain.pth"))
    assert main(["--resume", path] + args_for(data_root, tmp_path / "a")) == 2
    err = capsys.readouterr().err
    assert "Cannot resume" in err and 'saved for model "osnet_x0_25"' in err and "ptl_osnet_x0_25" in err


# ----------------------------------------------------------------------------------------------------------------
# Corrupt images and check-data
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def corrupt_root(tmp_path):
    """A fresh tiny synthetic dataset with one truncated training image."""
    root = tmp_path / "data"
    build_datamanager(load_config(opts=args_for(root, tmp_path / "gen")))
    train_dir = root / "synthetic_reid" / "bounding_box_train"
    victim = sorted(train_dir.iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:120])
    return root, victim


def test_corrupt_image_is_named_fast_or_skipped_and_counted(corrupt_root, tmp_path, capsys):
    root, victim = corrupt_root
    t0 = time.time()
    assert main(args_for(root, tmp_path / "a")) == 2
    assert time.time() - t0 < 60
    err = capsys.readouterr().err
    assert f'Cannot read image "{victim}"' in err and "check-data" in err

    assert main(args_for(root, tmp_path / "b", "data.skip_corrupt", "True")) == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if line.startswith("Skipped ")]
    assert skipped and int(skipped[0].split()[1]) >= 1 and "unreadable image(s)" in skipped[0]


def test_check_data_command(corrupt_root, data_root, tmp_path, capsys):
    root, victim = corrupt_root
    assert main(["check-data", "--root", str(tmp_path / "elsewhere"), "-s", "synthetic_reid"]) == 0
    assert "is not generated yet" in capsys.readouterr().out
    assert main(["check-data", "--root", str(root), "-s", "synthetic_reid"]) == 1
    out = capsys.readouterr().out
    assert "Unreadable files (1)" in out and str(victim) in out and "problems found" in out
    assert not (tmp_path / "log").exists()

    query = root / "synthetic_reid" / "query"
    (query / "no_identity_here.jpg").write_bytes((query / sorted(os.listdir(query))[0]).read_bytes())
    (query / "0001_c1s1_000001_00.jpg").write_bytes(b"")
    assert main(["check-data", "--dir", str(root / "synthetic_reid")]) == 1
    out = capsys.readouterr().out
    assert "Mislabeled files (1)" in out and "no_identity_here.jpg" in out
    assert "Empty files (1)" in out and "0001_c1s1_000001_00.jpg" in out

    assert main(["check-data", "--dir", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().out

    main(args_for(data_root, tmp_path / "gen", "train.max_epoch", "0"))  # generates the shared dataset
    capsys.readouterr()
    assert main(["check-data", "--root", data_root, "-s", "synthetic_reid"]) == 0
    out = capsys.readouterr().out
    assert "OK: no problems found." in out and "check-data: no problems found" in out


# ----------------------------------------------------------------------------------------------------------------
# Dataset problems
# ----------------------------------------------------------------------------------------------------------------


def _market(root, cams_test=(1, 2), train_ids=4, images=True):
    """A tiny Market-1501 folder for torchreid's market1501 dataset."""
    base = root / "market1501"
    img = Image.fromarray(np.full((16, 8, 3), 128, np.uint8))
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (base / sub).mkdir(parents=True)
    if not images:
        return base
    for pid in range(1, train_ids + 1):
        for i, cam in enumerate((1, 2, 1, 2)):
            img.save(str(base / "bounding_box_train" / f"{pid:04d}_c{cam}s1_{i:06d}_00.jpg"))
    for pid in (11, 12, 13):
        img.save(str(base / "query" / f"{pid:04d}_c{cams_test[0]}s1_000001_00.jpg"))
        for i in range(2):
            img.save(str(base / "bounding_box_test" / f"{pid:04d}_c{cams_test[-1]}s1_{i:06d}_00.jpg"))
    return base


def market_args(root, save_dir, *extra):
    return ["-s", "market1501", "-t", "market1501", "--root", str(root), "model.name", "osnet_x0_25",
            "model.pretrained", "False", "use_gpu", "False", "data.height", "32", "data.width", "16",
            "data.workers", "0", "train.batch_size", "4", "sampler.num_instances", "2",
            "sampler.train_sampler", "RandomIdentitySampler", "train.max_epoch", "1", "train.progress_bar",
            "False", "data.save_dir", str(save_dir)] + list(extra)


def test_empty_dataset_root_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty" / "market1501").mkdir(parents=True)
    assert main(market_args(tmp_path / "empty", tmp_path / "log")) == 2
    err = capsys.readouterr().err
    assert "incomplete dataset" in err and "market1501" in err

    _market(tmp_path / "noimages", images=False)
    assert main(market_args(tmp_path / "noimages", tmp_path / "log")) == 2
    err = capsys.readouterr().err
    assert "could not build the data loaders" in err and "check-data" in err


def test_single_camera_test_set_is_a_clear_error(tmp_path, capsys):
    _market(tmp_path / "onecam", cams_test=(3,))
    assert main(market_args(tmp_path / "onecam", tmp_path / "log")) == 2
    err = capsys.readouterr().err
    assert "target 'market1501' has images from 1 camera(s) only" in err and "at least 2" in err


def test_too_few_identities_for_the_sampler_is_a_clear_error(tmp_path, capsys):
    _market(tmp_path / "few", train_ids=2)
    assert main(market_args(tmp_path / "few", tmp_path / "log", "train.batch_size", "8")) == 2
    err = capsys.readouterr().err
    assert "fewer training identities than train.batch_size / sampler.num_instances = 4" in err


def _fake_dm(query, gallery, num_train_pids=4):
    return SimpleNamespace(num_train_pids=num_train_pids,
                           test_dataset={"d": {"query": [("q", p, c, 0) for p, c in query],
                                               "gallery": [("g", p, c, 0) for p, c in gallery]}})


def test_check_datamanager(capsys):
    cfg = load_config(opts=["test.ranks", "[1, 5, 20]"])
    good = [(1, 0), (2, 0)], [(1, 1), (2, 1), (3, 0)]
    check_datamanager(_fake_dm(*good), cfg)
    out = capsys.readouterr().out
    assert "only 3 images" in out and "Rank-5, Rank-20 cannot be computed" in out  # noted before training
    with pytest.raises(DatasetError, match="query set of target 'd' is empty"):
        check_datamanager(_fake_dm([], good[1]), cfg)
    with pytest.raises(DatasetError, match="no query of target 'd' has a gallery image"):
        check_datamanager(_fake_dm([(1, 0)], [(1, 0), (2, 1)]), cfg)
    with pytest.raises(DatasetError, match="holds no identities"):
        check_datamanager(_fake_dm(*good, num_train_pids=0), cfg)


# ----------------------------------------------------------------------------------------------------------------
# Config problems, rejected before any work starts
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts, expected", [
    (["train.checkpoint_every_n_iter", "5"], "Did you mean 'train.checkpoint_every_n_iters'"),
    (["data.skip_corupt", "True"], "Did you mean 'data.skip_corrupt'"),
    (["train.keep_last", "two"], "must be an integer"),
    (["data.skip_corrupt", "maybe"], "must be a boolean"),
    (["train.lr", "-0.1"], "the learning rate must be positive"),
    (["train.batch_size", "2", "sampler.train_sampler", "RandomIdentitySampler", "sampler.num_instances", "4"],
     "must hold at least that many"),
    (["train.batch_size", "6", "sampler.train_sampler", "RandomIdentitySampler", "sampler.num_instances", "4"],
     "needs a multiple of sampler.num_instances (4)"),
    (["train.batch_size", "6", "sampler.train_sampler", "RandomDomainSampler", "sampler.num_cams", "4"],
     "needs a multiple of sampler.num_cams (4)"),
    (["model.name", "ptl_osnet_x025"], "Did you mean 'ptl_osnet_x0_25'"),
    (["train.checkpoint_every_n_iters", "-1"], "train.checkpoint_every_n_iters = -1 is invalid"),
    (["train.keep_last", "-2"], "train.keep_last = -2 is invalid"),
    (["data.save_dir", "log/{model.x}"], "invalid placeholder"),
    (["model.load_weights_mode", "partial"], "Valid values: strict, match"),
])
def test_config_problems_are_rejected_before_any_work(tmp_path, capsys, opts, expected):
    with pytest.raises(ConfigError) as info:
        load_config(opts=opts)
    assert expected in str(info.value)
    save_dir = tmp_path / "log"
    assert main(opts + ["data.save_dir", str(save_dir)] if "data.save_dir" not in opts else opts) == 2
    assert expected in capsys.readouterr().err
    assert not save_dir.exists()


def test_defaults_for_the_new_keys():
    cfg = load_config()
    assert cfg.model.load_weights_mode == "strict" and cfg.model.trust_checkpoint is False
    assert cfg.train.resume == "" and cfg.train.checkpoint_every_n_iters == 0 and cfg.train.keep_last == 0
    assert cfg.data.skip_corrupt is False
