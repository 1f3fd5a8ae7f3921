"""Mixed precision and memory-format helpers shared by the engine and the benchmarks.

Precision names: ``'fp32'`` (no autocast), ``'bf16'`` (bfloat16 autocast; float32's exponent range, so no loss
scaling), ``'fp16'`` (float16 autocast with a GradScaler against gradient underflow). The BConv-Cells run their
state arithmetic in float32 under any of them.
"""
import contextlib

import torch

__all__ = ["PRECISIONS", "normalize_precision", "autocast_dtype", "check_precision", "resolve_precision",
           "autocast_context", "make_grad_scaler", "memory_format"]

PRECISIONS = ("fp32", "bf16", "fp16")
_ALIASES = {"fp32": "fp32", "float32": "fp32", "32": "fp32", "no": "fp32", "none": "fp32",
            "bf16": "bf16", "bfloat16": "bf16",
            "fp16": "fp16", "float16": "fp16", "half": "fp16", "16": "fp16"}
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def normalize_precision(precision):
    """Canonical precision name for ``precision`` (also accepts ``float32``/``bfloat16``/``float16``, a
    ``torch.dtype`` and ``None`` for fp32)."""
    if precision is None:
        return "fp32"
    if isinstance(precision, torch.dtype):
        for name, dtype in _DTYPES.items():
            if dtype == precision or (dtype is None and precision == torch.float32):
                return name
    key = str(precision).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"precision={precision!r} is not valid; use one of {', '.join(PRECISIONS)} (or "
                         "float32/bfloat16/float16)")
    return _ALIASES[key]


def autocast_dtype(precision):
    """The autocast dtype of ``precision``, or ``None`` for fp32."""
    return _DTYPES[normalize_precision(precision)]


def _device_type(device):
    return device if isinstance(device, str) and ":" not in device else torch.device(device).type


def check_precision(device, precision):
    """Raise a clear error when ``device`` cannot run ``precision``; returns the canonical name."""
    precision = normalize_precision(precision)
    device_type = _device_type(device)
    if precision == "bf16" and device_type == "cuda" and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"precision 'bf16' is not supported by this GPU ({torch.cuda.get_device_name()}); use 'fp16' (with loss "
            "scaling) "
            "or 'fp32'"
        )
    return precision


def resolve_precision(amp, amp_dtype, device):
    """'fp32' without ``amp``; otherwise ``amp_dtype``, where 'auto' is fp16 on CUDA and bf16 elsewhere."""
    device = torch.device(device)
    if not amp:
        return "fp32"
    if amp_dtype == "auto":
        amp_dtype = "fp16" if device.type == "cuda" else "bf16"
    return check_precision(device.type, amp_dtype)


def autocast_context(device_type, precision):
    """Context manager for a forward pass (and loss) at ``precision`` on ``device_type`` ('cuda', 'cpu', ...);
    a null context for fp32."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device_type(device_type), dtype=dtype)


def make_grad_scaler(device_type, precision):
    """A ``torch.amp.GradScaler``, enabled only for fp16 (bf16 and fp32 gradients do not underflow); a disabled
    scaler's ``scale``/``step``/``update`` pass through, so the training loop is the same for all precisions."""
    return torch.amp.GradScaler(_device_type(device_type), enabled=normalize_precision(precision) == "fp16")


def memory_format(channels_last):
    """``torch.channels_last`` when ``channels_last`` is true, else ``torch.contiguous_format``; use it for both
    the model (``model.to(memory_format=...)``) and the input batches (``x.contiguous(memory_format=...)``)."""
    return torch.channels_last if channels_last else torch.contiguous_format
