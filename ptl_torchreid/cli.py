"""Command line: ``ptl-torchreid [COMMAND] --config-file FILE [-s ...] [-t ...] [--root DIR] [KEY VALUE ...]``.

Mirrors torchreid's ``scripts/main.py`` flags. Commands live in :data:`COMMANDS`; adding one is a single
:func:`register_command` call. This module also holds the builders that turn a config into a data manager,
model, optimizer, scheduler and engine (used by the commands and by tools).
"""
import argparse
import contextlib
import difflib
import os
import os.path as osp
import shlex
import signal
import sys
import threading
import time
import traceback
from collections import namedtuple

import torch

from ptl_torchreid import __version__, _torchreid
from ptl_torchreid.cli_export import add_export_arguments, run_export
from ptl_torchreid.cli_retrieval import add_embed_arguments, add_search_arguments, run_embed, run_search
from ptl_torchreid.compress import is_pruned_checkpoint, load_pruned_model
from ptl_torchreid.config import (
    ConfigError,
    config_keys,
    engine_kwargs,
    engine_run_kwargs,
    get_default_config,
    imagedata_kwargs,
    is_ptl_model_name,
    is_synthetic_dataset,
    load_config,
    lr_scheduler_kwargs,
    model_kwargs,
    optimizer_kwargs,
    resolve_use_gpu,
    resume_path,
    synthetic_kwargs,
    torchreid_image_datasets,
)
from ptl_torchreid.data import (
    PATTERNS,
    DatasetError,
    DatasetRootError,
    ImageReadError,
    check_dataset_root,
    format_report,
    install_strict_reader,
    register_synthetic_dataset,
    reset_skipped_images,
    skipped_images,
)
from ptl_torchreid.data.samplers import distribute_train_loaders
from ptl_torchreid.data.user import check_user_source, is_user_source
from ptl_torchreid.engine import ENGINES, NonFiniteLossError, TrainingInterrupted, build_optimizer
from ptl_torchreid.export import ExportError
from ptl_torchreid.metrics import clamp_ranks
from ptl_torchreid.models import build_model as _build_model
from ptl_torchreid.models import is_ptl, is_ptl_state_dict, load_pretrained_weights, unwrap
from ptl_torchreid.utils import distributed as pdist
from ptl_torchreid.utils.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointReadError,
    extract_state_dict,
    load_checkpoint,
)
from ptl_torchreid.utils.cpu_threads import apply_cpu_threads, describe_cpu_threads
from ptl_torchreid.utils.savedir import SaveDirError, SaveDirLock

torchreid = _torchreid.torchreid

__all__ = [
    "COMMANDS",
    "build_datamanager",
    "build_engine",
    "build_model",
    "check_checkpoint_files",
    "check_datamanager",
    "check_dataset_roots",
    "check_data",
    "distributed_session",
    "format_results_table",
    "main",
    "parse_command_line",
    "register_command",
    "resume_command",
    "run",
    "trains",
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
                f"dataset '{name}' was not found: expected its files under {expected} (data.root = '{cfg.data.root}'). ptl-torchreid "
                f"does not download datasets; put {name} there (torchreid's layout) or point --root / data.root at "
                f"the folder that contains '{subdir}'."
            )


def build_datamanager(cfg):
    """The ``torchreid.data.ImageDataManager`` for ``cfg`` (the single place where loaders and samplers are
    made). Synthetic datasets are (re-)registered with ``data.synthetic`` first; real ones are checked. Images
    are read with the strict reader (an unreadable file raises an error naming it instead of torchreid's endless
    retries; ``data.skip_corrupt`` skips and counts such samples instead).

    Under several ranks, rank 0 builds it first (a synthetic dataset is generated into ``data.root`` then) and
    the train loaders get distributed samplers (``train.batch_size`` images per rank)."""
    with pdist.main_process_first():
        datamanager = _build_image_datamanager(cfg)
    if pdist.get_world_size() > 1:
        try:
            distribute_train_loaders(
                datamanager,
                cfg.sampler.train_sampler,
                cfg.sampler.num_instances,
                seed=cfg.train.seed,
                train_sampler_t=cfg.sampler.train_sampler_t,
            )
        except ValueError as e:
            raise ConfigError(f"distributed training over {pdist.get_world_size()} processes: {e}") from None
    return datamanager


