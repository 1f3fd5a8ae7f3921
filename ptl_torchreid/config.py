"""Configuration: torchreid's ``scripts/default_config.py`` layout plus a ``ptl`` section.

Key names follow torchreid's own, so a torchreid YAML config (image-reid) merges unchanged. Additions:

- ``ptl``: everything PTL-specific (ignored for plain torchreid models, so a baseline and its PTL twin can
  share one config and differ only in ``model.name``);
- ``data.synthetic``: size and seed of the embedded synthetic datasets;
- ``model.load_weights_mode`` / ``model.trust_checkpoint``: how ``model.load_weights`` is read;
- ``train.amp`` / ``train.amp_dtype`` / ``train.channels_last`` / ``train.progress_bar``; ``use_gpu`` may be
  ``'auto'``;
- ``train.cpu_threads`` ('auto' or a number): torch's CPU threads, see ``ptl_torchreid/utils/cpu_threads.py``;
- ``train.resume`` (a checkpoint or ``'auto'``; ``model.resume`` is torchreid's name for it),
  ``train.checkpoint_every_n_iters``, ``train.keep_last``, ``data.skip_corrupt``: see docs/RELIABILITY.md.

Merging is strict: an unknown key or a value of the wrong type raises :class:`ConfigError` naming the key and
the nearest valid key; :func:`validate_config` then rejects impossible values before any work starts.
"""
import ast
import difflib
import os.path as osp

import yaml
from yacs.config import CfgNode as CN

from ptl_torchreid.data.check import DatasetRootError
from ptl_torchreid.data.user import register_user_sources
from ptl_torchreid.models.ptl import CELL_INITS as PTL_CELL_INITS
from ptl_torchreid.models.ptl import CELL_TYPES as PTL_CELL_TYPES
from ptl_torchreid.models.ptl import HEADS as PTL_HEADS
from ptl_torchreid.models.ptl import MODES as PTL_MODES
from ptl_torchreid.models.ptl import SIDE_POOLS as PTL_SIDE_POOLS
from ptl_torchreid.models.ptl import STAGE3_TAPS as PTL_STAGE3_TAPS
from ptl_torchreid.models.ptl import STAGES as PTL_STAGES
from ptl_torchreid.models.ptl import check_stages
from ptl_torchreid.utils.cpu_threads import is_valid_setting as is_valid_cpu_threads

__all__ = [
    "ConfigError",
    "config_keys",
    "nearest_keys",
    "resolve_use_gpu",
    "is_ptl_model_name",
    "get_default_config",
    "load_config",
    "merge_from_file",
    "merge_from_list",
    "validate_config",
    "expand_save_dir",
    "imagedata_kwargs",
    "optimizer_kwargs",
    "lr_scheduler_kwargs",
    "engine_run_kwargs",
    "engine_kwargs",
    "evaluation_kwargs",
    "resume_path",
    "model_kwargs",
    "synthetic_kwargs",
    "is_synthetic_dataset",
    "torchreid_image_datasets",
    "torchreid_choices",
    "PTL_STATE_MODES",
    "PTL_EVAL_STATES",
    "PTL_RESET_POLICIES",
]

