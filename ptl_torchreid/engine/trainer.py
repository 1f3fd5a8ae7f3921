"""The PTL engines' training loop: torchreid's ``run`` / ``train`` / ``test`` schedule, written as one short loop
whose concerns (cell states, freezing, checkpoints, resume, the non-finite-loss guard, logging, signals) are
hooks (:mod:`ptl_torchreid.engine.hooks`), plus device placement, mixed precision, channels_last and DDP.
A concrete engine only supplies :meth:`PTLEngineMixin.compute_losses`.
"""
import datetime
import functools
import time

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ptl_torchreid._torchreid import torchreid
from ptl_torchreid.engine.checkpointing import CheckpointMixin
from ptl_torchreid.engine.evaluator import EvalOptions, ReIDEvaluator
from ptl_torchreid.engine.hooks import (
    BackboneFreeze,
    CellStateHook,
    EpochLogger,
    IterationCheckpointer,
    LRScheduler,
    NonFiniteLossGuard,
    PeriodicEvaluation,
    ResumePosition,
    StopOnSignal,
)
from ptl_torchreid.engine.reliability import StopSignals
from ptl_torchreid.models import check_freeze_epochs, is_ptl, unwrap
from ptl_torchreid.utils import distributed as pdist
from ptl_torchreid.utils.amp import autocast_context, autocast_dtype, make_grad_scaler, memory_format, resolve_precision
from ptl_torchreid.utils.checkpoint import weight_norm
from ptl_torchreid.utils.savedir import SaveDirError

__all__ = ["PTLEngineMixin"]


