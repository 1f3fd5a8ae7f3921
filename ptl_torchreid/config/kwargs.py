"""From a config to the keyword arguments of torchreid's and this package's builders (torchreid's mappers of
``scripts/default_config.py``, plus ours)."""
import torch

from ptl_torchreid.models import PTL_MODELS

from .errors import ConfigError

__all__ = ["resolve_use_gpu", "imagedata_kwargs", "synthetic_kwargs", "model_kwargs", "is_ptl_model_name",
           "optimizer_kwargs", "lr_scheduler_kwargs", "engine_kwargs", "evaluation_kwargs", "engine_run_kwargs",
           "resume_path"]


def resolve_use_gpu(cfg):
    """``use_gpu`` as a bool: 'auto' means CUDA when available."""
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
