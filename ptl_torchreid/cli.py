"""Command line: ``ptl-torchreid [COMMAND] --config-file FILE [-s ...] [-t ...] [--root DIR] [KEY VALUE ...]``.

Mirrors torchreid's ``scripts/main.py`` flags. Commands live in :data:`COMMANDS`; adding one is a single
:func:`register_command` call. This module also holds the builders that turn a config into a data manager,
model, optimizer, scheduler and engine (used by the commands and by tools).
"""
import argparse
import os
import os.path as osp
import sys
import time
from collections import namedtuple

import torch

from ptl_torchreid import __version__, _torchreid
from ptl_torchreid.config import (
    ConfigError,
    config_keys,
    engine_kwargs,
    engine_run_kwargs,
    imagedata_kwargs,
    is_ptl_model_name,
    is_synthetic_dataset,
    load_config,
    lr_scheduler_kwargs,
    get_default_config,
    model_kwargs,
    optimizer_kwargs,
    synthetic_kwargs,
    torchreid_image_datasets,
)
from ptl_torchreid.data import DatasetRootError, register_synthetic_dataset
from ptl_torchreid.engine import ENGINES, build_optimizer
from ptl_torchreid.models import build_model as _build_model
from ptl_torchreid.models import is_ptl, unwrap
from ptl_torchreid.utils.checkpoint import CheckpointError, extract_state_dict, load_checkpoint, load_weights

torchreid = _torchreid.torchreid

__all__ = [
    "COMMANDS",
    "build_datamanager",
    "build_engine",
    "build_model",
    "check_dataset_roots",
    "format_results_table",
    "main",
    "parse_command_line",
    "register_command",
    "run",
]


# ---------------------------------------------------------------------------------------------------------
# Builders: config -> objects
# ---------------------------------------------------------------------------------------------------------


def _dataset_names(cfg):
    names = list(cfg.data.sources) + list(cfg.data.targets)
    return list(dict.fromkeys(names))


def check_dataset_roots(cfg):
    """Fail fast, without downloading, when a real dataset is not under ``data.root``.

    torchreid's datasets download themselves (or hang offline) when their folder is missing; we check the
    folder first. The embedded synthetic datasets are generated, so they are skipped.
    """
    registry = torchreid_image_datasets()
    root = osp.abspath(osp.expanduser(cfg.data.root))
    for name in _dataset_names(cfg):
        if is_synthetic_dataset(name):
            continue
        subdir = getattr(registry.get(name), "dataset_dir", None)
        if not isinstance(subdir, str):
            continue  # a user-registered dataset that does not follow torchreid's layout convention
        expected = osp.join(root, subdir)
        if not osp.isdir(expected):
            raise DatasetRootError(
                "dataset '{}' was not found: expected its files under {} (data.root = '{}'). ptl-torchreid "
                "does not download datasets; put {} there (torchreid's layout) or point --root / data.root at "
                "the folder that contains '{}'.".format(name, expected, cfg.data.root, name, subdir)
            )


def build_datamanager(cfg):
    """The ``torchreid.data.ImageDataManager`` for ``cfg`` (the single place where loaders and samplers are
    made). Synthetic datasets are (re-)registered with ``data.synthetic`` first; real ones are checked."""
    for name in _dataset_names(cfg):
        if is_synthetic_dataset(name):
            register_synthetic_dataset(name, **synthetic_kwargs(cfg))
    check_dataset_roots(cfg)
    try:
        return torchreid.data.ImageDataManager(**imagedata_kwargs(cfg))
    except RuntimeError as e:
        # torchreid's check_before_run: a dataset folder exists but lacks a required sub-folder or file.
        if "is not found" in str(e):
            raise DatasetRootError(
                "incomplete dataset under data.root = '{}': {}. Check the folder layout torchreid expects for "
                "{}.".format(cfg.data.root, e, ", ".join(_dataset_names(cfg)))
            ) from None
        raise