PTL_STATE_MODES = ("dataset", "slot")
PTL_EVAL_STATES = ("running", "zero")
PTL_RESET_POLICIES = ("epoch", "never", "iter")
LOSSES = ("softmax", "triplet")
DIST_METRICS = ("euclidean", "cosine")
TRANSFORMS = ("random_flip", "random_crop", "random_patch", "color_jitter", "random_erase")
AMP_DTYPES = ("auto", "fp16", "bf16")
LOAD_WEIGHTS_MODES = ("strict", "match")
PTL_SIZE_MULTIPLE = 32  # input height and width of PTL models


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key and how to fix it."""


def get_default_config():
    """Default configuration (a yacs ``CfgNode``), torchreid's key names plus the PTL additions."""
    cfg = CN()

    cfg.model = CN()
    cfg.model.name = "resnet50"
    cfg.model.pretrained = True  # ImageNet weights for the backbone (torchreid downloads them if absent)
    cfg.model.load_weights = ""  # initial weights for fine-tuning or testing (a checkpoint path)
    # 'strict': every tensor must fit, else an error listing the mismatching keys; 'match': load what fits by
    # name and shape and print what was skipped (fine-tuning from another dataset: a new classifier size).
    cfg.model.load_weights_mode = "strict"
    cfg.model.trust_checkpoint = False  # allow full unpickling of load_weights/resume files (runs code!)
    cfg.model.resume = ""  # torchreid's key for train.resume (either may be set)

    cfg.data = CN()
    cfg.data.type = "image"
    cfg.data.root = "reid-data"
    cfg.data.sources = ["market1501"]
    cfg.data.targets = ["market1501"]
    cfg.data.workers = 4
    cfg.data.split_id = 0
    cfg.data.height = 256
    cfg.data.width = 128
    cfg.data.combineall = False
    cfg.data.transforms = ["random_flip"]
    cfg.data.k_tfm = 1
    cfg.data.norm_mean = [0.485, 0.456, 0.406]
    cfg.data.norm_std = [0.229, 0.224, 0.225]
    cfg.data.save_dir = "log"
    cfg.data.load_train_targets = False
    # Unreadable training images: False -> stop with an error naming the file; True -> replace the sample by
    # another of the same identity, count it and report the count at the end of training.
    cfg.data.skip_corrupt = False
    # Embedded synthetic datasets (synthetic_reid / synthetic_source / synthetic_target), generated into
    # data.root on first use. -1 keeps the named dataset's own default (the transfer pair's two domains
    # differ in size and cameras); a value applies to every synthetic dataset of the run.
    cfg.data.synthetic = CN()
    cfg.data.synthetic.num_train_ids = -1
    cfg.data.synthetic.num_test_ids = -1
    cfg.data.synthetic.num_cameras = -1
    cfg.data.synthetic.images_per_id_per_camera = -1
    cfg.data.synthetic.seed = -1

    cfg.market1501 = CN()
    cfg.market1501.use_500k_distractors = False
    cfg.cuhk03 = CN()
    cfg.cuhk03.labeled_images = False
    cfg.cuhk03.classic_split = False
    cfg.cuhk03.use_metric_cuhk03 = False

    cfg.sampler = CN()
    cfg.sampler.train_sampler = "RandomSampler"
    cfg.sampler.train_sampler_t = "RandomSampler"
    cfg.sampler.num_instances = 4
    cfg.sampler.num_cams = 1
    cfg.sampler.num_datasets = 1

    cfg.train = CN()
    cfg.train.optim = "adam"
    cfg.train.lr = 0.0003
    cfg.train.weight_decay = 5e-4
    cfg.train.max_epoch = 60
    cfg.train.start_epoch = 0
    cfg.train.batch_size = 32  # per process: under torchrun the global batch is this x the number of processes
    cfg.train.fixbase_epoch = 0
    cfg.train.open_layers = ["classifier"]
    cfg.train.staged_lr = False
    cfg.train.new_layers = ["classifier"]
    cfg.train.base_lr_mult = 0.1
    cfg.train.lr_scheduler = "single_step"
    cfg.train.stepsize = [20]
    cfg.train.gamma = 0.1
    cfg.train.print_freq = 20
    cfg.train.seed = 1
    cfg.train.amp = False  # mixed precision: fp16 + GradScaler on CUDA, bf16 autocast on the CPU
    cfg.train.amp_dtype = "auto"  # 'auto' | 'fp16' | 'bf16'
    cfg.train.channels_last = False  # model and batches in channels_last memory format (faster AMP convolutions)
    cfg.train.progress_bar = True  # tqdm bars for training and feature extraction (on a terminal)
    cfg.train.resume = ""  # checkpoint to resume from, or 'auto': the latest one in data.save_dir (if any)
    cfg.train.checkpoint_every_n_iters = 0  # also checkpoint every N training steps (0: only after evaluations)
    cfg.train.keep_last = 0  # periodic checkpoints kept on disk, newest first (0: all); model-best is kept
    # torch's CPU threads: 'auto' (the free CPUs this process may use, shared by local DDP processes), N, or 0
    # (torch's own default); OMP_NUM_THREADS in the environment wins over 'auto' (see utils/cpu_threads.py)
    cfg.train.cpu_threads = "auto"

    cfg.sgd = CN()
    cfg.sgd.momentum = 0.9
    cfg.sgd.dampening = 0.0
    cfg.sgd.nesterov = False
    cfg.rmsprop = CN()
    cfg.rmsprop.alpha = 0.99
    cfg.adam = CN()
    cfg.adam.beta1 = 0.9
    cfg.adam.beta2 = 0.999

    cfg.loss = CN()
    cfg.loss.name = "softmax"
    cfg.loss.softmax = CN()
    cfg.loss.softmax.label_smooth = True
    cfg.loss.triplet = CN()
    cfg.loss.triplet.margin = 0.3
    cfg.loss.triplet.weight_t = 1.0
    cfg.loss.triplet.weight_x = 0.0

    cfg.test = CN()
    cfg.test.batch_size = 100
    cfg.test.dist_metric = "euclidean"
    cfg.test.normalize_feature = False
    cfg.test.ranks = [1, 5, 10, 20]
    cfg.test.evaluate = False
    cfg.test.eval_freq = -1
    cfg.test.start_eval = 0
    cfg.test.rerank = False
    cfg.test.visrank = False
    cfg.test.visrank_topk = 10
    # Test-time options (ptl_torchreid.engine.evaluator): sparse k-reciprocal re-ranking parameters,
    # alpha-query expansion, flip test, TPR@FPR with a ROC plot, and the memory above which ranking is chunked.
    cfg.test.rerank_k1 = 20
    cfg.test.rerank_k2 = 6
    cfg.test.rerank_lambda = 0.3
    cfg.test.aqe = False
    cfg.test.aqe_k = 5
    cfg.test.aqe_alpha = 3.0
    cfg.test.flip = False
    cfg.test.roc = False
    cfg.test.max_distmat_gb = 2.0

    # PTL-specific settings; ignored (with a note) for plain torchreid models.
    cfg.ptl = CN()
    cfg.ptl.state_mode = "dataset"  # 'dataset': one state shared by the batch; 'slot': per-sample slots
    cfg.ptl.eval_state = "running"  # state used in eval mode: 'running' average or 'zero'
    cfg.ptl.momentum = 0.1  # momentum of the running (eval) state, as in BatchNorm
    cfg.ptl.reset_policy = "epoch"  # when the carried state is zeroed: 'epoch' | 'never' | 'iter'
    cfg.ptl.reset_every_n_iters = 0  # period for reset_policy 'iter'
    cfg.ptl.freeze_backbone_epochs = 0  # train only cells + head for the first K epochs; -1: throughout
    cfg.ptl.lr_mult = 1.0  # learning-rate multiplier for the PTL parameters (cells, fusion, head)
    # How the side stream acts (see ptl_torchreid.models.PTLNet):
    cfg.ptl.mode = "branch"  # 'branch': it joins the head | 'rectify': it modulates backbone stages
    cfg.ptl.head = "residual"  # branch head: 'residual' (keeps the pretrained embedding) | 'concat' (reference)
    cfg.ptl.rectify_stages = ["stage1", "stage2", "stage3", "last"]  # stages rectify mode modulates
    cfg.ptl.side_pool = "avg"  # pooling of the side stream in the branch head: 'avg' | 'max' (reference)
    cfg.ptl.cell_init = "fan_out"  # Kaiming mode of the side-stream convs: 'fan_out' | 'fan_in' (reference)
    cfg.ptl.cell_type = "bconv"  # 'bconv' cells | 'conv': stateless adapters of similar size (ablation)
    cfg.ptl.stage3_tap = "stage"  # where the side stream reads stage 3: 'stage' | 'first_block' (reference)

    cfg.use_gpu = "auto"  # 'auto' (CUDA when available), True or False
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Merging with clear errors
# ---------------------------------------------------------------------------------------------------------

