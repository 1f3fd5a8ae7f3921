"""Strict image reading, skip mode, and dataset checking (ptl_torchreid.data.reader / .check)."""
import contextlib
import os
import pickle
import signal
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from ptl_torchreid import _torchreid
from ptl_torchreid.data import reader
from ptl_torchreid.data.check import (
    DatasetRootError,
    check_dataset_root,
    format_report,
    parse_image_name,
)
from ptl_torchreid.data.reader import (
    ImageReadError,
    install_strict_reader,
    read_image,
    reset_skipped_images,
    skipped_images,
    strict_reader_installed,
    uninstall_strict_reader,
)

torchreid = _torchreid.torchreid


class Deadline(Exception):
    """Not an OSError, so torchreid's retry loop (which catches IOError) cannot swallow it."""


@contextlib.contextmanager
def deadline(seconds):
    def handler(signum, frame):
        raise Deadline(f"did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def write_jpg(path, seed=0, size=(32, 16)):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[0], size[1], 3)) * 255).astype("uint8")).save(path, quality=90)
    return str(path)


def write_truncated_jpg(path, seed=0):
    write_jpg(path, seed)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return str(path)


@pytest.fixture(autouse=True)
def _restore_reader():
    yield
    uninstall_strict_reader()
    reset_skipped_images()


# ---------------------------------------------------------------------------------------------------------------
# read_image
# ---------------------------------------------------------------------------------------------------------------
def test_reads_good_images_as_rgb(tmp_path):
    img = read_image(write_jpg(tmp_path / "a.jpg"))
    assert img.mode == "RGB" and img.size == (16, 32)
    Image.new("L", (5, 7)).save(tmp_path / "g.png")
    assert read_image(tmp_path / "g.png").mode == "RGB"


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "missing", "truncated_png", "directory"])
def test_bad_images_raise_fast_naming_the_file(tmp_path, kind):
    path = tmp_path / f"0001_c1_{kind}.jpg"
    if kind == "truncated":
        write_truncated_jpg(path)
    elif kind == "garbage":
        path.write_bytes(b"\xff\xd8 not really a jpeg" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated_png":
        path = tmp_path / "x.png"
        Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(path)
        path.write_bytes(path.read_bytes()[:-40])
    elif kind == "directory":
        path.mkdir()
    start = time.monotonic()
    with deadline(10), pytest.raises(ImageReadError) as ei:
        read_image(path)
    assert time.monotonic() - start < 5
    assert str(path) in str(ei.value) and ei.value.path == str(path)
    expected = {"truncated": "truncated", "truncated_png": "truncated", "empty": "empty", "missing": "does not exist",
                "garbage": "not a recognised image", "directory": "directory"}[kind]
    assert expected in str(ei.value)


def test_truncated_images_refused_even_if_pil_tolerance_was_enabled(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    path = write_truncated_jpg(tmp_path / "t.jpg")
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for everyone else


def test_image_read_error_survives_pickling_and_single_message_construction():
    err = ImageReadError("/d/x.jpg", "image file is truncated")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ImageReadError and back.path == "/d/x.jpg" and str(back) == str(err)
    assert str(ImageReadError("some message")) == "some message"  # how DataLoader re-raises it


# ---------------------------------------------------------------------------------------------------------------
# install_strict_reader
# ---------------------------------------------------------------------------------------------------------------
def make_dataset(items, transform=None):
    """A torchreid ImageDataset over ``items`` = [(path, pid, camid), ...]."""
    module = _torchreid.dataset_module()
    return module.ImageDataset(items, items, items, transform=transform, mode="train", verbose=False)


def test_install_makes_torchreid_datasets_raise_fast(tmp_path):
    bad = write_truncated_jpg(tmp_path / "0001_c1_bad.jpg")
    good = write_jpg(tmp_path / "0002_c1_good.jpg")
    ds = make_dataset([(bad, 0, 0), (good, 1, 0)])
    install_strict_reader()
    assert strict_reader_installed() and _torchreid.dataset_module().read_image is read_image
    start = time.monotonic()
    with deadline(10), pytest.raises(ImageReadError, match="0001_c1_bad.jpg"):
        ds[0]
    assert time.monotonic() - start < 5
    assert ds[1]["impath"] == good
    assert skipped_images() == 0


def test_skip_mode_substitutes_same_identity_and_counts(tmp_path, capsys):
    bad = write_truncated_jpg(tmp_path / "0001_c1_bad.jpg")
    other = write_jpg(tmp_path / "0002_c1.jpg", 1)
    same = write_jpg(tmp_path / "0001_c2.jpg", 2)
    ds = make_dataset([(bad, 0, 0), (other, 1, 0), (same, 0, 1)])
    install_strict_reader(skip_corrupt=True)
    with deadline(10):
        item = ds[0]
    assert item["impath"] == same and item["pid"] == 0
    assert skipped_images() == 1
    assert "0001_c1_bad.jpg" in capsys.readouterr().err
    ds[1]
    assert skipped_images() == 1
    reset_skipped_images()
    assert skipped_images() == 0


def test_skip_mode_falls_back_to_next_sample_then_gives_up(tmp_path):
    bad = write_truncated_jpg(tmp_path / "0001_c1_bad.jpg")
    other = write_jpg(tmp_path / "0002_c1.jpg", 1)
    install_strict_reader(skip_corrupt=True)
    assert make_dataset([(bad, 0, 0), (other, 1, 0)])[0]["impath"] == other
    all_bad = [(write_truncated_jpg(tmp_path / f"{i:04d}_c1.jpg"), i, 0) for i in range(reader.MAX_SUBSTITUTES + 3)]
    reset_skipped_images()
    with deadline(10), pytest.raises(ImageReadError, match="substitutes are all unreadable"):
        make_dataset(all_bad)[0]
    assert skipped_images() == reader.MAX_SUBSTITUTES + 1


def test_skip_count_and_errors_cross_dataloader_workers(tmp_path):
    import torchvision.transforms as T

    bad = write_truncated_jpg(tmp_path / "0001_c1_bad.jpg")
    goods = [write_jpg(tmp_path / f"000{i}_c1.jpg", i) for i in range(2, 5)]
    items = [(bad, 0, 0)] + [(g, i, 0) for i, g in enumerate(goods, 1)]
    ds = make_dataset(items, transform=T.ToTensor())
    install_strict_reader(skip_corrupt=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    with deadline(60):
        assert sum(len(b["pid"]) for b in loader) == 4
    assert skipped_images() == 1  # counted in the worker, visible here

    install_strict_reader(skip_corrupt=False)
    with deadline(60), pytest.raises(ImageReadError, match="0001_c1_bad.jpg"):
        list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1))


def test_install_is_idempotent_and_uninstall_restores(tmp_path):
    module = _torchreid.dataset_module()
    orig_read = module.read_image
    orig_getitem = vars(module.ImageDataset)["__getitem__"]
    orig_video = vars(module.VideoDataset)["__getitem__"]
    install_strict_reader(skip_corrupt=True)
    wrapped = vars(module.ImageDataset)["__getitem__"]
    install_strict_reader(skip_corrupt=False)
    install_strict_reader()
    assert vars(module.ImageDataset)["__getitem__"] is wrapped and wrapped.__wrapped__ is orig_getitem
    assert reader._State.skip_corrupt is False
    uninstall_strict_reader()
    uninstall_strict_reader()
    assert module.read_image is orig_read and orig_read is not read_image
    assert vars(module.ImageDataset)["__getitem__"] is orig_getitem
    assert vars(module.VideoDataset)["__getitem__"] is orig_video
    assert not strict_reader_installed()


# ---------------------------------------------------------------------------------------------------------------
# check_dataset_root
# ---------------------------------------------------------------------------------------------------------------
def make_market(root, train=(("0001", 1), ("0001", 2), ("0002", 1)), query=(("0001", 1), ("0002", 2)),
                gallery=(("0001", 3), ("0002", 1), ("-1", 2))):
    for sub, items in (("bounding_box_train", train), ("query", query), ("bounding_box_test", gallery)):
        d = root / sub
        d.mkdir(parents=True, exist_ok=True)
        for i, (pid, cam) in enumerate(items):
            write_jpg(d / f"{pid}_c{cam}s1_{i:06d}_00.jpg", seed=i)
    return root


def test_check_reports_bad_files_and_counts(tmp_path):
    root = make_market(tmp_path / "market")
    train = root / "bounding_box_train"
    (train / "0003_c1s1_000009_00.jpg").write_bytes(b"")
    write_truncated_jpg(train / "0004_c2s1_000010_00.jpg")
    write_jpg(train / "abc.jpg")
    write_jpg(train / "0005_c9s1_000011_00.jpg")  # camera out of range for Market-1501
    write_jpg(root / "query" / "9999_c1s1_000001_00.jpg")  # identity out of range
    (train / "Thumbs.db").write_bytes(b"x")

    report = check_dataset_root(root, num_workers=2)
    tr, q, g = report.splits["train"], report.splits["query"], report.splits["gallery"]
    assert (tr.num_images, tr.num_ok, tr.num_ignored) == (7, 3, 1)
    assert tr.empty == [str(train / "0003_c1s1_000009_00.jpg")]
    assert [p.path for p in tr.unreadable] == [str(train / "0004_c2s1_000010_00.jpg")]
    assert sorted(os.path.basename(p.path) for p in report.mislabeled) == [
        "0005_c9s1_000011_00.jpg", "9999_c1s1_000001_00.jpg", "abc.jpg"]
    assert any("camera 9" in p.reason for p in tr.mislabeled)
    assert tr.pids == {1, 2} and tr.cams == {1, 2}
    assert g.num_junk == 1 and g.pids == {1, 2} and q.num_images == 3
    assert not report.ok and report.problems == []

    table = format_report(report)
    assert table == report.format_table()
    lines = table.splitlines()
    assert lines[1].split() == ["split", "images", "ok", "empty", "unreadable", "mislabeled", "junk", "ids", "cams"]
    assert lines[3].split() == ["train", "7", "3", "1", "1", "2", "0", "2", "2"]
    assert "0004_c2s1_000010_00.jpg" in table and "abc.jpg" in table and "Empty files (1)" in table


def test_check_clean_dataset_is_ok(tmp_path):
    report = check_dataset_root(make_market(tmp_path / "m"))
    assert report.ok and "OK: no problems found." in format_report(report)


def test_check_finds_nested_layout(tmp_path):
    make_market(tmp_path / "data" / "market1501" / "Market-1501-v15.09.15")
    report = check_dataset_root(tmp_path / "data")
    assert report.root == str(tmp_path / "data" / "market1501" / "Market-1501-v15.09.15") and report.ok


def test_check_missing_or_empty_root_says_where_data_was_expected(tmp_path):
    with pytest.raises(DatasetRootError, match=r"absent.*does not exist.*bounding_box_train"):
        check_dataset_root(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetRootError, match=r"empty.*contains none of.*bounding_box_train"):
        check_dataset_root(tmp_path / "empty")
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (tmp_path / "hollow" / sub).mkdir(parents=True)
    with pytest.raises(DatasetRootError, match="holds no images"):
        check_dataset_root(tmp_path / "hollow")
    assert isinstance(DatasetRootError("x"), FileNotFoundError)


def test_check_dataset_level_problems(tmp_path):
    root = make_market(tmp_path / "onecam", query=(("0001", 1),), gallery=(("0001", 1), ("0002", 1)))
    (root / "bounding_box_train").rename(root / "elsewhere")
    report = check_dataset_root(root)
    text = " | ".join(report.problems)
    assert "train" in text and "missing" in text
    assert "1 camera(s)" in text and "evaluation is impossible" in text
    assert not report.ok and "missing" in format_report(report)


def test_parse_image_name():
    assert parse_image_name("/x/0002_c1s1_000451_03.jpg") == (2, 1)
    assert parse_image_name("-1_c3s1_000451_03.jpg") == (-1, 3)
    assert parse_image_name("7000_c8_f1.jpg", "dukemtmcreid") == (7000, 8)
    with pytest.raises(ValueError, match="camera 7"):
        parse_image_name("0002_c7s1.jpg")
    with pytest.raises(ValueError, match="does not follow"):
        parse_image_name("c1_0002.jpg")
    with pytest.raises(ValueError, match="Unknown naming pattern"):
        parse_image_name("0002_c1.jpg", "nope")


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40), st.sampled_from(["market1501", "dukemtmcreid", "market-style"]))
def test_parse_image_name_fuzz_only_raises_value_error(name, pattern):
    try:
        pid, cam = parse_image_name(name, pattern)
    except ValueError as e:
        assert str(e)
    else:
        assert isinstance(pid, int) and isinstance(cam, int)
