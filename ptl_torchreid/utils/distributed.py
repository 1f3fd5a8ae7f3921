"""torch.distributed helpers: launch from ``torchrun``, rank queries, gathering and DDP wrapping.

Launch: ``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them and creates the default process group (``nccl`` for CUDA, ``gloo`` for the
CPU). Without ``WORLD_SIZE`` it does nothing and every helper here behaves as a single process (rank 0 of 1).

Rank-synchronised buffers. Some buffers are kept in agreement across ranks by their owner rather than by DDP:
the BConv-Cells' states, which ``ptl_torchreid.models.cell_sync`` all-reduces after every step. DDP must leave
them alone: by default it re-broadcasts every buffer from rank 0 before each forward, which would overwrite them
with rank 0's local values. Their owner declares them with :func:`register_rank_synced_buffers`; :func:`wrap_ddp`
then tells DDP to ignore them and broadcasts them once from rank 0, and :func:`broadcast_buffers` skips them
(other buffers, e.g. BatchNorm statistics, are still broadcast from rank 0 as usual).
"""
import contextlib
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "cleanup_distributed", "is_distributed", "get_rank",
           "get_world_size", "get_local_rank", "is_main_process", "barrier", "main_process_first", "quiet_unless_main",
           "collective_device", "all_gather_tensors", "all_reduce_mean", "any_rank", "broadcast_object",
           "unwrap", "register_rank_synced_buffers", "rank_synced_buffer_names", "wrap_ddp", "broadcast_buffers"]

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process stands: its global rank, the number of processes, its rank on this node, the
    process-group backend (``None`` without a process group) and the device it should compute on."""
    rank: int
    world_size: int
    local_rank: int
    backend: object
    device: torch.device

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def _default_device(local_rank):
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(backend=None, device=None, timeout=None):
    """Create the default process group from the ``torchrun`` environment and return a :class:`DistContext`.

    Args:
        backend: ``'nccl'``, ``'gloo'`` or ``None`` to choose: ``nccl`` when the device is CUDA, else ``gloo``.
        device: the device to train on; ``None`` gives ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
            A CUDA device without an index becomes ``cuda:LOCAL_RANK`` and is made the current device.
        timeout: seconds (or a ``datetime.timedelta``) before a collective that does not complete fails.

    Without ``WORLD_SIZE`` in the environment (a plain ``python`` launch) nothing is initialised and the context
    says rank 0 of 1. Calling it again after the group exists returns the same context.
    """
    if "WORLD_SIZE" not in os.environ:
        dev = torch.device(device) if device is not None else _default_device(0)
        return DistContext(0, 1, 0, None, dev)
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
                           "launch with torchrun (which sets them all), or set them yourself for a manual launch")
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])

    dev = torch.device(device) if device is not None else _default_device(local_rank)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} asks for {dev} but only {torch.cuda.device_count()} CUDA device(s) are "
                "visible: start at most that many processes per node (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(dev)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError(
            f"backend 'nccl' needs CUDA devices but the device is {dev}; use backend 'gloo' for CPU training"
        )

    if not dist.is_initialized():
        kwargs = dict(backend=backend, init_method="env://", world_size=world_size, rank=rank)
        if timeout is not None:
            kwargs["timeout"] = (
                timeout if isinstance(timeout, datetime.timedelta) else datetime.timedelta(seconds=float(timeout))
            )
        dist.init_process_group(**kwargs)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), dev)


def cleanup_distributed():
    """Destroy the default process group, if one exists."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed():
    """Whether a default process group exists (of any size)."""
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank():
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def is_main_process():
    """True on rank 0 (and in a single process): the one that logs and writes files."""
    return get_rank() == 0


def barrier():
    """Wait for every rank (no-op in a single process)."""
    if get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_process_first():
    """Run the block on rank 0 first, then on the first process of every other node (``LOCAL_RANK`` 0), then on
    the remaining ranks: for work that writes files (generating a dataset, extracting an archive) which the later
    ones then only read. With a file system shared by the nodes only rank 0 does the work; without one, one
    process per node does it. A block that raises still releases the ranks waiting for it."""
    phase = 0 if get_rank() == 0 else (1 if get_local_rank() == 0 else 2)
    for _ in range(phase):
        barrier()
    try:
        yield
    finally:
        for _ in range(2 - phase):
            barrier()