def _build_image_datamanager(cfg):
    for name in _dataset_names(cfg):
        if is_synthetic_dataset(name):
            register_synthetic_dataset(name, **synthetic_kwargs(cfg))
    check_dataset_roots(cfg)
    install_strict_reader(skip_corrupt=cfg.data.skip_corrupt)
    try:
        datamanager = torchreid.data.ImageDataManager(**imagedata_kwargs(cfg))
    except RuntimeError as e:
        # torchreid's check_before_run: a dataset folder exists but lacks a required sub-folder or file.
        if "is not found" in str(e):
            raise DatasetRootError(
                "incomplete dataset under data.root = '{}': {}. Check the folder layout torchreid expects for "
                "{}.".format(cfg.data.root, e, ", ".join(_dataset_names(cfg)))
            ) from None
        raise
    except (AssertionError, ValueError, IndexError, KeyError, ZeroDivisionError) as e:
        # torchreid's own sanity checks (bare asserts, empty samplers) fail with little context.
        raise DatasetError(_datamanager_failure(cfg, e)) from None
    check_datamanager(datamanager, cfg)
    return datamanager


def _datamanager_failure(cfg, e):
    frame = traceback.extract_tb(e.__traceback__)[-1]
    where = '{} ("{}", line {})'.format((frame.line or "").strip(), osp.basename(frame.filename), frame.lineno)
    hints = [
        "an empty or incomplete dataset folder (scan it with: ptl-torchreid check-data --root {} -s {})".format(
            cfg.data.root, " ".join(_dataset_names(cfg))
        )
    ]
    if "RandomIdentitySampler" in (cfg.sampler.train_sampler, cfg.sampler.train_sampler_t):
        hints.append(
            f"fewer training identities than train.batch_size / sampler.num_instances = {cfg.train.batch_size // cfg.sampler.num_instances} "
            "(RandomIdentitySampler puts that many identities in every batch)"
        )
    return (
        "torchreid could not build the data loaders for sources {} / targets {} under data.root = '{}': "
        "{}{} at {}. Likely causes: {}.".format(
            list(cfg.data.sources),
            list(cfg.data.targets),
            cfg.data.root,
            type(e).__name__,
            ": " + str(e) if str(e) else "",
            where,
            "; ".join(hints),
        )
    )


def check_datamanager(datamanager, cfg):
    """Dataset problems that would otherwise surface only after training: an empty training set, an empty
    query or gallery, a test set with fewer than two cameras, no query with a cross-camera gallery match
    (each a :class:`DatasetError`); a gallery smaller than the largest of ``test.ranks`` is noted."""
    training = cfg.train.max_epoch > cfg.train.start_epoch and not cfg.test.evaluate
    if training and datamanager.num_train_pids < 1:
        raise DatasetError(
            f"the training set of {list(cfg.data.sources)} holds no identities under data.root = '{cfg.data.root}'; check the dataset "
            "with: ptl-torchreid check-data"
        )
    for name, splits in datamanager.test_dataset.items():
        query, gallery = splits["query"], splits["gallery"]
        for split, items in (("query", query), ("gallery", gallery)):
            if not items:
                raise DatasetError(
                    f"the {split} set of target '{name}' is empty (data.root = '{cfg.data.root}'): nothing to evaluate; "
                    "check the dataset with: ptl-torchreid check-data"
                )
        cams = {item[2] for item in query} | {item[2] for item in gallery}
        if len(cams) < 2:
            raise DatasetError(
                f"the test set of target '{name}' has images from {len(cams)} camera(s) only; ReID evaluation "
                "needs at least 2, since gallery images from the query's own camera are "
                "discarded"
            )
        gallery_cams = {}
        for item in gallery:
            gallery_cams.setdefault(item[1], set()).add(item[2])
        if not any(gallery_cams.get(q[1], set()) - {q[2]} for q in query):
            raise DatasetError(
                f"no query of target '{name}' has a gallery image of the same identity from another "
                "camera, so every query would be discarded; check the query/gallery split"
            )
        clamp_ranks(cfg.test.ranks, len(gallery), name)  # notes now, not after training