# Keys that accept more than their default's type.
_EXTRA_TYPES = {"use_gpu": (bool, str), "train.cpu_threads": (int, str)}
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def config_keys(node=None, prefix=""):
    """All leaf keys of a config (default: the default config), dotted."""
    if node is None:
        node = get_default_config()
    keys = []
    for k, v in node.items():
        full = prefix + k
        if isinstance(v, CN):
            keys.extend(config_keys(v, full + "."))
        else:
            keys.append(full)
    return keys


def nearest_keys(key, cfg, n=3):
    """Valid keys of ``cfg`` closest to ``key`` (whole dotted name first, then the last component)."""
    keys = config_keys(cfg)
    found = difflib.get_close_matches(key, keys, n=n, cutoff=0.6)
    if not found:
        leaf = key.split(".")[-1]
        by_leaf = {}
        for k in keys:
            by_leaf.setdefault(k.split(".")[-1], []).append(k)
        for name in difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=0.6):
            found.extend(by_leaf[name])
    return found[:n]


def _unknown_key_error(key, cfg, source):
    near = nearest_keys(key, cfg)
    hint = " Did you mean {}?".format(" or ".join(repr(k) for k in near)) if near else ""
    return ConfigError(f"unknown config key '{key}'{source}.{hint}")


def _type_name(t):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        t, t.__name__
    )


