"""Config: torchreid-compatible defaults, strict merging, validation, kwargs mappers, shipped configs."""
import glob
import inspect
import os.path as osp

import pytest
from yacs.config import CfgNode as CN

from ptl_torchreid import _torchreid, engine, models
from ptl_torchreid.config import (
    PTL_EVAL_STATES,
    PTL_RESET_POLICIES,
    PTL_STATE_MODES,
    ConfigError,
    add_ptl_config,
    config_keys,
    engine_kwargs,
    engine_run_kwargs,
    get_default_config,
    imagedata_kwargs,
    load_config,
    lr_scheduler_kwargs,
    merge_from_file,
    merge_from_list,
    model_kwargs,
    nearest_keys,
    optimizer_kwargs,
    synthetic_kwargs,
    torchreid_default_config,
    validate_config,
)
from ptl_torchreid.engine import PTLImageSoftmaxEngine, PTLImageTripletEngine, build_optimizer

torchreid = _torchreid.torchreid
REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = sorted(glob.glob(osp.join(REPO, "configs", "*.yaml")))

PTL_KEYS = {"ptl.state_mode", "ptl.eval_state", "ptl.momentum", "ptl.reset_policy", "ptl.reset_every_n_iters",
            "ptl.freeze_backbone_epochs", "ptl.lr_mult", "ptl.mode", "ptl.head", "ptl.rectify_stages",
            "ptl.side_pool", "ptl.cell_init", "ptl.cell_type", "ptl.stage3_tap"}


def test_defaults_use_torchreid_key_names_plus_ptl_section():
    keys = set(config_keys())
    torchreid_keys = {
        "model.name", "model.pretrained", "model.load_weights", "model.resume", "data.type", "data.root",
        "data.sources", "data.targets", "data.workers", "data.split_id", "data.height", "data.width",
        "data.combineall", "data.transforms", "data.k_tfm", "data.norm_mean", "data.norm_std", "data.save_dir",
        "data.load_train_targets", "market1501.use_500k_distractors", "cuhk03.labeled_images",
        "cuhk03.classic_split", "cuhk03.use_metric_cuhk03", "sampler.train_sampler", "sampler.train_sampler_t",
        "sampler.num_instances", "sampler.num_cams", "sampler.num_datasets", "train.optim", "train.lr",
        "train.weight_decay", "train.max_epoch", "train.start_epoch", "train.batch_size", "train.fixbase_epoch",
        "train.open_layers", "train.staged_lr", "train.new_layers", "train.base_lr_mult", "train.lr_scheduler",
        "train.stepsize", "train.gamma", "train.print_freq", "train.seed", "sgd.momentum", "sgd.dampening",
        "sgd.nesterov", "rmsprop.alpha", "adam.beta1", "adam.beta2", "loss.name", "loss.softmax.label_smooth",
        "loss.triplet.margin", "loss.triplet.weight_t", "loss.triplet.weight_x", "test.batch_size",
        "test.dist_metric", "test.normalize_feature", "test.ranks", "test.evaluate", "test.eval_freq",
        "test.start_eval", "test.rerank", "test.visrank", "test.visrank_topk", "use_gpu",
    }
    assert torchreid_keys <= keys
    assert {k for k in keys if k.startswith("ptl.")} == PTL_KEYS
    assert {k for k in keys if k.startswith("data.synthetic.")} == {
        "data.synthetic." + k for k in ("num_train_ids", "num_test_ids", "num_cameras",
                                        "images_per_id_per_camera", "seed")}
    validate_config(get_default_config())


def test_overrides_are_typed():
    cfg = get_default_config()
    merge_from_list(cfg, ["train.lr", "0.01", "train.max_epoch", "3", "test.ranks", "[1, 3]",
                          "data.sources", "market1501", "train.amp", "true", "ptl.lr_mult", "10",
                          "use_gpu", "False", "data.root", "/x/y"])
    assert cfg.train.lr == 0.01 and cfg.train.max_epoch == 3 and cfg.test.ranks == [1, 3]
    assert cfg.data.sources == ["market1501"]  # a single value for a list key
    assert cfg.train.amp is True and cfg.use_gpu is False
    assert isinstance(cfg.ptl.lr_mult, float) and cfg.ptl.lr_mult == 10.0
    assert cfg.data.root == "/x/y"


