"""Second reliability pass: full disks, NaN recovery that works, one run per save_dir, optimizer changes on resume,
PTL input sizes, SIGINT/SIGTERM, evaluation sets under data.skip_corrupt, file modes, checksums, argument parsing."""
import errno
import json
import os
import os.path as osp
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from tiny import PAUSING_SAVE_SCRIPT, run_opts

import ptl_torchreid.utils.checkpoint as ckmod
from ptl_torchreid import cli
from ptl_torchreid.cli import main, parse_command_line
from ptl_torchreid.config import ConfigError, load_config
from ptl_torchreid.data import synthetic
from ptl_torchreid.engine import TrainingInterrupted, build_datamanager
from ptl_torchreid.engine.reliability import StopSignals
from ptl_torchreid.utils.checkpoint import (
    CheckpointManager,
    CheckpointReadError,
    CheckpointWriteError,
    load_checkpoint,
    save_checkpoint,
)
from ptl_torchreid.utils.logfile import LogFile
from ptl_torchreid.utils.savedir import LOCK_NAME, SaveDirLock, owner_tag

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def opts(root, save_dir, *extra):
    return run_opts(root, save_dir, "test.ranks", "[1]", "test.eval_freq", "-1", *extra)


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def tmpfs(tmp_path):
    """A 6 MiB tmpfs (a real full disk), where the machine lets the test mount one; skipped elsewhere."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
                                                   capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ----------------------------------------------------------------------------------------------------------------
# 1. Full disk
# ----------------------------------------------------------------------------------------------------------------


def test_torch_save_runtime_error_on_a_full_disk_is_a_write_error(tmp_path, monkeypatch):
    path = tmp_path / "ck.pth"
    save_checkpoint({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def full(obj, f, *args, **kwargs):  # what torch.save does when the disk fills up during the write
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda d: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint({"w": torch.zeros(3)}, path)
    assert info.value.errno == errno.ENOSPC and str(path) in str(info.value)
    assert "Free disk space" in str(info.value) and "unexpected pos" in str(info.value)
    assert path.read_bytes() == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith(ckmod.TMP_SUFFIX)]


def test_real_full_disk_is_one_line_and_exit_2(data_root, tmpfs, capsys):
    """Checkpoints and the log file on a 6 MiB tmpfs: the first checkpoint (~5 MB) fits, the next does not."""
    status = main(opts(data_root, tmpfs / "run", "train.checkpoint_every_n_iters", "1"))
    captured = capsys.readouterr()
    assert status == 2, captured.err[-2000:]
    assert "Traceback" not in captured.err
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("ptl-torchreid: error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "Free disk space" in lines[0]
    latest = CheckpointManager(str(tmpfs / "run" / "model")).latest()
    assert osp.basename(latest) == "model-iter1.pth.tar" and load_checkpoint(latest)["iteration"] == 1

    # a save_dir that is full at start: the usual one-line error, not a traceback
    filler = tmpfs / "filler"
    with open(filler, "wb") as f:
        with pytest.raises(OSError):
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
    assert main(opts(data_root, tmpfs / "run2")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "data.save_dir" in err and "tmpfs" in err


def test_log_file_errors_do_not_replace_the_message(tmp_path, capsys):
    class FullFile:
        def write(self, msg):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        flush = write

        def close(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    tee = LogFile(str(tmp_path / "train.log"))
    tee.file.close()
    tee.file = FullFile()
    with tee:
        print("a line that cannot reach the log file")
        print("and another")
    captured = capsys.readouterr()
    assert "a line that cannot reach the log file" in captured.out and "and another" in captured.out
    assert captured.err.count("could not be written") == 1

    tee = LogFile(str(tmp_path / "train2.log"))
    tee.file.close()
    tee.file = FullFile()
    tee.file.write = lambda msg: None  # buffered: the error comes only when the file is closed
    with pytest.raises(ValueError, match="the run's own error"):
        with tee:
            raise ValueError("the run's own error")


def test_unwritable_save_dir_is_a_clear_error(data_root, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for command in ([], ["test"]):
        assert main(command + opts(data_root, blocker / "run")) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(blocker / "run") in err and "data.save_dir" in err


# ----------------------------------------------------------------------------------------------------------------
# 2. NaN recovery: the advice works, and a changed train.lr applies on resume
# ----------------------------------------------------------------------------------------------------------------


def test_following_the_divergence_advice_finishes_the_run(data_root, tmp_path, capsys):
    save_dir = tmp_path / "run"
    args = opts(data_root, save_dir, "train.checkpoint_every_n_iters", "1")
    assert main(args + ["train.lr", "0.0003"]) == 0
    capsys.readouterr()

    # resumed with a learning rate far too high: the configured rate applies (said in one line) and training
    # diverges; the advice names the newest checkpoint from before the divergence, not the latest finite one
    assert main(args + ["train.lr", "1e6", "train.max_epoch", "3", "--resume"]) == 2
    captured = capsys.readouterr()
    assert "configured base learning rate" in captured.out and "1e+06" in captured.out
    match = re.search(r"resume from it with --resume (\S+)", captured.err)
    assert match, captured.err[-2000:]
    good = match.group(1)
    assert "a sign of divergence" in captured.err
    newest = CheckpointManager(str(save_dir / "model")).latest()
    assert good != newest  # the latest checkpoint is finite but already diverged
    assert CheckpointManager(str(save_dir / "model")).record(newest)["param_norm"] > \
        10 * CheckpointManager(str(save_dir / "model")).record(good)["param_norm"]

    assert main(args + ["train.lr", "0.0003", "train.max_epoch", "3", "--resume", good]) == 0
    captured = capsys.readouterr()
    assert f'Resumed from "{good}"' in captured.out and "Non-finite" not in captured.err
    final = load_checkpoint(str(save_dir / "model" / "model.pth.tar-3"))
    assert all(g["lr"] == pytest.approx(0.0003) for g in final["optimizer"]["param_groups"])


# ----------------------------------------------------------------------------------------------------------------
# 3. One run per save_dir
# ----------------------------------------------------------------------------------------------------------------



@pytest.mark.slow
def test_two_runs_at_once_the_second_is_refused_and_the_first_finishes(data_root, tmp_path, capsys):
    save_dir = tmp_path / "run"
    args = opts(data_root, save_dir, "train.checkpoint_every_n_iters", "1")
    marker, go = tmp_path / "saving", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", PAUSING_SAVE_SCRIPT, "2", str(marker), str(go)] + args, cwd=REPO,
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600  # generous: the machine may be shared
        while not marker.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), first.communicate(timeout=30)[0][-3000:]
        folder = save_dir / "model"
        in_progress = [p.name for p in folder.iterdir() if p.name.endswith(ckmod.TMP_SUFFIX)]
        assert len(in_progress) == 1 and f"pid{first.pid}@" in in_progress[0]

        # a second run into the same folder is refused, naming the first one
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "in use by a running training run" in err and f"pid {first.pid}" in err
        # and a cleanup by another process keeps a temporary file whose writer still runs
        CheckpointManager(str(folder))
        assert [p.name for p in folder.iterdir() if p.name.endswith(ckmod.TMP_SUFFIX)] == in_progress
        go.touch()
        out = first.communicate(timeout=600)[0]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, out[-3000:]
    assert not (save_dir / LOCK_NAME).exists()
    assert load_checkpoint(CheckpointManager(str(save_dir / "model")).latest())["epoch"] == 1


def test_stale_lock_is_taken_over_and_stale_temp_files_removed(data_root, tmp_path, capsys):
    save_dir = tmp_path / "run"
    (save_dir / "model").mkdir(parents=True)
    pid = dead_pid()
    (save_dir / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": owner_tag().split("@", 1)[1],
                                                  "started": "2026-01-01T00:00:00"}))
    mine = save_dir / "model" / f".model-iter9.pth.tar.{owner_tag()}.x1.ptl-tmp"
    gone = save_dir / "model" / f".model-iter9.pth.tar.pid{pid}@{owner_tag().split('@', 1)[1]}.x2.ptl-tmp"
    other_host = save_dir / "model" / ".model-iter9.pth.tar.pid1@elsewhere.example.x3.ptl-tmp"
    for p in (mine, gone, other_host):
        p.write_bytes(b"x")
    CheckpointManager(str(save_dir / "model"))
    assert mine.exists() and other_host.exists() and not gone.exists()
    mine.unlink()
    other_host.unlink()

    assert main(opts(data_root, save_dir)) == 0
    out = capsys.readouterr().out
    assert "took over the lock" in out and f"pid {pid}" in out
    assert not (save_dir / LOCK_NAME).exists()


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(OSError, match="another host") as info:
        SaveDirLock(str(tmp_path), what="data.save_dir").acquire()
    assert str(tmp_path / LOCK_NAME) in str(info.value)


def test_finished_run_needs_resume_or_overwrite(data_root, tmp_path, capsys):
    save_dir = tmp_path / "run"
    assert main(opts(data_root, save_dir)) == 0
    first = (save_dir / "model" / "model.pth.tar-1").read_bytes()
    assert main(opts(data_root, save_dir, "train.seed", "5")) == 2
    err = capsys.readouterr().err
    assert "already holds the checkpoints of an earlier run" in err and "--overwrite" in err and "--resume" in err
    assert (save_dir / "model" / "model.pth.tar-1").read_bytes() == first
    # --overwrite, given after the overrides
    assert main(opts(data_root, save_dir, "train.seed", "5") + ["--overwrite"]) == 0
    assert "deleted the 2 checkpoint(s)" in capsys.readouterr().out
    assert load_checkpoint(str(save_dir / "model" / "model.pth.tar-1"))["seed"] == 5
    # the README names the log file the command line writes
    logs = [n for n in os.listdir(save_dir) if re.fullmatch(r"train-[0-9-]+\.log", n)]
    assert logs
    readme = open(osp.join(REPO, "README.md")).read()
    assert "train-<timestamp>.log" in readme and "log.txt" not in readme


# ----------------------------------------------------------------------------------------------------------------
# 4. Another optimizer on resume
# ----------------------------------------------------------------------------------------------------------------


def test_resume_with_another_optimizer_lists_what_does_not_fit(data_root, tmp_path, capsys):
    save_dir = tmp_path / "run"
    assert main(opts(data_root, save_dir, "train.optim", "adam")) == 0
    capsys.readouterr()
    assert main(opts(data_root, save_dir, "train.optim", "sgd", "train.max_epoch", "2", "--resume")) == 2
    err = capsys.readouterr().err
    assert "Cannot resume" in err and "(Adam)" in err and "SGD" in err and "momentum" in err and "betas" in err


# ----------------------------------------------------------------------------------------------------------------
# 5. PTL input size
# ----------------------------------------------------------------------------------------------------------------


def test_ptl_input_size_not_a_multiple_of_32_is_rejected_before_any_work(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"data.height = 250 .*multiple of 32.*224 or 256"):
        load_config(opts=["model.name", "ptl_osnet_x0_25", "data.height", "250"])
    load_config(opts=["model.name", "osnet_x0_25", "data.height", "250"])  # plain models take any size
    root = tmp_path / "data"
    assert main(opts(root, tmp_path / "run", "data.width", "40")) == 2
    assert "data.width = 40" in capsys.readouterr().err
    assert not root.exists()  # refused before the synthetic dataset was generated


# ----------------------------------------------------------------------------------------------------------------
# 6. SIGINT / SIGTERM
# ----------------------------------------------------------------------------------------------------------------

SLOW_RUN = textwrap.dedent("""
    import sys, time
    from ptl_torchreid.cli import main
    from ptl_torchreid.engine import PTLImageSoftmaxEngine

    # Steps are slowed down; a marker appears after the 3rd step.
    marker, args = sys.argv[1], sys.argv[2:]
    original = PTLImageSoftmaxEngine.forward_backward
    def forward_backward(self, data):
        out = original(self, data)
        if self.iteration + 1 == 3:
            open(marker, "w").close()
        time.sleep(0.2)
        return out
    PTLImageSoftmaxEngine.forward_backward = forward_backward
    sys.exit(main(args))