def _output_on_main_rank(method):
    """Run an engine method with standard output discarded on every rank but 0 (one log per run)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with pdist.quiet_unless_main():
            return method(self, *args, **kwargs)
    return wrapper


def _stops_on_signals(run):
    """Training under ``run``: SIGINT/SIGTERM stop at the next safe point with a checkpoint (see
    :class:`~ptl_torchreid.engine.hooks.StopOnSignal`); evaluation-only runs keep the usual handlers."""
    @functools.wraps(run)
    def wrapper(self, *args, **kwargs):
        if kwargs.get("test_only"):
            return run(self, *args, **kwargs)
        with self.stop_signals:
            return run(self, *args, **kwargs)
    return wrapper


class PTLEngineMixin(CheckpointMixin):
    """Mix in before a torchreid image engine: ``class E(PTLEngineMixin, torchreid.engine.ImageSoftmaxEngine)``.

    Training is :meth:`run`'s loop over epochs and :meth:`train`'s over steps, with hooks
    (:mod:`ptl_torchreid.engine.hooks`) doing the rest: the defaults from the arguments, then the ones given to
    :meth:`register_hooks`. Evaluation is :attr:`evaluator`'s (an
    :class:`~ptl_torchreid.engine.evaluator.ReIDEvaluator`).

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
        # built here so that their settings are checked when the engine is built
        self._cell_state_hook = CellStateHook(reset_policy, reset_every_n_iters)
        self._iteration_checkpointer = IterationCheckpointer(checkpoint_every_n_iters)
        check_freeze_epochs(freeze_backbone_epochs)

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
        self.step_batch_size = 0  # images in this rank's latest training batch
        self.first_batch = 0  # the epoch's first batch trained (> 0 in an epoch resumed mid-way)
        self.meters = None  # the epoch's loss meters
        self.step_summary = {}  # the last step's losses (name -> float)
        self.loss = None  # the step's loss tensor, between its computation and the backward pass
        self.outputs = None  # the step's model outputs (float32), for hooks that add loss terms
        self._hooks = []  # registered by the user
        self._active_hooks = None  # while training: the default hooks, then the registered ones
        self.evaluator = ReIDEvaluator(self, self.evaluation)
        self._resume_at = None  # (epoch, batches of it already trained, epoch meters), set by resume()
        self._pending_rng = None  # RNG states to restore when training (re)starts, set by resume()
        self.reference_param_norm = None  # weights' norm when the run started (kept across resumes)
        self.stop_signals = StopSignals()  # SIGINT/SIGTERM during run(): stop at the next safe point, with a checkpoint
        self._saved_at_iteration = None  # iteration of the latest checkpoint written
        self._epoch_start = None  # time.time() when the current epoch began


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
                f"distributed training over {self.world_size} ranks needs a distributed train sampler, but the train "
                "loader uses "
                f"{type(sampler).__name__}; call ptl_torchreid.data.samplers.distribute_train_loaders(datamanager, "
                "...) before building "
                "the engine (the command line does this)"
            )

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


    # ----------------------------------------------------------------------------------------------------
    # Hooks
    # ----------------------------------------------------------------------------------------------------

    def register_hooks(self, hooks):
        """Append ``hooks`` (:class:`~ptl_torchreid.engine.hooks.HookBase` instances; None entries are skipped)
        to the engine's hooks, which run after the default ones, in the order registered."""
        for hook in hooks:
            if hook is None:
                continue
            hook.trainer = self
            self._hooks.append(hook)

    def default_hooks(self, fixbase_epoch=0, open_layers=None, evaluation=None):
        """The hooks every epoch runs with, in order; ``evaluation`` (a ``PeriodicEvaluation``, in :meth:`run`)
        comes after the scheduler's step and before the signal stop, which follows the epoch's evaluation."""
        hooks = [ResumePosition(), BackboneFreeze(fixbase_epoch, open_layers), self._cell_state_hook,
                 NonFiniteLossGuard(), self._iteration_checkpointer, EpochLogger(), LRScheduler(), evaluation,
                 StopOnSignal()]
        hooks = [h for h in hooks if h is not None]
        for hook in hooks:
            hook.trainer = self
        return hooks

    def _with_registered_hooks(self, defaults):
        """The default hooks, then the registered ones; the non-finite-loss guard last, so that it checks the
        loss with every term a hook added (distillation, for instance)."""
        guards = [h for h in defaults if isinstance(h, NonFiniteLossGuard)]
        return [h for h in defaults if h not in guards] + self._hooks + guards

    def _call_hooks(self, point):
        for hook in self._active_hooks if self._active_hooks is not None else self._hooks:
            getattr(hook, point)()

    # ----------------------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------------------

    def bar_disabled(self):
        """tqdm's ``disable``: None shows the bar on a terminal only, so log files and CI output stay readable."""
        return None if self.progress_bar else True

    def autocast(self):
        """The autocast context of the engine's precision on its device."""
        return autocast_context(self.device.type, self.precision)

    def compute_losses(self, outputs, pids):
        """Return ``(loss, summary)`` for the model outputs; ``summary`` maps names to floats."""
        raise NotImplementedError

    def forward_backward(self, data):
        """One training step on ``data``; returns the step's loss summary."""
        imgs, pids = self.parse_data_for_train(data)
        self.step_batch_size = len(pids)
        imgs = imgs.to(self.device, non_blocking=True, memory_format=self.memory_format)
        pids = pids.to(self.device, non_blocking=True)
        with self.autocast():
            outputs = self.model(imgs)
        # Losses in float32 whatever the autocast dtype.
        outputs = _to_float(outputs)
        self.outputs = outputs
        self.loss, self.step_summary = self.compute_losses(outputs, pids)
        self._call_hooks("before_backward")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(self.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.loss = self.outputs = None
        return self.step_summary

    @_output_on_main_rank
    def train(self, print_freq=10, fixbase_epoch=0, open_layers=None):
        """Train the epoch :attr:`epoch` (torchreid's ``train``). Inside :meth:`run` the run's hooks apply (and
        ``fixbase_epoch`` / ``open_layers`` are the run's); called on its own, the default hooks for these
        arguments, then the registered ones."""
        if self._active_hooks is not None:
            return self._train_epoch(print_freq)
        self._active_hooks = self._with_registered_hooks(self.default_hooks(fixbase_epoch, open_layers))
        try:
            return self._train_epoch(print_freq)
        finally:
            self._active_hooks = None

    def _train_epoch(self, print_freq):
        self.meters = torchreid.utils.MetricMeter()
        batch_time = torchreid.utils.AverageMeter()
        data_time = torchreid.utils.AverageMeter()
        self.set_model_mode("train")
        self._check_train_sampler()
        self.first_batch = 0
        self._call_hooks("before_epoch")

        loader = self.epoch_loader()
        self.num_batches = len(loader.plan(self.epoch))
        max_epoch = max(self.max_epoch, self.epoch + 1)
        bar = tqdm(
            loader.batches(self.epoch, self.first_batch),
            total=self.num_batches,
            initial=self.first_batch,
            desc=f"epoch {self.epoch + 1}/{max_epoch}",
            disable=self.bar_disabled(),
            leave=False,
            dynamic_ncols=True,
        )
        self._epoch_start = end = time.time()
        for self.batch_idx, data in enumerate(bar, self.first_batch):
            data_time.update(time.time() - end)
            self._call_hooks("before_step")
            self.step_summary = self.forward_backward(data)
            self.iteration += 1
            batch_time.update(time.time() - end)
            self.meters.update(self.step_summary)
            self._call_hooks("after_step")
            bar.set_postfix({k: f"{m.avg:.3f}" for k, m in self.meters.meters.items()}, refresh=False)
            if (self.batch_idx + 1) % print_freq == 0:
                remaining = (self.num_batches - self.batch_idx - 1) + (max_epoch - self.epoch - 1) * self.num_batches
                eta = datetime.timedelta(seconds=int(batch_time.avg * remaining))
                tqdm.write(
                    f"epoch: [{self.epoch + 1}/{max_epoch}][{self.batch_idx + 1}/{self.num_batches}]\t"
                    f"time {batch_time.val:.3f} ({batch_time.avg:.3f})\tdata {data_time.val:.3f} ({data_time.avg:.3f})"
                    f"\teta {eta}\t{self.meters}\tlr {self.get_current_lr():.6f}"
                )
            end = time.time()
        bar.close()
        self._call_hooks("after_epoch")

    def epoch_seconds(self):
        """Seconds since the current epoch's first step began."""
        return time.time() - self._epoch_start

    def current_lrs(self):
        """Learning rate per parameter group: ``{'lr': x}`` or ``{'lr_backbone': x, 'lr_ptl': y}``."""
        groups = self.optimizer.param_groups
        if len(groups) == 1 or not all("name" in g for g in groups):
            return {"lr": groups[-1]["lr"]}
        return {"lr_" + g["name"]: g["lr"] for g in groups}

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
        test_kwargs = dict(dist_metric=dist_metric, normalize_feature=normalize_feature, visrank=visrank,
                           visrank_topk=visrank_topk, save_dir=save_dir, use_metric_cuhk03=use_metric_cuhk03,
                           ranks=list(ranks))
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
        evaluation = PeriodicEvaluation(start_eval, eval_freq, test_kwargs)
        self._active_hooks = self._with_registered_hooks(self.default_hooks(fixbase_epoch, open_layers, evaluation))
        try:
            self._call_hooks("before_train")
            print("=> Start training")
            for self.epoch in range(start_epoch, max_epoch):
                self.train(print_freq=print_freq, fixbase_epoch=fixbase_epoch, open_layers=open_layers)
            self._call_hooks("after_train")
        finally:
            self._active_hooks = None
        print(f"Elapsed {datetime.timedelta(seconds=round(time.time() - time_start))}")
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return self.last_results

    # ----------------------------------------------------------------------------------------------------
    # Evaluation
    # ----------------------------------------------------------------------------------------------------

    @_output_on_main_rank
    def test(self, dist_metric="euclidean", normalize_feature=False, visrank=False, visrank_topk=10, save_dir="",
             use_metric_cuhk03=False, ranks=(1, 5, 10, 20), rerank=False):
        """torchreid's ``test``: every target evaluated by :attr:`evaluator` in eval mode (cell states frozen);
        fills :attr:`last_results` and returns the Rank-1 of the last target, as torchreid does.

        Under several ranks every rank takes part (each extracts the features of its shard of the test sets) and
        every rank gets the same results."""
        self.last_results = {}
        self._call_hooks("before_test")
        if self.world_size > 1:
            # after training each rank holds BatchNorm statistics of its own last batch: evaluate with rank 0's
            pdist.broadcast_buffers(self.model)
        self.set_model_mode("eval")
        rank1 = None
        for name, loaders in self.test_loader.items():
            domain = "source" if name in self.datamanager.sources else "target"
            print(f"##### Evaluating {name} ({domain}) #####")
            rank1, mAP, self.last_results[name] = self.evaluator.evaluate(
                name, loaders["query"], loaders["gallery"], dist_metric=dist_metric,
                normalize_feature=normalize_feature, visrank=visrank, visrank_topk=visrank_topk, save_dir=save_dir,
                use_metric_cuhk03=use_metric_cuhk03, ranks=ranks, rerank=rerank,
            )
            if self.writer is not None:
                self.writer.add_scalar(f"Test/{name}/rank1", rank1, self.epoch)
                self.writer.add_scalar(f"Test/{name}/mAP", mAP, self.epoch)
        self._call_hooks("after_test")
        return rank1

    def extract_features(self, input):
        # The bare model under DDP: its forward would broadcast buffers, a collective out of step across ranks.
        return (self.net if self.ddp else self.model)(input)

    def extract_features_from(self, loader, desc="features"):
        """Features, pids and camids of a test loader in this process (see :meth:`ReIDEvaluator.extract_local`)."""
        return self.evaluator.extract_local(loader, desc)

    def extract_features_sharded(self, loader, desc="features"):
        """Features, pids and camids of a test loader, sharded over the ranks (see :meth:`ReIDEvaluator.extract`)."""
        return self.evaluator.extract(loader, desc)


def _to_float(outputs):
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_to_float(o) for o in outputs)
    if torch.is_tensor(outputs) and outputs.is_floating_point():
        return outputs.float()
    return outputs
