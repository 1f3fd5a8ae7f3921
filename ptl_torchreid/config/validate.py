"""Validation: reject impossible or inconsistent values before any work starts, naming the key and the fix.

The options of the cells and the PTL model are checked by their owners' functions
(``models.check_state_options``, ``models.check_options``, ``models.ptl.check_stages``), whose
:class:`~ptl_torchreid.models.options.InvalidOption` becomes an error naming the ``ptl.*`` key; choice lists
come from the modules that own them.
"""
import ptl_torchreid.data  # noqa: F401  (registers the synthetic datasets with torchreid)
from ptl_torchreid import _torchreid
from ptl_torchreid.data import registered_synthetic_datasets
from ptl_torchreid.data.check import DatasetRootError
from ptl_torchreid.data.user import register_user_sources
from ptl_torchreid.models import (
    InvalidOption,
    available_models,
    check_freeze_epochs,
    check_options,
    check_reset_options,
    check_state_options,
)
from ptl_torchreid.models.ptl import INPUT_SIZE_MULTIPLE, LOSSES, check_stages
from ptl_torchreid.utils.cpu_threads import is_valid_setting as is_valid_cpu_threads

from .errors import ConfigError, choice_error, option_error
from .kwargs import is_ptl_model_name, resume_path

__all__ = ["validate_config", "is_synthetic_dataset", "torchreid_image_datasets", "torchreid_choices",
           "DIST_METRICS", "TRANSFORMS", "AMP_DTYPES", "LOAD_WEIGHTS_MODES"]

DIST_METRICS = ("euclidean", "cosine")
TRANSFORMS = ("random_flip", "random_crop", "random_patch", "color_jitter", "random_erase")
AMP_DTYPES = ("auto", "fp16", "bf16")
LOAD_WEIGHTS_MODES = ("strict", "match")


def _choice(key, value, choices):
    if value not in choices:
        raise choice_error(key, value, choices)


def _check(cond, key, value, requirement):
    if not cond:
        raise ConfigError(f"{key} = {value!r} is invalid: {requirement}")


def is_synthetic_dataset(name):
    """Whether ``name`` is one of the embedded synthetic datasets (generated, never downloaded)."""
    return name in registered_synthetic_datasets()


# torchreid lookups that have no public API. They belong with the rest of torchreid's layout knowledge in
# ptl_torchreid._torchreid; they are kept together here so they can move there as one block.


def torchreid_image_datasets():
    """torchreid's image-dataset registry (name -> class), including the registered synthetic datasets."""
    return _torchreid.image_dataset_registry()


def torchreid_choices():
    """Names torchreid accepts for samplers, optimizers and LR schedulers."""
    return _torchreid.training_choices()


def _register_user_sources(cfg):
    """Folder / list-file / no-camera sources (``ptl_torchreid.data.user``) become torchreid datasets."""
    for key in ("data.sources", "data.targets"):
        try:
            register_user_sources(cfg.data[key.split(".")[1]])
        except DatasetRootError as e:
            raise ConfigError(f"{key}: {e}") from None


