"""Building blocks of the PTL side stream besides the cell: the fuse block, the rectifier and the plain
convolutional adapter that stands in for a cell in the capacity-matched ablation."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class _ConcatConv1x1(torch.autograd.Function):
    """``conv1x1(cat(inputs), weight)`` that saves the inputs rather than their concatenation.

    The backbone keeps its tap maps for its own backward anyway, so saving them costs nothing, whereas the
    concatenation would be a second copy of every tap held until backward. The backward re-concatenates and
    calls the same convolution backward autograd would call, so gradients are identical.
    """

    @staticmethod
    def forward(ctx, weight, *inputs):
        ctx.save_for_backward(weight, *inputs)
        return F.conv2d(torch.cat(inputs, 1), weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weight, *inputs = ctx.saved_tensors
        need_inputs = any(ctx.needs_input_grad[1:])
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, torch.cat(inputs, 1), weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            [need_inputs, ctx.needs_input_grad[0], False])
        grads, start = [], 0
        for x, needed in zip(inputs, ctx.needs_input_grad[1:]):
            grads.append(grad_x.narrow(1, start, x.shape[1]) if needed else None)
            start += x.shape[1]
        return (grad_w, *grads)


def _autocast_enabled(device_type):
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # device types without autocast, e.g. 'meta'
        return False


class FuseBlock(nn.Sequential):
    """1x1 conv + BN + ReLU applied to the channel concatenation of a backbone tap and the side stream."""

    def __init__(self, in_channels, out_channels):
        super().__init__(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))

    def forward(self, *inputs):
        conv, bn, relu = self
        weight = conv.weight
        # Memory-saving path when training in one dtype; autocast (which casts inside the convolution) and
        # inference take the plain path.
        if (torch.is_grad_enabled() and not _autocast_enabled(weight.device.type)
                and all(x.dtype == weight.dtype for x in inputs)):
            return relu(bn(_ConcatConv1x1.apply(weight, *inputs)))
        return super().forward(torch.cat(inputs, 1))


class Rectifier(nn.Module):
    """FiLM-style rectification of a backbone feature map by the side stream at the same resolution:
    ``x * (1 + scale(h)) + shift(h)`` with per-position, per-channel 1x1 convolutions.

    Both convolutions start at zero (weights and biases), so a new rectifier is the identity and the model
    starts as its pretrained backbone; their weights still get a gradient at the first step (it is
    proportional to ``h``), so the path starts learning at once.
    """

    def __init__(self, side_channels, channels):
        super().__init__()
        self.scale = nn.Conv2d(side_channels, channels, 1)
        self.shift = nn.Conv2d(side_channels, channels, 1)
        self.reset_parameters()

    def reset_parameters(self):
        for conv in (self.scale, self.shift):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x, h):
        h = h.to(x.dtype)
        return x * (1 + self.scale(h)) + self.shift(h)


class ConvAdapter(nn.Module):
    """A stateless stand-in for a BConv-Cell with as many parameters: a 3x3 convolution to ``hidden`` channels,
    BN + ReLU, and a 1x1 convolution down to ``out_channels``, with ``hidden`` chosen so that the two
    convolutions hold as many weights as the cell's gate convolution (``in x 4 out x 3 x 3``). Used to separate
    what the carried state adds from what the extra capacity adds."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        hidden = max(1, round(36 * in_channels * out_channels / (9 * in_channels + out_channels)))
        self.conv = nn.Conv2d(in_channels, hidden, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.proj = nn.Conv2d(hidden, out_channels, 1, bias=False)

    def forward(self, x):
        return self.proj(F.relu(self.bn(self.conv(x)), inplace=True))