@contextlib.contextmanager
def quiet_unless_main():
    """Discard standard output on every rank but 0, so that a run prints one log (errors and warnings go to
    standard error and still show on every rank)."""
    if is_main_process():
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def collective_device():
    """The device collectives of the default group run on: the current CUDA device for nccl, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_tensors(tensor, cat=True):
    """Gather ``tensor`` from every rank; the sizes along dim 0 may differ between ranks (the other dims must
    agree). Returns the rank-ordered concatenation, or the list of per-rank tensors with ``cat=False``.

    Each rank's tensor is padded to the largest dim-0 size, gathered, and trimmed back.
    The tensor must live on a device the backend supports (CUDA for nccl).
    """
    if tensor.dim() == 0:
        raise ValueError("all_gather_tensors needs a tensor with at least one dimension; use tensor.view(1)")
    if get_world_size() == 1:
        return tensor if cat else [tensor]
    world = get_world_size()
    size = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    # gloo has no bool collectives; uint8 carries the same values.
    send = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
    if send.shape[0] < longest:
        send = torch.cat([send, send.new_zeros((longest - send.shape[0],) + tuple(send.shape[1:]))], 0)
    send = send.contiguous()
    received = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(received, send)
    parts = [r[:n].to(tensor.dtype) for r, n in zip(received, sizes)]
    return torch.cat(parts, 0) if cat else parts


def all_reduce_mean(value, weight=1.0):
    """Weighted mean over ranks of a float or tensor (e.g. a loss for logging); weights are per rank."""
    if get_world_size() == 1:
        return value
    is_tensor = torch.is_tensor(value)
    t = value.detach().float().reshape(-1) if is_tensor else torch.tensor([float(value)], dtype=torch.float64)
    device = t.device if is_tensor else collective_device()
    buf = torch.cat(
        [t.to(device, torch.float64) * float(weight), torch.tensor([float(weight)], dtype=torch.float64, device=device)]
    )
    dist.all_reduce(buf)
    mean = buf[:-1] / buf[-1]
    if is_tensor:
        return mean.to(value.dtype).reshape(value.shape).to(value.device)
    return float(mean.item())


def any_rank(flag):
    """Whether ``flag`` is true on at least one rank (every rank gets the same answer): for decisions that all
    ranks must take together, such as skipping a step, since a rank that leaves a collective out stalls the rest."""
    if get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj, src=0):
    """Rank ``src``'s ``obj`` (any picklable object) on every rank; ``obj`` is ignored on the other ranks."""
    if get_world_size() == 1:
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=collective_device())
    return box[0]


# -- DDP wrapping -----------------------------------------------------------------------------------------------


def unwrap(model):
    """The model inside DataParallel / DistributedDataParallel wrappers."""
    while isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


# (names, broadcast) pairs from register_rank_synced_buffers, in registration order.
_RANK_SYNCED = []


def register_rank_synced_buffers(names, broadcast):
    """Declare buffers that their owner keeps in agreement across ranks, so that DDP leaves them alone.

    Args:
        names: ``names(model)`` -> the fully qualified names of such buffers in the unwrapped ``model``.
        broadcast: ``broadcast(model, src)`` copies them from rank ``src`` to every rank; :func:`wrap_ddp` calls it
            so that all ranks start from the same values.

    Registering the same pair again does nothing.
    """
    if (names, broadcast) not in _RANK_SYNCED:
        _RANK_SYNCED.append((names, broadcast))


def rank_synced_buffer_names(model):
    """Names (in the unwrapped model) of every registered rank-synchronised buffer of ``model``, sorted."""
    net = unwrap(model)
    return sorted({name for names, _ in _RANK_SYNCED for name in names(net)})


def wrap_ddp(model, device=None, find_unused_parameters=False, **ddp_kwargs):
    """Wrap ``model`` in DistributedDataParallel for the current process group, with the rank-synchronised
    buffers (:func:`register_rank_synced_buffers`; the BConv-Cells' states) excluded from DDP's buffer broadcast
    and broadcast once from rank 0 instead, so that every rank starts from the same values.

    Args:
        device: the model's device; for CUDA it becomes DDP's single ``device_ids`` entry.
        find_unused_parameters: set it when some parameters may get no gradient in a step, e.g. when layers are
            frozen (``requires_grad=False``) after wrapping, as backbone freezing or torchreid's fixbase do.
        ddp_kwargs: passed on to DistributedDataParallel.
    """
    if not is_distributed():
        raise RuntimeError("wrap_ddp needs a process group: call init_distributed() first (under torchrun)")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise ValueError("the model is already wrapped in DistributedDataParallel")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    names = rank_synced_buffer_names(model)
    if names:
        ignored = sorted(set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())) | set(names))
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        for _, broadcast in _RANK_SYNCED:
            broadcast(model, 0)
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index if device.index is not None else torch.cuda.current_device()])
    return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused_parameters, **ddp_kwargs)


@torch.no_grad()
def broadcast_buffers(model, src=0):
    """Copy every buffer except the rank-synchronised ones (see :func:`register_rank_synced_buffers`) from rank
    ``src``.

    DDP broadcasts buffers before each training forward, so after the last step every rank has updated its
    BatchNorm statistics with its own batch; call this before evaluating with the unwrapped model so that all
    ranks compute features with the same statistics (those a rank-0 checkpoint holds)."""
    if get_world_size() == 1:
        return
    net = unwrap(model)
    skip = set(rank_synced_buffer_names(net))
    for name, buf in net.named_buffers():
        if name not in skip and buf is not None:
            dist.broadcast(buf, src)
