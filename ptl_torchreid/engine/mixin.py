"""The PTL engine mixin, shared by the softmax and the softmax+triplet engines.

It adds to torchreid's ``Engine``: PTL cell-state handling (reset policy; evaluation with the frozen state),
backbone freezing, device placement, mixed precision and channels_last, per-epoch logging (console +
TensorBoard), progress bars, vectorised ranking evaluation with rank clamping, weights-only-safe atomic
checkpoints with ``model-best``, checkpoints every N iterations, exact resume (mid-epoch included), a stop on a
non-finite loss, and distributed training (DDP, synchronised cell states, sharded evaluation, rank-0 output).
A concrete engine only supplies :meth:`compute_losses`.
"""
import datetime
import functools
import math
import os.path as osp
import signal
import time

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ptl_torchreid._torchreid import torchreid
from ptl_torchreid.data.samplers import ShardSampler, rebuild_loader
from ptl_torchreid.engine.evaluator import EvalOptions, file_name, rank_features
from ptl_torchreid.engine.reliability import (
    DIVERGED_GROWTH,
    StopSignals,
    TrainingInterrupted,
    apply_configured_lr,
    last_good_checkpoint,
    load_optimizer_state,
)
from ptl_torchreid.models import is_ptl, unwrap
from ptl_torchreid.utils import distributed as pdist
from ptl_torchreid.utils.amp import autocast_context, autocast_dtype, check_precision, make_grad_scaler, memory_format
from ptl_torchreid.utils.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointMismatchError,
    NonFiniteCheckpointError,
    load_checkpoint,
    to_plain,
    weight_norm,
)
from ptl_torchreid.utils.resume import EpochLoader, capture_rng_state, restore_rng_state
from ptl_torchreid.utils.savedir import SaveDirError

__all__ = ["PTLEngineMixin", "NonFiniteLossError", "TrainingInterrupted", "RESET_POLICIES", "clamp_ranks",
           "resolve_precision"]

RESET_POLICIES = ("epoch", "never", "iter")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; training stopped before the step changed the weights."""


def _output_on_main_rank(method):
    """Run an engine method with standard output discarded on every rank but 0 (one log per run)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with pdist.quiet_unless_main():
            return method(self, *args, **kwargs)
    return wrapper


def _stops_on_signals(run):
    """Training under ``run``: SIGINT/SIGTERM stop at the next safe point with a checkpoint (see
    :class:`~ptl_torchreid.engine.reliability.StopSignals`); evaluation-only runs keep the usual handlers."""
    @functools.wraps(run)
    def wrapper(self, *args, **kwargs):
        if kwargs.get("test_only"):
            return run(self, *args, **kwargs)
        with self._stop:
            return run(self, *args, **kwargs)
    return wrapper