def _coerce_scalar(value, default, key, source):
    """Coerce ``value`` to the type of ``default``; raise ConfigError if that is not a faithful conversion."""
    want = type(default)
    if isinstance(value, want) and not (want is int and isinstance(value, bool)):
        return value
    if want is bool and isinstance(value, str):
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if want is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(
        f"config key '{key}'{source} must be {_type_name(want)} (like the default {default!r}), got {value!r}"
    )


def _coerce(value, default, key, source):
    leaf = key.split(".")[-1]
    extra = _EXTRA_TYPES.get(key) or _EXTRA_TYPES.get(leaf)
    if extra is not None:
        if isinstance(value, str) and bool in extra and value.lower() in _TRUE + _FALSE and value != "auto":
            return value.lower() in _TRUE
        if isinstance(value, extra):
            return value
        raise ConfigError(
            "config key '{}'{} must be one of the types {}, got {!r}".format(
                key, source, ", ".join(t.__name__ for t in extra), value
            )
        )
    if isinstance(default, (list, tuple)):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value]  # a single value for a list key, e.g. `data.sources market1501`
        if default:
            value = [_coerce_scalar(v, default[0], key, source) for v in value]
        return value
    if isinstance(value, (list, tuple)):
        raise ConfigError(
            f"config key '{key}'{source} takes a single value (like the default {default!r}), got the list {value!r}"
        )
    return _coerce_scalar(value, default, key, source)


def _set_key(cfg, key, value, source=""):
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], CN):
            raise _unknown_key_error(key, cfg, source)
        node = node[part]
    leaf = parts[-1]
    if leaf not in node:
        raise _unknown_key_error(key, cfg, source)
    if isinstance(node[leaf], CN):
        raise ConfigError(
            "config key '{}'{} is a section; set one of its keys instead: {}".format(
                key, source, ", ".join(key + "." + k for k in node[leaf])
            )
        )
    node[leaf] = _coerce(value, node[leaf], key, source)


def _flatten(d, prefix=""):
    for k, v in d.items():
        full = prefix + str(k)
        if isinstance(v, dict):
            yield from _flatten(v, full + ".")
        else:
            yield full, v


class _DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKeyError(f"key '{_dotted(self, node, key)}' is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); keep one of them")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _dotted(loader, node, key):
    # the dotted name of `key` inside `node`, from the mappings that enclose it (for the error message)
    path = [str(key)]
    parents = getattr(loader, "_parents", {})
    while id(node) in parents:
        node, name = parents[id(node)]
        path.append(str(name))
    return ".".join(reversed(path))


def _compose_with_parents(self):
    node = yaml.SafeLoader.compose_document(self)
    parents = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                if isinstance(v, yaml.MappingNode):
                    parents[id(v)] = (n, getattr(k, "value", k))
                    stack.append(v)
    self._parents = parents
    return node


_UniqueKeyLoader.compose_document = _compose_with_parents


