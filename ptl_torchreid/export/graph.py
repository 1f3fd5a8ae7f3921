"""The function an exporter writes: a model in eval mode, copied, with its PTL cell states frozen.

In eval mode every model here is a fixed function of its input: BatchNorm uses its running statistics and each
BConv-Cell its frozen eval state (``running_state`` or zeros), which nothing updates. :func:`frozen_eval_model`
makes that copy and checks that its forward returns an embedding ``[batch, dim]``.
"""
import copy

import torch

from ..models import BConvCell, is_ptl, unwrap

__all__ = ["ExportError", "UnsupportedModelError", "frozen_eval_model", "probe_embedding", "ptl_state_summary",
           "example_input"]


class ExportError(RuntimeError):
    """An export that could not be written or did not pass its checks; the message says which and why."""


class UnsupportedModelError(ExportError):
    """The model cannot be exported as an embedding function (its message says why and what to change)."""


def example_input(input_size, batch_size=2, seed=0):
    """A deterministic normalised-image-like batch ``[batch_size, 3, H, W]`` (float32)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, *input_size, generator=gen)


def frozen_eval_model(model):
    """An eval-mode copy of ``model`` (DataParallel/DDP wrappers removed, on the CPU, float32, no gradients)."""
    net = copy.deepcopy(unwrap(model)).cpu().float().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def model_input_size(net, input_size=None):
    """The input size to export at: a PTL model's own (its cell states have that shape), else ``input_size``."""
    own = getattr(net, "input_size", None) if is_ptl(net) else None
    if own is not None:
        own = tuple(int(s) for s in own)
        if input_size is not None and tuple(input_size) != own:
            raise UnsupportedModelError(
                f"this PTL model was built for input size {own[0]}x{own[1]} (its cell states have that shape) and "
                "cannot be "
                f"exported at {input_size[0]}x{input_size[1]}; export at {own[0]}x{own[1]} (data.height/data.width) "
                "or rebuild the model for the new "
                "size"
            )
        return own
    if input_size is None:
        raise ValueError("input_size=(height, width) is needed to export a plain model")
    return tuple(int(s) for s in input_size)


@torch.no_grad()
def probe_embedding(net, input_size, what="the model"):
    """Feature size of ``net``'s eval forward; :class:`UnsupportedModelError` unless it returns ``[batch, dim]``."""
    x = example_input(input_size)
    try:
        out = net(x)
    except (RuntimeError, ValueError) as e:
        raise UnsupportedModelError(
            f"{what} failed on a {input_size[0]}x{input_size[1]} input in eval mode: {e}"
        ) from e
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        got = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a tensor of shape {list(out.shape)}"
        raise UnsupportedModelError(
            f"{what} returns {got} in eval mode; export needs a model whose eval forward returns one embedding tensor "
            "[batch, dim] (torchreid's convention). Wrap it in a module that returns the features"
        )
    if not out.is_floating_point():
        raise UnsupportedModelError(f"{what} returns {out.dtype} features; export needs floating-point features")
    return int(out.shape[1])


def ptl_state_summary(net):
    """What the graph freezes for a PTL model (None for a plain one): eval state kind and how many training
    batches the running state has averaged (0 means it is still all zeros)."""
    cells = [m for m in net.modules() if isinstance(m, BConvCell)]
    if not cells:
        return None
    return {
        "cells": len(cells),
        "eval_state": sorted({c.eval_state for c in cells}),
        "running_state_batches": int(min(int(c.num_batches_tracked) for c in cells)),
        "frozen_in_graph": True,
    }
