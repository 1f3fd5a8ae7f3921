"""Synthetic ReID datasets: determinism, Market-1501 protocol, torchreid integration, validation, manifests."""
import json
import os
import os.path as osp
import shutil
import warnings
from collections import defaultdict

import cv2
import numpy as np
import pytest

import ptl_torchreid.data as data
from ptl_torchreid._torchreid import torchreid
from ptl_torchreid.data import synthetic
from ptl_torchreid.data.synthetic import generate as generation

TINY = dict(num_train_ids=6, num_test_ids=5, num_cameras=3, images_per_id_per_camera=2, height=64, width=32,
            num_distractor_ids=2)


def tiny(**kw):
    return synthetic.make_params(**dict(TINY, **kw))


def generate(tmp_path, name="ds", **kw):
    path = str(tmp_path / name)
    manifest = data.prepare_synthetic_dataset(path, tiny(**kw), verbose=False)
    return path, manifest


def files(path):
    out = {}
    for d in synthetic.SPLIT_DIRS.values():
        for n in sorted(os.listdir(osp.join(path, d))):
            with open(osp.join(path, d, n), "rb") as f:
                out[d + "/" + n] = f.read()
    return out


def splits(path):
    return {s: data.read_split(osp.join(path, d)) for s, d in synthetic.SPLIT_DIRS.items()}


def labels(s):
    """Query pids, gallery pids, query cameras, gallery cameras of ``splits()``'s result, as arrays."""
    return (np.array([p for _, p, _ in s["query"]]), np.array([p for _, p, _ in s["gallery"]]),
            np.array([c for _, _, c in s["query"]]), np.array([c for _, _, c in s["gallery"]]))


@pytest.fixture
def restore_registrations():
    yield
    for name, (dataset_dir, _) in data.DEFAULT_DATASETS.items():
        data.register_synthetic_dataset(name, dataset_dir=dataset_dir)


# ---------------------------------------------------------------------------------------------------------------
# determinism

def test_same_seed_gives_identical_files(tmp_path):
    a, _ = generate(tmp_path, "a")
    b, _ = generate(tmp_path, "b")
    fa, fb = files(a), files(b)
    assert len(fa) > 0 and fa.keys() == fb.keys()
    assert all(fa[k] == fb[k] for k in fa)


def test_different_seed_differs(tmp_path):
    a, _ = generate(tmp_path, "a", seed=0)
    b, _ = generate(tmp_path, "b", seed=1)
    ia = cv2.imread(osp.join(a, "bounding_box_train", sorted(os.listdir(osp.join(a, "bounding_box_train")))[0]))
    ib = cv2.imread(osp.join(b, "bounding_box_train", sorted(os.listdir(osp.join(b, "bounding_box_train")))[0]))
    assert ia.shape == ib.shape == (64, 32, 3)
    assert np.abs(ia.astype(int) - ib.astype(int)).mean() > 5
    assert files(a) != files(b)


def test_images_of_one_identity_differ(tmp_path):
    path, _ = generate(tmp_path)
    by_key = defaultdict(list)
    for p, pid, cam in splits(path)["train"]:
        by_key[(pid, cam)].append(cv2.imread(p).astype(np.float32))
    for imgs in by_key.values():
        assert len(imgs) == TINY["images_per_id_per_camera"]
        assert np.abs(imgs[0] - imgs[1]).mean() > 2  # pose/position/lighting jitter, not copies


# ---------------------------------------------------------------------------------------------------------------
# protocol