def merge_from_file(cfg, path):
    """Merge a YAML file into ``cfg`` (strict: unknown keys and wrong types are errors)."""
    if osp.isdir(path):
        raise ConfigError(f"config file {path} is a directory, not a YAML file; give the path of the file")
    if not osp.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
        except _DuplicateKeyError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        raise ConfigError(
            f"config file {path} is empty (no settings in it); give a config with at least one key, or leave "
            "out --config-file to use the defaults"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    source = f" (in {path})"
    for key, value in _flatten(data):
        _set_key(cfg, key, value, source)
    return cfg


def _decode(text):
    """Decode a command-line value the way yacs does (Python literals; anything else is a string)."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        # not a (buildable) literal, e.g. a dict with a list as key: keep the text; type checks follow
        return text


def merge_from_list(cfg, opts):
    """Merge ``['KEY', 'VALUE', ...]`` overrides (strict, with the nearest valid key on a typo)."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(
            "overrides must be KEY VALUE pairs, got an odd number of items: {}".format(" ".join(map(str, opts)))
        )
    for key, value in zip(opts[0::2], opts[1::2]):
        if not isinstance(key, str) or key.startswith("-"):
            raise ConfigError(
                f"expected a config KEY, got {key!r}; options (--config-file, -s, ...) must come before the "
                "KEY VALUE overrides"
            )
        _set_key(cfg, key, _decode(value), " (command-line override)")
    return cfg


def load_config(config_file=None, opts=None, sources=None, targets=None, transforms=None, root=None, validate=True):
    """Defaults <- YAML file <- torchreid-style flags <- ``KEY VALUE`` overrides, then validated."""
    cfg = get_default_config()
    if config_file:
        merge_from_file(cfg, config_file)
    # The flags of torchreid's scripts/main.py, applied like its reset_config().
    if root:
        cfg.data.root = root
    if sources:
        cfg.data.sources = list(sources)
    if targets:
        cfg.data.targets = list(targets)
    if transforms:
        cfg.data.transforms = list(transforms)
    merge_from_list(cfg, opts)
    expand_save_dir(cfg)
    if validate:
        validate_config(cfg)
    return cfg


def expand_save_dir(cfg):
    """Fill the placeholders ``{model}``, ``{sources}``, ``{targets}``, ``{loss}`` in ``data.save_dir``.

    This lets a PTL config and its baseline twin differ only in ``model.name`` yet log to different folders.
    """
    values = {
        "model": cfg.model.name,
        "sources": "+".join(cfg.data.sources),
        "targets": "+".join(cfg.data.targets),
        "loss": cfg.loss.name,
    }
    try:
        cfg.data.save_dir = cfg.data.save_dir.format(**values)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
        raise ConfigError(
            "data.save_dir = '{}' has an invalid placeholder ({}); available: {}".format(
                cfg.data.save_dir, e, ", ".join("{" + k + "}" for k in values)
            )
        ) from None
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------


def _choice(key, value, choices):
    if value not in choices:
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=3, cutoff=0.5)
        hint = " Did you mean {}?".format(" or ".join(repr(c) for c in near)) if near else ""
        raise ConfigError(
            "{} = {!r} is not valid.{} Valid values: {}.".format(key, value, hint, ", ".join(map(str, choices)))
        )


def _check(cond, key, value, requirement):
    if not cond:
        raise ConfigError(f"{key} = {value!r} is invalid: {requirement}")


def resume_path(cfg):
    """The checkpoint to resume from: ``train.resume`` or torchreid's ``model.resume`` ('' when neither is set;
    ``'auto'``: the latest checkpoint in ``data.save_dir``, if any)."""
    a, b = cfg.train.resume, cfg.model.resume
    if a and b and a != b:
        raise ConfigError(
            f"train.resume = {a!r} and model.resume = {b!r} name different checkpoints; model.resume is "
            "torchreid's name for train.resume, set only one of them"
        )
    return a or b


def is_synthetic_dataset(name):
    """Whether ``name`` is one of the embedded synthetic datasets (generated, never downloaded)."""
    from ptl_torchreid.data import registered_synthetic_datasets

    return name in registered_synthetic_datasets()


# torchreid lookups that have no public API. They belong with the rest of torchreid's layout knowledge in
# ptl_torchreid._torchreid; they are kept together here so they can move there as one block.


def torchreid_image_datasets():
    """torchreid's image-dataset registry (name -> class), including the registered synthetic datasets."""
    import ptl_torchreid.data  # noqa: F401  (registers the synthetic datasets)
    from ptl_torchreid import _torchreid

    return _torchreid.image_dataset_registry()