class PTLEngineMixin:
    """Mix in before a torchreid image engine: ``class E(PTLEngineMixin, torchreid.engine.ImageSoftmaxEngine)``.

    Keyword arguments (on top of the torchreid engine's own, which must be given by keyword):

    - ``reset_policy``: when the carried cell state is zeroed: ``'epoch'`` (at every epoch start), ``'never'``,
      or ``'iter'`` (before every ``reset_every_n_iters``-th training step, counted over the whole run);
    - ``freeze_backbone_epochs``: train only the PTL parameters for the first K epochs; -1: throughout;
    - ``amp`` / ``amp_dtype``: autocast (``'auto'``: fp16 with a GradScaler on CUDA, bf16 on the CPU; or
      ``'fp16'`` / ``'bf16'``);
    - ``channels_last``: keep the model and the input batches in channels_last memory format (faster
      convolutions with AMP on tensor-core GPUs);
    - ``device``: where to train; default CUDA (the current CUDA device) when ``use_gpu`` and available, else
      the CPU;
    - ``find_unused_parameters``: DDP's flag, used under a process group of more than one rank. ``None``
      (default) turns it on when backbone freezing is configured, because frozen parameters get no gradient;
      set it to True for torchreid's fixbase epochs;
    - ``progress_bar``: tqdm bars for training and feature extraction (shown on a terminal only);
    - ``checkpoint_extras``: plain-typed entries added to every checkpoint (e.g. the config as YAML text);
    - ``keep_last``: periodic checkpoints kept (None: all, as torchreid); ``model-best`` is always kept;
    - ``seed``: the run's seed; the order of each epoch's batches and each sample's augmentation derive from
      ``(seed, epoch, rank)``, which is what lets :meth:`resume` continue mid-epoch exactly (and gives the ranks
      of a distributed run different augmentations);
    - ``checkpoint_every_n_iters``: also save a checkpoint every N training steps (0: only after evaluations,
      as torchreid); written to ``<save_dir>/model/model-iter<N>.pth.tar`` by :meth:`run`.

    A scheduler is always present: without one a constant schedule is used, so checkpoints always hold one.
    PTL-specific behaviour applies only when ``ptl_torchreid.models.is_ptl(model)``.

    Distributed training: when a process group of more than one rank exists (``utils.distributed.init_distributed``
    under ``torchrun``), the model is wrapped in DistributedDataParallel, the train loader must carry a
    distributed sampler (``data.samplers.distribute_train_loaders``), cell states are synchronised after every
    step, evaluation extracts features on disjoint shards of the test sets and gathers them (metrics are
    computed on rank 0 and shared), and only rank 0 prints, writes TensorBoard and saves checkpoints. Stops are
    agreed by all ranks (a non-finite loss on any rank, a failed checkpoint write on rank 0), and :meth:`resume`
    loads the same checkpoint on every rank.
    """

    def __init__(self, datamanager, model, optimizer, *, reset_policy="epoch", reset_every_n_iters=0,
                 freeze_backbone_epochs=0, amp=False, amp_dtype="auto", channels_last=False, device=None,
                 find_unused_parameters=None, progress_bar=True, checkpoint_extras=None, keep_last=None, seed=0,
                 checkpoint_every_n_iters=0, evaluation=None, **kwargs):
        if reset_policy not in RESET_POLICIES:
            raise ValueError(f"reset_policy must be one of {RESET_POLICIES}, got {reset_policy!r}")
        if reset_policy == "iter" and reset_every_n_iters < 1:
            raise ValueError(f"reset_policy 'iter' needs reset_every_n_iters >= 1, got {reset_every_n_iters}")
        if checkpoint_every_n_iters < 0:
            raise ValueError(f"checkpoint_every_n_iters must be >= 0 (0: off), got {checkpoint_every_n_iters}")
        if freeze_backbone_epochs < -1:
            raise ValueError(
                f"freeze_backbone_epochs must be -1 (throughout), 0 (never) or K > 0, got {freeze_backbone_epochs}"
            )

        use_gpu = kwargs.pop("use_gpu", True)
        if device is None:
            device = "cuda" if (use_gpu and torch.cuda.is_available()) else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # the current device: cuda:LOCAL_RANK once init_distributed has run
            self.device = torch.device("cuda", torch.cuda.current_device())
        # torchreid's losses move their targets to CUDA when use_gpu is set: keep it tied to the device.
        kwargs["use_gpu"] = self.device.type == "cuda"
        self.channels_last = bool(channels_last)
        # input batches follow the model's format; preserve_format leaves them untouched
        self.memory_format = memory_format(True) if self.channels_last else torch.preserve_format
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=self.memory_format)
        self.world_size = pdist.get_world_size()
        self.is_main = pdist.is_main_process()
        model = self._wrap_distributed(model, find_unused_parameters, freeze_backbone_epochs)
        if kwargs.get("scheduler") is None:
            kwargs["scheduler"] = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=1.0)
        super().__init__(datamanager, model, optimizer, **kwargs)

        self.reset_policy = reset_policy
        self.reset_every_n_iters = int(reset_every_n_iters)
        self.freeze_backbone_epochs = int(freeze_backbone_epochs)
        self.progress_bar = bool(progress_bar) and self.is_main
        self.checkpoint_extras = dict(checkpoint_extras or {})
        self.is_ptl = is_ptl(model)

        self.precision = resolve_precision(amp, amp_dtype, self.device)
        self.amp = self.precision != "fp32"
        self.amp_dtype = autocast_dtype(self.precision)
        # Loss scaling for fp16 only; a disabled scaler passes through, so the step is the same for all.
        self.scaler = make_grad_scaler(self.device.type, self.precision)
        self.keep_last = keep_last
        self._checkpoint_managers = {}

        self.max_epoch = 0
        self.num_batches = 0
        self.iteration = 0  # training steps taken over the whole run (restored on resume)
        self.best_rank1 = -1.0
        self.epoch_summary = {}  # last epoch's logged values
        self.last_results = {}  # target name -> {'mAP': float, 'cmc': {rank: float}}

        self.seed = int(seed)
        self.checkpoint_every_n_iters = int(checkpoint_every_n_iters)
        # test-time options: re-ranking parameters, AQE, flip, ROC, ranking memory cap (engine/evaluator.py)
        self.evaluation = evaluation if isinstance(evaluation, EvalOptions) else EvalOptions(**(evaluation or {}))
        self.save_dir = None  # set by run(); iteration checkpoints go to <save_dir>/model
        self.last_rank1 = None  # Rank-1 of the latest evaluation that was saved
        self._epoch_loader = None
        self._step_batch_size = 0  # images in this rank's latest training batch
        self._resume_at = None  # (epoch, batches of it already trained, epoch meters), set by resume()
        self._pending_rng = None  # RNG states to restore when training (re)starts, set by resume()
        self.reference_param_norm = None  # weights' norm when the run started (kept across resumes)
        self._stop = StopSignals()  # SIGINT/SIGTERM during run(): stop at the next safe point, with a checkpoint
        self._saved_at_iteration = None  # iteration of the latest checkpoint written

    # ----------------------------------------------------------------------------------------------------
    # Distributed training
    # ----------------------------------------------------------------------------------------------------

    def _wrap_distributed(self, model, find_unused_parameters, freeze_backbone_epochs):
        """DDP-wrapped ``model`` when more than one rank runs (else ``model``): the one place the engine wraps."""
        if self.world_size == 1:
            return model
        if find_unused_parameters is None:
            # freezing switches requires_grad off after wrapping; DDP must not wait for those gradients
            find_unused_parameters = is_ptl(model) and freeze_backbone_epochs != 0
        return pdist.wrap_ddp(model, device=self.device, find_unused_parameters=bool(find_unused_parameters))

    @property
    def ddp(self):
        """Whether the model is wrapped in DistributedDataParallel."""
        return isinstance(self.model, torch.nn.parallel.DistributedDataParallel)

    def _check_train_sampler(self):
        """Refuse a plain train sampler under several ranks, which would feed every rank the same batches. (The
        sampler gets each epoch through ``set_epoch`` from :meth:`epoch_loader`, which plans the epoch.)"""
        sampler = getattr(self.train_loader, "sampler", None)
        if self.world_size > 1 and getattr(sampler, "num_replicas", None) != self.world_size:
            raise ValueError(
                f"distributed training over {self.world_size} ranks needs a distributed train sampler, but the train loader uses "
                f"{type(sampler).__name__}; call ptl_torchreid.data.samplers.distribute_train_loaders(datamanager, ...) before building "
                "the engine (the command line does this)"
            )

    def _sync_cell_states(self, batch_size):
        """After the optimizer step: average the cells' states over the ranks (weighted by batch size)."""
        if self.world_size > 1 and self.is_ptl:
            pdist.sync_cell_states(self.model, batch_size=batch_size)

    def _average_meters_over_ranks(self, losses):
        """Turn each rank's epoch averages into averages over all ranks' samples (for logging)."""
        if self.world_size == 1:
            return
        for meter in losses.meters.values():
            meter.avg = pdist.all_reduce_mean(meter.avg, weight=max(meter.count, 1))

    def _check_distributed_run(self, fixbase_epoch, open_layers):
        if self.ddp and fixbase_epoch > 0 and open_layers and not self.model.find_unused_parameters:
            raise ValueError(
                "fixbase epochs freeze layers after the model was wrapped in DistributedDataParallel; build the "
                "engine with find_unused_parameters=True (the command line does so when train.fixbase_epoch > 0)"
            )

    # ----------------------------------------------------------------------------------------------------
    # PTL state and freezing
    # ----------------------------------------------------------------------------------------------------

    @property
    def net(self):
        """The model without DataParallel / DDP wrappers."""
        return unwrap(self.model)

    def reset_state(self):
        """Zero the carried cell states (no-op for a plain torchreid model)."""
        if self.is_ptl:
            self.net.reset_state()

    def state_norm(self):
        """The model's ``state_norm()`` (magnitude of the carried cell states), or None for a plain model."""
        return float(self.net.state_norm()) if self.is_ptl else None

    def backbone_frozen(self, epoch):
        """Whether the backbone is frozen in ``epoch`` (0-based) under ``freeze_backbone_epochs``."""
        return self.is_ptl and (self.freeze_backbone_epochs == -1 or epoch < self.freeze_backbone_epochs)

    def _on_train_epoch_start(self, fixbase_epoch, open_layers, resuming=False):
        self.set_model_mode("train")
        fixbase = open_layers is not None and (self.epoch + 1) <= fixbase_epoch
        # torchreid's fixbase (only `open_layers` train) opens or closes layers and sets train mode...
        self.two_stepped_transfer_learning(self.epoch, fixbase_epoch, open_layers, model=self.net)
        # ...then PTL freezing, unless fixbase already froze more than that this epoch.
        if self.is_ptl and not fixbase:
            self.net.freeze_backbone(self.backbone_frozen(self.epoch))
        # A resumed epoch continues with the carried state its checkpoint holds.
        if self.reset_policy == "epoch" and not resuming:
            self.reset_state()
        self._check_train_sampler()

    def _on_train_iter_start(self):
        if self.reset_policy == "iter" and self.iteration % self.reset_every_n_iters == 0:
            self.reset_state()

    # ----------------------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------------------

    def _bar_disabled(self):
        # tqdm's None: show the bar on a terminal only, so log files and CI output stay readable.
        return None if self.progress_bar else True

    def _autocast(self):
        return autocast_context(self.device.type, self.precision)

    def compute_losses(self, outputs, pids):
        """Return ``(loss, summary)`` for the model outputs; ``summary`` maps names to floats."""
        raise NotImplementedError

    def forward_backward(self, data):
        imgs, pids = self.parse_data_for_train(data)
        self._step_batch_size = len(pids)
        imgs = imgs.to(self.device, non_blocking=True, memory_format=self.memory_format)
        pids = pids.to(self.device, non_blocking=True)
        with self._autocast():
            outputs = self.model(imgs)
        # Losses in float32 whatever the autocast dtype.
        outputs = _to_float(outputs)
        loss, summary = self.compute_losses(outputs, pids)
        self._check_finite_loss(loss, summary)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return summary

    @_output_on_main_rank
    def train(self, print_freq=10, fixbase_epoch=0, open_layers=None):
        losses = torchreid.utils.MetricMeter()
        batch_time = torchreid.utils.AverageMeter()
        data_time = torchreid.utils.AverageMeter()
        start = self._begin_train_epoch(fixbase_epoch, open_layers, losses)

        loader = self.epoch_loader()
        self.num_batches = len(loader.plan(self.epoch))
        max_epoch = max(self.max_epoch, self.epoch + 1)
        bar = tqdm(
            loader.batches(self.epoch, start),
            total=self.num_batches,
            initial=start,
            desc=f"epoch {self.epoch + 1}/{max_epoch}",
            disable=self._bar_disabled(),
            leave=False,
            dynamic_ncols=True,
        )
        epoch_start = end = time.time()
        for self.batch_idx, data in enumerate(bar, start):
            data_time.update(time.time() - end)
            self._on_train_iter_start()
            summary = self.forward_backward(data)
            self.iteration += 1
            batch_time.update(time.time() - end)
            losses.update(summary)
            self._after_train_step(losses)
            self._stop_if_signalled(losses)
            bar.set_postfix({k: f"{m.avg:.3f}" for k, m in losses.meters.items()}, refresh=False)
            if (self.batch_idx + 1) % print_freq == 0:
                remaining = (self.num_batches - self.batch_idx - 1) + (max_epoch - self.epoch - 1) * self.num_batches
                tqdm.write(
                    f"epoch: [{self.epoch + 1}/{max_epoch}][{self.batch_idx + 1}/{self.num_batches}]\ttime {batch_time.val:.3f} ({batch_time.avg:.3f})\tdata {data_time.val:.3f} ({data_time.avg:.3f})\teta {datetime.timedelta(seconds=int(batch_time.avg * remaining))}\t{losses}\tlr {self.get_current_lr():.6f}"
                )
            end = time.time()
        bar.close()
        self._average_meters_over_ranks(losses)
        self._log_epoch(losses, time.time() - epoch_start)
        self.update_lr()

    def current_lrs(self):
        """Learning rate per parameter group: ``{'lr': x}`` or ``{'lr_backbone': x, 'lr_ptl': y}``."""
        groups = self.optimizer.param_groups
        if len(groups) == 1 or not all("name" in g for g in groups):
            return {"lr": groups[-1]["lr"]}
        return {"lr_" + g["name"]: g["lr"] for g in groups}

    def _log_epoch(self, losses, seconds):
        values = {name: meter.avg for name, meter in losses.meters.items()}
        values.update(self.current_lrs())
        norm = self.state_norm()
        if norm is not None:
            values["state_norm"] = norm
        values["epoch_time"] = seconds
        self.epoch_summary = values

        parts = []
        for name, v in values.items():
            if name == "acc":
                parts.append(f"acc {v:.1f}%")  # torchreid's accuracy is already in percent
            elif name.startswith("lr"):
                parts.append(f"{name} {v:.2e}")
            elif name == "epoch_time":
                parts.append(f"time {v:.1f}s")
            else:
                parts.append(f"{name} {v:.4f}")
        if self.is_ptl and self.backbone_frozen(self.epoch):
            parts.append("(backbone frozen)")
        print("epoch {}/{}  {}".format(self.epoch + 1, max(self.max_epoch, self.epoch + 1), "  ".join(parts)))

        if self.writer is not None:
            for name, v in values.items():
                tag = "PTL/" + name if name == "state_norm" else "Train/" + name
                self.writer.add_scalar(tag, v, self.epoch + 1)

    # ----------------------------------------------------------------------------------------------------
    # Run loop
    # ----------------------------------------------------------------------------------------------------

    @_output_on_main_rank
    @_stops_on_signals
    def run(
        self,
        save_dir="log",
        max_epoch=0,
        start_epoch=0,
        print_freq=10,
        fixbase_epoch=0,
        open_layers=None,
        start_eval=0,
        eval_freq=-1,
        test_only=False,
        dist_metric="euclidean",
        normalize_feature=False,
        visrank=False,
        visrank_topk=10,
        use_metric_cuhk03=False,
        ranks=(1, 5, 10, 20),
        rerank=False,
    ):
        """torchreid's ``Engine.run`` (same arguments and schedule), returning :attr:`last_results`.

        Differences: ``model-best`` is kept (best Rank-1 over the evaluations), the final checkpoint is written
        only when an epoch was trained, and re-ranking is used in test-only mode (as torchreid documents).
        """
        if visrank and not test_only:
            raise ValueError("visrank can be set to True only if test_only=True")
        test_kwargs = dict(
            dist_metric=dist_metric,
            normalize_feature=normalize_feature,
            visrank=visrank,
            visrank_topk=visrank_topk,
            save_dir=save_dir,
            use_metric_cuhk03=use_metric_cuhk03,
            ranks=list(ranks),
        )
        if test_only:
            self.test(rerank=rerank, **test_kwargs)
            return self.last_results

        self._check_distributed_run(fixbase_epoch, open_layers)
        if self.writer is None and self.is_main:
            try:
                self.writer = SummaryWriter(log_dir=save_dir)
            except OSError as e:
                raise SaveDirError(
                    e.errno,
                    f"cannot write the TensorBoard log into '{save_dir}': {e.strerror or e}; make the folder "
                    "writable (data.save_dir)",
                ) from None
        time_start = time.time()
        self.start_epoch = start_epoch
        self.max_epoch = max_epoch
        self.save_dir = save_dir
        if self.reference_param_norm is None:
            self.reference_param_norm = weight_norm(self.net.state_dict())
        print("=> Start training")
        trained = False
        for self.epoch in range(start_epoch, max_epoch):
            self.train(print_freq=print_freq, fixbase_epoch=fixbase_epoch, open_layers=open_layers)
            trained = True
            if (
                (self.epoch + 1) >= start_eval
                and eval_freq > 0
                and (self.epoch + 1) % eval_freq == 0
                and (self.epoch + 1) != max_epoch
            ):
                rank1 = self.test(**test_kwargs)
                self.save_model(self.epoch, rank1, save_dir)
            self._stop_if_signalled()
        if max_epoch > 0:
            print("=> Final test")
            rank1 = self.test(**test_kwargs)
            if trained:
                self.save_model(self.epoch, rank1, save_dir)
                self._stop_if_signalled()
        print(f"Elapsed {datetime.timedelta(seconds=round(time.time() - time_start))}")
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return self.last_results

    def _stop_if_signalled(self, losses=None):
        """A safe point of :meth:`run`: after a training step (``losses``: the epoch's meters), or after an epoch
        and its evaluation. When SIGINT/SIGTERM arrived (on any rank), write a checkpoint unless this point's state
        is already saved, then raise :class:`TrainingInterrupted`."""
        if not pdist.any_rank(self._stop.requested):
            return
        signum = self._stop.signum or signal.SIGTERM
        path = None
        if self.save_dir is not None:
            manager = self.checkpoint_manager(self.save_dir)
            if self._saved_at_iteration == self.iteration:
                path = manager.latest()
            elif losses is not None:
                path = self.save_iteration_checkpoint(losses)
            else:  # the epoch is complete (its LR step taken): resuming starts the next one
                path = self._save_checkpoint(self.epoch, self.last_rank1, self.save_dir)
        raise TrainingInterrupted(signum, path, self.epoch + 1, self.iteration)

    # ----------------------------------------------------------------------------------------------------
    # Evaluation
    # ----------------------------------------------------------------------------------------------------

    @_output_on_main_rank
    def test(self, *args, **kwargs):
        """torchreid's ``test`` (puts the model in eval mode, so cell states are frozen); fills
        :attr:`last_results` and returns the Rank-1 of the last target, as torchreid does.

        Under several ranks every rank takes part (each extracts the features of its shard of the test sets) and
        every rank gets the same results."""
        self.last_results = {}
        if self.world_size > 1:
            # after training each rank holds BatchNorm statistics of its own last batch: evaluate with rank 0's
            pdist.broadcast_buffers(self.model)
        return super().test(*args, **kwargs)

    def extract_features(self, input):
        # The bare model under DDP: its forward would broadcast buffers, a collective out of step across ranks.
        return (self.net if self.ddp else self.model)(input)

    @torch.no_grad()
    def extract_features_from(self, loader, desc="features"):
        """Features, pids and camids of a test loader (model must be in eval mode)."""
        feats, pids, camids = [], [], []
        for data in tqdm(loader, desc=desc, disable=self._bar_disabled(), leave=False, dynamic_ncols=True):
            imgs, p, c = self.parse_data_for_eval(data)
            imgs = imgs.to(self.device, non_blocking=True, memory_format=self.memory_format)
            with self._autocast():
                f = self.extract_features(imgs)
                if self.evaluation.flip:  # the embedding of the image and of its mirror image, averaged
                    f = (f.float() + self.extract_features(imgs.flip(3)).float()) / 2
            feats.append(f.float().cpu())
            pids.append(torch.as_tensor(p))
            camids.append(torch.as_tensor(c))
        return torch.cat(feats), torch.cat(pids).numpy(), torch.cat(camids).numpy()

    @torch.no_grad()
    def extract_features_sharded(self, loader, desc="features"):
        """:meth:`extract_features_from` over all ranks: each rank extracts a disjoint shard of the loader's
        dataset (items ``rank, rank + world_size, ...``), the shards are gathered, and every rank gets all
        features, pids and camids in the dataset's order, as one process would compute them."""
        if self.world_size == 1:
            return self.extract_features_from(loader, desc)
        n, world = len(loader.dataset), self.world_size
        if n < world:
            raise ValueError(
                f"the test set '{desc}' has {n} images, fewer than the {world} ranks: evaluate it with fewer processes"
            )
        feats, pids, camids = self.extract_features_from(rebuild_loader(loader, ShardSampler(n), drop_last=False), desc)
        device = pdist.collective_device()
        order = torch.cat([torch.arange(r, n, world) for r in range(world)])  # dataset index of each gathered row
        out = []
        for t in (feats, torch.as_tensor(pids), torch.as_tensor(camids)):
            gathered = pdist.all_gather_tensors(t.to(device)).cpu()
            restored = torch.empty_like(gathered)
            restored[order] = gathered
            out.append(restored)
        return out[0], out[1].numpy(), out[2].numpy()

    @torch.no_grad()
    def _evaluate(
        self,
        dataset_name="",
        query_loader=None,
        gallery_loader=None,
        dist_metric="euclidean",
        normalize_feature=False,
        visrank=False,
        visrank_topk=10,
        save_dir="",
        use_metric_cuhk03=False,
        ranks=(1, 5, 10, 20),
        rerank=False,
    ):
        """The one evaluation function: features -> distances -> vectorised CMC/mAP (torchreid's protocol).

        Under several ranks the features are extracted on shards and gathered; the distances, metrics and
        ranked-result images are computed on rank 0 only (one distance matrix in memory per run) and the results
        broadcast, so every rank returns the same values."""
        t0 = time.time()
        qf, q_pids, q_camids = self.extract_features_sharded(query_loader, "query " + dataset_name)
        gf, g_pids, g_camids = self.extract_features_sharded(gallery_loader, "gallery " + dataset_name)
        print(
            f"Extracted features: query {qf.size(0)}x{qf.size(1)}, gallery {gf.size(0)}x{gf.size(1)} ({time.time() - t0:.1f}s)"
        )
        outcome = None
        if self.is_main:
            outcome = self._rank_and_report(
                dataset_name,
                qf,
                gf,
                q_pids,
                g_pids,
                q_camids,
                g_camids,
                dist_metric=dist_metric,
                normalize_feature=normalize_feature,
                visrank=visrank,
                visrank_topk=visrank_topk,
                save_dir=save_dir,
                use_metric_cuhk03=use_metric_cuhk03,
                ranks=ranks,
                rerank=rerank,
            )
        rank1, mAP, result = pdist.broadcast_object(outcome)
        self.last_results[dataset_name] = result
        return rank1, mAP

    def _rank_and_report(
        self,
        dataset_name,
        qf,
        gf,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        dist_metric="euclidean",
        normalize_feature=False,
        visrank=False,
        visrank_topk=10,
        save_dir="",
        use_metric_cuhk03=False,
        ranks=(1, 5, 10, 20),
        rerank=False,
    ):
        """Distances, CMC/mAP, printed results and optional ranked-result images; returns
        ``(rank1, mAP, {'mAP': ..., 'cmc': {rank: ...}})``."""
        ranks = clamp_ranks(ranks, len(gf), dataset_name)
        cmc, mAP, minp, tpr, distmat = rank_features(
            qf,
            gf,
            q_pids,
            g_pids,
            q_camids,
            g_camids,
            self.evaluation,
            dist_metric=dist_metric,
            normalize_feature=normalize_feature,
            rerank_on=rerank,
            use_metric_cuhk03=use_metric_cuhk03,
            max_rank=max(ranks),
            need_distmat=visrank,
            progress=self.progress_bar,
            roc_plot=osp.join(save_dir, f"roc_{file_name(dataset_name)}.png") if save_dir else None,
        )
        result = {"mAP": float(mAP), "cmc": {int(r): float(cmc[r - 1]) for r in ranks}, "mINP": float(minp)}
        if tpr:
            result["tpr_at_fpr"] = {f"{f:g}": float(t) for f, t in tpr.items()}
        print(f"** Results ({dataset_name}) **")
        print("mAP: {:.1%}".format(result["mAP"]))
        print("mINP: {:.1%}".format(result["mINP"]))
        for f, t in result.get("tpr_at_fpr", {}).items():
            print(f"TPR@FPR={f}: {t:.1%}")
        print("CMC curve")
        for r, v in result["cmc"].items():
            print(f"Rank-{r:<3}: {v:.1%}")

        if visrank:
            torchreid.utils.visualize_ranked_results(
                distmat,
                self.datamanager.fetch_test_loaders(dataset_name),
                self.datamanager.data_type,
                width=self.datamanager.width,
                height=self.datamanager.height,
                save_dir=osp.join(save_dir, "visrank_" + file_name(dataset_name)),
                topk=min(visrank_topk, distmat.shape[1]),
            )
        return float(cmc[0]), float(mAP), result

    # ----------------------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------------------

    def checkpoint_state(self, epoch, rank1):
        """Everything a checkpoint taken after epoch ``epoch`` (0-based) holds, as tensors and plain Python types
        only (loads with weights_only): weights with the cells' carried states and running buffers, optimizer,
        scheduler, AMP scaler, progress, best Rank-1, the run's seed and the RNG states."""
        state = {
            "state_dict": self.net.state_dict(),  # cell running buffers and carried states included
            "epoch": epoch + 1,  # epochs completed: training resumes at this (0-based) epoch
            "batch": 0,  # batches of that epoch already trained (> 0 in iteration checkpoints)
            "iteration": self.iteration,
            "rank1": rank1,
            "best_rank1": self.best_rank1,
            "results": self.last_results,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "seed": self.seed,
            "rng": self._capture_rng_state(),
            "optimizer_type": type(self.optimizer).__name__,
            "reference_param_norm": self.reference_param_norm,
        }
        state.update(self.checkpoint_extras)
        return to_plain(state)

    def save_model(self, epoch, rank1, save_dir, is_best=False):
        """torchreid's hook, called after evaluations; tracks the best Rank-1 for ``model-best``."""
        rank1 = float(rank1)
        if not math.isnan(rank1) and rank1 > self.best_rank1:
            self.best_rank1 = rank1
            is_best = True
        self.last_rank1 = rank1
        self._save_checkpoint(epoch, rank1, save_dir, is_best=is_best)

    def checkpoint_manager(self, save_dir):
        """The :class:`CheckpointManager` of ``<save_dir>/model`` (torchreid's checkpoint folder)."""
        folder = osp.join(save_dir, "model")
        if folder not in self._checkpoint_managers:
            self._checkpoint_managers[folder] = CheckpointManager(folder, keep_last=self.keep_last)
        return self._checkpoint_managers[folder]

    def _save_checkpoint(self, epoch, rank1, save_dir, is_best=False):
        """Write ``<save_dir>/model/model.pth.tar-<epoch>`` (torchreid's naming) atomically, and
        ``model-best.pth.tar`` when ``is_best``. Weights with NaN/inf are refused, keeping the last good files.
        Only rank 0 writes (the ranks hold the same weights); the others return None."""
        manager = self.checkpoint_manager(save_dir)
        path = self._write_checkpoint(
            manager, lambda: self.checkpoint_state(epoch, rank1), epoch=epoch + 1, is_best=is_best
        )
        if path is None:
            return None
        print(f'Checkpoint saved to "{path}"')
        if is_best:
            print(f'Best so far (Rank-1 {rank1:.1%}) saved to "{manager.best_path}"')
        return path

    def resume(self, path, trust=False, save_dir=None, preloaded=None):
        """Restore everything a checkpoint of this engine holds (see :meth:`load_checkpoint_state`).

        ``path`` is a checkpoint file, or ``'auto'``: the latest checkpoint in ``<save_dir>/model`` (default
        ``save_dir``: :attr:`save_dir`). Returns the epoch to start from (pass it to :meth:`run` as
        ``start_epoch``); a checkpoint taken mid-epoch makes that epoch continue after its last trained batch.
        With ``'auto'`` and no checkpoint yet, prints so and returns None (start from scratch).

        Under several ranks every rank calls it and loads the same file (rank 0's choice for ``'auto'``), so the
        ranks continue with identical weights, optimizer and cell states. ``preloaded``: ``{path: checkpoint}``
        of files already read; the one resumed from is taken out of it instead of being read again.
        """
        if path == "auto":
            save_dir = save_dir if save_dir is not None else self.save_dir
            if save_dir is None:
                raise ValueError("resume('auto') needs save_dir: where the run writes its checkpoints")
            # rank 0's choice, so that every rank resumes from the same file
            path = pdist.broadcast_object(self.checkpoint_manager(save_dir).latest() if self.is_main else None)
            if path is None:
                print('No checkpoint in "{}" to resume from: starting from scratch'.format(osp.join(save_dir, "model")))
                return None
        if preloaded and path in preloaded:
            state = preloaded.pop(path)
        else:
            state = load_checkpoint(path, map_location=self.device, trust=trust)
        if not isinstance(state, dict) or "state_dict" not in state or "optimizer" not in state:
            raise CheckpointMismatchError(
                None,
                f'Cannot resume from "{path}": it is not a training checkpoint of this '
                "engine (no state_dict/optimizer entries). To start from its "
                "weights, give it as model.load_weights instead.",
            )
        self.load_checkpoint_state(state, source=path)
        batch, epoch = int(state.get("batch", 0)), int(state["epoch"]) + 1
        where = f"epoch {epoch}, after batch {batch}" if batch else f"start of epoch {epoch}"
        print(
            f'Resumed from "{path}" ({where}, iteration {self.iteration}, best Rank-1 {max(self.best_rank1, 0.0):.1%})'
        )
        return int(state["epoch"])

    def load_checkpoint_state(self, state, source="the checkpoint"):
        """Inverse of :meth:`checkpoint_state` (and of iteration checkpoints). A checkpoint of another model or
        optimizer setup raises :class:`CheckpointMismatchError` listing what does not match."""
        name = self.checkpoint_extras.get("model_name")
        if name is not None and state.get("model_name") not in (None, name):
            raise CheckpointMismatchError(
                None,
                'Cannot resume from "{}": it was saved for model "{}", this run builds "{}".'.format(
                    source, state["model_name"], name
                ),
            )
        try:
            self.net.load_state_dict(state["state_dict"])
        except RuntimeError as e:
            raise CheckpointMismatchError(
                None,
                f'Cannot resume from "{source}": its weights do not fit this model (was '
                f"it saved with another model or data.height/width?).\n{e}",
            ) from None
        # the base rates this run was configured with (train.lr, ptl.lr_mult), before the checkpoint's replace them
        configured = [g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups]
        try:
            load_optimizer_state(self.optimizer, state["optimizer"], source, state.get("optimizer_type"))
        except ValueError as e:
            raise CheckpointMismatchError(None, str(e)) from None
        self.scheduler.load_state_dict(state["scheduler"])
        for name, old, new, now in apply_configured_lr(self.optimizer, self.scheduler, configured):
            print(
                "Note: the configured base learning rate{} is {:.3g}, the checkpoint's {:.3g}: the configured one "
                "applies from here on (the schedule keeps its position; the rate is now {:.3g}).".format(
                    "" if len(configured) == 1 else " of " + str(name), new, old, now
                )
            )
        if state.get("reference_param_norm") is not None:
            self.reference_param_norm = float(state["reference_param_norm"])
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.best_rank1 = float(state.get("best_rank1", -1.0))
        self.iteration = int(state.get("iteration", 0))
        self.last_results = state.get("results", {})
        rank1 = state.get("rank1")
        self.last_rank1 = float(rank1) if isinstance(rank1, (int, float)) else None
        self._load_resume_position(state)

    def _write_checkpoint(self, manager, state, **where):
        """The single place the engine writes checkpoints: atomically, through ``manager``; ``state`` is the
        checkpoint or a function returning it. A failed write (disk full, permission denied) or diverged weights
        stop training; nothing is reported as saved.

        Under several ranks only rank 0 builds and writes the checkpoint (the ranks hold the same weights) and the
        others return None; every rank must call this, since all of them stop together when rank 0's write
        fails (a rank left running would wait forever in its next collective)."""
        error, path = None, None
        if self.is_main:
            try:
                path = manager.save(state() if callable(state) else state, **where)
            except CheckpointError as e:
                error = e
        if isinstance(error, NonFiniteCheckpointError):
            error = NonFiniteCheckpointError(f"{error} {self._divergence_advice()}.")
        if pdist.any_rank(error is not None):
            print(
                f"Training stopped at epoch {self.epoch + 1}, iteration {self.iteration}: the checkpoint was not saved (see the error "
                "below); the previous checkpoints are intact."
            )
            if error is not None:
                raise error
            raise CheckpointError("rank 0 could not write the checkpoint (its error says why); this rank stops with it")
        self._saved_at_iteration = self.iteration
        return path

    # ----------------------------------------------------------------------------------------------------
    # Reliability: exact resume, iteration checkpoints, non-finite loss
    # ----------------------------------------------------------------------------------------------------

    def epoch_loader(self):
        """The :class:`~ptl_torchreid.utils.resume.EpochLoader` over :attr:`train_loader` and :attr:`seed`."""
        el = self._epoch_loader
        if el is None or el.loader is not self.train_loader or el.seed != self.seed:
            self._epoch_loader = EpochLoader(self.train_loader, self.seed)
        return self._epoch_loader

    def _begin_train_epoch(self, fixbase_epoch, open_layers, losses):
        """Start (or resume) the epoch :attr:`epoch`; returns the number of its batches already trained."""
        start, meters = 0, None
        if self._resume_at is not None and self._resume_at[0] == self.epoch:
            _, start, meters = self._resume_at
        self._resume_at = None
        self._on_train_epoch_start(fixbase_epoch, open_layers, resuming=start > 0)
        for name, (total, count) in (meters or {}).items():
            meter = losses.meters[name]
            meter.sum, meter.count = float(total), int(count)
            meter.avg = meter.sum / max(meter.count, 1)
        if self._pending_rng is not None:
            self._restore_rng_state(self._pending_rng)
            self._pending_rng = None
        return start

    def _after_train_step(self, losses):
        """After the optimizer step (and the scaler's update): the cells' states are made the same on all ranks
        first, so that an iteration checkpoint holds the synchronised states."""
        self._sync_cell_states(self._step_batch_size)
        n = self.checkpoint_every_n_iters
        if n > 0 and self.iteration % n == 0 and self.save_dir is not None:
            self.save_iteration_checkpoint(losses)

    def iteration_checkpoint_state(self, losses=None):
        """The state after the current training step, mid-epoch: the epoch in progress and the batches of it
        already trained, plus this epoch's loss meters (so the epoch's logged averages survive a resume)."""
        state = self.checkpoint_state(self.epoch, self.last_rank1)
        state["epoch"] = self.epoch
        state["batch"] = self.batch_idx + 1
        state["num_batches"] = self.num_batches
        if losses is not None:
            state["epoch_meters"] = {name: [float(m.sum), int(m.count)] for name, m in losses.meters.items()}
        return state

    def save_iteration_checkpoint(self, losses=None):
        """Write ``<save_dir>/model/model-iter<iteration>.pth.tar`` (atomic; the ``latest`` pointer follows)."""
        manager = self.checkpoint_manager(self.save_dir)
        path = self._write_checkpoint(
            manager, lambda: self.iteration_checkpoint_state(losses), iteration=self.iteration
        )
        if path is None:
            return None
        if self.progress_bar:
            tqdm.write(f'Checkpoint saved to "{path}"')
        else:
            print(f'Checkpoint saved to "{path}"')
        return path

    def _capture_rng_state(self):
        """The global RNG states for a checkpoint. All ranks are seeded alike and draw alike (their data
        randomness comes from :meth:`epoch_loader`'s per-rank seeds), so rank 0's states, the ones saved, are
        every rank's; on CUDA each rank draws from its own device, so only that device's state is kept."""
        state = capture_rng_state()
        if self.world_size > 1 and self.device.type == "cuda" and state["cuda"]:
            state["cuda"] = [torch.cuda.get_rng_state(self.device)]
        return state

    def _restore_rng_state(self, state):
        cuda = state.get("cuda") or []
        if self.world_size > 1 and self.device.type == "cuda" and len(cuda) == 1:
            restore_rng_state(dict(state, cuda=[]))
            torch.cuda.set_rng_state(cuda[0].cpu().to(torch.uint8), self.device)
        else:
            restore_rng_state(state)

    def _load_resume_position(self, state):
        seed = state.get("seed")
        if seed is not None and int(seed) != self.seed:
            print(
                f"Note: the checkpoint was trained with seed {seed} (this run: {self.seed}); continuing with {seed} so that the "
                "data order stays that of the interrupted run."
            )
            self.seed = int(seed)
        batch = int(state.get("batch", 0))
        self._resume_at = (int(state["epoch"]), batch, state.get("epoch_meters")) if batch > 0 else None
        self._pending_rng = state.get("rng")
        if batch > 0 and "num_batches" in state:
            planned = len(self.epoch_loader().plan(int(state["epoch"])))
            if planned != int(state["num_batches"]):
                print(
                    "Warning: epoch {} now has {} batches but had {} when the checkpoint was taken (changed batch "
                    "size, sampler or data?); the rest of the epoch will not match the interrupted run.".format(
                        int(state["epoch"]) + 1, planned, int(state["num_batches"])
                    )
                )

    def _divergence_advice(self):
        """Which checkpoint to resume from after a divergence: the newest one whose weights have not blown up (a
        finite checkpoint can already hold weights a million times too large), and how."""
        manager = self.checkpoint_manager(self.save_dir) if self.save_dir is not None else None
        if manager is None or not manager.latest():
            return "No checkpoint had been written yet"
        good, diverged = last_good_checkpoint(manager, self.reference_param_norm)
        grown = ", ".join(f'"{osp.basename(p)}" ({g:.3g}x)' for p, g in diverged)
        if good is None:
            return (
                f"Every checkpoint kept holds weights more than {DIVERGED_GROWTH:g} times larger than at the start of the run "
                f"({grown}): training was diverging before it overflowed, so start again with a lower train.lr"
            )
        newer = (
            ""
            if not diverged
            else (
                f" (newer ones hold weights more than {DIVERGED_GROWTH:g} times larger than at the start of "
                f"the run, a sign of divergence: {grown})"
            )
        )
        return (
            f'The last good checkpoint, "{good}", is unchanged{newer}; once the cause is fixed, resume from it with --resume '
            f"{good} and, for instance, a lower train.lr (the configured learning rate applies on resume)"
        )

    def _check_finite_loss(self, loss, summary):
        """Stop before a NaN/inf loss reaches the weights; say where it happened and what is safe on disk."""
        value = float(loss.detach().float().sum())
        # Decided together: a rank that stopped alone would leave the others waiting in the gradient all-reduce.
        if not pdist.any_rank(not math.isfinite(value)):
            return
        if math.isfinite(value):
            what = "on another rank"
        else:
            what = ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if isinstance(v, float))
            what = (what or f"loss {value}") + (f" on rank {pdist.get_rank()}" if self.world_size > 1 else "")
        saved = self._divergence_advice()
        raise NonFiniteLossError(
            f"Non-finite loss ({what}) at epoch {self.epoch + 1}, batch {self.batch_idx + 1}/{self.num_batches} (iteration {self.iteration + 1} of the run). Training stopped before this "
            f"step changed the weights. {saved}. Usual causes: a learning rate too high (train.lr, ptl.lr_mult), fp16 "
            "overflow (train.amp_dtype bf16), or corrupt input."
        )


