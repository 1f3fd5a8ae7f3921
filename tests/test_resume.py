"""Nothing lost: exact resume (mid-epoch), RNG states, reproducible epoch order, iteration checkpoints, a real
SIGKILL during training and during a save, non-finite loss, failed writes."""
import errno
import json
import os
import os.path as osp
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tiny import PAUSING_SAVE_SCRIPT, TINY_RUN

from ptl_torchreid import _torchreid
from ptl_torchreid.cli import main
from ptl_torchreid.config import engine_run_kwargs, load_config
from ptl_torchreid.engine import HookBase, NonFiniteLossError, PTLImageSoftmaxEngine, build_datamanager, build_engine
from ptl_torchreid.utils.checkpoint import CheckpointManager, CheckpointWriteError, load_checkpoint
from ptl_torchreid.utils.resume import EpochLoader, capture_rng_state, restore_rng_state, seeded_rng

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

# Tiny synthetic data and ptl_osnet_x0_25 at 64x32: about 4 batches per epoch. Random flip, crop and erasing
# make the data pipeline consume random numbers, which an exact resume must reproduce.
TINY = TINY_RUN + [
    "data.transforms", "['random_flip', 'random_crop', 'random_erase']",
    "train.max_epoch", "3", "train.lr", "0.001", "train.seed", "7", "train.lr_scheduler", "single_step",
    "train.stepsize", "[2]", "test.ranks", "[1]", "test.eval_freq", "1",
]


def tiny_cfg(data_root, save_dir, *opts):
    return load_config(opts=TINY + ["data.root", data_root, "data.save_dir", str(save_dir)] + list(opts))


@pytest.fixture(scope="module")
def datamanager(data_root, tmp_path_factory):
    return build_datamanager(tiny_cfg(data_root, tmp_path_factory.mktemp("dm")))


class Interrupted(Exception):
    pass


class LossRecorder(HookBase):
    """``losses``: ``{iteration: loss}`` of every step; raises :class:`Interrupted` when step ``stop_at`` (1-based)
    starts, before its forward pass."""

    def __init__(self, stop_at=None):
        self.losses = {}
        self.stop_at = stop_at

    def before_step(self):
        if self.stop_at is not None and self.trainer.iteration + 1 == self.stop_at:
            raise Interrupted()

    def after_step(self):
        self.losses[self.trainer.iteration] = self.trainer.step_summary["loss"]


def record_losses(engine, stop_at=None):
    recorder = LossRecorder(stop_at)
    engine.register_hooks([recorder])
    return recorder.losses


def add_dropout(engine):
    """Dropout on the training outputs: the model then draws from the global torch RNG at every step, which an
    exact resume must restore (torchreid's OSNet has no dropout of its own)."""
    engine.net.register_forward_hook(
        lambda module, inputs, out: torch.nn.functional.dropout(out, 0.2, True) if module.training else out)
    return engine


def run_engine(engine, cfg):
    kwargs = engine_run_kwargs(cfg)
    kwargs["start_epoch"] = engine.start_epoch
    return engine.run(**kwargs)


def assert_same_tensors(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), k