def torchreid_choices():
    """Names torchreid accepts for samplers, optimizers and LR schedulers."""
    from ptl_torchreid import _torchreid

    return _torchreid.training_choices()


def _register_user_sources(cfg):
    """Folder / list-file / no-camera sources (``ptl_torchreid.data.user``) become torchreid datasets."""
    for key in ("data.sources", "data.targets"):
        try:
            register_user_sources(cfg.data[key.split(".")[1]])
        except DatasetRootError as e:
            raise ConfigError(f"{key}: {e}") from None


def _available_models():
    from ptl_torchreid.models import available_models  # importing registers the ptl_* names

    return available_models()


def validate_config(cfg):
    """Reject impossible or inconsistent values before any work starts (raises :class:`ConfigError`)."""
    choices = torchreid_choices()
    _choice("model.name", cfg.model.name, _available_models())
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
        for key in ("height", "width"):
            size = cfg.data[key]
            _check(
                size % PTL_SIZE_MULTIPLE == 0,
                "data." + key,
                size,
                f"{cfg.model.name} needs a multiple of {PTL_SIZE_MULTIPLE} (its side stream follows the backbone's stride-{PTL_SIZE_MULTIPLE} taps); use {max(PTL_SIZE_MULTIPLE, size // PTL_SIZE_MULTIPLE * PTL_SIZE_MULTIPLE)} or "
                f"{(size // PTL_SIZE_MULTIPLE + 1) * PTL_SIZE_MULTIPLE}",
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
            f"RandomIdentitySampler takes sampler.num_instances ({cfg.sampler.num_instances}) images per identity, so the batch must "
            "hold at least that many",
        )
        _check(
            tr.batch_size % cfg.sampler.num_instances == 0,
            "train.batch_size",
            tr.batch_size,
            f"RandomIdentitySampler needs a multiple of sampler.num_instances ({cfg.sampler.num_instances}): P identities x K "
            "images per batch",
        )
    if "RandomDomainSampler" in samplers:
        _check(
            tr.batch_size % cfg.sampler.num_cams == 0,
            "train.batch_size",
            tr.batch_size,
            f"RandomDomainSampler needs a multiple of sampler.num_cams ({cfg.sampler.num_cams})",
        )
    if "RandomDatasetSampler" in samplers:
        _check(
            tr.batch_size % cfg.sampler.num_datasets == 0,
            "train.batch_size",
            tr.batch_size,
            f"RandomDatasetSampler needs a multiple of sampler.num_datasets ({cfg.sampler.num_datasets})",
        )
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
    _choice("ptl.state_mode", p.state_mode, PTL_STATE_MODES)
    _choice("ptl.eval_state", p.eval_state, PTL_EVAL_STATES)
    _choice("ptl.reset_policy", p.reset_policy, PTL_RESET_POLICIES)
    if p.reset_policy == "iter":
        _check(
            p.reset_every_n_iters >= 1,
            "ptl.reset_every_n_iters",
            p.reset_every_n_iters,
            "must be >= 1 when ptl.reset_policy is 'iter'",
        )
    _check(p.reset_every_n_iters >= 0, "ptl.reset_every_n_iters", p.reset_every_n_iters, "must be >= 0")
    _check(
        p.freeze_backbone_epochs >= -1,
        "ptl.freeze_backbone_epochs",
        p.freeze_backbone_epochs,
        "must be -1 (frozen throughout), 0 (never frozen) or a number of epochs",
    )
    _check(p.lr_mult > 0, "ptl.lr_mult", p.lr_mult, "must be positive")
    _check(0 < p.momentum <= 1, "ptl.momentum", p.momentum, "must be in (0, 1]")
    for key, choices in (
        ("mode", PTL_MODES),
        ("head", PTL_HEADS),
        ("side_pool", PTL_SIDE_POOLS),
        ("cell_init", PTL_CELL_INITS),
        ("cell_type", PTL_CELL_TYPES),
        ("stage3_tap", PTL_STAGE3_TAPS),
    ):
        _choice("ptl." + key, p[key], choices)
    try:
        check_stages(p.rectify_stages)
    except ValueError:
        raise ConfigError(
            "ptl.rectify_stages = {} is not valid; give one or more distinct names of {}".format(
                list(p.rectify_stages), ", ".join(PTL_STAGES)
            )
        ) from None

    _check(
        isinstance(cfg.use_gpu, bool) or cfg.use_gpu == "auto", "use_gpu", cfg.use_gpu, "must be 'auto', True or False"
    )
    return cfg


