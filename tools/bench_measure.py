"""Measurements for tools/benchmark.py: FLOPs, parameters, peak memory, interleaved timing, machine description.

Nothing here trains; the functions take built models/engines and return plain numbers, so they can be reused by
other tools (and by a pruned-model column later).
"""
import copy
import ctypes
import os
import platform
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "count_params",
    "train_and_inference_flops",
    "sync",
    "rss_bytes",
    "release_free_memory",
    "heap_in_use_bytes",
    "HeapPeak",
    "reset_peak_rss",
    "peak_rss_bytes",
    "interleaved",
    "median",
    "load_average",
    "machine_description",
]


def count_params(model):
    """Number of parameters (all of them, trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def _outputs_sum(out):
    if isinstance(out, (tuple, list)):
        return sum(_outputs_sum(o) for o in out)
    return out.float().sum()


def train_and_inference_flops(model, height, width, batch_size=2, device="cpu"):
    """FLOPs per image of an inference forward and of a training step, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts as 2); ``ptl_torchreid.compress.count_flops``
    counts the inference forward of a whole batch only.

    Returns ``{'inference': x, 'train': y}``: ``inference`` is one eval-mode forward (the embedding), ``train``
    a train-mode forward plus the backward of a scalar made from the outputs (the loss itself is negligible).
    Counting runs on a copy, so the model's weights, statistics and cell states are untouched.
    """
    model = copy.deepcopy(model).to(device)
    x = torch.randn(batch_size, 3, height, width, device=device)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    inference = counter.get_total_flops() / batch_size
    model.train()
    with FlopCounterMode(display=False) as counter:
        _outputs_sum(model(x)).backward()
    train = counter.get_total_flops() / batch_size
    return {"inference": float(inference), "train": float(train)}


def sync(device):
    """Wait for queued device work (CUDA kernels run asynchronously)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- memory ---------------------------------------------------------------------------------------------------

def _proc_status(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes():
    """Current resident set size of this process (Linux /proc; None elsewhere)."""
    return _proc_status("VmRSS")


def release_free_memory():
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so that RSS counts memory in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes():
    """Peak resident set size since start or the last :func:`reset_peak_rss`."""
    peak = _proc_status("VmHWM")
    if peak is None:  # ru_maxrss is in kilobytes on Linux, bytes on macOS
        scale = 1 if platform.system() == "Darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return peak


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def heap_in_use_bytes():
    """Bytes malloc has handed out and not got back (glibc ``mallinfo2``: heap chunks in use + mmapped
    chunks); unlike RSS it does not count freed memory the allocator keeps. None without glibc."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


class HeapPeak:
    """Context manager: peak of :func:`heap_in_use_bytes` sampled after every aten operation (forward and
    backward), the CPU counterpart of ``torch.cuda.max_memory_allocated``. ``peak`` is None without glibc."""

    def __init__(self):
        self.peak = None

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.peak = heap_in_use_bytes()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                now = heap_in_use_bytes()
                if now is not None and now > tracker.peak:
                    tracker.peak = now
                return out

        self._mode = _Mode() if self.peak is not None else None
        if self._mode is not None:
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self._mode is not None:
            self._mode.__exit__(*exc)
        return False


# -- timing ---------------------------------------------------------------------------------------------------

def interleaved(tasks, rounds, warmup=1):
    """Run ``tasks`` (name -> callable returning seconds) alternately, so that all see the same machine load.

    Round r runs the tasks in order, round r+1 in reverse order (ABBA...), which also cancels slow drift.
    ``warmup`` untimed rounds come first. Returns name -> list of times (one per timed round).
    """
    names = list(tasks)
    times = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t = tasks[n]()
            if r >= warmup:
                times[n].append(t)
    return times


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def load_average():
    """1-minute load average (nan where unavailable)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def machine_description(device):
    """One line: CPU/GPU, threads, library versions."""
    device = torch.device(device)
    if device.type == "cuda":
        what = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        what = f"CPU {cpu_model() or platform.machine()} ({cpus} cores usable, {torch.get_num_threads()} torch threads)"
    return f"{what}; torch {torch.__version__}, Python {platform.python_version()}"


def cpu_model():
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def now():
    return time.perf_counter()
