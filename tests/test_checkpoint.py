"""Safe, atomic checkpoints and weight loading (ptl_torchreid.utils.checkpoint)."""
import errno
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from ptl_torchreid.utils import checkpoint as ckmod
from ptl_torchreid.utils.checkpoint import (
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointReadError,
    CheckpointWriteError,
    NonFiniteCheckpointError,
    UntrustedCheckpointError,
    UntrustedCheckpointWarning,
    extract_state_dict,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    to_plain,
)
from ptl_torchreid.utils.checkpoint.loading import _load_with_mode

REPO = Path(__file__).resolve().parents[1]


def shared_dir():
    return Path(os.environ.get("PTL_SHARED_DIR") or REPO.parent / "shared")


def leftovers(d):
    return [n for n in os.listdir(d) if n.endswith(ckmod.TMP_SUFFIX)]


class Tiny(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.classifier(self.bn(self.conv(x)).mean((2, 3)))


# ---------------------------------------------------------------------------------------------------------------
# to_plain / weights-only round trip
# ---------------------------------------------------------------------------------------------------------------
def test_numpy_values_survive_weights_only_round_trip(tmp_path):
    state = {
        "rank1": np.float64(0.875),
        "mAP": np.float32(0.5),
        "epoch": np.int64(7),
        "flag": np.bool_(True),
        "arr": np.arange(6, dtype=np.float32).reshape(2, 3),
        "names": np.array(["a", "b"]),
        "nested": [{"x": np.int32(3)}, (np.float16(1.5),)],
    }
    raw = tmp_path / "raw.pth"
    torch.save(state, raw)
    with pytest.raises(pickle.UnpicklingError):  # why to_plain is needed
        torch.load(raw, weights_only=True)

    path = tmp_path / "plain.pth"
    save_checkpoint(state, path)
    out = torch.load(path, weights_only=True)  # plain torch, no allow-list
    assert out["rank1"] == 0.875 and type(out["rank1"]) is float
    assert out["mAP"] == 0.5 and type(out["epoch"]) is int and out["epoch"] == 7
    assert out["flag"] is True
    assert torch.equal(out["arr"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert out["names"] == ["a", "b"]
    assert out["nested"] == [{"x": 3}, (1.5,)]


def test_to_plain_keeps_container_types_that_schedulers_need(tmp_path):
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    for _ in range(3):
        opt.step()
        sched.step()
    save_checkpoint({"scheduler": sched.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "s.pth")
    ck = torch.load(tmp_path / "s.pth", weights_only=True)
    assert isinstance(ck["scheduler"]["milestones"], Counter)
    opt2 = torch.optim.SGD(Tiny().parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ck["optimizer"])
    sched2 = torch.optim.lr_scheduler.MultiStepLR(opt2, milestones=[2, 4], gamma=0.1)
    sched2.load_state_dict(ck["scheduler"])
    opt2.step()
    sched2.step()  # epoch 4 is a milestone: needs the Counter semantics
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.001)


def test_to_plain_converts_odd_values_and_rejects_objects():
    from collections import namedtuple

    P = namedtuple("P", "a b")

    class Cfg(dict):
        pass

    out = to_plain({"p": P(1, np.float64(2.0)), "cfg": Cfg(lr=np.float32(0.5)), "path": Path("/x"),
                    "t": nn.Parameter(torch.ones(2)), "od": OrderedDict(a=1)})
    assert out["p"] == (1, 2.0) and type(out["p"]) is tuple
    assert type(out["cfg"]) is dict and out["cfg"] == {"lr": 0.5}
    assert out["path"] == "/x"
    assert type(out["od"]) is OrderedDict

    class Thing:
        pass

    with pytest.raises(TypeError, match=r"state\['a'\]\[1\].*Thing"):
        to_plain({"a": [1, Thing()]})
    with pytest.raises(TypeError, match="state_dict"):
        to_plain({"opt": torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1)})


# ---------------------------------------------------------------------------------------------------------------
# Atomic save
# ---------------------------------------------------------------------------------------------------------------
def test_save_writes_fsyncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = tmp_path / "sub" / "ck.pth"
    assert save_checkpoint({"w": torch.ones(3)}, path) == str(path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert synced == [False, True]  # the data first, then the directory entry
    assert leftovers(path.parent) == []


def _good_old_file(path):
    save_checkpoint({"version": "old", "w": torch.zeros(4)}, path)


def _assert_old_intact(path):
    ck = load_checkpoint(path)
    assert ck["version"] == "old" and torch.equal(ck["w"], torch.zeros(4))
    assert leftovers(os.path.dirname(path)) == []


def test_crash_during_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ck.pth"
    _good_old_file(path)
    real_save = torch.save

    def crash(obj, f, *a, **k):
        f.write(b"PK\x03\x04partial")  # some bytes reach the file, then the process "dies"
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"version": "new", "w": torch.ones(4)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    _assert_old_intact(path)


def test_failed_rename_reports_path_and_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.pth"
    _good_old_file(path)

    def broken_replace(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(CheckpointWriteError) as ei:
        save_checkpoint({"version": "new", "w": torch.ones(4)}, path)
    monkeypatch.undo()
    assert str(path) in str(ei.value) and "Input/output error" in str(ei.value)
    _assert_old_intact(path)


def test_disk_full_raises_checkpoint_write_error_with_path(tmp_path, monkeypatch):
    path = tmp_path / "ck.pth"
    _good_old_file(path)

    def full(obj, f, *a, **k):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointWriteError) as ei:
        save_checkpoint({"version": "new", "w": torch.ones(4)}, path)
    monkeypatch.undo()
    err = ei.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert err.path == str(path)
    assert str(path) in str(err) and "No space left" in str(err) and "disk space" in str(err)
    _assert_old_intact(path)


def test_permission_denied_raises_checkpoint_write_error(tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(CheckpointWriteError, match="Permission denied.*writable") as ei:
        save_checkpoint({"w": torch.ones(1)}, tmp_path / "ck.pth")
    assert str(tmp_path / "ck.pth") in str(ei.value)
    assert not (tmp_path / "ck.pth").exists()


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from ptl_torchreid.utils.checkpoint import save_checkpoint
    path = sys.argv[1]
    for i in range(1, 100000):
        save_checkpoint({"i": i, "w": torch.full((2_000_000,), float(i))}, path)
        print(i, flush=True)
    """
)


def test_sigkill_during_saves_never_leaves_a_truncated_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(KILL_SCRIPT)
    path = tmp_path / "ck.pth"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"1"
        time.sleep(0.13)  # somewhere in the middle of a later save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ck = load_checkpoint(path)  # complete: one of the versions, whole
    assert ck["i"] >= 1 and torch.equal(ck["w"], torch.full((2_000_000,), float(ck["i"])))
    # a killed writer may leave its temp file (never at the real path); the manager removes it
    CheckpointManager(tmp_path)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# Safe loading
# ---------------------------------------------------------------------------------------------------------------
class ExecPayload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [ExecPayload, SystemPayload])
@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw_pickle"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, payload, fmt):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    obj = {"state_dict": {"w": torch.ones(1)}, "x": payload(marker)}
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=4)

    with pytest.raises(UntrustedCheckpointError) as ei:
        load_checkpoint(path)
    msg = str(ei.value)
    assert str(path) in msg and "arbitrary code" in msg
    assert "--trust-checkpoint" in msg and "trust=True" in msg and "model.trust_checkpoint" in msg
    with pytest.raises(UntrustedCheckpointError):
        load_weights(Tiny(), str(path), mode="match")
    assert not marker.exists()
    # the allow-list is scoped to the call
    assert not any("numpy" in str(g) for g in torch.serialization.get_safe_globals())

    if payload is ExecPayload and fmt != "raw_pickle":  # proves the payload is live: opting in runs it
        with pytest.warns(UntrustedCheckpointWarning, match="arbitrary code"):
            load_checkpoint(path, trust=True)
        assert marker.read_text() == "pwned"


def test_numpy_checkpoints_load_through_allow_list(tmp_path):
    # torchreid's own engine saves rank1 as a numpy float
    path = tmp_path / "torchreid_style.pth.tar"
    torch.save({"state_dict": Tiny().state_dict(), "epoch": 3, "rank1": np.float64(0.9),
                "arr": np.ones(3, dtype=np.int64)}, path)
    ck, mode = _load_with_mode(path)
    assert mode == "allow_list"
    assert ck["rank1"] == 0.9 and np.array_equal(ck["arr"], np.ones(3))
    assert not any("numpy" in str(g) for g in torch.serialization.get_safe_globals())


def test_numpy1_names_are_allowed_too(tmp_path):
    path = tmp_path / "np1.pth"
    torch.save({"rank1": np.float64(0.25)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    old = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert old != data
    path.write_bytes(old)
    ck, mode = _load_with_mode(path)
    assert mode == "allow_list" and ck["rank1"] == 0.25


def test_object_arrays_are_not_on_the_allow_list(tmp_path):
    path = tmp_path / "obj.pth"
    torch.save({"a": np.array([1, "x"], dtype=object)}, path)
    with pytest.raises(UntrustedCheckpointError):
        load_checkpoint(path)
    with pytest.warns(UntrustedCheckpointWarning):
        assert list(load_checkpoint(path, trust=True)["a"]) == [1, "x"]


def test_missing_empty_and_truncated_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointReadError, match="empty"):
        load_checkpoint(tmp_path / "empty.pth")
    for legacy in (False, True):
        good = tmp_path / "good.pth"
        torch.save({"w": torch.randn(1000)}, good, _use_new_zipfile_serialization=not legacy)
        data = good.read_bytes()
        (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointReadError, match="trunc.pth.*(truncated|corrupt)"):
            load_checkpoint(tmp_path / "trunc.pth")


# ---------------------------------------------------------------------------------------------------------------
# State dicts and load_weights
# ---------------------------------------------------------------------------------------------------------------
def test_extract_state_dict_variants():
    sd = Tiny().state_dict()
    for ck in (sd, {"state_dict": sd, "epoch": 1}, {"model": sd}, {"model_state_dict": sd}):
        assert list(extract_state_dict(ck)) == list(sd)
    dp = nn.DataParallel(Tiny()).state_dict()
    assert all(k.startswith("module.") for k in dp)
    assert list(extract_state_dict({"state_dict": dp})) == list(sd)
    assert list(extract_state_dict(Tiny())) == list(sd)
    with pytest.raises(ValueError, match="no tensors"):
        extract_state_dict({"epoch": 1, "rank1": 0.5})
    with pytest.raises(ValueError):
        extract_state_dict([1, 2])


def _params(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_strict_load_copies_everything(tmp_path):
    src, dst = Tiny(), Tiny()
    save_checkpoint({"state_dict": src.state_dict()}, tmp_path / "ck.pth")
    report = load_weights(dst, str(tmp_path / "ck.pth"), verbose=False)
    assert report.ok and report.load_mode == "weights_only" and len(report.loaded) == len(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_module_prefix_and_wrapped_target():
    src = Tiny()
    dst = nn.DataParallel(Tiny())
    load_weights(dst, {"state_dict": nn.DataParallel(src).state_dict()}, verbose=False)
    assert torch.equal(dst.module.conv.weight, src.conv.weight)


def test_strict_shape_mismatch_lists_keys_and_loads_nothing():
    src, dst = Tiny(num_classes=10), Tiny(num_classes=5)
    before = _params(dst)
    with pytest.raises(CheckpointMismatchError) as ei:
        load_weights(dst, src.state_dict(), verbose=False)
    msg = str(ei.value)
    assert "classifier.weight: [10, 8] vs [5, 8]" in msg and "classifier.bias: [10] vs [5]" in msg
    assert "mode='match'" in msg
    assert [k for k, _, _ in ei.value.report.shape_mismatched] == ["classifier.weight", "classifier.bias"]
    for k, v in dst.state_dict().items():  # not even the matching conv was loaded
        assert torch.equal(v, before[k])


def test_strict_missing_and_unexpected_keys_are_listed():
    sd = Tiny().state_dict()
    del sd["bn.running_var"]
    sd["extra.weight"] = torch.ones(2)
    with pytest.raises(CheckpointMismatchError) as ei:
        load_weights(Tiny(), sd, verbose=False)
    msg = str(ei.value)
    assert "missing from the checkpoint" in msg and "bn.running_var" in msg
    assert "not in the model" in msg and "extra.weight" in msg


def test_match_mode_loads_matching_and_prints_skipped(capsys):
    src, dst = Tiny(num_classes=10), Tiny(num_classes=5)
    cls_before = dst.classifier.weight.detach().clone()
    report = load_weights(dst, {"state_dict": src.state_dict()}, mode="match")
    out = capsys.readouterr().out
    assert "classifier.weight: [10, 8] vs [5, 8]" in out and "Loaded" in out
    assert report.skipped == ["classifier.weight", "classifier.bias"]
    assert torch.equal(dst.conv.weight, src.conv.weight)
    assert torch.equal(dst.bn.running_mean, src.bn.running_mean)
    assert torch.equal(dst.classifier.weight, cls_before)


def test_nothing_matching_is_an_error_even_in_match_mode():
    other = nn.Sequential(nn.Linear(3, 3)).state_dict()
    with pytest.raises(CheckpointMismatchError, match="different model"):
        load_weights(Tiny(), other, mode="match", verbose=False)
    with pytest.raises(ValueError, match="mode"):
        load_weights(Tiny(), other, mode="partial")


def test_real_model_zoo_file_loads_into_osnet(capsys):
    path = shared_dir() / "weights" / "osnet_x0_25_msmt17.pth"
    if not path.is_file():
        pytest.skip(f"{path} not present (set PTL_SHARED_DIR)")
    from ptl_torchreid._torchreid import torchreid

    model = torchreid.models.build_model("osnet_x0_25", num_classes=1041, pretrained=False)
    report = load_weights(model, str(path), mode="strict", trust=False)
    # The file is a legacy (non-zip) pickle of an OrderedDict of tensors: torch's weights-only unpickler
    # reads it without the numpy allow-list and without trust.
    print(f"model-zoo file loaded via: {report.load_mode}")
    assert report.load_mode == "weights_only"
    assert report.ok and len(report.loaded) == len(model.state_dict())
    raw = load_checkpoint(path)
    assert torch.equal(model.state_dict()["classifier.weight"], raw["classifier.weight"])


# ---------------------------------------------------------------------------------------------------------------
# CheckpointManager
# ---------------------------------------------------------------------------------------------------------------
def test_manager_names_keeps_last_and_points_to_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert mgr.latest() is None
    paths = [mgr.save({"epoch": e, "w": torch.full((2,), float(e))}, epoch=e) for e in (1, 2, 3, 4)]
    assert [os.path.basename(p) for p in paths] == [f"model.pth.tar-{e}" for e in (1, 2, 3, 4)]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("model")) == ["model.pth.tar-3", "model.pth.tar-4"]
    assert mgr.latest() == paths[-1]
    pointer = json.loads((tmp_path / "latest.json").read_text())
    assert pointer["latest"] == "model.pth.tar-4" and pointer["history"] == ["model.pth.tar-3", "model.pth.tar-4"]
    p = mgr.save({"it": 10}, epoch=4, iteration=10)
    assert os.path.basename(p) == "model-iter10.pth.tar" and mgr.latest() == p
    assert [os.path.basename(c) for c in mgr.checkpoints()] == ["model.pth.tar-4", "model-iter10.pth.tar"]
    assert leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="epoch or an iteration"):
        mgr.save({})
    with pytest.raises(ValueError):
        CheckpointManager(tmp_path, keep_last=0)


def test_manager_best(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save({"epoch": 1, "rank1": np.float64(0.5)}, epoch=1, is_best=True)
    mgr.save({"epoch": 2, "rank1": 0.4}, epoch=2, is_best=False)
    assert load_checkpoint(mgr.best())["epoch"] == 1  # kept although its periodic file was pruned
    assert not (tmp_path / "model.pth.tar-1").exists()
    mgr.save({"epoch": 3, "rank1": 0.7}, epoch=3, is_best=True)
    assert load_checkpoint(tmp_path / "model-best.pth.tar")["epoch"] == 3
    assert json.loads((tmp_path / "latest.json").read_text())["best_epoch"] == 3


def test_manager_failed_save_changes_nothing(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save({"epoch": 1}, epoch=1)
    good = mgr.save({"epoch": 2}, epoch=2)

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointWriteError, match="model.pth.tar-3"):
        mgr.save({"epoch": 3}, epoch=3, is_best=True)
    monkeypatch.undo()
    assert mgr.latest() == good
    assert (tmp_path / "model.pth.tar-1").exists()  # nothing pruned
    assert not (tmp_path / "model.pth.tar-3").exists() and not (tmp_path / "model-best.pth.tar").exists()
    assert leftovers(tmp_path) == []


def test_manager_resumes_history_across_instances(tmp_path):
    a = CheckpointManager(tmp_path, keep_last=2)
    a.save({"e": 1}, epoch=1)
    a.save({"e": 2}, epoch=2)
    b = CheckpointManager(tmp_path, keep_last=2)
    assert b.latest() == str(tmp_path / "model.pth.tar-2")
    b.save({"e": 3}, epoch=3)
    assert not (tmp_path / "model.pth.tar-1").exists()
    assert (tmp_path / "model.pth.tar-2").exists()


def test_manager_latest_without_pointer_uses_newest_file(tmp_path):
    # a directory written by torchreid itself (no pointer)
    for i, e in enumerate((5, 10, 2)):
        torch.save({"epoch": e}, tmp_path / f"model.pth.tar-{e}")
        os.utime(tmp_path / f"model.pth.tar-{e}", (1000 + i, 1000 + i))
    assert CheckpointManager(tmp_path).latest() == str(tmp_path / "model.pth.tar-2")
    (tmp_path / "latest.json").write_text(json.dumps({"latest": "model.pth.tar-99"}))  # dangling
    assert CheckpointManager(tmp_path).latest() == str(tmp_path / "model.pth.tar-2")
    assert CheckpointManager(tmp_path / "absent").latest() is None


def test_manager_removes_stale_temp_files(tmp_path):
    stale = tmp_path / (".model.pth.tar-3.abcd" + ckmod.TMP_SUFFIX)
    stale.write_bytes(b"partial")
    other = tmp_path / "notes.txt"
    other.write_text("keep")
    CheckpointManager(tmp_path)
    assert not stale.exists() and other.exists()


def test_manager_refuses_to_save_diverged_weights(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    model = Tiny()
    good = mgr.save({"state_dict": model.state_dict(), "epoch": 1}, epoch=1, is_best=True)
    with torch.no_grad():
        model.conv.weight[0, 0, 0, 0] = float("nan")
        model.bn.running_var[0] = float("inf")
    with pytest.raises(NonFiniteCheckpointError, match=r"model.pth.tar-2.*conv.weight, bn.running_var"):
        mgr.save({"state_dict": model.state_dict(), "epoch": 2}, epoch=2, is_best=True)
    assert mgr.latest() == good and os.listdir(tmp_path).count("model.pth.tar-2") == 0
    assert torch.isfinite(load_checkpoint(mgr.best())["state_dict"]["conv.weight"]).all()
    mgr.save({"state_dict": model.state_dict()}, epoch=2, require_finite=False)  # explicit opt-out
    assert mgr.latest().endswith("model.pth.tar-2")
