"""PTLNet: a torchreid backbone plus the Progressive Transfer Learning side stream.

The backbone runs unchanged (its pretrained weights load exactly). At five taps (stem, three intermediate stages,
last stage) the side stream reads the backbone's feature maps:

    bconv1(image, s2) -> bconv2(s2) -> fuse1[bconv2, stem] -> bconv3 -> fuse2[stage1, bconv3] -> bconv4
      -> fuse3[stage2, bconv4] -> bconv5 -> fuse4[stage3, bconv5] -> bconv6 (stride of the last stage)

Each fuse is a 1x1 conv + BN + ReLU over the channel concatenation. The head concatenates the globally pooled last
stage with the pooled bconv6 output and reduces it (linear + BN + ReLU) to the feature size; ``classifier``
follows, a direct child as torchreid's ``open_specified_layers`` expects.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .bconv import BConvCell, conv_output_size

# Side-stream widths of the reference ResNet-50 model; other backbones scale them (see ``side_stream_widths``).
REFERENCE_WIDTHS = dict(bconv1=16, bconv2=32, fuse1=64, bconv3=64, fuse2=128, bconv4=256, fuse3=256, bconv5=512,
                        fuse4=512, bconv6=128)
_REFERENCE_STAGE3_CHANNELS = 1024


def side_stream_widths(stage3_channels, divisor=8):
    """Scale the reference widths by the backbone's stage-3 width relative to ResNet-50's, rounded up to a
    multiple of ``divisor`` (at least ``divisor``) so that narrow backbones keep a usable side stream."""
    scale = stage3_channels / _REFERENCE_STAGE3_CHANNELS
    return {k: max(divisor, int(-(-v * scale // divisor)) * divisor) for k, v in REFERENCE_WIDTHS.items()}


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


class PTLNet(nn.Module):
    """Progressive Transfer Learning network over a torchreid backbone.

    Args:
        backbone: a torchreid model (its ``fc``/``classifier``/pooling are replaced by the PTL head).
        taps: five tuples of backbone attribute names; running them in order yields the stem, stage-1, stage-2,
            stage-3 and last-stage feature maps.
        num_classes: identities of the classifier.
        loss: ``'softmax'`` or ``'triplet'`` (torchreid's forward contract).
        feature_dim: embedding size after the reduction.
        input_size: (height, width) the model is built for; fixes the cells' state shapes.
        widths: side-stream channel widths (keys of ``REFERENCE_WIDTHS``); default scales the reference widths.
        state_mode, eval_state, momentum: BConv-Cell options (see ``BConvCell``).
    """

    is_ptl = True

    def __init__(self, backbone, taps, num_classes, loss="softmax", feature_dim=None, input_size=(256, 128),
                 widths=None, state_mode="dataset", eval_state="running", momentum=0.1):
        super().__init__()
        if len(taps) != 5:
            raise ValueError("PTLNet needs 5 taps (stem, stage1, stage2, stage3, last), got {}".format(len(taps)))
        if loss not in ("softmax", "triplet"):
            raise ValueError("loss={!r} is not supported; use 'softmax' or 'triplet'".format(loss))
        self.loss = loss
        self.backbone = backbone
        self.taps = tuple(tuple(t) for t in taps)
        self.input_size = tuple(int(s) for s in input_size)
        # The PTL head replaces these; keeping them would leave unused parameters (an error under DDP).
        for name in ("fc", "classifier", "global_avgpool"):
            if hasattr(backbone, name):
                setattr(backbone, name, None)

        channels, sizes = self._probe_taps()
        strides = self._tap_strides(sizes)
        w = dict(side_stream_widths(channels[3]), **(widths or {}))
        self.widths = w
        self.feature_dim = int(feature_dim or getattr(backbone, "feature_dim", channels[4]))
        cell = dict(state_mode=state_mode, eval_state=eval_state, momentum=momentum)
        h, wd = self.input_size

        def make_cell(cin, cout, stride, size):
            out = (conv_output_size(size[0], stride), conv_output_size(size[1], stride))
            return BConvCell(cin, cout, out, stride=stride, **cell), out

        self.bconv1, size = make_cell(3, w["bconv1"], 2, (h, wd))
        self.bconv2, size = make_cell(w["bconv1"], w["bconv2"], 2, size)
        self._check_size("stem", size, sizes[0])
        self.fuse1 = FuseBlock(w["bconv2"] + channels[0], w["fuse1"])
        self.bconv3, size = make_cell(w["fuse1"], w["bconv3"], strides[1], size)
        self._check_size("stage1", size, sizes[1])
        self.fuse2 = FuseBlock(channels[1] + w["bconv3"], w["fuse2"])
        self.bconv4, size = make_cell(w["fuse2"], w["bconv4"], strides[2], size)
        self._check_size("stage2", size, sizes[2])
        self.fuse3 = FuseBlock(channels[2] + w["bconv4"], w["fuse3"])
        self.bconv5, size = make_cell(w["fuse3"], w["bconv5"], strides[3], size)
        self._check_size("stage3", size, sizes[3])
        self.fuse4 = FuseBlock(channels[3] + w["bconv5"], w["fuse4"])
        self.bconv6, size = make_cell(w["fuse4"], w["bconv6"], strides[4], size)
        self._check_size("last stage", size, sizes[4])

        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Sequential(nn.Linear(channels[4] + w["bconv6"], self.feature_dim),
                                    nn.BatchNorm1d(self.feature_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        self._backbone_frozen = False
        self._init_side_stream()

    # -- construction helpers -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _probe_taps(self):
        """Channels and spatial sizes of the five taps, from one forward of a blank image at ``input_size``."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            param = next(self.backbone.parameters())
            x = torch.zeros(1, 3, *self.input_size, device=param.device, dtype=param.dtype)
            outs = self._run_taps(x)
        finally:
            self.backbone.train(was_training)
        return [o.shape[1] for o in outs], [tuple(o.shape[-2:]) for o in outs]

    def _tap_strides(self, sizes):
        strides = [None]
        for prev, cur in zip(sizes[:-1], sizes[1:]):
            stride = prev[0] // cur[0]
            if stride < 1 or conv_output_size(prev[0], stride) != cur[0]:
                raise ValueError("backbone taps {} -> {} are not a plain stride apart; input_size {} may not suit "
                                 "this backbone; use an input size that is a multiple of 32".format(prev, cur, self.input_size))
            strides.append(stride)
        return strides

    def _check_size(self, tap, side, backbone):
        if tuple(side) != tuple(backbone):
            raise ValueError("side stream is {} at the {} tap but the backbone gives {} for input_size {}; use an "
                             "input size that is a multiple of 32".format(side, tap, backbone, self.input_size))

    def _init_side_stream(self):
        for name, m in self.named_modules():
            if name.startswith("backbone"):
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    # -- PTL API ------------------------------------------------------------------------------------------------
    def cells(self):
        """The BConv-Cells in side-stream order."""
        return (m for m in self.modules() if isinstance(m, BConvCell))

    def reset_state(self):
        """Zero the carried state of every cell (the engine calls this at each epoch start)."""
        for c in self.cells():
            c.reset_state()

    def configure_cells(self, **options):
        """Set ``state_mode``, ``eval_state`` and/or ``momentum`` on every cell."""
        for c in self.cells():
            c.configure(**options)

    def state_norm(self):
        """Mean over cells of the carried state's root-mean-square magnitude (0.0 after a reset)."""
        values = [c.state_rms() for c in self.cells()]
        return sum(values) / len(values)

    def backbone_parameters(self):
        return self.backbone.parameters()

    def ptl_parameters(self):
        """Parameters of the side stream and the head (everything outside the backbone)."""
        return (p for n, p in self.named_parameters() if not n.startswith("backbone."))

    def freeze_backbone(self, frozen=True):
        """Train only the cells and the head: backbone weights get no gradient and its BatchNorms keep their
        running statistics (eval mode) while frozen."""
        self._backbone_frozen = bool(frozen)
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        self.backbone.train(self.training and not frozen)
        return self

    @property
    def backbone_frozen(self):
        return self._backbone_frozen

    def train(self, mode=True):
        super().train(mode)
        if self._backbone_frozen:
            self.backbone.eval()
        return self

    # -- forward ------------------------------------------------------------------------------------------------
    def _run_taps(self, x):
        outs = []
        for names in self.taps:
            for name in names:
                x = getattr(self.backbone, name)(x)
            outs.append(x)
        return outs

    def featuremaps(self, x):
        """Last-stage backbone maps concatenated with the bconv6 maps (what the head pools)."""
        stem, stage1, stage2, stage3, last = self._run_taps(x)
        h = self.bconv2(self.bconv1(x))
        h = self.bconv3(self.fuse1(h, stem))
        h = self.bconv4(self.fuse2(stage1, h))
        h = self.bconv5(self.fuse3(stage2, h))
        h = self.bconv6(self.fuse4(stage3, h))
        return torch.cat([last, h.to(last.dtype)], 1)

    def forward(self, x, return_featuremaps=False):
        f = self.featuremaps(x)
        if return_featuremaps:
            return f
        v = self.reduce(torch.flatten(self.global_avgpool(f), 1))
        if not self.training:
            return v
        y = self.classifier(v)
        if self.loss == "softmax":
            return y
        return y, v