@pytest.mark.parametrize("mode", ["branch", "rectify"])
def test_resume_mid_epoch_is_exact(data_root, datamanager, tmp_path, mode):
    """Interrupted after step 7 (checkpoints every 3 steps: the last one is mid-epoch 2) and resumed in a fresh
    engine with other RNG states: the same losses at every later step and the same final weights. An evaluation
    after epoch 1 and the LR step at its end lie between the checkpoints."""
    two_epochs = ["train.checkpoint_every_n_iters", "3", "train.max_epoch", "2", "train.stepsize", "[1]",
                  "ptl.mode", mode]
    cfg = tiny_cfg(data_root, tmp_path / "full", *two_epochs)
    torchreid = _torchreid.torchreid
    torchreid.utils.set_random_seed(cfg.train.seed)
    full = add_dropout(build_engine(cfg, datamanager=datamanager))
    full_losses = record_losses(full)
    run_engine(full, cfg)
    steps = full.iteration
    per_epoch = steps // 2
    assert steps >= 8 and per_epoch > 3  # step 6 below is mid-epoch

    cfg_b = tiny_cfg(data_root, tmp_path / "broken", *two_epochs)
    torchreid.utils.set_random_seed(cfg.train.seed)
    broken = add_dropout(build_engine(cfg_b, datamanager=datamanager))
    broken_losses = record_losses(broken, stop_at=8)
    with pytest.raises(Interrupted):
        run_engine(broken, cfg_b)
    assert broken_losses == {k: v for k, v in full_losses.items() if k <= 7}
    latest = CheckpointManager(str(tmp_path / "broken" / "model")).latest()
    assert osp.basename(latest) == "model-iter6.pth.tar"
    state = load_checkpoint(latest)
    assert state["epoch"] == 6 // per_epoch and state["batch"] == 6 % per_epoch > 0  # taken mid-epoch

    # A fresh process would start with other RNG states and another model initialisation.
    torchreid.utils.set_random_seed(12345)
    cfg_c = tiny_cfg(data_root, tmp_path / "broken", *two_epochs, "train.resume", "auto")
    resumed = add_dropout(build_engine(cfg_c, datamanager=datamanager))
    assert resumed.start_epoch == state["epoch"] and resumed.iteration == 6
    resumed_losses = record_losses(resumed)
    run_engine(resumed, cfg_c)

    assert sorted(resumed_losses) == list(range(7, steps + 1))
    for k, v in resumed_losses.items():
        assert v == pytest.approx(full_losses[k], abs=1e-6), k
    assert_same_tensors(full.net.state_dict(), resumed.net.state_dict())
    assert resumed.scheduler.state_dict() == full.scheduler.state_dict()
    assert resumed.best_rank1 == full.best_rank1 and resumed.iteration == full.iteration
    # The epoch's logged averages include the steps trained before the interruption.
    assert resumed.epoch_summary["loss"] == pytest.approx(full.epoch_summary["loss"], abs=1e-6)


