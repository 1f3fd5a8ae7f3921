"""Model cost as measured, not estimated: FLOPs by torch's own counter, parameters, and wall-clock latency."""
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_params", "compare_latency"]


def _dummy(model, input_size, batch_size):
    param = next(iter(model.parameters()), None)
    kw = dict(device=param.device, dtype=param.dtype) if param is not None else {}
    return torch.randn(batch_size, 3, *input_size, **kw)


@torch.no_grad()
def count_flops(model, input_size=(256, 128), batch_size=1):
    """FLOPs of one eval-mode forward (the embedding), as ``torch.utils.flop_counter.FlopCounterMode`` counts
    them (2 per multiply-add of convolutions and matrix products), per batch of ``batch_size``."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(_dummy(model, input_size, batch_size))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def count_params(model):
    """Number of parameters (buffers such as BatchNorm statistics are not parameters)."""
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def compare_latency(models, input_size=(256, 128), batch_size=32, rounds=5, warmup=1, num_threads=None):
    """Latency of several models measured in interleaved rounds (one forward of each model per round), so that
    load from other processes affects all of them alike.

    Args:
        models: dict name -> module.
    Returns: dict name -> dict(median, min, mean, runs, cpu_median) in seconds per forward of a ``batch_size``
    batch; ``cpu_median`` is the process CPU time, which other processes do not inflate (with one thread it is
    the compute time even on a busy machine; with more it also counts threads waiting for each other).
    """
    modes = {name: m.training for name, m in models.items()}
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    inputs = {name: _dummy(m, input_size, batch_size) for name, m in models.items()}
    runs = {name: [] for name in models}
    cpu = {name: [] for name in models}
    try:
        for m in models.values():
            m.eval()
        for _ in range(warmup):
            for name, m in models.items():
                m(inputs[name])
        for _ in range(rounds):
            for name, m in models.items():
                x = inputs[name]
                c, t = time.process_time(), time.perf_counter()
                m(x)
                if x.is_cuda:
                    torch.cuda.synchronize(x.device)
                runs[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    finally:
        torch.set_num_threads(threads)
        for name, m in models.items():
            m.train(modes[name])
    return {name: dict(median=statistics.median(r), min=min(r), mean=statistics.fmean(r), runs=r,
                       cpu_median=statistics.median(cpu[name])) for name, r in runs.items()}