@pytest.mark.parametrize("k", [1, 2])
def test_market1501_protocol(tmp_path, k):
    params = tiny(images_per_id_per_camera=k, num_test_ids=8, num_cameras=4, queries_per_id=4)
    path = str(tmp_path / "ds")
    manifest = data.prepare_synthetic_dataset(path, params, verbose=False)
    s = splits(path)
    train_pids = {pid for _, pid, _ in data.read_split(osp.join(path, "bounding_box_train"))}
    q_pids = {pid for _, pid, _ in s["query"]}
    g_pids = {pid for _, pid, _ in s["gallery"]}
    assert len(train_pids) == params.num_train_ids and len(q_pids) == params.num_test_ids
    assert not train_pids & g_pids
    assert q_pids <= g_pids
    assert len(g_pids - q_pids) == params.num_distractor_ids
    gallery = defaultdict(set)
    for _, pid, cam in s["gallery"]:
        gallery[pid].add(cam)
    query_cams = defaultdict(list)
    for _, pid, cam in s["query"]:
        assert gallery[pid] - {cam}, f"query of id {pid} in camera {cam} has no cross-camera match"
        query_cams[pid].append(cam)
    for pid, cams in query_cams.items():
        assert len(cams) == len(set(cams)), "at most one query per camera"
        assert len(cams) <= params.queries_per_id
        assert len(gallery[pid] | set(cams)) >= 2  # every test identity in at least two cameras
    cams_all = {cam for split in s.values() for _, _, cam in split}
    assert cams_all <= set(range(params.num_cameras))
    assert manifest["counts"] == {k_: len(v) for k_, v in s.items()}
    # torchreid's own Market-1501 evaluation accepts it: a perfect distance gives rank-1 = 1
    qp, gp, qc, gc = labels(s)
    dist = (qp[:, None] != gp[None]).astype(np.float32)
    cmc, mAP = torchreid.metrics.evaluate_rank(dist, qp, gp, qc, gc, max_rank=1, use_cython=False)
    assert cmc[0] == 1.0 and mAP == 1.0


def test_train_split_is_relabelled_and_names_parse(tmp_path):
    path, _ = generate(tmp_path)
    train = data.read_split(osp.join(path, "bounding_box_train"), relabel=True)
    assert sorted({pid for _, pid, _ in train}) == list(range(TINY["num_train_ids"]))
    raw = data.read_split(osp.join(path, "bounding_box_train"))
    assert all(data.parse_image_name(p, "market-style") == (pid, cam + 1) for p, pid, cam in raw)


def test_transfer_pair_is_disjoint_and_differs_in_style(tmp_path):
    src_dir, src_params = data.DEFAULT_DATASETS["synthetic_source"]
    tgt_dir, tgt_params = data.DEFAULT_DATASETS["synthetic_target"]
    assert src_dir != tgt_dir and src_params.style != tgt_params.style

    def pid_range(p):
        return set(range(p.id_offset + 1, p.id_offset + 1 + p.num_train_ids + p.num_test_ids + p.num_distractor_ids))

    assert not pid_range(src_params) & pid_range(tgt_params)
    assert not pid_range(src_params) & pid_range(data.DEFAULT_DATASETS["synthetic_reid"][1])
    # small versions that keep the id offsets and styles
    shrink = dict(num_train_ids=6, num_test_ids=4, num_distractor_ids=0, images_per_id_per_camera=2)
    src = str(tmp_path / "src")
    tgt = str(tmp_path / "tgt")
    data.prepare_synthetic_dataset(src, synthetic.make_params(src_params, **shrink), verbose=False)
    data.prepare_synthetic_dataset(tgt, synthetic.make_params(tgt_params, **shrink), verbose=False)
    ps = {pid for s in splits(src).values() for _, pid, _ in s}
    pt = {pid for s in splits(tgt).values() for _, pid, _ in s}
    assert ps and pt and not ps & pt

    def warmth(path):  # mean red minus blue over all images
        imgs = [cv2.imread(p).astype(np.float32) for s in splits(path).values() for p, _, _ in s]
        m = np.mean([im.reshape(-1, 3).mean(0) for im in imgs], 0)
        return m[2] - m[0]

    assert warmth(src) > warmth(tgt) + 10  # the indoor style is warm, the outdoor one cool


