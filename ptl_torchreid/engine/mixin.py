"""The PTL engine mixin, shared by the softmax and the softmax+triplet engines.

It adds to torchreid's ``Engine``: PTL cell-state handling (reset policy; evaluation with the frozen state),
backbone freezing, device placement and mixed precision, per-epoch logging (console + TensorBoard), progress
bars, vectorised ranking evaluation with rank clamping, and weights-only-safe checkpoints with ``model-best``.
A concrete engine only supplies :meth:`compute_losses`.
"""
import datetime
import math
import os.path as osp
import time

import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ptl_torchreid._torchreid import torchreid
from ptl_torchreid.metrics import evaluate_rank
from ptl_torchreid.models import is_ptl, unwrap
from ptl_torchreid.utils.amp import autocast_context, autocast_dtype, check_precision, make_grad_scaler
from ptl_torchreid.utils.checkpoint import CheckpointManager, load_checkpoint, to_plain

__all__ = ["PTLEngineMixin", "RESET_POLICIES", "clamp_ranks", "resolve_precision"]

RESET_POLICIES = ("epoch", "never", "iter")


class PTLEngineMixin:
    """Mix in before a torchreid image engine: ``class E(PTLEngineMixin, torchreid.engine.ImageSoftmaxEngine)``.

    Keyword arguments (on top of the torchreid engine's own, which must be given by keyword):

    - ``reset_policy``: when the carried cell state is zeroed: ``'epoch'`` (at every epoch start), ``'never'``,
      or ``'iter'`` (before every ``reset_every_n_iters``-th training step, counted over the whole run);
    - ``freeze_backbone_epochs``: train only the PTL parameters for the first K epochs; -1: throughout;
    - ``amp`` / ``amp_dtype``: autocast (``'auto'``: fp16 with a GradScaler on CUDA, bf16 on the CPU; or
      ``'fp16'`` / ``'bf16'``);
    - ``device``: where to train; default CUDA when ``use_gpu`` and available, else the CPU;
    - ``progress_bar``: tqdm bars for training and feature extraction;
    - ``checkpoint_extras``: plain-typed entries added to every checkpoint (e.g. the config as YAML text);
    - ``keep_last``: periodic checkpoints kept (None: all, as torchreid); ``model-best`` is always kept.

    A scheduler is always present: without one a constant schedule is used, so checkpoints always hold one.
    PTL-specific behaviour applies only when ``ptl_torchreid.models.is_ptl(model)``.
    """

    def __init__(self, datamanager, model, optimizer, *, reset_policy="epoch", reset_every_n_iters=0,
                 freeze_backbone_epochs=0, amp=False, amp_dtype="auto", device=None, progress_bar=True,
                 checkpoint_extras=None, keep_last=None, **kwargs):
        if reset_policy not in RESET_POLICIES:
            raise ValueError("reset_policy must be one of {}, got {!r}".format(RESET_POLICIES, reset_policy))
        if reset_policy == "iter" and reset_every_n_iters < 1:
            raise ValueError("reset_policy 'iter' needs reset_every_n_iters >= 1, got {}".format(
                reset_every_n_iters))
        if freeze_backbone_epochs < -1:
            raise ValueError("freeze_backbone_epochs must be -1 (throughout), 0 (never) or K > 0, got {}".format(
                freeze_backbone_epochs))

        use_gpu = kwargs.pop("use_gpu", True)
        if device is None:
            device = "cuda" if (use_gpu and torch.cuda.is_available()) else "cpu"
        self.device = torch.device(device)
        # torchreid's losses move their targets with .cuda() when use_gpu is set: keep it tied to the device.
        kwargs["use_gpu"] = self.device.type == "cuda"
        model.to(self.device)
        if kwargs.get("scheduler") is None:
            kwargs["scheduler"] = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=1.0)
        super().__init__(datamanager, model, optimizer, **kwargs)

        self.reset_policy = reset_policy
        self.reset_every_n_iters = int(reset_every_n_iters)
        self.freeze_backbone_epochs = int(freeze_backbone_epochs)
        self.progress_bar = bool(progress_bar)
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

    def _on_train_epoch_start(self, fixbase_epoch, open_layers):
        self.set_model_mode("train")
        fixbase = open_layers is not None and (self.epoch + 1) <= fixbase_epoch
        # torchreid's fixbase (only `open_layers` train) opens or closes layers and sets train mode...
        self.two_stepped_transfer_learning(self.epoch, fixbase_epoch, open_layers)
        # ...then PTL freezing, unless fixbase already froze more than that this epoch.
        if self.is_ptl and not fixbase:
            self.net.freeze_backbone(self.backbone_frozen(self.epoch))
        if self.reset_policy == "epoch":
            self.reset_state()

    def _on_train_iter_start(self):
        if self.reset_policy == "iter" and self.iteration % self.reset_every_n_iters == 0:
            self.reset_state()

    # ----------------------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------------------

    def _autocast(self):
        return autocast_context(self.device.type, self.precision)

    def compute_losses(self, outputs, pids):
        """Return ``(loss, summary)`` for the model outputs; ``summary`` maps names to floats."""
        raise NotImplementedError

    def forward_backward(self, data):
        imgs, pids = self.parse_data_for_train(data)
        imgs = imgs.to(self.device, non_blocking=True)
        pids = pids.to(self.device, non_blocking=True)
        with self._autocast():
            outputs = self.model(imgs)
        # Losses in float32 whatever the autocast dtype.
        outputs = _to_float(outputs)
        loss, summary = self.compute_losses(outputs, pids)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return summary

    def train(self, print_freq=10, fixbase_epoch=0, open_layers=None):
        losses = torchreid.utils.MetricMeter()
        batch_time = torchreid.utils.AverageMeter()
        data_time = torchreid.utils.AverageMeter()
        self._on_train_epoch_start(fixbase_epoch, open_layers)

        self.num_batches = len(self.train_loader)
        max_epoch = max(self.max_epoch, self.epoch + 1)
        bar = tqdm(self.train_loader, total=self.num_batches, desc="epoch {}/{}".format(self.epoch + 1, max_epoch),
                   disable=not self.progress_bar, leave=False, dynamic_ncols=True)
        epoch_start = end = time.time()
        for self.batch_idx, data in enumerate(bar):
            data_time.update(time.time() - end)
            self._on_train_iter_start()
            summary = self.forward_backward(data)
            self.iteration += 1
            batch_time.update(time.time() - end)
            losses.update(summary)
            bar.set_postfix({k: "{:.3f}".format(m.avg) for k, m in losses.meters.items()}, refresh=False)
            if (self.batch_idx + 1) % print_freq == 0:
                remaining = (self.num_batches - self.batch_idx - 1) + (max_epoch - self.epoch - 1) * self.num_batches
                tqdm.write(
                    "epoch: [{}/{}][{}/{}]\ttime {:.3f} ({:.3f})\tdata {:.3f} ({:.3f})\teta {}\t{}\tlr {:.6f}".format(
                        self.epoch + 1, max_epoch, self.batch_idx + 1, self.num_batches, batch_time.val,
                        batch_time.avg, data_time.val, data_time.avg,
                        datetime.timedelta(seconds=int(batch_time.avg * remaining)), losses, self.get_current_lr()
                    )
                )
            end = time.time()
        bar.close()
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
                parts.append("acc {:.1f}%".format(v))  # torchreid's accuracy is already in percent
            elif name.startswith("lr"):
                parts.append("{} {:.2e}".format(name, v))
            elif name == "epoch_time":
                parts.append("time {:.1f}s".format(v))
            else:
                parts.append("{} {:.4f}".format(name, v))
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

    def run(self, save_dir="log", max_epoch=0, start_epoch=0, print_freq=10, fixbase_epoch=0, open_layers=None,
            start_eval=0, eval_freq=-1, test_only=False, dist_metric="euclidean", normalize_feature=False,
            visrank=False, visrank_topk=10, use_metric_cuhk03=False, ranks=(1, 5, 10, 20), rerank=False):
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

        if self.writer is None:
            self.writer = SummaryWriter(log_dir=save_dir)
        time_start = time.time()
        self.start_epoch = start_epoch
        self.max_epoch = max_epoch
        print("=> Start training")
        trained = False
        for self.epoch in range(start_epoch, max_epoch):
            self.train(print_freq=print_freq, fixbase_epoch=fixbase_epoch, open_layers=open_layers)
            trained = True
            if ((self.epoch + 1) >= start_eval and eval_freq > 0 and (self.epoch + 1) % eval_freq == 0
                    and (self.epoch + 1) != max_epoch):
                rank1 = self.test(**test_kwargs)
                self.save_model(self.epoch, rank1, save_dir)
        if max_epoch > 0:
            print("=> Final test")
            rank1 = self.test(**test_kwargs)
            if trained:
                self.save_model(self.epoch, rank1, save_dir)
        print("Elapsed {}".format(datetime.timedelta(seconds=round(time.time() - time_start))))
        self.writer.close()
        self.writer = None
        return self.last_results

    # ----------------------------------------------------------------------------------------------------
    # Evaluation
    # ----------------------------------------------------------------------------------------------------

    def test(self, *args, **kwargs):
        """torchreid's ``test`` (puts the model in eval mode, so cell states are frozen); fills
        :attr:`last_results` and returns the Rank-1 of the last target, as torchreid does."""
        self.last_results = {}
        return super().test(*args, **kwargs)

    @torch.no_grad()
    def extract_features_from(self, loader, desc="features"):
        """Features, pids and camids of a test loader (model must be in eval mode)."""
        feats, pids, camids = [], [], []
        for data in tqdm(loader, desc=desc, disable=not self.progress_bar, leave=False, dynamic_ncols=True):
            imgs, p, c = self.parse_data_for_eval(data)
            imgs = imgs.to(self.device, non_blocking=True)
            with self._autocast():
                f = self.extract_features(imgs)
            feats.append(f.float().cpu())
            pids.append(torch.as_tensor(p))
            camids.append(torch.as_tensor(c))
        return torch.cat(feats), torch.cat(pids).numpy(), torch.cat(camids).numpy()

    @torch.no_grad()
    def _evaluate(self, dataset_name="", query_loader=None, gallery_loader=None, dist_metric="euclidean",
                  normalize_feature=False, visrank=False, visrank_topk=10, save_dir="", use_metric_cuhk03=False,
                  ranks=(1, 5, 10, 20), rerank=False):
        """The one evaluation function: features -> distances -> vectorised CMC/mAP (torchreid's protocol)."""
        t0 = time.time()
        qf, q_pids, q_camids = self.extract_features_from(query_loader, "query " + dataset_name)
        gf, g_pids, g_camids = self.extract_features_from(gallery_loader, "gallery " + dataset_name)
        print("Extracted features: query {}x{}, gallery {}x{} ({:.1f}s)".format(
            qf.size(0), qf.size(1), gf.size(0), gf.size(1), time.time() - t0))
        if normalize_feature:
            qf = F.normalize(qf, p=2, dim=1)
            gf = F.normalize(gf, p=2, dim=1)
        distmat = torchreid.metrics.compute_distance_matrix(qf, gf, dist_metric).numpy()
        if rerank:
            print("Applying person re-ranking ...")
            distmat_qq = torchreid.metrics.compute_distance_matrix(qf, qf, dist_metric).numpy()
            distmat_gg = torchreid.metrics.compute_distance_matrix(gf, gf, dist_metric).numpy()
            distmat = torchreid.utils.re_ranking(distmat, distmat_qq, distmat_gg)

        ranks = clamp_ranks(ranks, distmat.shape[1], dataset_name)
        cmc, mAP = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max(ranks),
                                 use_metric_cuhk03=use_metric_cuhk03)
        result = {"mAP": float(mAP), "cmc": {int(r): float(cmc[r - 1]) for r in ranks}}
        self.last_results[dataset_name] = result
        print("** Results ({}) **".format(dataset_name))
        print("mAP: {:.1%}".format(result["mAP"]))
        print("CMC curve")
        for r, v in result["cmc"].items():
            print("Rank-{:<3}: {:.1%}".format(r, v))

        if visrank:
            torchreid.utils.visualize_ranked_results(
                distmat, self.datamanager.fetch_test_loaders(dataset_name), self.datamanager.data_type,
                width=self.datamanager.width, height=self.datamanager.height,
                save_dir=osp.join(save_dir, "visrank_" + dataset_name), topk=min(visrank_topk, distmat.shape[1]),
            )
        return float(cmc[0]), float(mAP)

    # ----------------------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------------------

    def checkpoint_state(self, epoch, rank1):
        """Everything a checkpoint holds, as tensors and plain Python types only (loads with weights_only)."""
        state = {
            "state_dict": self.net.state_dict(),  # cell running buffers included
            "epoch": epoch + 1,
            "iteration": self.iteration,
            "rank1": rank1,
            "best_rank1": self.best_rank1,
            "results": self.last_results,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        state.update(self.checkpoint_extras)
        return to_plain(state)

    def save_model(self, epoch, rank1, save_dir, is_best=False):
        """torchreid's hook, called after evaluations; tracks the best Rank-1 for ``model-best``."""
        rank1 = float(rank1)
        if not math.isnan(rank1) and rank1 > self.best_rank1:
            self.best_rank1 = rank1
            is_best = True
        self._save_checkpoint(epoch, rank1, save_dir, is_best=is_best)

    def checkpoint_manager(self, save_dir):
        """The :class:`CheckpointManager` of ``<save_dir>/model`` (torchreid's checkpoint folder)."""
        folder = osp.join(save_dir, "model")
        if folder not in self._checkpoint_managers:
            self._checkpoint_managers[folder] = CheckpointManager(folder, keep_last=self.keep_last)
        return self._checkpoint_managers[folder]

    def _save_checkpoint(self, epoch, rank1, save_dir, is_best=False):
        """Write ``<save_dir>/model/model.pth.tar-<epoch>`` (torchreid's naming) atomically, and
        ``model-best.pth.tar`` when ``is_best``. Weights with NaN/inf are refused, keeping the last good files."""
        manager = self.checkpoint_manager(save_dir)
        path = manager.save(self.checkpoint_state(epoch, rank1), epoch=epoch + 1, is_best=is_best)
        print('Checkpoint saved to "{}"'.format(path))
        if is_best:
            print('Best so far (Rank-1 {:.1%}) saved to "{}"'.format(rank1, manager.best_path))
        return path

    def resume(self, path, trust=False):
        """Restore model, optimizer, scheduler, AMP scaler and best Rank-1 from a checkpoint of this engine.

        Returns the epoch to start from (pass it to :meth:`run` as ``start_epoch``).
        """
        state = load_checkpoint(path, map_location=self.device, trust=trust)
        self.load_checkpoint_state(state)
        print('Resumed from "{}" (epoch {}, best Rank-1 {:.1%})'.format(path, state["epoch"],
                                                                        max(self.best_rank1, 0.0)))
        return int(state["epoch"])

    def load_checkpoint_state(self, state):
        """Inverse of :meth:`checkpoint_state`."""
        self.net.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.best_rank1 = float(state.get("best_rank1", -1.0))
        self.iteration = int(state.get("iteration", 0))
        self.last_results = state.get("results", {})


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
        print("Note: the gallery of {} has only {} images, so {} cannot be computed and {} skipped "
              "(set test.ranks to ranks <= {}).".format(dataset_name or "this dataset", num_gallery,
                                                       ", ".join("Rank-{}".format(r) for r in dropped),
                                                       "is" if len(dropped) == 1 else "are", num_gallery))
    if num_gallery < 1:
        raise ValueError("the gallery of {} is empty: nothing to rank".format(dataset_name or "this dataset"))
    return valid or [1]


def _to_float(outputs):
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_to_float(o) for o in outputs)
    if torch.is_tensor(outputs) and outputs.is_floating_point():
        return outputs.float()
    return outputs