# ---------------------------------------------------------------------------------------------------------
# kwargs mappers (torchreid's, plus ours)
# ---------------------------------------------------------------------------------------------------------


def resolve_use_gpu(cfg):
    """``use_gpu`` as a bool: 'auto' means CUDA when available."""
    import torch

    if cfg.use_gpu == "auto":
        return torch.cuda.is_available()
    return bool(cfg.use_gpu) and torch.cuda.is_available()


def imagedata_kwargs(cfg):
    """Arguments of ``torchreid.data.ImageDataManager``."""
    return {
        "root": cfg.data.root,
        "sources": list(cfg.data.sources),
        "targets": list(cfg.data.targets),
        "height": cfg.data.height,
        "width": cfg.data.width,
        "transforms": list(cfg.data.transforms),
        "k_tfm": cfg.data.k_tfm,
        "norm_mean": list(cfg.data.norm_mean),
        "norm_std": list(cfg.data.norm_std),
        "use_gpu": resolve_use_gpu(cfg),
        "split_id": cfg.data.split_id,
        "combineall": cfg.data.combineall,
        "load_train_targets": cfg.data.load_train_targets,
        "batch_size_train": cfg.train.batch_size,
        "batch_size_test": cfg.test.batch_size,
        "workers": cfg.data.workers,
        "num_instances": cfg.sampler.num_instances,
        "num_cams": cfg.sampler.num_cams,
        "num_datasets": cfg.sampler.num_datasets,
        "train_sampler": cfg.sampler.train_sampler,
        "train_sampler_t": cfg.sampler.train_sampler_t,
        "cuhk03_labeled": cfg.cuhk03.labeled_images,
        "cuhk03_classic_split": cfg.cuhk03.classic_split,
        "market1501_500k": cfg.market1501.use_500k_distractors,
    }


def synthetic_kwargs(cfg):
    """Parameters for ``ptl_torchreid.data.register_synthetic_dataset``: the ``data.synthetic`` values that are
    set (not -1); the others keep the named dataset's defaults."""
    return {k: v for k, v in cfg.data.synthetic.items() if v != -1}


def model_kwargs(cfg, num_classes):
    """Arguments of ``ptl_torchreid.models.build_model`` (PTL options only for ``ptl_*`` models)."""
    kwargs = {
        "name": cfg.model.name,
        "num_classes": num_classes,
        "loss": cfg.loss.name,
        "pretrained": cfg.model.pretrained,
    }
    if is_ptl_model_name(cfg.model.name):
        # The cells' state shapes follow the input size, so the model is built for data.height x data.width.
        p = cfg.ptl
        kwargs.update(
            state_mode=p.state_mode,
            eval_state=p.eval_state,
            momentum=p.momentum,
            input_size=(cfg.data.height, cfg.data.width),
            mode=p.mode,
            head=p.head,
            rectify_stages=tuple(p.rectify_stages),
            side_pool=p.side_pool,
            cell_init=p.cell_init,
            cell_type=p.cell_type,
            stage3_tap=p.stage3_tap,
        )
    return kwargs


def is_ptl_model_name(name):
    """Whether ``name`` is one of the PTL models (``ptl_torchreid.models.PTL_MODELS``)."""
    from ptl_torchreid.models import PTL_MODELS

    return name in PTL_MODELS


def optimizer_kwargs(cfg):
    """Arguments of ``ptl_torchreid.engine.build_optimizer`` (torchreid's plus ``lr_mult``)."""
    return {
        "optim": cfg.train.optim,
        "lr": cfg.train.lr,
        "weight_decay": cfg.train.weight_decay,
        "momentum": cfg.sgd.momentum,
        "sgd_dampening": cfg.sgd.dampening,
        "sgd_nesterov": cfg.sgd.nesterov,
        "rmsprop_alpha": cfg.rmsprop.alpha,
        "adam_beta1": cfg.adam.beta1,
        "adam_beta2": cfg.adam.beta2,
        "staged_lr": cfg.train.staged_lr,
        "new_layers": list(cfg.train.new_layers),
        "base_lr_mult": cfg.train.base_lr_mult,
        "lr_mult": cfg.ptl.lr_mult,
    }


