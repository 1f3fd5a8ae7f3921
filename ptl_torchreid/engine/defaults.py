"""Builders from a config, and :func:`run`: what ``ptl-torchreid train`` does, callable from Python.

    from ptl_torchreid.config import load_config
    from ptl_torchreid.engine import run

    results = run(load_config("configs/synthetic_demo.yaml", ["train.max_epoch", "2"]))

:func:`build_datamanager`, :func:`build_model`, :func:`build_optimizer_and_scheduler` and :func:`build_engine`
turn a config into torchreid's data manager, the model (``model.load_weights`` loaded), the optimizer and LR
scheduler, and the PTL engine (resumed from ``train.resume``). :func:`preflight` checks, before any work starts,
the files and dataset folders the config names and reads its checkpoints once; the builders take what it read.
The command line, the ``prune`` command and the benchmark tools all train through :func:`run`.
"""
import contextlib
import os.path as osp
import traceback

from ptl_torchreid import _torchreid
from ptl_torchreid.compress import is_pruned_checkpoint, load_pruned_model
from ptl_torchreid.config import (
    ConfigError,
    engine_kwargs,
    engine_run_kwargs,
    get_default_config,
    imagedata_kwargs,
    is_ptl_model_name,
    is_synthetic_dataset,
    lr_scheduler_kwargs,
    model_kwargs,
    optimizer_kwargs,
    resolve_use_gpu,
    resume_path,
    synthetic_kwargs,
    torchreid_image_datasets,
)
from ptl_torchreid.data import (
    DatasetError,
    DatasetRootError,
    install_strict_reader,
    register_synthetic_dataset,
    reset_skipped_images,
    skipped_images,
)
from ptl_torchreid.data.check import cross_camera_matches
from ptl_torchreid.data.samplers import distribute_train_loaders
from ptl_torchreid.engine.engines import PTLImageSoftmaxEngine, PTLImageTripletEngine
from ptl_torchreid.engine.optim import build_optimizer
from ptl_torchreid.metrics import clamp_ranks
from ptl_torchreid.models import build_model as build_named_model
from ptl_torchreid.models import is_ptl, is_ptl_state_dict, load_pretrained_weights
from ptl_torchreid.utils import distributed as pdist
from ptl_torchreid.utils.checkpoint import CheckpointManager, CheckpointReadError, extract_state_dict, load_checkpoint

torchreid = _torchreid.torchreid

__all__ = [
    "ENGINES",
    "build_datamanager",
    "build_engine",
    "build_model",
    "build_optimizer_and_scheduler",
    "check_datamanager",
    "check_dataset_roots",
    "check_paths",
    "dataset_names",
    "distributed_session",
    "preflight",
    "read_checkpoints",
    "run",
    "take_checkpoint",
]

# loss.name -> engine class
ENGINES = {"softmax": PTLImageSoftmaxEngine, "triplet": PTLImageTripletEngine}


# ---------------------------------------------------------------------------------------------------------
# Checks before any work
# ---------------------------------------------------------------------------------------------------------


def dataset_names(cfg):
    """The config's source and target datasets, each once, sources first."""
    return list(dict.fromkeys(list(cfg.data.sources) + list(cfg.data.targets)))


def check_paths(cfg):
    """Files named in the config exist."""
    for key in ("model.load_weights", "model.resume", "train.resume"):
        section, leaf = key.split(".")
        path = cfg[section][leaf]
        if path and path != "auto" and osp.isdir(path):
            raise ConfigError(f"{key} = '{path}' is a directory; give a checkpoint file in it")
        if path and path != "auto" and not osp.isfile(path):
            raise ConfigError(f"{key} = '{path}': no such file")


