"""The user's own data from the command line: Market-style folders, list files, data without camera ids."""
import os.path as osp

import cv2
import numpy as np
import pytest

from ptl_torchreid.cli import main
from ptl_torchreid.data.user import NO_CAMERA_NOTE, read_list_file

RUN = ["model.name", "ptl_osnet_x0_25", "model.pretrained", "False", "use_gpu", "False", "data.height", "64",
       "data.width", "32", "data.workers", "0", "train.batch_size", "4", "train.max_epoch", "1",
       "train.progress_bar", "False", "test.batch_size", "16", "sampler.train_sampler", "RandomIdentitySampler",
       "sampler.num_instances", "2"]


def write_image(path, seed):
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(0, 255, (32, 16, 3), dtype=np.uint8))


def make_folder(root):
    """Market-1501 layout: 4 training ids, 3 test ids, 2 cameras, 2 images each."""
    n = 0
    layout = {"bounding_box_train": range(1, 5), "query": range(10, 13), "bounding_box_test": range(10, 13)}
    for sub, ids in layout.items():
        (root / sub).mkdir(parents=True)
        for pid in ids:
            for cam in (1, 2):
                for k in range(1 if sub == "query" else 2):
                    write_image(root / sub / f"{pid:04d}_c{cam}s1_{k:06d}_00.jpg", n)
                    n += 1
    return root


def make_lists(root, folder, no_camera=False):
    """List files over the images of ``folder`` (paths relative to the list files)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, sub in (("train", "bounding_box_train"), ("query", "query"), ("gallery", "bounding_box_test")):
        lines = []
        for p in sorted((folder / sub).iterdir()):
            pid, cam = int(p.name[:4]), int(p.name[6])
            rel = osp.relpath(str(p), str(root))
            lines.append(f"{rel} {pid}" if no_camera else f"{rel} {pid} {cam}")
        (root / (split + ".txt")).write_text("# path pid camid\n" + "\n".join(lines) + "\n")
    return root


def train_once(source, save_dir, capsys):
    status = main(["-s", source, "-t", source] + RUN + ["data.save_dir", str(save_dir)])
    out = capsys.readouterr()
    assert status == 0, out.err
    assert "| target" in out.out and "Rank-1" in out.out
    assert (save_dir / "model" / "model-best.pth.tar").is_file()
    return out.out


def test_folder_source_trains_and_evaluates(tmp_path, capsys):
    folder = make_folder(tmp_path / "mydata")
    train_once(str(folder), tmp_path / "log", capsys)
    assert main(["check-data", "-s", "folder:" + str(folder)]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_list_file_source_trains_and_evaluates(tmp_path, capsys):
    lists = make_lists(tmp_path / "lists", make_folder(tmp_path / "images"))
    train_once("list:" + str(lists / "train.txt"), tmp_path / "log", capsys)
    assert main(["check-data", "-s", str(lists)]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_no_camera_source_says_what_protocol_it_implies(tmp_path, capsys):
    lists = make_lists(tmp_path / "lists", make_folder(tmp_path / "images"), no_camera=True)
    out = train_once("nocam:" + str(lists), tmp_path / "log", capsys)
    assert NO_CAMERA_NOTE in out
    # without the prefix, a two-column line is an error that names the file and the line and says what to do
    assert main(["check-data", "-s", str(lists)]) == 2
    err = capsys.readouterr().err
    assert 'train.txt", line 2' in err and "nocam:" in err


def test_bad_list_line_is_an_error_naming_the_line(tmp_path, capsys):
    lists = make_lists(tmp_path / "lists", make_folder(tmp_path / "images"))
    text = (lists / "gallery.txt").read_text().splitlines()
    text[3] = text[3].split()[0] + " seven 1"
    (lists / "gallery.txt").write_text("\n".join(text) + "\n")
    assert main(["-s", str(lists), "-t", str(lists)] + RUN + ["data.save_dir", str(tmp_path / "log")]) == 2
    err = capsys.readouterr().err
    assert 'gallery.txt", line 4' in err and "integers" in err and "Traceback" not in err
    assert main(["check-data", "-s", str(lists)]) == 2
    assert 'gallery.txt", line 4' in capsys.readouterr().err


def test_list_file_errors(tmp_path):
    write_image(tmp_path / "a.jpg", 0)
    (tmp_path / "l.txt").write_text("a.jpg 3 1\n\nmissing.jpg 3 1\n")
    with pytest.raises(ValueError, match=r'line 3: image ".*missing.jpg" does not exist'):
        read_list_file(str(tmp_path / "l.txt"))
    (tmp_path / "l.txt").write_text("a.jpg 3 1 extra\n")
    with pytest.raises(ValueError, match="line 1: expected 'path pid camid'"):
        read_list_file(str(tmp_path / "l.txt"))


def test_missing_source_folder_names_the_key(tmp_path, capsys):
    assert main(["-s", str(tmp_path / "nowhere") + "/"] + RUN) == 2
    assert "data.sources" in capsys.readouterr().err