def load_initial_weights(model, path, mode="match", trust=False):
    """Load ``model.load_weights`` into ``model``.

    A plain torchreid checkpoint given to a PTL model goes into its backbone (the usual PTL setting: a plain
    model pretrained on one dataset, fine-tuned with PTL on another); a PTL checkpoint loads into the whole
    model.
    """
    net = unwrap(model)
    target = net
    checkpoint = load_checkpoint(path, map_location="cpu", trust=trust)
    if is_ptl(net) and not any(k.startswith("backbone.") for k in extract_state_dict(checkpoint)):
        target = net.backbone
        print('Loading plain model weights from "{}" into the PTL backbone'.format(path))
    return load_weights(target, path, mode=mode, trust=trust)


def build_model(cfg, num_classes):
    """``ptl_torchreid.models.build_model`` with the config's model and PTL options, plus ``load_weights``."""
    model = _build_model(**model_kwargs(cfg, num_classes))
    if not is_ptl_model_name(cfg.model.name) and cfg.ptl != get_default_config().ptl:
        print("Note: '{}' is a plain torchreid model; the ptl.* settings are ignored.".format(cfg.model.name))
    if cfg.model.load_weights:
        load_initial_weights(model, cfg.model.load_weights, cfg.model.load_weights_mode,
                             cfg.model.trust_checkpoint)
    return model


def build_engine(cfg, datamanager=None, model=None):
    """Engine for ``loss.name`` with its model, optimizer and scheduler; resumes from ``model.resume``.

    Returns the engine; ``engine.start_epoch`` is where training starts (after a resume).
    """
    if datamanager is None:
        datamanager = build_datamanager(cfg)
    if model is None:
        model = build_model(cfg, datamanager.num_train_pids)
    optimizer = build_optimizer(model, **optimizer_kwargs(cfg))
    scheduler = torchreid.optim.build_lr_scheduler(optimizer, **lr_scheduler_kwargs(cfg))
    engine_cls = ENGINES[cfg.loss.name]
    engine = engine_cls(datamanager, model, optimizer, scheduler=scheduler,
                        checkpoint_extras={"config": cfg.dump(), "model_name": cfg.model.name},
                        **engine_kwargs(cfg))
    engine.start_epoch = cfg.train.start_epoch
    if cfg.model.resume:
        engine.start_epoch = engine.resume(cfg.model.resume, trust=cfg.model.trust_checkpoint)
    return engine


def check_paths(cfg):
    """Files named in the config exist (checked before any work starts)."""
    for key in ("model.load_weights", "model.resume"):
        section, leaf = key.split(".")
        path = cfg[section][leaf]
        if path and not osp.isfile(path):
            raise ConfigError("{} = '{}': no such file".format(key, path))