def check_dataset_roots(cfg):
    """Fail fast, without downloading, when a real dataset is not under ``data.root``.

    torchreid's datasets download themselves (or hang offline) when their folder is missing; we check the
    folder first. The embedded synthetic datasets are generated, so they are skipped.
    """
    registry = torchreid_image_datasets()
    root = osp.abspath(osp.expanduser(cfg.data.root))
    for name in dataset_names(cfg):
        if is_synthetic_dataset(name):
            continue
        subdir = getattr(registry.get(name), "dataset_dir", None)
        if not isinstance(subdir, str):
            continue  # a user-registered dataset that does not follow torchreid's layout convention
        expected = osp.join(root, subdir)
        if not osp.isdir(expected):
            raise DatasetRootError(
                f"dataset '{name}' was not found: expected its files under {expected} "
                f"(data.root = '{cfg.data.root}'). ptl-torchreid does not download datasets; put {name} there "
                f"(torchreid's layout) or point --root / data.root at the folder that contains '{subdir}'."
            )


def read_checkpoints(cfg):
    """``{path: checkpoint}`` of the files named by ``model.load_weights`` and the resume keys (``'auto'``: the
    latest checkpoint in ``data.save_dir``), each read once, on the CPU. A file that would need full unpickling
    is refused here (unless ``model.trust_checkpoint``), and a corrupt one reported."""
    resume = resume_path(cfg)
    if resume == "auto":
        resume = CheckpointManager(osp.join(cfg.data.save_dir, "model")).latest()
    paths = dict.fromkeys(p for p in (cfg.model.load_weights, resume) if p)
    return {path: load_checkpoint(path, map_location="cpu", trust=cfg.model.trust_checkpoint) for path in paths}


def preflight(cfg):
    """The checks done before any work starts (no dataset generated, no model built, nothing written): the
    files the config names exist, the real datasets are under ``data.root``, and its checkpoints are readable
    and safe. Returns the checkpoints read (:func:`read_checkpoints`), for :func:`build_engine` / :func:`run`."""
    check_paths(cfg)
    check_dataset_roots(cfg)
    return read_checkpoints(cfg)


def take_checkpoint(cfg, path, checkpoints=None):
    """The checkpoint file at ``path``: taken out of ``checkpoints`` (what :func:`preflight` read) when it is
    there, so that no file is deserialised twice nor kept after use; read now otherwise."""
    if checkpoints is not None and path in checkpoints:
        return checkpoints.pop(path)
    return load_checkpoint(path, map_location="cpu", trust=cfg.model.trust_checkpoint)


# ---------------------------------------------------------------------------------------------------------
# Builders: config -> objects
# ---------------------------------------------------------------------------------------------------------