def test_resume_at_another_cpu_thread_count_says_it_is_not_exact(data_root, datamanager, tmp_path, capsys):
    """CPU sums are rounded by thread count: the checkpoint records the count, and a resume at another one says
    that the continuation is not bit for bit, and how to make it so."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cfg = tiny_cfg(data_root, tmp_path, "train.checkpoint_every_n_iters", "2", "train.max_epoch", "1")
        engine = build_engine(cfg, datamanager=datamanager)
        record_losses(engine, stop_at=3)
        with pytest.raises(Interrupted):
            run_engine(engine, cfg)
        path = osp.join(str(tmp_path), "model", "model-iter2.pth.tar")
        assert load_checkpoint(path)["cpu_threads"] == 1
        for count, noted in ((1, False), (2, True)):
            torch.set_num_threads(count)
            capsys.readouterr()
            build_engine(tiny_cfg(data_root, tmp_path, "train.max_epoch", "1"), datamanager=datamanager).resume(path)
            out = capsys.readouterr().out
            assert ("written by a run computing with 1 torch CPU threads, this run uses 2" in out) == noted, out
            assert ("Set train.cpu_threads 1 for an exact continuation" in out) == noted
    finally:
        torch.set_num_threads(threads)


def test_resume_restores_cell_state_meters_and_rng(data_root, datamanager, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, "train.checkpoint_every_n_iters", "2", "train.max_epoch", "1")
    engine = build_engine(cfg, datamanager=datamanager)
    record_losses(engine, stop_at=3)
    with pytest.raises(Interrupted):
        run_engine(engine, cfg)
    state = load_checkpoint(osp.join(str(tmp_path), "model", "model-iter2.pth.tar"))
    assert state["batch"] == 2 and state["epoch"] == 0 and state["epoch_meters"]["loss"][1] == 2
    cells = [k for k in state["state_dict"] if k.endswith("_extra_state")]
    assert cells and all(state["state_dict"][k].numel() > 0 for k in cells)  # the carried state is saved
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}

    fresh = build_engine(tiny_cfg(data_root, tmp_path, "train.max_epoch", "1"), datamanager=datamanager)
    assert fresh.resume(osp.join(str(tmp_path), "model", "model-iter2.pth.tar")) == 0
    for key in cells:
        cell = fresh.net.get_submodule(key[: -len("._extra_state")])
        assert torch.equal(cell.state, state["state_dict"][key])
    # RNG states and the epoch's meters come back when training restarts (whatever ran in between).
    random.random(), np.random.rand(), torch.rand(1)
    seen = {}

    class EpochStart(HookBase):
        def before_epoch(self):
            t = self.trainer
            seen.update(first=t.first_batch, count=t.meters.meters["loss"].count, norm=t.net.state_norm(),
                        draws=(random.random(), np.random.rand(), torch.rand(1)))
            raise Interrupted()

    fresh.register_hooks([EpochStart()])
    with pytest.raises(Interrupted):
        fresh.train()
    assert seen["first"] == 2  # two batches of epoch 1 are done
    assert seen["count"] == 2
    assert seen["norm"] > 0  # no reset at the start of a resumed epoch
    got = seen["draws"]
    restore_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == got


def test_rng_state_round_trip_is_weights_only_safe(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = capture_rng_state()
    path = tmp_path / "rng.pt"
    torch.save(state, str(path))
    expected = (random.random(), np.random.randn(), torch.randn(2).tolist())
    restore_rng_state(torch.load(str(path), weights_only=True))
    assert (random.random(), np.random.randn(), torch.randn(2).tolist()) == expected


def _batches(loader, epoch, start=0):
    return [(b["pid"].tolist(), b["img"].clone()) for b in loader.batches(epoch, start)]


def test_epoch_loader_is_a_function_of_seed_and_epoch(datamanager):
    """Order and augmentation depend only on (seed, epoch): restarting at batch k gives the tail of the epoch,
    worker processes give the same batches, and the global RNG streams are left alone."""
    train = datamanager.train_loader
    loader = EpochLoader(train, seed=5)
    before = capture_rng_state()
    full = _batches(loader, 1)
    after = capture_rng_state()
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]
    assert len(full) == len(loader.plan(1)) >= 3
    tail = _batches(EpochLoader(train, seed=5), 1, start=2)
    assert len(tail) == len(full) - 2
    for (p1, x1), (p2, x2) in zip(full[2:], tail):
        assert p1 == p2 and torch.equal(x1, x2)
    other_epoch = EpochLoader(train, seed=5).plan(2)
    other_seed = EpochLoader(train, seed=6).plan(1)
    assert loader.plan(1) != other_epoch and loader.plan(1) != other_seed

    workers = torch.utils.data.DataLoader(train.dataset, sampler=train.sampler, batch_size=train.batch_size,
                                          drop_last=True, num_workers=2)
    parallel = _batches(EpochLoader(workers, seed=5), 1)
    assert len(parallel) == len(full)
    for (p1, x1), (p2, x2) in zip(full, parallel):
        assert p1 == p2 and torch.equal(x1, x2)


def test_seeded_rng_restores_the_outer_streams():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with seeded_rng(99):
        inner = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with seeded_rng(99):
        assert torch.equal(torch.rand(3), inner)


def test_iteration_checkpoints_keep_the_last_n(data_root, datamanager, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, "train.checkpoint_every_n_iters", "2", "train.keep_last", "2",
                   "train.max_epoch", "2", "test.eval_freq", "-1")
    engine = build_engine(cfg, datamanager=datamanager)
    run_engine(engine, cfg)
    folder = tmp_path / "model"
    periodic = sorted(p.name for p in folder.iterdir() if p.name.startswith("model") and "best" not in p.name)
    last_iter = engine.iteration - engine.iteration % 2
    # the final epoch checkpoint and the newest iteration checkpoint survive; older ones were deleted
    assert periodic == sorted([f"model-iter{last_iter}.pth.tar", "model.pth.tar-2"])
    assert json.loads((folder / "latest.json").read_text())["latest"] == "model.pth.tar-2"
    assert (folder / "model-best.pth.tar").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Failures while training
# ----------------------------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_root, datamanager, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, "train.checkpoint_every_n_iters", "2", "test.eval_freq", "-1")
    engine = build_engine(cfg, datamanager=datamanager)

    class DivergeAtStep5(HookBase):  # the 5th step's loss turns NaN (the guard checks after every hook)
        def before_backward(self):
            if engine.iteration == 4:
                engine.loss = engine.loss * float("nan")
                engine.step_summary["loss"] = float("nan")

    good = tmp_path / "model" / "model-iter4.pth.tar"
    seen = {}

    class AfterStep(HookBase):  # runs after the default hooks: the step's checkpoint is written
        def after_step(self):
            if engine.iteration == 4:
                seen["bytes"], seen["mtime"] = good.read_bytes(), good.stat().st_mtime_ns
                seen["weights"] = {k: v.clone() for k, v in engine.net.state_dict().items()
                                   if "_extra_state" not in k}

    engine.register_hooks([DivergeAtStep5(), AfterStep()])
    with pytest.raises(NonFiniteLossError) as info:
        run_engine(engine, cfg)
    message = str(info.value)
    assert "iteration 5" in message and "epoch 2" in message and "batch 1/" in message
    assert str(good) in message and "unchanged" in message
    assert good.read_bytes() == seen["bytes"] and good.stat().st_mtime_ns == seen["mtime"]
    assert CheckpointManager(str(tmp_path / "model")).latest() == str(good)
    assert sorted(p.name for p in (tmp_path / "model").iterdir() if "iter" in p.name) == [
        "model-iter2.pth.tar", "model-iter4.pth.tar"]
    # the step was not taken: trainable weights are still those of the checkpoint
    after_sd = engine.net.state_dict()
    for k, v in seen["weights"].items():
        if "running" not in k and "num_batches_tracked" not in k:
            assert torch.equal(after_sd[k], v), k
    assert engine.iteration == 4


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_failed_checkpoint_write_stops_training(data_root, datamanager, tmp_path, monkeypatch, code, capsys):
    cfg = tiny_cfg(data_root, tmp_path, "train.checkpoint_every_n_iters", "2")
    engine = build_engine(cfg, datamanager=datamanager)
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(code, os.strerror(code))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointWriteError) as info:
        run_engine(engine, cfg)
    target = osp.join(str(tmp_path), "model", "model-iter4.pth.tar")
    assert target in str(info.value) and os.strerror(code) in str(info.value)
    assert "stopped at epoch" in capsys.readouterr().out
    assert engine.iteration == 4  # no step after the failed save
    assert not osp.exists(target)
    manager = CheckpointManager(osp.join(str(tmp_path), "model"))
    assert osp.basename(manager.latest()) == "model-iter2.pth.tar"
    assert load_checkpoint(manager.latest())["iteration"] == 2
    assert not [n for n in os.listdir(osp.join(str(tmp_path), "model")) if n.endswith(".ptl-tmp")]


def cli_args(data_root, save_dir, *extra):
    return TINY + ["data.root", data_root, "data.save_dir", str(save_dir)] + list(extra)


def test_cli_reports_disk_full_and_non_finite_loss(data_root, tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(cli_args(data_root, tmp_path / "a", "train.checkpoint_every_n_iters", "1")) == 2
    err = capsys.readouterr().err
    assert osp.join(str(tmp_path / "a"), "model", "model-iter1.pth.tar") in err and "Free disk space" in err
    monkeypatch.setattr(torch, "save", real_save)

    def nan_loss(self, outputs, pids):
        return outputs.sum() * float("nan"), {"loss": float("nan")}

    monkeypatch.setattr(PTLImageSoftmaxEngine, "compute_losses", nan_loss)
    assert main(cli_args(data_root, tmp_path / "b")) == 2
    err = capsys.readouterr().err
    assert "Non-finite loss" in err and "iteration 1" in err and "No checkpoint had been written yet" in err


# ----------------------------------------------------------------------------------------------------------------
# Real kills, in a subprocess
# ----------------------------------------------------------------------------------------------------------------



def test_sigkill_in_the_middle_of_a_save_then_resume_finishes(data_root, datamanager, tmp_path, capsys):
    """SIGKILL while the 3rd checkpoint is being written: the last good checkpoint is intact and named by the
    latest pointer, and ``--resume`` finishes the run from it."""
    save_dir = tmp_path / "run"
    args = cli_args(data_root, save_dir, "train.checkpoint_every_n_iters", "1", "train.max_epoch", "1",
                    "test.eval_freq", "-1")
    marker = tmp_path / "saving"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # the 3rd checkpoint write stops half-way and waits there to be killed (no `go` file ever appears)
    proc = subprocess.Popen([sys.executable, "-c", PAUSING_SAVE_SCRIPT, "3", str(marker), str(tmp_path / "go")]
                            + args, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=10)[0][-3000:] if proc.poll() is not None else "timeout"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    folder = save_dir / "model"
    leftovers = [p for p in folder.iterdir() if p.name.endswith(".ptl-tmp")]
    assert len(leftovers) == 1 and leftovers[0].read_bytes() == b"half a checkpoint"  # cut short for real
    assert not (folder / "model-iter3.pth.tar").exists()
    latest = CheckpointManager(str(folder)).latest()
    assert osp.basename(latest) == "model-iter2.pth.tar"
    assert load_checkpoint(latest)["iteration"] == 2
    assert not any(p.name.endswith(".ptl-tmp") for p in folder.iterdir())  # the manager cleared the leftover

    assert main(["--resume"] + args) == 0  # --resume without a value: the latest checkpoint
    out = capsys.readouterr().out
    assert f'Resumed from "{latest}" (epoch 1, after batch 2' in out and "Rank-1" in out
    final = load_checkpoint(str(folder / "model.pth.tar-1"))
    assert final["epoch"] == 1 and final["iteration"] > 2