def validate_config(cfg):
    """Reject impossible or inconsistent values before any work starts (raises :class:`ConfigError`)."""
    choices = torchreid_choices()
    _choice("model.name", cfg.model.name, available_models())
    _choice("model.load_weights_mode", cfg.model.load_weights_mode, LOAD_WEIGHTS_MODES)
    _choice("data.type", cfg.data.type, ("image",))
    _choice("loss.name", cfg.loss.name, LOSSES)

    _register_user_sources(cfg)
    datasets = sorted(torchreid_image_datasets())
    for key in ("data.sources", "data.targets"):
        names = cfg.data[key.split(".")[1]]
        _check(len(names) > 0, key, names, "give at least one dataset name")
        for name in names:
            _choice(key, name, datasets)
    if cfg.data.load_train_targets:
        overlap = set(cfg.data.sources) & set(cfg.data.targets)
        _check(
            not overlap,
            "data.load_train_targets",
            True,
            f"sources and targets must not overlap (both contain {sorted(overlap)})",
        )
    for t in cfg.data.transforms:
        _choice("data.transforms", t.lower(), TRANSFORMS)
    _check(cfg.data.height > 0, "data.height", cfg.data.height, "must be positive")
    _check(cfg.data.width > 0, "data.width", cfg.data.width, "must be positive")
    if is_ptl_model_name(cfg.model.name):
        # the side stream follows the backbone's stride-32 taps, which only line up for such sizes
        m = INPUT_SIZE_MULTIPLE
        for key in ("height", "width"):
            size = cfg.data[key]
            _check(
                size % m == 0,
                "data." + key,
                size,
                f"{cfg.model.name} needs a multiple of {m} (its side stream follows the backbone's stride-{m} "
                f"taps); use {max(m, size // m * m)} or {(size // m + 1) * m}",
            )
    _check(cfg.data.workers >= 0, "data.workers", cfg.data.workers, "must be >= 0")
    _check(cfg.data.k_tfm >= 1, "data.k_tfm", cfg.data.k_tfm, "must be >= 1")
    _check(cfg.data.split_id >= 0, "data.split_id", cfg.data.split_id, "must be >= 0")
    _check(len(cfg.data.norm_mean) == 3, "data.norm_mean", cfg.data.norm_mean, "needs 3 values (RGB)")
    _check(
        len(cfg.data.norm_std) == 3 and all(s > 0 for s in cfg.data.norm_std),
        "data.norm_std",
        cfg.data.norm_std,
        "needs 3 positive values (RGB)",
    )
    _check(bool(cfg.data.save_dir), "data.save_dir", cfg.data.save_dir, "must not be empty")
    _check(bool(cfg.data.root), "data.root", cfg.data.root, "must not be empty (the folder holding the datasets)")
    syn = cfg.data.synthetic
    unset = " (or -1 for the dataset's own default)"
    _check(
        syn.num_train_ids == -1 or syn.num_train_ids >= 2,
        "data.synthetic.num_train_ids",
        syn.num_train_ids,
        "softmax training needs at least 2 identities" + unset,
    )
    for k in ("num_test_ids", "images_per_id_per_camera"):
        _check(syn[k] == -1 or syn[k] >= 1, "data.synthetic." + k, syn[k], "must be >= 1" + unset)
    _check(
        syn.num_cameras == -1 or syn.num_cameras >= 2,
        "data.synthetic.num_cameras",
        syn.num_cameras,
        "needs at least 2 cameras (query and gallery come from different cameras)" + unset,
    )
    _check(syn.seed >= -1, "data.synthetic.seed", syn.seed, "must be >= 0" + unset)

    _choice("sampler.train_sampler", cfg.sampler.train_sampler, choices["samplers"])
    _choice("sampler.train_sampler_t", cfg.sampler.train_sampler_t, choices["samplers"])
    _check(cfg.sampler.num_instances >= 1, "sampler.num_instances", cfg.sampler.num_instances, "must be >= 1")
    _check(cfg.sampler.num_cams >= 1, "sampler.num_cams", cfg.sampler.num_cams, "must be >= 1")
    _check(cfg.sampler.num_datasets >= 1, "sampler.num_datasets", cfg.sampler.num_datasets, "must be >= 1")

    tr = cfg.train
    _choice("train.optim", tr.optim, choices["optimizers"])
    _check(tr.lr > 0, "train.lr", tr.lr, "the learning rate must be positive")
    _check(tr.weight_decay >= 0, "train.weight_decay", tr.weight_decay, "must be >= 0")
    _check(tr.max_epoch >= 0, "train.max_epoch", tr.max_epoch, "must be >= 0")
    _check(
        0 <= tr.start_epoch <= max(tr.max_epoch, 0),
        "train.start_epoch",
        tr.start_epoch,
        f"must be between 0 and train.max_epoch ({tr.max_epoch})",
    )
    _check(tr.batch_size >= 1, "train.batch_size", tr.batch_size, "must be >= 1")
    samplers = (cfg.sampler.train_sampler, cfg.sampler.train_sampler_t)
    if "RandomIdentitySampler" in samplers:
        _check(
            tr.batch_size >= cfg.sampler.num_instances,
            "train.batch_size",
            tr.batch_size,
            f"RandomIdentitySampler takes sampler.num_instances ({cfg.sampler.num_instances}) images per identity, "
            "so the batch must hold at least that many",
        )
        _check(
            tr.batch_size % cfg.sampler.num_instances == 0,
            "train.batch_size",
            tr.batch_size,
            f"RandomIdentitySampler needs a multiple of sampler.num_instances ({cfg.sampler.num_instances}): "
            "P identities x K images per batch",
        )
    for sampler, key in (("RandomDomainSampler", "num_cams"), ("RandomDatasetSampler", "num_datasets")):
        if sampler in samplers:
            n = cfg.sampler[key]
            _check(tr.batch_size % n == 0, "train.batch_size", tr.batch_size,
                   f"{sampler} needs a multiple of sampler.{key} ({n})")
    _check(tr.fixbase_epoch >= 0, "train.fixbase_epoch", tr.fixbase_epoch, "must be >= 0")
    _check(tr.base_lr_mult > 0, "train.base_lr_mult", tr.base_lr_mult, "must be positive")
    _choice("train.lr_scheduler", tr.lr_scheduler, choices["schedulers"])
    _check(
        len(tr.stepsize) > 0 and all(s > 0 for s in tr.stepsize),
        "train.stepsize",
        tr.stepsize,
        "needs one or more positive epoch numbers",
    )
    if tr.lr_scheduler == "multi_step":
        _check(
            list(tr.stepsize) == sorted(tr.stepsize),
            "train.stepsize",
            tr.stepsize,
            "multi_step milestones must be increasing",
        )
    _check(tr.gamma > 0, "train.gamma", tr.gamma, "must be positive")
    _check(tr.print_freq >= 1, "train.print_freq", tr.print_freq, "must be >= 1")
    _check(tr.seed >= 0, "train.seed", tr.seed, "must be >= 0")
    _choice("train.amp_dtype", tr.amp_dtype, AMP_DTYPES)
    _check(
        tr.checkpoint_every_n_iters >= 0,
        "train.checkpoint_every_n_iters",
        tr.checkpoint_every_n_iters,
        "must be >= 0 (0: checkpoints only after evaluations)",
    )
    _check(tr.keep_last >= 0, "train.keep_last", tr.keep_last, "must be >= 0 (0: keep every checkpoint)")
    resume_path(cfg)  # both resume keys set to different checkpoints is an error
    _check(
        is_valid_cpu_threads(tr.cpu_threads),
        "train.cpu_threads",
        tr.cpu_threads,
        "must be 'auto', a number of threads >= 1, or 0 (torch's own default)",
    )

    _check(cfg.sgd.momentum >= 0, "sgd.momentum", cfg.sgd.momentum, "must be >= 0")
    _check(cfg.sgd.dampening >= 0, "sgd.dampening", cfg.sgd.dampening, "must be >= 0")
    _check(0 < cfg.rmsprop.alpha <= 1, "rmsprop.alpha", cfg.rmsprop.alpha, "must be in (0, 1]")
    _check(0 <= cfg.adam.beta1 < 1, "adam.beta1", cfg.adam.beta1, "must be in [0, 1)")
    _check(0 <= cfg.adam.beta2 < 1, "adam.beta2", cfg.adam.beta2, "must be in [0, 1)")

    tl = cfg.loss.triplet
    _check(tl.margin >= 0, "loss.triplet.margin", tl.margin, "must be >= 0")
    _check(tl.weight_t >= 0, "loss.triplet.weight_t", tl.weight_t, "must be >= 0")
    _check(tl.weight_x >= 0, "loss.triplet.weight_x", tl.weight_x, "must be >= 0")
    if cfg.loss.name == "triplet":
        _check(
            tl.weight_t + tl.weight_x > 0,
            "loss.triplet.weight_t",
            tl.weight_t,
            "weight_t and weight_x cannot both be 0",
        )
        # As torchreid's check_cfg: with no softmax term the classifier is outside the graph.
        _check(
            not (tl.weight_x == 0 and tr.fixbase_epoch > 0),
            "train.fixbase_epoch",
            tr.fixbase_epoch,
            "must be 0 when loss.triplet.weight_x is 0 (the classifier would get no gradient)",
        )

    te = cfg.test
    _check(te.batch_size >= 1, "test.batch_size", te.batch_size, "must be >= 1")
    _choice("test.dist_metric", te.dist_metric, DIST_METRICS)
    _check(len(te.ranks) > 0 and all(r >= 1 for r in te.ranks), "test.ranks", te.ranks, "needs one or more ranks >= 1")
    _check(
        te.eval_freq == -1 or te.eval_freq >= 1,
        "test.eval_freq",
        te.eval_freq,
        "must be -1 (evaluate after training only) or >= 1",
    )
    _check(te.start_eval >= 0, "test.start_eval", te.start_eval, "must be >= 0")
    _check(te.visrank_topk >= 1, "test.visrank_topk", te.visrank_topk, "must be >= 1")
    _validate_test_options(te)
    _check(
        not te.visrank or te.evaluate,
        "test.visrank",
        te.visrank,
        "ranked-result visualisation runs in test mode only; also set test.evaluate True (or use the "
        "'visrank' command)",
    )

    p = cfg.ptl
    _validate_model_options(p)
    _check(p.lr_mult > 0, "ptl.lr_mult", p.lr_mult, "must be positive")

    _check(
        isinstance(cfg.use_gpu, bool) or cfg.use_gpu == "auto", "use_gpu", cfg.use_gpu, "must be 'auto', True or False"
    )
    return cfg


