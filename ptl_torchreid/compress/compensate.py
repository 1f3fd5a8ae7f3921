"""Compensation: after the cut, refit each consumer of pruned channels so that it reproduces its unpruned output.

As in channel-pruning reconstruction (He et al., ICCV 2017), consumers are refitted one after the other in the
order the forward calls them: layer l's inputs come from the pruned model (already compensated upstream), its
targets from the unpruned parent. For a convolution the rows are unfolded patches (a random subset of at most
``max_rows`` positions over the calibration images); for a linear, the samples. The weights solve

    min_W' ||Y - X W'^T - b||^2 + lam ||W' - W_cut||^2,    lam = ridge * mean diagonal of X^T X

where W_cut is the sliced kernel: the penalty pulls towards what pruning alone gives, so the fitted weights
never reconstruct worse than W_cut on the fitting rows (they minimise an objective that W_cut attains with the
same error and no penalty). The intercept b (the mean the removed channels contributed) goes into the layer's
bias, or into the running mean of the BatchNorm that directly follows a bias-free layer; otherwise it is not
fitted. Depthwise layers and BConv-Cells are not refitted (their inputs are either sliced with their outputs, or
read through the recurrent gates).

With ``recalibrate=True`` the refit is done under the calibration images' own BatchNorm statistics, the ones
fine-tuning normalises with (batch statistics), instead of the running statistics the model was trained with
(another domain, when fine-tuning transfers). Parent and pruned model are first recalibrated
(``recalibrate_batchnorm``); after each refit, the BatchNorm that follows the layer takes the statistics of the
refitted output; at the end the pruned model is recalibrated once more, for the layers downstream that were not
refitted.
"""
import numpy as np
import torch
import torch.nn.functional as F

from .calibration import layer_io, recalibrate_batchnorm

__all__ = ["compensate", "refit_consumer", "reconstruction_error"]


def _rows(module, x):
    """(rows, features) matrix of a layer's input: unfolded patches for a conv, samples for a linear."""
    if x.dim() == 2:
        return x
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                    stride=module.stride)  # (N, C*k*k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _targets(y):
    return y if y.dim() == 2 else y.movedim(1, -1).reshape(-1, y.shape[1])


def _weight_matrix(module):
    return module.weight.detach().reshape(module.weight.shape[0], -1)


def reconstruction_error(module, x, y):
    """Sum of squared differences between ``module(x)`` (without bias, as rows) and the targets ``y`` (rows)."""
    pred = _rows(module, x).double() @ _weight_matrix(module).double().t()
    if module.bias is not None:
        pred = pred + module.bias.detach().double()
    return float(((_targets(y).double() - pred) ** 2).sum())


def _following_norm(graph, index):
    records = graph.records
    if index + 1 < len(records):
        nxt, rec = records[index + 1], records[index]
        if nxt.kind == "norm" and getattr(nxt.module, "running_mean", None) is not None and \
                np.array_equal(nxt.in_units, rec.out_units):
            return nxt.module
    return None


@torch.no_grad()
def refit_consumer(module, x, y, ridge=1e-6, max_rows=16384, norm=None, seed=0):
    """Refit ``module`` (a conv with groups=1 or a linear, already pruned) on its pruned input ``x`` to reproduce
    ``y`` (the unpruned model's output of the kept output channels). Returns (error before, error after) on the
    fitting rows, or None when there are fewer rows than twice the unknowns (nothing is changed then)."""
    rows, target = _rows(module, x), _targets(y)
    if rows.shape[0] > max_rows:
        pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]
        rows, target = rows[pick.to(rows.device)], target[pick.to(target.device)]
    rows, target = rows.double(), target.double()
    intercept = module.bias is not None or norm is not None
    if rows.shape[0] < 2 * (rows.shape[1] + intercept):
        return None
    w_cut = _weight_matrix(module).double()
    b_cut = module.bias.detach().double() if module.bias is not None else torch.zeros_like(target[0])
    design = torch.cat([rows, torch.ones_like(rows[:, :1])], 1) if intercept else rows
    prior = torch.cat([w_cut, b_cut[:, None]], 1) if intercept else w_cut
    gram = design.t() @ design
    lam = ridge * float(torch.diagonal(gram).mean().clamp_min(1e-12))
    before = float(((target - design @ prior.t()) ** 2).sum())
    solution = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device),
                                  design.t() @ target + lam * prior.t()).t()
    after = float(((target - design @ solution.t()) ** 2).sum())
    if not np.isfinite(after) or after > before:  # the solve can only lose to W_cut through round-off
        return before, before
    w = solution[:, :rows.shape[1]]
    module.weight.copy_(w.reshape(module.weight.shape).to(module.weight.dtype))
    if intercept:
        shift = solution[:, -1] - b_cut
        if module.bias is not None:
            module.bias.copy_(solution[:, -1].to(module.bias.dtype))
        else:  # BN(y + shift) in eval mode = BN with its running mean lowered by shift
            norm.running_mean.sub_(shift.to(norm.running_mean.dtype))
    return before, after


@torch.no_grad()
def _take_statistics(norm, out):
    """Set ``norm``'s running statistics to those of its input ``out`` (N, C, ...), as a BatchNorm in train mode
    would measure them on this batch (unbiased variance, as torch stores it)."""
    rows = _targets(out)
    norm.running_mean.copy_(rows.mean(0).to(norm.running_mean.dtype))
    norm.running_var.copy_(rows.var(0).to(norm.running_var.dtype))


def compensate(graph, parent, alive, images, ridge=1e-6, max_rows=16384, recalibrate=False):
    """Refit, in call order, every conv/linear of the pruned ``graph.model`` whose input channels were cut.

    Args:
        graph: the dependency graph the pruning used (its records point at the pruned model's modules).
        parent: the unpruned model, with the same module names.
        alive: boolean per unit of ``graph`` (the kept units).
        images: calibration images.
        recalibrate: refit under the calibration images' BatchNorm statistics (module docstring); the parent's
            running statistics are re-estimated in place.
    Returns: list of (layer name, error before, error after); layers skipped for too few rows are left out.
    """
    alive = np.asarray(alive, dtype=bool)
    parent_modules = dict(parent.named_modules())
    results = []
    was_training = graph.model.training
    graph.model.eval()
    parent.eval()
    try:
        if recalibrate:
            recalibrate_batchnorm(parent, images)
            recalibrate_batchnorm(graph.model, images)
        results = _compensate(graph, parent_modules, parent, alive, images, ridge, max_rows, recalibrate)
        if recalibrate:
            recalibrate_batchnorm(graph.model, images)
    finally:
        graph.model.train(was_training)
    return results


@torch.no_grad()
def _compensate(graph, parent_modules, parent, alive, images, ridge, max_rows, recalibrate):
    results = []
    for index, rec in enumerate(graph.records):
        if rec.kind not in ("conv", "linear") or alive[rec.in_units].all():
            continue
        x = layer_io(graph.model, rec.module, images)
        y = layer_io(parent, parent_modules[rec.name], images, output=True)
        keep_out = torch.from_numpy(np.flatnonzero(alive[rec.out_units])).to(y.device)
        norm = _following_norm(graph, index)
        fit = refit_consumer(rec.module, x, y.index_select(1, keep_out), ridge=ridge, max_rows=max_rows,
                             norm=norm, seed=index)
        if fit is not None:
            results.append((rec.name,) + fit)
            if recalibrate and norm is not None:
                _take_statistics(norm, rec.module(x))
    return results
