"""Calibration data for the data-aware criteria and for compensation: a few training images, the inputs and
outputs of chosen layers on them, and BatchNorm statistics re-estimated on them."""
import numpy as np
import torch

__all__ = ["calibration_images", "consumer_columns", "layer_io", "recalibrate_batchnorm"]


def _images_of(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return batch.get("img")
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]  # (imgs, pids, ...)
    return None


def calibration_images(calibration, max_images=64):
    """Up to ``max_images`` images (N, 3, H, W) from an image tensor or an iterable of torchreid batches (dicts
    with ``'img'``, or tuples whose first entry is the image tensor, e.g. a torchreid train loader)."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 4:
            raise ValueError(
                f"calibration images must be a 4-d tensor (N, 3, H, W), got shape {tuple(calibration.shape)}"
            )
        images = calibration[:max_images]
    else:
        chunks, count = [], 0
        try:
            iterator = iter(calibration)
        except TypeError:
            raise ValueError(
                "calibration= must be an image tensor or a DataLoader of torchreid batches, got "
                f"{type(calibration).__name__}"
            ) from None
        for batch in iterator:
            imgs = _images_of(batch)
            if imgs is None or imgs.dim() != 4:
                raise ValueError(
                    "calibration batches must be torchreid batches (a dict with 'img', or (imgs, "
                    f"pids, ...)); got a {type(batch).__name__}"
                )
            chunks.append(imgs[: max_images - count])
            count += len(chunks[-1])
            if count >= max_images:
                break
        images = torch.cat(chunks) if chunks else None
    if images is None or len(images) < 2:
        raise ValueError(
            f"calibration data gave {0 if images is None else len(images)} images; the data-aware criteria and "
            "compensation need at least 2"
        )
    return images


def consumer_columns(rec, group):
    """(input columns of consumer ``rec`` that carry ``group``'s units, unit of each column), or None when some
    unit is read through several columns (e.g. after a flatten), which the per-channel statistics do not model."""
    local = rec.in_units - group.offset
    columns = np.flatnonzero((local >= 0) & (local < group.size))
    if len(columns) == 0:
        return None
    units = local[columns]
    if len(np.unique(units)) != len(units):
        return None
    return columns, units


class _Stop(Exception):
    pass


@torch.no_grad()
def layer_io(model, module, images, output=False, batch_size=32):
    """``module``'s first positional input (or its output, with ``output=True``) when ``model`` (eval mode) runs
    on ``images``, concatenated over batches. The forward stops at ``module``, so the rest of the network is not
    run."""
    stored = []

    def pre_hook(mod, args):
        if not output:
            stored.append(args[0].detach())
            raise _Stop()

    def post_hook(mod, args, out):
        stored.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
        raise _Stop()

    handles = [module.register_forward_pre_hook(pre_hook), module.register_forward_hook(post_hook)]
    was_training = model.training
    if was_training:  # (train() walks every module: only when needed)
        model.eval()
    try:
        for start in range(0, len(images), batch_size):
            try:
                model(images[start : start + batch_size])
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
        if was_training:
            model.train()
    if not stored:
        raise RuntimeError(f"module {type(module).__name__} was not called in the forward pass")
    return torch.cat(stored)


@torch.no_grad()
def recalibrate_batchnorm(model, images, batch_size=32):
    """Re-estimate the running statistics of every BatchNorm of ``model`` on ``images``: the cumulative average
    over batches of ``batch_size`` (torchreid's default train batch), with every other module in eval mode, so
    that dropout, PTL cells' states and the weights are left as they are. The model's training mode is restored.

    After a cut, and on a new domain, the statistics the model was trained with no longer describe its
    activations; fine-tuning normalises with batch statistics, so these are what it sees from its first step."""
    norms = [m for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts alike
        m.train()
    try:
        ends = list(range(batch_size, len(images), batch_size)) + [len(images)]
        if len(ends) > 1 and ends[-1] - ends[-2] == 1:
            del ends[-2]  # a batch of one image has no batch statistics: it joins the batch before
        for start, end in zip([0] + ends[:-1], ends):
            model(images[start:end])
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return model