def _validate_model_options(p):
    """The cells' and the PTL model's own checks, on the ``ptl`` section (checked for every model name, so that
    a baseline config and its PTL twin are equally valid)."""
    try:
        check_state_options(p.state_mode, p.eval_state, p.momentum)
        check_options(mode=p.mode, head=p.head, side_pool=p.side_pool, cell_init=p.cell_init, cell_type=p.cell_type,
                      stage3_tap=p.stage3_tap)
        check_stages(p.rectify_stages)
        check_reset_options(p.reset_policy, p.reset_every_n_iters)
        check_freeze_epochs(p.freeze_backbone_epochs)
    except InvalidOption as e:
        raise option_error("ptl." + e.option, e) from None


def _validate_test_options(te):
    _check(te.rerank_k1 >= 1, "test.rerank_k1", te.rerank_k1, "must be >= 1")
    _check(te.rerank_k2 >= 1, "test.rerank_k2", te.rerank_k2, "must be >= 1 (1: no local query expansion)")
    _check(0 <= te.rerank_lambda <= 1, "test.rerank_lambda", te.rerank_lambda, "must be in [0, 1]")
    _check(te.aqe_k >= 1, "test.aqe_k", te.aqe_k, "must be >= 1")
    _check(te.max_distmat_gb > 0, "test.max_distmat_gb", te.max_distmat_gb, "must be positive (in GB)")