def test_cameras_have_their_own_domain(tmp_path):
    path, manifest = generate(tmp_path, num_cameras=4)
    cams = manifest["cameras"]
    assert len(cams) == 4
    for key in ("gain", "cast_bgr", "blur", "person_scale"):
        assert len({json.dumps(c[key]) for c in cams}) == 4, key


def test_histogram_baseline_is_above_chance_but_far_from_perfect(tmp_path):
    """A colour-histogram nearest neighbour (central region) must find identity cues across cameras, but the
    camera shifts must keep it far from solving the task."""
    params = synthetic.make_params(num_train_ids=2, num_test_ids=30, num_cameras=4, images_per_id_per_camera=2,
                                   num_distractor_ids=0, seed=3)
    path = str(tmp_path / "ds")
    data.prepare_synthetic_dataset(path, params, verbose=False)
    s = splits(path)

    def feat(p):
        img = cv2.imread(p)
        h, w = img.shape[:2]
        hsv = cv2.cvtColor(img[h // 8: h * 15 // 16, w // 4: w * 3 // 4], cv2.COLOR_BGR2HSV)
        hist = cv2.calcHist([hsv], [0, 1, 2], None, [16, 4, 4], [0, 180, 0, 256, 0, 256]).ravel()
        return np.sqrt(hist / hist.sum())

    fq = np.array([feat(p) for p, _, _ in s["query"]])
    fg = np.array([feat(p) for p, _, _ in s["gallery"]])
    dist = ((fq[:, None] - fg[None]) ** 2).sum(-1)
    qp, gp, qc, gc = labels(s)
    cmc, _ = torchreid.metrics.evaluate_rank(dist, qp, gp, qc, gc, max_rank=1, use_cython=False)
    chance = 1.0 / params.num_test_ids
    assert 4 * chance < cmc[0] < 0.8, cmc[0]


# ---------------------------------------------------------------------------------------------------------------
# torchreid integration and registration

def test_defaults_registered():
    reg = data.registered_synthetic_datasets()
    assert set(data.DEFAULT_DATASETS) <= set(reg)
    for cls in reg.values():
        assert issubclass(cls, torchreid.data.ImageDataset)


def test_image_data_manager_with_registered_tiny_dataset(tmp_path, restore_registrations):
    cls = data.register_synthetic_dataset("synthetic_reid", **TINY)
    assert data.registered_synthetic_datasets()["synthetic_reid"] is cls and cls.params == tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = torchreid.data.ImageDataManager(
            root=str(tmp_path), sources="synthetic_reid", height=64, width=32, batch_size_train=4,
            batch_size_test=8, workers=0, use_gpu=False, transforms=["random_flip"])
    assert dm.num_train_pids == TINY["num_train_ids"]
    assert dm.num_train_cams == TINY["num_cameras"]
    batch = next(iter(dm.train_loader))
    assert tuple(batch["img"].shape) == (4, 3, 64, 32)
    q = dm.test_loader["synthetic_reid"]["query"].dataset
    assert len(q) > 0 and all(item[1] > TINY["num_train_ids"] for item in q.query)
    assert osp.isfile(osp.join(str(tmp_path), "synthetic_reid", synthetic.MANIFEST))

    # re-registering the same name with other parameters rebinds it; the next load regenerates
    data.register_synthetic_dataset("synthetic_reid", **dict(TINY, num_train_ids=3))
    ds = torchreid.data.datasets.init_image_dataset("synthetic_reid", root=str(tmp_path), verbose=False)
    assert ds.num_train_pids == 3


def test_custom_name_and_dataset_dir(tmp_path, restore_registrations):
    data.register_synthetic_dataset("synthetic_tiny_test", dataset_dir="tiny_dir", **TINY)
    ds = torchreid.data.datasets.init_image_dataset("synthetic_tiny_test", root=str(tmp_path), verbose=False,
                                                    mode="query")
    assert osp.isdir(osp.join(str(tmp_path), "tiny_dir", "query"))
    assert len(ds) == len(ds.query) > 0


def test_registration_refuses_torchreid_names_and_bad_input():
    with pytest.raises(ValueError, match="already registered"):
        data.register_synthetic_dataset("market1501")
    with pytest.raises(ValueError, match="name"):
        data.register_synthetic_dataset("bad name/with slash")
    with pytest.raises(ValueError, match="dataset_dir"):
        data.register_synthetic_dataset("synthetic_x_bad_dir", dataset_dir="../elsewhere")
    with pytest.raises(TypeError, match="num_cameras"):
        data.register_synthetic_dataset("synthetic_x_bad_param", num_camera=3)
    assert "synthetic_x_bad_dir" not in data.registered_synthetic_datasets()


# ---------------------------------------------------------------------------------------------------------------
# parameter validation

@pytest.mark.parametrize("kw, exc, match", [
    (dict(num_cameras=1), ValueError, "num_cameras.*at least two cameras"),
    (dict(num_train_ids=1), ValueError, "num_train_ids"),
    (dict(num_test_ids=0), ValueError, "num_test_ids"),
    (dict(images_per_id_per_camera=0), ValueError, "images_per_id_per_camera"),
    (dict(height=8), ValueError, "height"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(num_cameras=2.5), TypeError, "num_cameras must be an integer"),
    (dict(num_train_ids=True), TypeError, "num_train_ids"),
    (dict(style="outdor"), ValueError, "did you mean 'outdoor'"),
    (dict(min_cameras_per_id=4, num_cameras=3), ValueError, "min_cameras_per_id"),
    (dict(max_cameras_per_id=5, num_cameras=3), ValueError, "max_cameras_per_id"),
    (dict(image_format="gif"), ValueError, "image_format"),
    (dict(num_ids=3), TypeError, "Unknown synthetic dataset parameter 'num_ids'"),
])
def test_param_validation(kw, exc, match):
    with pytest.raises(exc, match=match):
        synthetic.make_params(**kw)


def test_numpy_ints_are_accepted():
    p = synthetic.make_params(num_train_ids=np.int64(7))
    assert type(p.num_train_ids) is int and json.dumps(p.to_dict())


# ---------------------------------------------------------------------------------------------------------------
# manifest handling and crash safety

def test_up_to_date_folder_is_reused(tmp_path):
    path, m1 = generate(tmp_path)
    stamp = os.stat(osp.join(path, synthetic.MANIFEST)).st_mtime_ns
    m2 = data.prepare_synthetic_dataset(path, tiny(), verbose=False)
    assert m2 == m1 and os.stat(osp.join(path, synthetic.MANIFEST)).st_mtime_ns == stamp


def test_other_params_regenerate(tmp_path, capsys):
    path, _ = generate(tmp_path)
    m = data.prepare_synthetic_dataset(path, tiny(num_train_ids=3), verbose=True)
    assert "Regenerating" in capsys.readouterr().out
    assert m["params"]["num_train_ids"] == 3
    assert len({pid for _, pid, _ in splits(path)["train"]}) == 3
    assert not [n for n in os.listdir(str(tmp_path)) if n.startswith(".")]  # no temp/old folders left


def test_other_params_error_when_asked(tmp_path):
    path, _ = generate(tmp_path)
    before = files(path)
    with pytest.raises(RuntimeError, match=r"num_test_ids: 5 on disk vs 4 requested"):
        data.prepare_synthetic_dataset(path, tiny(num_test_ids=4), on_mismatch="error", verbose=False)
    assert files(path) == before


def test_stale_format_version_and_missing_files_regenerate(tmp_path):
    path, _ = generate(tmp_path)
    mpath = osp.join(path, synthetic.MANIFEST)
    with open(mpath) as f:
        m = json.load(f)
    m["format_version"] = synthetic.FORMAT_VERSION - 1
    with open(mpath, "w") as f:
        json.dump(m, f)
    with pytest.raises(RuntimeError, match="format version"):
        data.prepare_synthetic_dataset(path, tiny(), on_mismatch="error", verbose=False)
    assert data.prepare_synthetic_dataset(path, tiny(), verbose=False)["format_version"] == synthetic.FORMAT_VERSION
    victim = osp.join(path, "query", sorted(os.listdir(osp.join(path, "query")))[0])
    os.remove(victim)
    with pytest.raises(RuntimeError, match="holds .* images but the manifest records"):
        data.prepare_synthetic_dataset(path, tiny(), on_mismatch="error", verbose=False)
    data.prepare_synthetic_dataset(path, tiny(), verbose=False)
    assert osp.isfile(victim)


def test_foreign_folder_is_never_touched(tmp_path):
    path = tmp_path / "synthetic_reid"
    (path / "bounding_box_train").mkdir(parents=True)
    (path / "mine.txt").write_text("user data")
    with pytest.raises(RuntimeError, match="not a generated synthetic dataset.*left untouched"):
        data.prepare_synthetic_dataset(str(path), tiny(), verbose=False)
    assert (path / "mine.txt").read_text() == "user data"


def test_crash_mid_generation_leaves_nothing_half_written(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = generation.render_image

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "render_image", failing)
    path = str(tmp_path / "ds")
    with pytest.raises(KeyboardInterrupt):
        data.prepare_synthetic_dataset(path, tiny(), verbose=False)
    assert os.listdir(str(tmp_path)) == []
    # a failed regeneration keeps the previous complete folder
    monkeypatch.setattr(generation, "render_image", real)
    data.prepare_synthetic_dataset(path, tiny(), verbose=False)
    before = files(path)
    calls["n"] = 0
    monkeypatch.setattr(generation, "render_image", failing)
    with pytest.raises(KeyboardInterrupt):
        data.prepare_synthetic_dataset(path, tiny(num_train_ids=3), verbose=False)
    assert files(path) == before and os.listdir(str(tmp_path)) == ["ds"]


def test_old_leftovers_are_cleaned(tmp_path):
    old = tmp_path / ".ds.tmp-abc"
    old.mkdir()
    young = tmp_path / ".ds.tmp-def"
    young.mkdir()
    t = os.path.getmtime(str(old)) - 2 * generation.LEFTOVER_AGE_S
    os.utime(str(old), (t, t))
    generate(tmp_path, "ds")
    assert not old.exists() and young.exists()


def test_png_format_and_contact_sheet(tmp_path):
    path, _ = generate(tmp_path, image_format="png")
    names = os.listdir(osp.join(path, "bounding_box_train"))
    assert names and all(n.endswith(".png") for n in names)
    sheet = data.make_contact_sheet(path, num_ids=3, scale=1)
    assert sheet.dtype == np.uint8 and sheet.shape[1] == TINY["num_cameras"] * (32 + 4) + 4


def test_split_reading_and_the_checker_agree_on_what_an_image_is(tmp_path):
    path, _ = generate(tmp_path)
    train = osp.join(path, synthetic.SPLIT_DIRS["train"])
    shutil.copy(osp.join(train, sorted(os.listdir(train))[0]), osp.join(train, "0999_c1s1_000001_01.JPEG"))
    (tmp_path / "ds" / synthetic.SPLIT_DIRS["train"] / "notes.txt").write_text("not an image")
    (tmp_path / "ds" / synthetic.SPLIT_DIRS["train"] / ".0998_c1s1_000001_01.jpg").write_text("hidden")
    names = {osp.basename(p) for p, _, _ in data.read_split(train)}
    report = data.check_dataset_root(path, pattern="market-style", num_workers=1).splits["train"]
    assert "0999_c1s1_000001_01.JPEG" in names and not any(n.startswith(".") for n in names)
    assert report.num_images == len(names) and report.num_ignored == 1