def load_initial_weights(model, path, mode="match", trust=False, checkpoint=None):
    """Load ``model.load_weights`` into ``model`` (a plain torchreid checkpoint given to a PTL model fills its
    backbone; see ``ptl_torchreid.models.load_pretrained_weights``). ``checkpoint``: the file already loaded."""
    net = unwrap(model)
    if checkpoint is None:
        checkpoint = load_checkpoint(path, map_location="cpu", trust=trust)
    try:
        state_dict = extract_state_dict(checkpoint)
    except ValueError as e:
        raise CheckpointReadError(f'model.load_weights = "{path}" holds no model weights: {e}') from None
    if is_ptl(net) and not is_ptl_state_dict(state_dict):
        print(f'Loading plain model weights from "{path}" into the PTL backbone')
    print(f'Loading weights from "{path}" (model.load_weights_mode = {mode})')
    return load_pretrained_weights(net, state_dict, mode=mode)


def build_model(cfg, num_classes):
    """``ptl_torchreid.models.build_model`` with the config's model and PTL options, plus ``load_weights``.
    A pruned checkpoint (see ``ptl_torchreid.compress``) as ``load_weights`` rebuilds the pruned model."""
    path = cfg.model.load_weights
    checkpoint = load_checkpoint(path, map_location="cpu", trust=cfg.model.trust_checkpoint) if path else None
    if is_pruned_checkpoint(checkpoint):
        model = load_pruned_model(checkpoint, num_classes=num_classes, loss=cfg.loss.name)
        if is_ptl(model):
            model.configure_cells(
                state_mode=cfg.ptl.state_mode, eval_state=cfg.ptl.eval_state, momentum=cfg.ptl.momentum
            )
        print('Loaded the pruned {} from "{}"'.format(checkpoint["pruning"]["arch"], path))
        return model
    model = _build_model(**model_kwargs(cfg, num_classes))
    if not is_ptl_model_name(cfg.model.name) and cfg.ptl != get_default_config().ptl:
        print(f"Note: '{cfg.model.name}' is a plain torchreid model; the ptl.* settings are ignored.")
    if cfg.model.load_weights:
        load_initial_weights(
            model,
            cfg.model.load_weights,
            cfg.model.load_weights_mode,
            cfg.model.trust_checkpoint,
            checkpoint=checkpoint,
        )
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
    engine = engine_cls(
        datamanager,
        model,
        optimizer,
        scheduler=scheduler,
        checkpoint_extras={"config": cfg.dump(), "model_name": cfg.model.name},
        **engine_kwargs(cfg),
    )
    engine.start_epoch = cfg.train.start_epoch
    resume = resume_path(cfg)
    if resume:
        start = engine.resume(resume, trust=cfg.model.trust_checkpoint, save_dir=cfg.data.save_dir)
        if start is not None:
            engine.start_epoch = start
    return engine


def check_paths(cfg):
    """Files named in the config exist (checked before any work starts)."""
    for key in ("model.load_weights", "model.resume", "train.resume"):
        section, leaf = key.split(".")
        path = cfg[section][leaf]
        if path and path != "auto" and osp.isdir(path):
            raise ConfigError(f"{key} = '{path}' is a directory; give a checkpoint file in it")
        if path and path != "auto" and not osp.isfile(path):
            raise ConfigError(f"{key} = '{path}': no such file")