def run(cfg):
    """Train and/or evaluate as ``cfg`` says; returns ``{target: {'mAP': x, 'cmc': {rank: y}}}``."""
    check_paths(cfg)
    torchreid.utils.set_random_seed(cfg.train.seed)
    engine = build_engine(cfg)
    kwargs = engine_run_kwargs(cfg)
    kwargs["start_epoch"] = engine.start_epoch
    if cfg.test.evaluate and not (cfg.model.load_weights or cfg.model.resume):
        print("Warning: evaluating a model without trained weights (set model.load_weights).")
    return engine.run(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def format_results_table(results):
    """A Markdown table: one row per target, mAP and the Rank-k columns."""
    if not results:
        return "(no results)"
    ranks = sorted({r for res in results.values() for r in res["cmc"]})
    header = ["target", "mAP"] + ["Rank-{}".format(r) for r in ranks]
    rows = []
    for name, res in results.items():
        cmc = res["cmc"]
        rows.append([name, "{:.1%}".format(res["mAP"])]
                    + ["{:.1%}".format(cmc[r]) if r in cmc else "-" for r in ranks])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


class _Tee:
    """Copy of stdout into a log file (restored on exit)."""

    def __init__(self, path):
        os.makedirs(osp.dirname(path), exist_ok=True)
        self.file = open(path, "a")
        self.console = sys.stdout

    def write(self, msg):
        self.console.write(msg)
        self.file.write(msg)

    def flush(self):
        self.console.flush()
        self.file.flush()

    def isatty(self):
        return False

    def __enter__(self):
        sys.stdout = self
        return self

    def __exit__(self, *exc):
        sys.stdout = self.console
        self.file.close()


# ---------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------

Command = namedtuple("Command", "name help run overrides add_arguments")
COMMANDS = {}


def register_command(name, help, run_fn, overrides=(), add_arguments=None):
    """Add a CLI command. ``run_fn(cfg, args)`` returns results (or None); ``overrides`` are ``KEY VALUE``
    pairs applied after the user's; ``add_arguments(parser)`` adds command-specific flags."""
    COMMANDS[name] = Command(name, help, run_fn, list(overrides), add_arguments)


def _run_and_report(cfg, args):
    results = run(cfg)
    print("\n" + format_results_table(results))
    return results


register_command("train", "train, then evaluate on the targets (the default command)", _run_and_report)
register_command("test", "evaluate only (sets test.evaluate True); give weights with model.load_weights",
                 _run_and_report, overrides=["test.evaluate", "True"])
register_command("visrank", "evaluate and save ranked-result images to <save_dir>/visrank_<target>",
                 _run_and_report, overrides=["test.evaluate", "True", "test.visrank", "True"])


def build_parser(command="train"):
    cmd = COMMANDS[command]
    parser = argparse.ArgumentParser(
        prog="ptl-torchreid" if command == "train" else "ptl-torchreid " + command,
        description="PTL (Progressive Transfer Learning) for torchreid. Command '{}': {}.".format(command, cmd.help),
        epilog="commands: " + "; ".join("{} ({})".format(c.name, c.help) for c in COMMANDS.values())
        + ". Config keys follow torchreid's default_config plus a 'ptl' section.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", type=str, default="", help="path to a YAML config file")
    parser.add_argument("-s", "--sources", type=str, nargs="+", help="source datasets (data.sources)")
    parser.add_argument("-t", "--targets", type=str, nargs="+", help="target datasets (data.targets)")
    parser.add_argument("--transforms", type=str, nargs="+", help="training augmentations (data.transforms)")
    parser.add_argument("--root", type=str, default="", help="path to the dataset root (data.root)")
    parser.add_argument("--version", action="version", version="ptl_torchreid " + __version__)
    if cmd.add_arguments is not None:
        cmd.add_arguments(parser)
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="KEY VALUE config overrides, e.g. train.max_epoch 10 ptl.lr_mult 10")
    return parser


def _move_trailing_overrides(args):
    """``-s market1501 train.max_epoch 1``: argparse gives the override to -s; hand it back to ``opts``."""
    keys = set(config_keys())
    for attr in ("sources", "targets", "transforms"):
        values = getattr(args, attr)
        if not values:
            continue
        for i, v in enumerate(values):
            if v in keys:
                setattr(args, attr, values[:i])
                args.opts = values[i:] + list(args.opts or [])
                break
    return args


def parse_command_line(argv=None):
    """``(command, args, cfg)`` from a command line; the config is merged and validated, and the files and
    dataset folders it names are checked, so errors come before any work starts."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    args = _move_trailing_overrides(build_parser(command).parse_args(argv))
    cfg = load_config(args.config_file or None, list(args.opts or []) + COMMANDS[command].overrides,
                      sources=args.sources, targets=args.targets, transforms=args.transforms,
                      root=args.root or None)
    check_paths(cfg)
    check_dataset_roots(cfg)
    return command, args, cfg


def main(argv=None):
    """Entry point of ``ptl-torchreid`` and ``python -m ptl_torchreid``; returns the exit status."""
    try:
        command, args, cfg = parse_command_line(argv)
        log_name = "{}-{}.log".format(command, time.strftime("%Y-%m-%d-%H-%M-%S"))
        with _Tee(osp.join(cfg.data.save_dir, log_name)):
            print("ptl_torchreid {} | torch {} | device {}".format(
                __version__, torch.__version__, "cuda" if engine_kwargs(cfg)["use_gpu"] else "cpu"))
            print("Configuration:\n{}".format(cfg.dump()))
            COMMANDS[command].run(cfg, args)
    except (ConfigError, DatasetRootError, CheckpointError) as e:
        print("ptl-torchreid: error: {}".format(e), file=sys.stderr)
        return 2
    return 0