def test_unknown_key_names_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'.*'train\.lr'"):
        merge_from_list(get_default_config(), ["train.lrr", "0.1"])
    with pytest.raises(ConfigError, match=r"'ptl\.lr_mult'"):
        merge_from_list(get_default_config(), ["ptl.lr_mul", "2"])
    with pytest.raises(ConfigError, match=r"'ptl\.reset_policy'"):
        merge_from_list(get_default_config(), ["reset_policy", "never"])
    assert nearest_keys("ptl.freeze_backbone", get_default_config())[0] == "ptl.freeze_backbone_epochs"


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_epochs: 3\n")
    with pytest.raises(ConfigError) as e:
        merge_from_file(get_default_config(), str(path))
    assert "train.max_epochs" in str(e.value) and str(path) in str(e.value) and "'train.max_epoch'" in str(e.value)


def test_wrong_types_are_errors(tmp_path):
    for opts, key in ((["train.lr", "fast"], "train.lr"), (["train.max_epoch", "2.5"], "train.max_epoch"),
                      (["test.ranks", "['a']"], "test.ranks"), (["train.amp", "maybe"], "train.amp"),
                      (["model.name", "[1, 2]"], "model.name")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            merge_from_list(get_default_config(), opts)
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        merge_from_list(get_default_config(), ["train.lr"])
    with pytest.raises(ConfigError, match="is a section"):
        merge_from_list(get_default_config(), ["ptl", "1"])


@pytest.mark.parametrize("opts, key", [
    (["train.lr", "-0.1"], "train.lr"),
    (["model.name", "resnet5O"], "model.name"),
    (["data.sources", "market1502"], "data.sources"),
    (["sampler.train_sampler", "RandomIdentitySampler", "train.batch_size", "30"], "train.batch_size"),
    (["sampler.train_sampler", "RandomIdentitySampler", "train.batch_size", "2"], "train.batch_size"),
    (["ptl.reset_policy", "iter"], "ptl.reset_every_n_iters"),
    (["ptl.reset_policy", "epochs"], "ptl.reset_policy"),
    (["ptl.freeze_backbone_epochs", "-2"], "ptl.freeze_backbone_epochs"),
    (["ptl.lr_mult", "0"], "ptl.lr_mult"),
    (["ptl.momentum", "1.5"], "ptl.momentum"),
    (["ptl.state_mode", "batch"], "ptl.state_mode"),
    (["ptl.eval_state", "last"], "ptl.eval_state"),
    (["test.visrank", "True"], "test.visrank"),
    (["test.ranks", "[0, 1]"], "test.ranks"),
    (["loss.name", "arcface"], "loss.name"),
    (["data.transforms", "random_flips"], "data.transforms"),
    (["data.synthetic.num_cameras", "1"], "data.synthetic.num_cameras"),
    (["use_gpu", "sometimes"], "use_gpu"),
    (["train.start_epoch", "5", "train.max_epoch", "2"], "train.start_epoch"),
    (["loss.name", "triplet", "loss.triplet.weight_t", "0", "loss.triplet.weight_x", "0"], "weight_t"),
])
def test_validation_rejects_impossible_values(opts, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(opts=opts)


def test_validation_suggests_nearest_model_and_dataset():
    with pytest.raises(ConfigError, match="Did you mean 'resnet50'"):
        load_config(opts=["model.name", "resnet5O"])
    with pytest.raises(ConfigError, match="Did you mean 'market1501'"):
        load_config(opts=["data.sources", "market1502"])


def test_flags_and_save_dir_placeholders():
    cfg = load_config(sources=["dukemtmcreid"], targets=["market1501"], transforms=["random_flip", "random_erase"],
                      root="/data", opts=["data.save_dir", "log/{model}_{sources}_to_{targets}",
                                          "model.name", "osnet_x0_25"])
    assert cfg.data.sources == ["dukemtmcreid"] and cfg.data.targets == ["market1501"]
    assert cfg.data.transforms == ["random_flip", "random_erase"] and cfg.data.root == "/data"
    assert cfg.data.save_dir == "log/osnet_x0_25_dukemtmcreid_to_market1501"
    with pytest.raises(ConfigError, match="placeholder"):
        load_config(opts=["data.save_dir", "log/{modle}"])


def test_kwargs_mappers_match_torchreid_signatures():
    cfg = load_config(opts=["model.name", "ptl_osnet_x0_25", "loss.name", "triplet"])

    def accepted(fn):
        return set(inspect.signature(fn).parameters)

    assert set(imagedata_kwargs(cfg)) <= accepted(torchreid.data.ImageDataManager.__init__)
    assert set(lr_scheduler_kwargs(cfg)) <= accepted(torchreid.optim.build_lr_scheduler)
    assert set(optimizer_kwargs(cfg)) - {"lr_mult"} <= accepted(torchreid.optim.build_optimizer)
    assert set(engine_run_kwargs(cfg)) == accepted(torchreid.engine.ImageSoftmaxEngine.run) - {"self"}
    assert set(engine_run_kwargs(cfg)) == accepted(PTLImageTripletEngine.run) - {"self"}
    assert set(engine_kwargs(cfg)) >= {"margin", "weight_t", "weight_x", "reset_policy", "freeze_backbone_epochs"}
    assert lr_scheduler_kwargs(cfg)["stepsize"] == 20  # single_step takes an int
    assert model_kwargs(cfg, 10) == {"name": "ptl_osnet_x0_25", "num_classes": 10, "loss": "triplet",
                                     "pretrained": True, "state_mode": "dataset", "eval_state": "running",
                                     "momentum": 0.1, "input_size": (256, 128), "mode": "rectify",
                                     "head": "residual", "rectify_stages": ("stage1", "stage2", "stage3", "last"),
                                     "side_pool": "avg", "cell_init": "fan_out", "cell_type": "bconv",
                                     "stage3_tap": "stage"}
    plain = load_config(opts=["model.name", "osnet_x0_25"])
    assert "state_mode" not in model_kwargs(plain, 10)  # PTL options only for PTL models
    assert synthetic_kwargs(cfg) == {}  # -1: each synthetic dataset keeps its own defaults
    sized = load_config(opts=["data.synthetic.num_train_ids", "6", "data.synthetic.seed", "0"])
    assert synthetic_kwargs(sized) == {"num_train_ids": 6, "seed": 0}
    softmax = load_config()
    assert "margin" not in engine_kwargs(softmax)
    assert PTLImageSoftmaxEngine is not None and build_optimizer is not None


def test_every_shipped_config_loads_and_validates():
    names = {osp.basename(p) for p in CONFIGS}
    assert "synthetic_demo.yaml" in names
    for ds in ("market1501", "dukemtmcreid", "msmt17", "cuhk03"):
        assert {f"ptl_resnet50_{ds}.yaml", f"resnet50_{ds}.yaml"} <= names
    for path in CONFIGS:
        with open(path) as f:
            first = f.readline()
        assert first.startswith("# "), f"{path} must start with a comment saying what it reproduces"
        load_config(path)


def test_baseline_twins_differ_only_in_model_name():
    pairs = 0
    for path in CONFIGS:
        name = osp.basename(path)
        if not name.startswith("ptl_"):
            continue
        twin = osp.join(osp.dirname(path), name[len("ptl_"):])
        assert osp.isfile(twin), f"{name} has no baseline twin"
        ptl = load_config(path, validate=False)
        base = load_config(twin, validate=False)
        assert ptl.model.name == "ptl_" + base.model.name
        ptl.model.name = base.model.name
        # save_dir holds the {model} placeholder, so the two runs log to different folders.
        assert ptl.data.save_dir != base.data.save_dir
        ptl.data.save_dir = base.data.save_dir = ""
        assert ptl == base, name
        pairs += 1
    assert pairs >= 7  # 4 datasets, 2 cross-domain settings, the synthetic transfer pair


def test_reference_recipe_in_real_dataset_configs():
    for path in CONFIGS:
        cfg = load_config(path)
        if cfg.data.sources[0].startswith("synthetic"):
            continue
        assert (cfg.data.height, cfg.data.width) == (256, 128)
        assert cfg.sampler.train_sampler == "RandomIdentitySampler" and cfg.sampler.num_instances == 4
        assert cfg.train.optim == "adam" and cfg.loss.softmax.label_smooth
        assert cfg.loss.name == "triplet" and cfg.loss.triplet.margin == 0.3
        assert {"random_flip", "random_erase"} <= set(cfg.data.transforms)


def test_cross_domain_configs():
    by_name = {osp.basename(p): load_config(p) for p in CONFIGS}
    ft = by_name["ptl_resnet50_msmt17_to_market1501.yaml"]
    assert ft.model.load_weights.startswith(by_name["resnet50_msmt17.yaml"].data.save_dir)
    assert ft.data.sources == ["market1501"] and ft.model.load_weights_mode == "match"
    dt = by_name["ptl_resnet50_market1501_to_dukemtmcreid.yaml"]
    assert dt.data.sources == ["market1501"] and dt.data.targets == ["dukemtmcreid"]
    pre = by_name["osnet_x0_25_synthetic_source.yaml"]
    tgt = by_name["ptl_osnet_x0_25_synthetic_source_to_target.yaml"]
    assert pre.data.sources == ["synthetic_source"] and tgt.data.sources == ["synthetic_target"]
    assert tgt.model.load_weights.startswith(pre.data.save_dir + "/")


def test_add_ptl_config_extends_a_torchreid_style_config():
    # a torchreid user's own config: torchreid's keys and a section of their own
    cfg = torchreid_default_config()
    assert "ptl" not in cfg and "amp" not in cfg.train and "synthetic" not in cfg.data
    cfg.mine = CN()
    cfg.mine.alpha = 0.5
    cfg.train.lr = 0.01
    assert add_ptl_config(cfg) is cfg
    assert cfg.mine.alpha == 0.5 and cfg.train.lr == 0.01  # what was there stays
    assert set(config_keys(cfg)) == set(config_keys()) | {"mine.alpha"}
    merge_from_list(cfg, ["ptl.mode", "rectify", "model.name", "ptl_osnet_x0_25", "mine.alpha", "2"])
    assert validate_config(cfg).ptl.mode == "rectify" and cfg.mine.alpha == 2.0
    assert torchreid_default_config() != get_default_config()
    assert add_ptl_config(torchreid_default_config()) == get_default_config()


def test_choice_lists_and_checks_come_from_their_owners():
    assert PTL_STATE_MODES is models.STATE_MODES and PTL_EVAL_STATES is models.EVAL_STATES
    assert PTL_RESET_POLICIES is models.RESET_POLICIES is engine.RESET_POLICIES
    # the cell's own check decides what ptl.momentum accepts, and says how to fix it; the config names the key
    with pytest.raises(models.InvalidOption) as owner:
        models.check_state_options("dataset", "running", 2.0)
    cfg = get_default_config()
    merge_from_list(cfg, ["ptl.momentum", "2.0"])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert str(e.value) == f"ptl.momentum = 2.0 is not valid; {owner.value.requirement}"
    merge_from_list(cfg, ["ptl.momentum", "1.0"])
    validate_config(cfg)


@pytest.mark.parametrize("opts, key, kwargs", [
    (["ptl.reset_policy", "iter", "ptl.reset_every_n_iters", "0"], "ptl.reset_every_n_iters",
     {"reset_policy": "iter", "reset_every_n_iters": 0}),
    (["ptl.freeze_backbone_epochs", "-3"], "ptl.freeze_backbone_epochs", {"freeze_backbone_epochs": -3}),
])
def test_engine_and_config_share_one_check_of_the_training_options(opts, key, kwargs):
    cfg = get_default_config()
    merge_from_list(cfg, opts)
    with pytest.raises(ConfigError) as from_config:
        validate_config(cfg)
    # the engine refuses the same values with the same requirement, before it touches its arguments
    with pytest.raises(models.InvalidOption) as from_engine:
        PTLImageSoftmaxEngine(None, None, None, **kwargs)
    engine_error = from_engine.value
    assert str(from_config.value) == f"{key} = {engine_error.value!r} is not valid; {engine_error.requirement}"