def lr_scheduler_kwargs(cfg):
    """Arguments of ``torchreid.optim.build_lr_scheduler``."""
    stepsize = list(cfg.train.stepsize)
    return {
        "lr_scheduler": cfg.train.lr_scheduler,
        # torchreid's single_step takes an int (it would take the last item of a list anyway).
        "stepsize": stepsize[-1] if cfg.train.lr_scheduler == "single_step" else stepsize,
        "gamma": cfg.train.gamma,
        "max_epoch": cfg.train.max_epoch,
    }


def engine_kwargs(cfg):
    """Keyword arguments of the PTL engine for ``loss.name`` (see ``ptl_torchreid.engine.ENGINES``)."""
    kwargs = {
        "use_gpu": resolve_use_gpu(cfg),
        "label_smooth": cfg.loss.softmax.label_smooth,
        "reset_policy": cfg.ptl.reset_policy,
        "reset_every_n_iters": cfg.ptl.reset_every_n_iters,
        "freeze_backbone_epochs": cfg.ptl.freeze_backbone_epochs,
        "amp": cfg.train.amp,
        "amp_dtype": cfg.train.amp_dtype,
        "channels_last": cfg.train.channels_last,
        "progress_bar": cfg.train.progress_bar,
        # under DDP: fixbase freezes layers after wrapping (PTL backbone freezing is detected by the engine)
        "find_unused_parameters": True if cfg.train.fixbase_epoch > 0 else None,
        "seed": cfg.train.seed,
        "checkpoint_every_n_iters": cfg.train.checkpoint_every_n_iters,
        "keep_last": cfg.train.keep_last or None,
        "evaluation": evaluation_kwargs(cfg),
    }
    if cfg.loss.name == "triplet":
        kwargs.update(
            margin=cfg.loss.triplet.margin,
            weight_t=cfg.loss.triplet.weight_t,
            weight_x=cfg.loss.triplet.weight_x,
        )
    return kwargs


def _validate_test_options(te):
    _check(te.rerank_k1 >= 1, "test.rerank_k1", te.rerank_k1, "must be >= 1")
    _check(te.rerank_k2 >= 1, "test.rerank_k2", te.rerank_k2, "must be >= 1 (1: no local query expansion)")
    _check(0 <= te.rerank_lambda <= 1, "test.rerank_lambda", te.rerank_lambda, "must be in [0, 1]")
    _check(te.aqe_k >= 1, "test.aqe_k", te.aqe_k, "must be >= 1")
    _check(te.max_distmat_gb > 0, "test.max_distmat_gb", te.max_distmat_gb, "must be positive (in GB)")


def evaluation_kwargs(cfg):
    """The engine's ``evaluation`` options (``ptl_torchreid.engine.evaluator.EvalOptions``) from ``test.*``."""
    te = cfg.test
    return {
        k: te[k]
        for k in (
            "rerank_k1",
            "rerank_k2",
            "rerank_lambda",
            "aqe",
            "aqe_k",
            "aqe_alpha",
            "flip",
            "roc",
            "max_distmat_gb",
        )
    }


def engine_run_kwargs(cfg):
    """Arguments of ``engine.run`` (torchreid's)."""
    return {
        "save_dir": cfg.data.save_dir,
        "max_epoch": cfg.train.max_epoch,
        "start_epoch": cfg.train.start_epoch,
        "fixbase_epoch": cfg.train.fixbase_epoch,
        "open_layers": list(cfg.train.open_layers),
        "start_eval": cfg.test.start_eval,
        "eval_freq": cfg.test.eval_freq,
        "test_only": cfg.test.evaluate,
        "print_freq": cfg.train.print_freq,
        "dist_metric": cfg.test.dist_metric,
        "normalize_feature": cfg.test.normalize_feature,
        "visrank": cfg.test.visrank,
        "visrank_topk": cfg.test.visrank_topk,
        "use_metric_cuhk03": cfg.cuhk03.use_metric_cuhk03,
        "ranks": list(cfg.test.ranks),
        "rerank": cfg.test.rerank,
    }
