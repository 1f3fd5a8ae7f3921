"""Command line: ``ptl-torchreid [COMMAND] --config-file FILE [-s ...] [-t ...] [--root DIR] [KEY VALUE ...]``.

Mirrors torchreid's ``scripts/main.py`` flags. Commands live in :data:`COMMANDS`; adding one is a single
:func:`register_command` call. The training commands run :func:`ptl_torchreid.engine.run`; the builders they
use live in ``ptl_torchreid.engine.defaults``.
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
from collections import namedtuple

import torch

from ptl_torchreid import __version__
from ptl_torchreid.cli_export import add_export_arguments, run_export
from ptl_torchreid.cli_prune import add_prune_arguments, run_prune
from ptl_torchreid.cli_retrieval import add_embed_arguments, add_search_arguments, run_embed, run_search
from ptl_torchreid.config import (
    ConfigError,
    config_keys,
    engine_kwargs,
    is_synthetic_dataset,
    load_config,
    resume_path,
    torchreid_image_datasets,
)
from ptl_torchreid.data import (
    PATTERNS,
    DatasetError,
    DatasetRootError,
    ImageReadError,
    check_dataset_root,
    format_report,
)
from ptl_torchreid.data.user import check_user_source, is_user_source
from ptl_torchreid.engine import NonFiniteLossError, TrainingInterrupted, run

# build_*, check_* and distributed_session live in engine.defaults; cli's __all__ re-exports them, as the
# documentation of earlier releases imported them from here.
from ptl_torchreid.engine.defaults import (
    build_datamanager,
    build_engine,
    build_model,
    check_datamanager,
    check_dataset_roots,
    dataset_names,
    distributed_session,
    preflight,
)
from ptl_torchreid.export import ExportError
from ptl_torchreid.metrics.table import format_results_table
from ptl_torchreid.utils import distributed as pdist
from ptl_torchreid.utils.checkpoint import CheckpointError, CheckpointManager
from ptl_torchreid.utils.cpu_threads import apply_cpu_threads, describe_cpu_threads
from ptl_torchreid.utils.logfile import log_file
from ptl_torchreid.utils.savedir import SaveDirError, SaveDirLock

__all__ = [
    "COMMANDS",
    "build_datamanager",
    "build_engine",
    "build_model",
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
# Commands
# ---------------------------------------------------------------------------------------------------------

Command = namedtuple("Command", "name help run overrides add_arguments tool")
COMMANDS = {}


def register_command(name, help, run_fn, overrides=(), add_arguments=None, tool=False):
    """Add a CLI command. ``run_fn(cfg, args)`` returns results (or None), or an int: the exit status;
    ``overrides`` are ``KEY VALUE`` pairs applied after the user's; ``add_arguments(parser)`` adds
    command-specific flags. A ``tool`` command (e.g. check-data) runs without a log file in ``data.save_dir``
    and without the dataset-folder and checkpoint checks done before training commands; for the others,
    ``args.checkpoints`` holds the checkpoints those checks read (pass it on to the builders, or take a file
    out of it with ``ptl_torchreid.engine.defaults.take_checkpoint``)."""
    COMMANDS[name] = Command(name, help, run_fn, list(overrides), add_arguments, bool(tool))


def _run_and_report(cfg, args):
    results = run(cfg, checkpoints=args.checkpoints)
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
        names = list(dict.fromkeys((args.sources or []) + (args.targets or []))) or dataset_names(cfg)
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
    print(f"check-data: {'no problems found' if status == 0 else 'problems found (see above)'}")
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


register_command(
    "prune",
    "COP-prune model.load_weights to a target (--flops-reduction/--params-reduction/"
    "--prune-rate), fine-tune, evaluate, save",
    run_prune,
    add_arguments=add_prune_arguments,
)


register_command(
    "embed",
    "write the features of a folder, list file or DATASET:SPLIT (--input) to --output (.npz with the image paths)",
    run_embed,
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
    run_export,
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
    suggestion = f" (did you mean '{near[0]}')" if near else ""
    raise ConfigError(f"unknown command '{argv[0]}'{suggestion}; the commands are {', '.join(COMMANDS)}")


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
    dataset folders it names are checked, so errors come before any work starts. ``args.checkpoints`` holds
    the checkpoint files the config names, read by these checks, for the command to build from
    (see :func:`ptl_torchreid.engine.defaults.preflight`; empty for tool commands)."""
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
    args.checkpoints = {}
    if not COMMANDS[command].tool:
        if COMMANDS[command].run is _run_and_report and not cfg.test.evaluate and cfg.train.max_epoch == 0:
            raise ConfigError(
                "train.max_epoch = 0: there is nothing to train, and test.evaluate is False, so nothing "
                "would be evaluated either. Set train.max_epoch to the number of epochs to train, or "
                "evaluate model.load_weights with the 'test' command"
            )
        if cfg.model.trust_checkpoint:
            print(
                "Warning: model.trust_checkpoint is on: a checkpoint that cannot be read weights-only will be "
                "fully unpickled, which runs any code it contains. Use it only for files you trust.",
                file=sys.stderr,
            )
        args.checkpoints = preflight(cfg)
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
                    f"data.save_dir = '{cfg.data.save_dir}' already holds the checkpoints of an earlier run "
                    f"({', '.join(osp.basename(p) for p in earlier[-3:])}). A new run would overwrite them and mix "
                    "both runs in latest.json: continue that run with --resume, train into another data.save_dir, or "
                    "delete them first with --overwrite"
                )
            # the weights this run starts from stay, even when they are one of those checkpoints
            keep = {osp.realpath(cfg.model.load_weights)} if cfg.model.load_weights else set()
            deleted = [p for p in earlier if osp.realpath(p) not in keep]
            for path in deleted + [manager.pointer_path]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            print(
                f"--overwrite: deleted the {len(deleted)} checkpoint(s) of the earlier run in "
                f"'{manager.save_dir}'{' (kept model.load_weights)' if len(deleted) < len(earlier) else ''}"
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
            log_name = f"{command}-{time.strftime('%Y-%m-%d-%H-%M-%S')}.log"
            with (
                distributed_session(cfg) as ctx,
                _save_dir_guard(cfg, args),
                log_file(osp.join(cfg.data.save_dir, log_name)),
            ):
                device = "cuda" if engine_kwargs(cfg)["use_gpu"] else "cpu"
                processes = f" | {ctx.world_size} processes ({ctx.backend})" if ctx.distributed else ""
                print(f"ptl_torchreid {__version__} | torch {torch.__version__} | device {device}{processes}")
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