def build_datamanager(cfg):
    """The ``torchreid.data.ImageDataManager`` for ``cfg`` (the single place where loaders and samplers are
    made). Synthetic datasets are (re-)registered with ``data.synthetic`` first. Images are read with the
    strict reader (an unreadable file raises an error naming it instead of torchreid's endless retries;
    ``data.skip_corrupt`` skips and counts such samples instead). Real datasets must be under ``data.root``
    (torchreid would download them): :func:`preflight` checks that, and :func:`run` calls it.

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
    for name in dataset_names(cfg):
        if is_synthetic_dataset(name):
            register_synthetic_dataset(name, **synthetic_kwargs(cfg))
    install_strict_reader(skip_corrupt=cfg.data.skip_corrupt)
    try:
        datamanager = torchreid.data.ImageDataManager(**imagedata_kwargs(cfg))
    except RuntimeError as e:
        # torchreid's check_before_run: a dataset folder exists but lacks a required sub-folder or file.
        if "is not found" in str(e):
            raise DatasetRootError(
                f"incomplete dataset under data.root = '{cfg.data.root}': {e}. Check the folder layout torchreid "
                f"expects for {', '.join(dataset_names(cfg))}."
            ) from None
        raise
    except (AssertionError, ValueError, IndexError, KeyError, ZeroDivisionError) as e:
        # torchreid's own sanity checks (bare asserts, empty samplers) fail with little context.
        raise DatasetError(_datamanager_failure(cfg, e)) from None
    check_datamanager(datamanager, cfg)
    return datamanager


def _datamanager_failure(cfg, e):
    frame = traceback.extract_tb(e.__traceback__)[-1]
    where = f'{(frame.line or "").strip()} ("{osp.basename(frame.filename)}", line {frame.lineno})'
    hints = [
        f"an empty or incomplete dataset folder (scan it with: ptl-torchreid check-data --root {cfg.data.root} -s "
        f"{' '.join(dataset_names(cfg))})"
    ]
    if "RandomIdentitySampler" in (cfg.sampler.train_sampler, cfg.sampler.train_sampler_t):
        hints.append(
            "fewer training identities than train.batch_size / sampler.num_instances = "
            f"{cfg.train.batch_size // cfg.sampler.num_instances} (RandomIdentitySampler puts that many identities "
            "in every batch)"
        )
    return (
        f"torchreid could not build the data loaders for sources {list(cfg.data.sources)} / targets "
        f"{list(cfg.data.targets)} under data.root = '{cfg.data.root}': "
        f"{type(e).__name__}{': ' + str(e) if str(e) else ''} at {where}. Likely causes: {'; '.join(hints)}."
    )


def check_datamanager(datamanager, cfg):
    """Dataset problems that would otherwise surface only after training: an empty training set, an empty
    query or gallery, a test set with fewer than two cameras, no query with a cross-camera gallery match
    (each a :class:`DatasetError`); a gallery smaller than the largest of ``test.ranks`` is noted."""
    training = cfg.train.max_epoch > cfg.train.start_epoch and not cfg.test.evaluate
    if training and datamanager.num_train_pids < 1:
        raise DatasetError(
            f"the training set of {list(cfg.data.sources)} holds no identities under data.root = "
            f"'{cfg.data.root}'; check the dataset with: ptl-torchreid check-data"
        )
    for name, splits in datamanager.test_dataset.items():
        query, gallery = splits["query"], splits["gallery"]
        for split, items in (("query", query), ("gallery", gallery)):
            if not items:
                raise DatasetError(
                    f"the {split} set of target '{name}' is empty (data.root = '{cfg.data.root}'): nothing to "
                    "evaluate; check the dataset with: ptl-torchreid check-data"
                )
        cams, unmatched = cross_camera_matches([i[1:3] for i in query], [i[1:3] for i in gallery])
        if len(cams) < 2:
            raise DatasetError(
                f"the test set of target '{name}' has images from {len(cams)} camera(s) only; ReID evaluation "
                "needs at least 2, since gallery images from the query's own camera are "
                "discarded"
            )
        if unmatched == len(query):
            raise DatasetError(
                f"no query of target '{name}' has a gallery image of the same identity from another "
                "camera, so every query would be discarded; check the query/gallery split"
            )
        clamp_ranks(cfg.test.ranks, len(gallery), name)  # notes now, not after training


def build_model(cfg, num_classes, checkpoint=None):
    """``ptl_torchreid.models.build_model`` with the config's model and PTL options, plus ``model.load_weights``
    (``checkpoint``: that file already loaded, e.g. by :func:`take_checkpoint`). A pruned checkpoint (see
    ``ptl_torchreid.compress``) as ``load_weights`` rebuilds the pruned model."""
    path = cfg.model.load_weights
    if path and checkpoint is None:
        checkpoint = take_checkpoint(cfg, path)
    if is_pruned_checkpoint(checkpoint):
        model = load_pruned_model(checkpoint, num_classes=num_classes, loss=cfg.loss.name)
        if is_ptl(model):
            model.configure_cells(
                state_mode=cfg.ptl.state_mode, eval_state=cfg.ptl.eval_state, momentum=cfg.ptl.momentum
            )
        print(f'Loaded the pruned {checkpoint["pruning"]["arch"]} from "{path}"')
        return model
    model = build_named_model(**model_kwargs(cfg, num_classes))
    if not is_ptl_model_name(cfg.model.name) and cfg.ptl != get_default_config().ptl:
        print(f"Note: '{cfg.model.name}' is a plain torchreid model; the ptl.* settings are ignored.")
    if path:
        try:
            state_dict = extract_state_dict(checkpoint)
        except ValueError as e:
            raise CheckpointReadError(f'model.load_weights = "{path}" holds no model weights: {e}') from None
        if is_ptl(model) and not is_ptl_state_dict(state_dict):
            print(f'Loading plain model weights from "{path}" into the PTL backbone')
        print(f'Loading weights from "{path}" (model.load_weights_mode = {cfg.model.load_weights_mode})')
        load_pretrained_weights(model, state_dict, mode=cfg.model.load_weights_mode)
    return model


def build_optimizer_and_scheduler(cfg, model):
    """The optimizer (``train.*``, with ``ptl.lr_mult`` for the side stream) and torchreid's LR scheduler."""
    optimizer = build_optimizer(model, **optimizer_kwargs(cfg))
    return optimizer, torchreid.optim.build_lr_scheduler(optimizer, **lr_scheduler_kwargs(cfg))


