"""Synchronisation of BConv-Cell states across DDP ranks.

A BConv-Cell carries a state from one mini-batch to the next and keeps ``running_state``, a running average of
the batch-mean state used at evaluation. Under DDP every rank sees a different batch, so the ranks' states drift
apart unless they are synchronised. :func:`sync_cell_states`, called after every training step, makes them agree
(one all-reduce, like SyncBatchNorm):

* ``state_mode='dataset'``: the carried state is the batch mean of C_t. The batch mean over the union of the
  ranks' batches is the batch-size-weighted average of the per-rank means, and ``running_state`` is updated
  linearly from that mean, so averaging both (weighted by batch size) gives every rank exactly what one process
  would hold after a step over the concatenated batch -- provided the cells' inputs are per-sample, i.e. the
  layers in front of them do not mix samples. Training-mode BatchNorm does mix them (it normalises with the
  batch's statistics), so for a full PTL model the match is exact only with SyncBatchNorm; the ranks' states are
  equal either way.
* ``state_mode='slot'``: the carried state holds one slot per sample position, so there is nothing to average:
  each rank keeps its own slots. With equal per-rank batches of size B, rank r's slots are exactly slots
  ``r*B .. (r+1)*B-1`` of the single-process state over the batches concatenated in rank order, so the ranks
  together hold the single-process state. ``running_state`` (a running average of batch means) is averaged as in
  dataset mode, so evaluation uses the same state on every rank.

DDP itself must leave the cells' buffers alone (it would re-broadcast rank 0's before each forward and, in slot
mode, replace every rank's slots with rank 0's): importing this module registers them with
:func:`ptl_torchreid.utils.distributed.register_rank_synced_buffers`, so
:func:`~ptl_torchreid.utils.distributed.wrap_ddp` ignores them and broadcasts them once from rank 0.
"""
import torch
import torch.distributed as dist

from ..utils.distributed import get_world_size, register_rank_synced_buffers, unwrap
from .bconv import BConvCell

__all__ = ["cell_buffer_names", "broadcast_cell_states", "sync_cell_states"]


def _cells(model):
    return [m for m in unwrap(model).modules() if isinstance(m, BConvCell)]


def cell_buffer_names(model):
    """Fully qualified names of the BConv-Cells' buffers (carried state, running state, step counter), relative
    to the unwrapped model; these are synchronised by :func:`sync_cell_states`, not by DDP."""
    names = []
    for prefix, m in unwrap(model).named_modules():
        if isinstance(m, BConvCell):
            stem = prefix + "." if prefix else ""
            names.extend(stem + b for b in ("state", "running_state", "num_batches_tracked"))
    return names


@torch.no_grad()
def broadcast_cell_states(model, src=0):
    """Copy every cell's ``running_state``, step counter and carried state from rank ``src`` to all ranks. If the
    carried state is unset on any rank, it is reset everywhere (the next step starts from zeros)."""
    cells = _cells(model)
    if get_world_size() == 1 or not cells:
        return
    device = cells[0].running_state.device
    has_state = torch.tensor([float(all(c.state is not None for c in cells))], device=device)
    dist.all_reduce(has_state, op=dist.ReduceOp.MIN)
    shapes = torch.tensor(
        [d for c in cells for d in (c.state.shape if c.state is not None else (0, 0, 0, 0))],
        dtype=torch.long,
        device=device,
    )
    if has_state.item() > 0:
        # slot-mode states may differ in batch size between ranks: adopt rank src's shapes
        dist.broadcast(shapes, src)
        for c, shape in zip(cells, shapes.view(-1, 4).tolist()):
            if tuple(c.state.shape) != tuple(shape):
                c.state = c.state.new_zeros(shape)
    else:
        for c in cells:
            c.reset_state()
    for c in cells:
        dist.broadcast(c.running_state, src)
        dist.broadcast(c.num_batches_tracked, src)
        if c.state is not None:
            c.state = c.state.contiguous()
            dist.broadcast(c.state, src)


@torch.no_grad()
def sync_cell_states(model, batch_size=None):
    """All-reduce the BConv-Cells' states after a training step so that every rank holds the same state.

    Each rank's contribution is weighted by ``batch_size`` (its number of samples in the step; ``None`` means
    equal weights), so unequal batches still give the state one process would hold for their union. Averaged:
    ``running_state`` of every cell, and the carried ``state`` of cells in ``'dataset'`` mode; ``'slot'`` mode
    states stay per rank (see the module docstring). One collective for the whole model; a no-op in a single
    process. Every rank must call it at the same point (after the same number of forward passes).
    """
    cells = _cells(model)
    if get_world_size() == 1 or not cells:
        return
    tensors = []
    for c in cells:
        tensors.append(c.running_state)
        if c.state_mode == "dataset" and c.state is not None:
            tensors.append(c.state)
    weight = 1.0 if batch_size is None else float(batch_size)
    if weight <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = cells[0].running_state.device
    flat = (
        torch.cat([t.reshape(-1).to(device, torch.float32) for t in tensors] + [torch.ones(1, device=device)]) * weight
    )
    dist.all_reduce(flat)
    flat = flat[:-1] / flat[-1]
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


register_rank_synced_buffers(cell_buffer_names, broadcast_cell_states)