def resolve_precision(amp, amp_dtype, device):
    """'fp32' without ``amp``; otherwise ``amp_dtype``, where 'auto' is fp16 on CUDA and bf16 elsewhere."""
    device = torch.device(device)
    if not amp:
        return "fp32"
    if amp_dtype == "auto":
        amp_dtype = "fp16" if device.type == "cuda" else "bf16"
    return check_precision(device.type, amp_dtype)


def clamp_ranks(ranks, num_gallery, dataset_name=""):
    """Ranks that a gallery of ``num_gallery`` images can give; says which requested ranks are dropped."""
    ranks = sorted({int(r) for r in ranks})
    valid = [r for r in ranks if r <= num_gallery]
    dropped = [r for r in ranks if r > num_gallery]
    if dropped:
        print(
            "Note: the gallery of {} has only {} images, so {} cannot be computed and {} skipped "
            "(set test.ranks to ranks <= {}).".format(
                dataset_name or "this dataset",
                num_gallery,
                ", ".join(f"Rank-{r}" for r in dropped),
                "is" if len(dropped) == 1 else "are",
                num_gallery,
            )
        )
    if num_gallery < 1:
        raise ValueError("the gallery of {} is empty: nothing to rank".format(dataset_name or "this dataset"))
    return valid or [1]


def _to_float(outputs):
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_to_float(o) for o in outputs)
    if torch.is_tensor(outputs) and outputs.is_floating_point():
        return outputs.float()
    return outputs