def build_engine(cfg, datamanager=None, model=None, checkpoints=None):
    """Engine for ``loss.name`` with its model, optimizer and scheduler; resumes from ``model.resume``.
    ``checkpoints``: files already read (:func:`preflight`), used instead of reading them again.

    Returns the engine; ``engine.start_epoch`` is where training starts (after a resume).
    """
    if datamanager is None:
        datamanager = build_datamanager(cfg)
    if model is None:
        weights = take_checkpoint(cfg, cfg.model.load_weights, checkpoints) if cfg.model.load_weights else None
        model = build_model(cfg, datamanager.num_train_pids, checkpoint=weights)
    optimizer, scheduler = build_optimizer_and_scheduler(cfg, model)
    engine = ENGINES[cfg.loss.name](
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
        start = engine.resume(resume, trust=cfg.model.trust_checkpoint, save_dir=cfg.data.save_dir,
                              preloaded=checkpoints)
        if start is not None:
            engine.start_epoch = start
    return engine


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------


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


def run(cfg, hooks=(), engine=None, checkpoints=None):
    """Train and/or evaluate as ``cfg`` says; returns ``{target: {'mAP': x, 'cmc': {rank: y}}}``.

    Without ``engine`` it checks the config's inputs (:func:`preflight`, unless ``checkpoints`` says what it
    read already), seeds every RNG with ``train.seed`` and builds the engine (:func:`build_engine`). To train
    something else the same way (a pruned model, a distillation attached), seed, make the engine with
    :func:`build_engine` and pass it as ``engine``. ``hooks`` are registered on the engine before it runs.
    """
    if engine is None:
        if checkpoints is None:
            checkpoints = preflight(cfg)
        # The same seed on every rank: the global RNG streams stay identical across ranks (so rank 0's RNG state
        # in a checkpoint resumes all of them); data order and augmentation differ per rank through the training
        # loader's seeds, derived from (train.seed, epoch, rank).
        torchreid.utils.set_random_seed(cfg.train.seed)
        engine = build_engine(cfg, checkpoints=checkpoints)
        if cfg.test.evaluate and not (cfg.model.load_weights or resume_path(cfg)):
            print("Warning: evaluating a model without trained weights (set model.load_weights).")
    if hooks:
        engine.register_hooks(list(hooks))
    kwargs = engine_run_kwargs(cfg)
    kwargs["start_epoch"] = engine.start_epoch
    reset_skipped_images()
    results = engine.run(**kwargs)
    if cfg.data.skip_corrupt:
        print(
            f"Skipped {skipped_images()} unreadable image(s) during this run (data.skip_corrupt is on; each "
            "training image was replaced by another sample of the same identity; query and gallery images are "
            "never replaced). Find them with: ptl-torchreid check-data"
        )
    return results