def check_checkpoint_files(cfg):
    """Read the checkpoints named by ``model.load_weights`` and the resume keys once, before any work starts:
    a file that would need full unpickling is refused here (unless ``model.trust_checkpoint``), and a corrupt
    one is reported, before datasets are generated or models built."""
    resume = resume_path(cfg)
    if resume == "auto":
        resume = CheckpointManager(osp.join(cfg.data.save_dir, "model")).latest()
    for path in dict.fromkeys(p for p in (cfg.model.load_weights, resume) if p):
        load_checkpoint(path, map_location="cpu", trust=cfg.model.trust_checkpoint)


def run(cfg):
    """Train and/or evaluate as ``cfg`` says; returns ``{target: {'mAP': x, 'cmc': {rank: y}}}``."""
    check_paths(cfg)
    # The same seed on every rank: the global RNG streams stay identical across ranks (so rank 0's RNG state in a
    # checkpoint resumes all of them); data order and augmentation differ per rank through the training loader's
    # seeds, derived from (train.seed, epoch, rank).
    torchreid.utils.set_random_seed(cfg.train.seed)
    engine = build_engine(cfg)
    kwargs = engine_run_kwargs(cfg)
    kwargs["start_epoch"] = engine.start_epoch
    if cfg.test.evaluate and not (cfg.model.load_weights or resume_path(cfg)):
        print("Warning: evaluating a model without trained weights (set model.load_weights).")
    reset_skipped_images()
    results = engine.run(**kwargs)
    if cfg.data.skip_corrupt:
        print(
            f"Skipped {skipped_images()} unreadable image(s) during this run (data.skip_corrupt is on; each training image was "
            "replaced by another sample of the same identity; query and gallery images are never replaced). Find "
            "them with: ptl-torchreid check-data"
        )
    return results


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def format_results_table(results):
    """A Markdown table: one row per target, mAP and the Rank-k columns."""
    if not results:
        return "(no results)"
    ranks = sorted({r for res in results.values() for r in res["cmc"]})
    minp = any("mINP" in res for res in results.values())
    header = ["target", "mAP"] + ["mINP"] * minp + [f"Rank-{r}" for r in ranks]
    rows = []
    for name, res in results.items():
        cmc = res["cmc"]
        rows.append(
            [name, "{:.1%}".format(res["mAP"])]
            + ["{:.1%}".format(res.get("mINP", float("nan")))] * minp
            + [f"{cmc[r]:.1%}" if r in cmc else "-" for r in ranks]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


@contextlib.contextmanager
def distributed_session(cfg):
    """Join the ``torchrun`` process group, if launched by ``torchrun`` (``nccl`` with ``use_gpu``, else
    ``gloo``; each process on ``cuda:LOCAL_RANK``), for the block; standard output of ranks other than 0 is
    discarded. Without ``torchrun`` it runs the block as a single process."""
    joined = not pdist.is_distributed()
    ctx = pdist.init_distributed(device="cuda" if resolve_use_gpu(cfg) else "cpu")
    try:
        with pdist.quiet_unless_main():
            yield ctx
    finally:
        if joined:
            pdist.cleanup_distributed()


def _log_file(path):
    """Standard output copied into ``path`` on rank 0; nothing on the other ranks."""
    return _Tee(path) if pdist.is_main_process() else contextlib.nullcontext()


class _Tee:
    """Copy of stdout into a log file (restored on exit)."""

    def __init__(self, path):
        self.path = path
        try:
            os.makedirs(osp.dirname(path), exist_ok=True)
            self.file = open(path, "a")
        except OSError as e:
            raise SaveDirError(
                e.errno,
                f"cannot write the log file '{path}': {e.strerror or e}; make data.save_dir writable or choose "
                "another one",
            ) from None
        self.console = sys.stdout

    def _file_failed(self, e):
        # The log file's disk is full (or gone): keep the console output and the run's own error message.
        file, self.file = self.file, None
        with contextlib.suppress(OSError):
            file.close()
        print(
            f"ptl-torchreid: warning: the log file '{self.path}' could not be written ({e.strerror or e}); output continues on the "
            "console only",
            file=sys.stderr,
        )

    def write(self, msg):
        self.console.write(msg)
        if self.file is not None:
            try:
                self.file.write(msg)
            except OSError as e:
                self._file_failed(e)

    def flush(self):
        self.console.flush()
        if self.file is not None:
            try:
                self.file.flush()
            except OSError as e:
                self._file_failed(e)

    def isatty(self):
        return False

    def __enter__(self):
        sys.stdout = self
        return self

    def __exit__(self, *exc):
        sys.stdout = self.console
        if self.file is not None:
            try:
                self.file.close()
            except OSError as e:
                self.file = None
                print(
                    f"ptl-torchreid: warning: the end of the log file '{self.path}' could not be written ({e.strerror or e})",
                    file=sys.stderr,
                )


# ---------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------

Command = namedtuple("Command", "name help run overrides add_arguments tool")
COMMANDS = {}


def register_command(name, help, run_fn, overrides=(), add_arguments=None, tool=False):
    """Add a CLI command. ``run_fn(cfg, args)`` returns results (or None), or an int: the exit status;
    ``overrides`` are ``KEY VALUE`` pairs applied after the user's; ``add_arguments(parser)`` adds
    command-specific flags. A ``tool`` command (e.g. check-data) runs without a log file in ``data.save_dir``
    and without the dataset-folder and checkpoint checks done before training commands."""
    COMMANDS[name] = Command(name, help, run_fn, list(overrides), add_arguments, bool(tool))


def _run_and_report(cfg, args):
    results = run(cfg)
    print("\n" + format_results_table(results))
    return results


register_command("train", "train, then evaluate on the targets (the default command)", _run_and_report)
register_command(
    "test",
    "evaluate only (sets test.evaluate True); give weights with model.load_weights",
    _run_and_report,
    overrides=["test.evaluate", "True"],
)
register_command(
    "visrank",
    "evaluate and save ranked-result images to <save_dir>/visrank_<target>",
    _run_and_report,
    overrides=["test.evaluate", "True", "test.visrank", "True"],
)


def _dataset_dirs(cfg, names):
    """``[(name, folder, naming pattern)]`` of datasets under ``data.root``."""
    registry = torchreid_image_datasets()
    root = osp.abspath(osp.expanduser(cfg.data.root))
    out = []
    for name in names:
        subdir = getattr(registry.get(name), "dataset_dir", None)
        if not isinstance(subdir, str):
            raise DatasetRootError(
                f"dataset '{name}' does not say where its files are (no dataset_dir); scan its folder with --dir"
            )
        out.append((name, osp.join(root, subdir), name if name in PATTERNS else "market-style"))
    return out


def check_data(cfg, args):
    """The ``check-data`` command: scan dataset folders (every image decoded) and print a report per dataset:
    ``--dir``, else the datasets named with -s/-t, else the config's sources and targets, under ``data.root``.
    Returns 0 when every scanned dataset is fine, 1 when a problem was found."""
    if args.dir:
        jobs = [(osp.basename(osp.normpath(args.dir)), args.dir, args.pattern or "market-style")]
    else:
        names = list(dict.fromkeys((args.sources or []) + (args.targets or []))) or _dataset_names(cfg)
        jobs = [(n, d, args.pattern or p) for n, d, p in _dataset_dirs(cfg, names)]
    status = 0
    for name, folder, pattern in jobs:
        print(f"== {name} ==")
        if not args.dir and is_synthetic_dataset(name) and not osp.isdir(folder):
            print(f'"{folder}" is not generated yet; it is generated (and valid) on first use.')
            continue
        try:
            if not args.dir and is_user_source(name):  # folder / list-file / no-camera source
                report = check_user_source(name, num_workers=args.scan_workers)
            else:
                report = check_dataset_root(folder, pattern=pattern, num_workers=args.scan_workers)
        except DatasetRootError as e:
            print(f"Problem: {e}")
            status = 1
            continue
        print(format_report(report, max_files=args.max_files))
        if not report.ok:
            status = 1
    print("check-data: {}".format("no problems found" if status == 0 else "problems found (see above)"))
    return status


def _check_data_arguments(parser):
    parser.add_argument(
        "--dir",
        type=str,
        default="",
        help="scan this dataset folder (Market-1501 layout) instead of the config's datasets under data.root",
    )
    parser.add_argument(
        "--pattern",
        choices=sorted(PATTERNS),
        default=None,
        help="file-name convention for identities and cameras (default: by dataset name, else market-style)",
    )
    parser.add_argument("--max-files", type=int, default=20, help="problem files listed per kind")
    parser.add_argument("--scan-workers", type=int, default=4, help="threads decoding images")


register_command(
    "check-data",
    "scan the datasets (-s/-t under --root, or --dir) for unreadable, empty or mislabeled "
    "images and layout problems; exit status 1 when any is found",
    check_data,
    add_arguments=_check_data_arguments,
    tool=True,
)


def _run_prune(cfg, args):
    from ptl_torchreid.cli_prune import run_prune

    return run_prune(cfg, args)


def _prune_arguments(parser):
    from ptl_torchreid.cli_prune import add_prune_arguments

    add_prune_arguments(parser)


register_command(
    "prune",
    "COP-prune model.load_weights to a target (--flops-reduction/--params-reduction/"
    "--prune-rate), fine-tune, evaluate, save",
    _run_prune,
    add_arguments=_prune_arguments,
)


register_command(
    "embed",
    "write the features of a folder, list file or DATASET:SPLIT (--input) to --output (.npz with the image paths)",
    lambda cfg, args: run_embed(cfg, args, build_model),
    add_arguments=add_embed_arguments,
    tool=True,
)
register_command(
    "search",
    "top-k gallery images of each query from saved features (--query/--gallery), as a "
    "table, results.csv and visrank-style PNGs",
    run_search,
    add_arguments=add_search_arguments,
    tool=True,
)
register_command(
    "export",
    "export model.load_weights (plain, PTL or pruned) to ONNX / OpenVINO (--format, "
    "--int8), checked against PyTorch, with a sidecar JSON",
    lambda cfg, args: run_export(cfg, args, build_datamanager, build_model),
    add_arguments=add_export_arguments,
)


def build_parser(command="train"):
    cmd = COMMANDS[command]
    parser = argparse.ArgumentParser(
        prog="ptl-torchreid" if command == "train" else "ptl-torchreid " + command,
        description=f"PTL (Progressive Transfer Learning) for torchreid. Command '{command}': {cmd.help}.",
        epilog="commands: "
        + "; ".join(f"{c.name} ({c.help})" for c in COMMANDS.values())
        + ". Config keys follow torchreid's default_config plus a 'ptl' section.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", type=str, default="", help="path to a YAML config file")
    parser.add_argument("-s", "--sources", type=str, nargs="+", help="source datasets (data.sources)")
    parser.add_argument("-t", "--targets", type=str, nargs="+", help="target datasets (data.targets)")
    parser.add_argument("--transforms", type=str, nargs="+", help="training augmentations (data.transforms)")
    parser.add_argument("--root", type=str, default="", help="path to the dataset root (data.root)")
    parser.add_argument(
        "--resume",
        type=str,
        nargs="?",
        const="auto",
        default=None,
        metavar="CHECKPOINT",
        help="resume training from CHECKPOINT, or, without a value, from the latest checkpoint "
        "in data.save_dir when there is one (train.resume)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow checkpoints that cannot be read weights-only (legacy pickles) to be fully "
        "unpickled. Unpickling can run arbitrary code contained in the file: use it only "
        "for files from a source you trust (model.trust_checkpoint)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="train into a data.save_dir that holds the checkpoints of an earlier run, deleting them "
        "first (without it such a folder needs --resume or another data.save_dir)",
    )
    parser.add_argument("--version", action="version", version="ptl_torchreid " + __version__)
    if cmd.add_arguments is not None:
        cmd.add_arguments(parser)
    parser.add_argument(
        "opts",
        default=None,
        nargs=argparse.REMAINDER,
        help="KEY VALUE config overrides, e.g. train.max_epoch 10 ptl.lr_mult 10",
    )
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


# Flags accepted anywhere, also after the KEY VALUE overrides (which argparse would otherwise take as overrides).
_ANYWHERE_FLAGS = ("--trust-checkpoint", "--overwrite")


def _pull_flags_forward(argv):
    """``argv`` with ``--resume [CHECKPOINT]``, ``--trust-checkpoint`` and ``--overwrite`` moved to the front, so
    that ``... train.max_epoch 3 --resume`` means what it says."""
    keys = set(config_keys())
    front, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a in _ANYWHERE_FLAGS or a.startswith("--resume="):
            front.append(a)
        elif a == "--resume":
            front.append(a)
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("-") and nxt not in keys and nxt not in COMMANDS:
                front.append(nxt)
                i += 1
        else:
            rest.append(a)
        i += 1
    return front + rest


def _check_command_name(argv):
    """A first word that is neither a command, a flag nor a config key is a mistyped command."""
    if not argv or argv[0] in COMMANDS or argv[0].startswith("-") or "." in argv[0]:
        return
    near = difflib.get_close_matches(argv[0], list(COMMANDS), n=1, cutoff=0.5)
    raise ConfigError(
        "unknown command '{}'{}; the commands are {}".format(
            argv[0], f" (did you mean '{near[0]}')" if near else "", ", ".join(COMMANDS)
        )
    )


def resume_command(argv):
    """The command line that resumes the run started with ``argv``: the same arguments with ``--resume``."""
    args, i = [], 0
    while i < len(argv):
        if argv[i] == "--resume":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            i += 2 if nxt is not None and not nxt.startswith("-") and nxt not in set(config_keys()) else 1
            continue
        if not argv[i].startswith("--resume=") and argv[i] != "--overwrite":  # resuming must not delete anything
            args.append(argv[i])
        i += 1
    return "ptl-torchreid " + " ".join(shlex.quote(a) for a in args + ["--resume"])


def parse_command_line(argv=None):
    """``(command, args, cfg)`` from a command line; the config is merged and validated, and the files and
    dataset folders it names are checked, so errors come before any work starts."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _check_command_name(argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    args = _move_trailing_overrides(build_parser(command).parse_args(_pull_flags_forward(argv)))
    flags = []
    if args.resume is not None and args.resume in set(config_keys()):
        # `--resume train.max_epoch 3`: the override is not a checkpoint path
        args.opts = [args.resume] + list(args.opts or [])
        args.resume = "auto"
    if args.resume is not None:
        flags += ["train.resume", args.resume]
    if args.trust_checkpoint:
        flags += ["model.trust_checkpoint", "True"]
    cfg = load_config(
        args.config_file or None,
        list(args.opts or []) + flags + COMMANDS[command].overrides,
        sources=args.sources,
        targets=args.targets,
        transforms=args.transforms,
        root=args.root or None,
    )
    if not COMMANDS[command].tool:
        if COMMANDS[command].run is _run_and_report and not cfg.test.evaluate and cfg.train.max_epoch == 0:
            raise ConfigError(
                "train.max_epoch = 0: there is nothing to train, and test.evaluate is False, so nothing "
                "would be evaluated either. Set train.max_epoch to the number of epochs to train, or "
                "evaluate model.load_weights with the 'test' command"
            )
        check_paths(cfg)
        check_dataset_roots(cfg)
        if cfg.model.trust_checkpoint:
            print(
                "Warning: model.trust_checkpoint is on: a checkpoint that cannot be read weights-only will be "
                "fully unpickled, which runs any code it contains. Use it only for files you trust.",
                file=sys.stderr,
            )
        check_checkpoint_files(cfg)
    return command, args, cfg


def trains(cfg):
    """Whether a run of ``cfg`` writes training checkpoints into ``data.save_dir``."""
    return not cfg.test.evaluate and cfg.train.max_epoch > cfg.train.start_epoch


@contextlib.contextmanager
def _save_dir_guard(cfg, args):
    """For a training run on rank 0: hold ``data.save_dir``'s lock, and refuse a folder that already holds an
    earlier run's checkpoints unless resuming it or told to overwrite them (``--overwrite``)."""
    if not (trains(cfg) and pdist.is_main_process()):
        yield
        return
    with SaveDirLock(cfg.data.save_dir, what="data.save_dir"):
        manager = CheckpointManager(osp.join(cfg.data.save_dir, "model"))
        earlier = [p for p in manager.checkpoints() + [manager.best()] if p]
        if earlier and not resume_path(cfg):
            if not getattr(args, "overwrite", False):
                raise ConfigError(
                    "data.save_dir = '{}' already holds the checkpoints of an earlier run ({}). A new run would "
                    "overwrite them and mix both runs in latest.json: continue that run with --resume, train into "
                    "another data.save_dir, or delete them first with --overwrite".format(
                        cfg.data.save_dir, ", ".join(osp.basename(p) for p in earlier[-3:])
                    )
                )
            # the weights this run starts from stay, even when they are one of those checkpoints
            keep = {osp.realpath(cfg.model.load_weights)} if cfg.model.load_weights else set()
            deleted = [p for p in earlier if osp.realpath(p) not in keep]
            for path in deleted + [manager.pointer_path]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            print(
                "--overwrite: deleted the {} checkpoint(s) of the earlier run in '{}'{}".format(
                    len(deleted), manager.save_dir, " (kept model.load_weights)" if len(deleted) < len(earlier) else ""
                )
            )
        yield


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM outside the engine's training loop (which checkpoints first) stops like Ctrl-C, not silently."""

    def stop(signum, frame):
        raise TrainingInterrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _report_interrupt(e, argv):
    if isinstance(e, TrainingInterrupted):
        name, status, saved = e.signal_name, e.exit_status, e.checkpoint
        where = "" if e.epoch is None else f" at epoch {e.epoch}, iteration {e.iteration}"
    else:
        name, status, saved, where = "SIGINT", 128 + signal.SIGINT, None, ""
    what = f'checkpoint saved to "{saved}"' if saved else "no checkpoint was written at the stop"
    print(f"ptl-torchreid: stopped by {name}{where}; {what}. Resume with: {resume_command(argv)}", file=sys.stderr)
    return status


def main(argv=None):
    """Entry point of ``ptl-torchreid`` and ``python -m ptl_torchreid``; returns the exit status (2 for the
    errors it explains; 130 / 143 when stopped by SIGINT / SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with _sigterm_as_interrupt():
            return _main(argv)
    except (TrainingInterrupted, KeyboardInterrupt) as e:
        return _report_interrupt(e, argv)


def _main(argv):
    try:
        command, args, cfg = parse_command_line(argv)
        cmd = COMMANDS[command]
        if cmd.tool:
            status = cmd.run(cfg, args)
        else:
            log_name = "{}-{}.log".format(command, time.strftime("%Y-%m-%d-%H-%M-%S"))
            with (
                distributed_session(cfg) as ctx,
                _save_dir_guard(cfg, args),
                _log_file(osp.join(cfg.data.save_dir, log_name)),
            ):
                print(
                    "ptl_torchreid {} | torch {} | device {}{}".format(
                        __version__,
                        torch.__version__,
                        "cuda" if engine_kwargs(cfg)["use_gpu"] else "cpu",
                        f" | {ctx.world_size} processes ({ctx.backend})" if ctx.distributed else "",
                    )
                )
                print(describe_cpu_threads(apply_cpu_threads(cfg.train.cpu_threads)))
                print(f"Configuration:\n{cfg.dump()}")
                status = cmd.run(cfg, args)
    except (
        ConfigError,
        DatasetRootError,
        DatasetError,
        CheckpointError,
        NonFiniteLossError,
        ImageReadError,
        SaveDirError,
        ExportError,
    ) as e:
        # Errors whose message says what is wrong and how to fix it; a traceback would only bury it.
        print(f"ptl-torchreid: error: {e}", file=sys.stderr)
        return 2
    return status if type(status) is int else 0