""")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_a_checkpoint_prints_the_resume_command_and_exits(data_root, tmp_path, capsys, signum):
    save_dir = tmp_path / "run"
    args = opts(data_root, save_dir, "train.max_epoch", "50")
    marker = tmp_path / "step3"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, str(marker)] + args, cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600  # generous: the machine may be shared
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=30)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err
    name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
    line = [ln for ln in err.splitlines() if ln.startswith("ptl-torchreid: stopped by " + name)]
    assert len(line) == 1 and "checkpoint saved to" in line[0] and line[0].rstrip().endswith("--resume")
    assert "Resume with: ptl-torchreid " in line[0] and "train.max_epoch 50" in line[0]
    saved = re.search(r'checkpoint saved to "([^"]+)"', line[0]).group(1)
    assert CheckpointManager(str(save_dir / "model")).latest() == saved
    state = load_checkpoint(saved)
    assert state["iteration"] >= 3
    assert not (save_dir / LOCK_NAME).exists()

    # the printed command resumes (with fewer epochs here, to stay short)
    assert main(args + ["--resume", "train.max_epoch", "2"]) == 0
    assert f'Resumed from "{saved}"' in capsys.readouterr().out


def test_second_signal_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested and stop.signum == signal.SIGINT
        with pytest.raises(TrainingInterrupted) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert info.value.exit_status == 128 + signal.SIGTERM and info.value.checkpoint is None
    assert signal.getsignal(signal.SIGINT) is before  # restored


# ----------------------------------------------------------------------------------------------------------------
# 7. Evaluation sets are never altered by data.skip_corrupt
# ----------------------------------------------------------------------------------------------------------------


def test_skip_corrupt_never_replaces_query_or_gallery_images(tmp_path, capsys):
    root = tmp_path / "data"
    build_datamanager(load_config(opts=opts(root, tmp_path / "gen")))
    victim = sorted((root / "synthetic_reid" / "query").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:100])
    assert main(["test"] + opts(root, tmp_path / "eval", "data.skip_corrupt", "True")) == 2
    err = capsys.readouterr().err
    assert f'Cannot read query image "{victim}"' in err and "evaluation sets are never altered" in err


# ----------------------------------------------------------------------------------------------------------------
# 8. The smaller ones
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_checkpoints_and_synthetic_folders_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        manager = CheckpointManager(str(tmp_path / "model"))
        path = manager.save({"state_dict": {"w": torch.ones(2)}}, epoch=1, is_best=True)
        synthetic.prepare_synthetic_dataset(str(tmp_path / "ds"), synthetic.make_params(
            num_train_ids=2, num_test_ids=1, num_cameras=2, images_per_id_per_camera=1, height=32, width=16,
            num_distractor_ids=0), verbose=False)
    finally:
        os.umask(old)
    for p in (path, manager.best_path, manager.pointer_path):
        assert os.stat(p).st_mode & 0o777 == mode, p
    assert os.stat(tmp_path / "ds").st_mode & 0o777 == mode | 0o111 & ~umask


def test_bit_rot_inside_a_checkpoint_is_detected_and_named(tmp_path):
    manager = CheckpointManager(str(tmp_path))
    path = manager.save({"state_dict": {"w": torch.arange(4096.0)}}, epoch=1, is_best=True)
    assert load_checkpoint(path)["state_dict"]["w"][5] == 5  # verified and fine
    st = os.stat(path)
    data = bytearray(open(path, "rb").read())
    i = data.index(torch.arange(4096.0).numpy().tobytes()[4000:4016])  # inside the tensor's bytes
    data[i] ^= 0x01
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # bit rot leaves size and time stamp as they were
    with pytest.raises(CheckpointReadError, match="SHA-256") as info:
        load_checkpoint(path)
    assert path in str(info.value)
    # a file rewritten since (new time stamp) is not taken for a corrupt one
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_checkpoint(path)
    load_checkpoint(manager.best())


def test_resume_anywhere_and_unknown_command(tmp_path):
    keys = ["train.max_epoch", "3"]
    # check-data: a command that does not look for the files and datasets named
    for argv, resume in ((keys + ["--resume"], "auto"), (keys + ["--resume", "x.pth"], "x.pth"),
                         (["--resume"] + keys, "auto"), (keys + ["--resume=y.pth"], "y.pth")):
        _, args, cfg = parse_command_line(["check-data"] + argv)
        assert cfg.train.resume == resume and cfg.train.max_epoch == 3
    _, args, _ = parse_command_line(["check-data"] + keys + ["--overwrite", "--trust-checkpoint"])
    assert args.overwrite and args.trust_checkpoint
    with pytest.raises(ConfigError, match=r"unknown command 'tset' \(did you mean 'test'\)"):
        parse_command_line(["tset"] + keys)
    assert cli.resume_command(["--config-file", "a b.yaml", "--resume", "c.pth", "train.lr", "0.1"]) == \
        "ptl-torchreid --config-file 'a b.yaml' train.lr 0.1 --resume"


def test_directories_where_files_are_expected(tmp_path, capsys):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))
    assert main(["model.load_weights", str(tmp_path)]) == 2
    assert f"model.load_weights = '{tmp_path}' is a directory" in capsys.readouterr().err


def test_empty_yaml_and_duplicate_keys_are_errors(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="empty.yaml is empty"):
        load_config(str(empty))
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  lr: 0.1\n  max_epoch: 3\n  lr: 0.2\ndata:\n  height: 64\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: key 'train.lr' is given twice \(lines 2 and 4\)"):
        load_config(str(dup))
    top = tmp_path / "top.yaml"
    top.write_text("train:\n  lr: 0.1\ntrain:\n  max_epoch: 3\n")
    with pytest.raises(ConfigError, match="key 'train' is given twice"):
        load_config(str(top))


def test_max_epoch_0_says_what_happened(tmp_path, capsys):
    assert main(opts(tmp_path / "data", tmp_path / "run", "train.max_epoch", "0")) == 2
    err = capsys.readouterr().err
    assert "train.max_epoch = 0" in err and "nothing to train" in err and "'test' command" in err
