"""PTLNet: a torchreid backbone plus the Progressive Transfer Learning side stream.

The backbone runs unchanged and keeps its own key names (``conv1.weight``, ``layer1.0.conv1.weight``,
``fc.0.weight``, ...), so torchreid's loaders fill a PTL model from a plain checkpoint and a plain model from a
PTL checkpoint. At five taps (stem, three intermediate stages, last stage) the side stream reads the backbone's
feature maps:

    bconv1(image, s2) -> bconv2(s2) -> fuse1[bconv2, stem] -> bconv3 -> fuse2[stage1, bconv3] -> bconv4
      -> fuse3[stage2, bconv4] -> bconv5 -> fuse4[stage3, bconv5] -> bconv6 (stride of the last stage)

``bconv3`` .. ``bconv6`` give maps at the resolution of stage 1 .. the last stage; each fuse is a 1x1 conv + BN
+ ReLU over the channel concatenation. How the side stream reaches the embedding is the ``mode``:

* ``'branch'`` (the paper's shape): the pooled bconv6 output joins the head. With ``head='residual'`` (default)
  the backbone's own head (pooling and, where it has one, its ``fc`` embedding layer) is kept with its weights
  and the side stream adds a zero-initialised projection to the embedding; with ``head='concat'`` (the
  reference's head, for training from ImageNet) the pooled maps are concatenated and reduced by a new
  linear + BN + ReLU.
* ``'rectify'`` (the default, as measured in docs/BENCHMARKS.md): at the chosen stages the cell output at that
  stage's resolution modulates the stage's output (:class:`~ptl_torchreid.models.blocks.Rectifier`,
  zero-initialised) before it goes on through the backbone; the backbone's own head gives the embedding.

With the default head and in rectify mode a freshly built PTL model computes exactly the embedding of its
backbone, so fine-tuning starts from the pretrained model.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .bconv import BConvCell, conv_output_size
from .blocks import ConvAdapter, FuseBlock, Rectifier
from .options import InvalidOption, check_choice

# Side-stream widths of the reference ResNet-50 model; other backbones scale them (see ``side_stream_widths``).
REFERENCE_WIDTHS = dict(bconv1=16, bconv2=32, fuse1=64, bconv3=64, fuse2=128, bconv4=256, fuse3=256, bconv5=512,
                        fuse4=512, bconv6=128)
_REFERENCE_STAGE3_CHANNELS = 1024

MODES = ("branch", "rectify")
HEADS = ("residual", "concat")
SIDE_POOLS = ("avg", "max")
CELL_INITS = ("fan_out", "fan_in")
CELL_TYPES = ("bconv", "conv")
STAGE3_TAPS = ("stage", "first_block")
STAGES = ("stage1", "stage2", "stage3", "last")  # what rectify mode can modulate
LOSSES = ("softmax", "triplet")  # torchreid's forward contracts
# The side stream follows the backbone's stride-32 taps, which line up for input sizes of this multiple.
INPUT_SIZE_MULTIPLE = 32


def side_stream_widths(stage3_channels, divisor=8):
    """Scale the reference widths by the backbone's stage-3 width relative to ResNet-50's, rounded up to a
    multiple of ``divisor`` (at least ``divisor``) so that narrow backbones keep a usable side stream."""
    scale = stage3_channels / _REFERENCE_STAGE3_CHANNELS
    return {k: max(divisor, int(-(-v * scale // divisor)) * divisor) for k, v in REFERENCE_WIDTHS.items()}


def check_options(mode="rectify", head="residual", side_pool="avg", cell_init="fan_out", cell_type="bconv",
                  stage3_tap="stage", loss="softmax"):
    """Validate :class:`PTLNet`'s choice options without building a model (used by configs); raises
    :class:`~ptl_torchreid.models.options.InvalidOption`."""
    for name, value, choices in (("mode", mode, MODES), ("head", head, HEADS), ("side_pool", side_pool, SIDE_POOLS),
                                 ("cell_init", cell_init, CELL_INITS), ("cell_type", cell_type, CELL_TYPES),
                                 ("stage3_tap", stage3_tap, STAGE3_TAPS), ("loss", loss, LOSSES)):
        check_choice(name, value, choices)
    if mode != "branch":  # options of the branch head would be silently ignored
        for name, value, default in (("head", head, "residual"), ("side_pool", side_pool, "avg")):
            if value != default:
                raise InvalidOption(name, value, f"it shapes the branch head only: set mode='branch' (config: "
                                    f"ptl.mode branch) to use it, or leave it at {default!r} with mode={mode!r}")


def check_freeze_epochs(freeze_backbone_epochs):
    """Validate for how many epochs training freezes the backbone (the engine and the config call this); raises
    :class:`~ptl_torchreid.models.options.InvalidOption`."""
    if freeze_backbone_epochs < -1:
        raise InvalidOption("freeze_backbone_epochs", freeze_backbone_epochs,
                            "must be -1 (frozen throughout), 0 (never frozen) or a number of epochs")


def check_stages(stages):
    """``stages`` in side-stream order, or :class:`~ptl_torchreid.models.options.InvalidOption` unless they are
    one or more distinct names of ``STAGES``."""
    stages = tuple(stages)
    if not stages or any(s not in STAGES for s in stages) or len(set(stages)) != len(stages):
        raise InvalidOption("rectify_stages", list(stages),
                            "give one or more distinct names of " + ", ".join(STAGES))
    return tuple(s for s in STAGES if s in stages)


def _parse_step(name):
    """'layer3' -> ('layer3', None, None); 'layer3[1:]' -> ('layer3', 1, None) (a slice of a Sequential)."""
    if "[" not in name:
        return name, None, None
    attr, _, rest = name.partition("[")
    start, _, stop = rest.rstrip("]").partition(":")
    return attr, int(start) if start else None, int(stop) if stop else None


def split_stage3(taps):
    """The reference's tap: stage 3 read after its first block, the rest of stage 3 run with the last stage."""
    *head, stage3, last = [tuple(t) for t in taps]
    if len(stage3) != 1:
        raise ValueError(f"stage3_tap='first_block' needs a stage-3 tap of one module, got {stage3}")
    return (*head, (stage3[0] + "[:1]",), (stage3[0] + "[1:]",) + last)


class PTLNet(nn.Module):
    """Progressive Transfer Learning network over a torchreid backbone.

    Args:
        backbone: a torchreid model. Its modules become this model's own children under their own names.
        taps: five tuples of backbone attribute names (``'layer3[1:]'`` slices a Sequential); running them in
            order yields the stem, stage-1, stage-2, stage-3 and last-stage feature maps.
        num_classes: identities of the classifier.
        loss: ``'softmax'`` or ``'triplet'`` (torchreid's forward contract).
        input_size: (height, width) the model is built for; fixes the cells' state shapes.
        widths: side-stream channel widths (keys of ``REFERENCE_WIDTHS``); default scales the reference widths.
        state_mode, eval_state, momentum: BConv-Cell options (see ``BConvCell``).
        mode: ``'rectify'`` (default) or ``'branch'`` (module docstring).
        head: branch mode's head, ``'residual'`` or ``'concat'`` (rectify mode takes the default only).
        rectify_stages: stages rectify mode modulates, names of ``STAGES``.
        side_pool: pooling of the side-stream output in the branch head, ``'avg'`` or ``'max'`` (the reference).
        cell_init: Kaiming init mode of the side-stream convolutions, ``'fan_out'`` or ``'fan_in'`` (reference).
        cell_type: ``'bconv'`` (BConv-Cells) or ``'conv'`` (stateless :class:`ConvAdapter` of similar size).
        feature_dim: embedding size of the concat head (default: the backbone's).
    """

    is_ptl = True

    def __init__(self, backbone, taps, num_classes, loss="softmax", input_size=(256, 128), widths=None,
                 state_mode="dataset", eval_state="running", momentum=0.1, mode="rectify", head="residual",
                 rectify_stages=STAGES, side_pool="avg", cell_init="fan_out", cell_type="bconv", stage3_tap="stage",
                 feature_dim=None):
        super().__init__()
        if len(taps) != 5:
            raise ValueError(f"PTLNet needs 5 taps (stem, stage1, stage2, stage3, last), got {len(taps)}")
        check_options(mode=mode, head=head, side_pool=side_pool, cell_init=cell_init, cell_type=cell_type,
                      stage3_tap=stage3_tap, loss=loss)
        self.loss, self.mode, self.side_pool, self.cell_type = loss, mode, side_pool, cell_type
        self.head = head if mode == "branch" else None
        self.rectify_stages = check_stages(rectify_stages) if mode == "rectify" else ()
        self.stage3_tap = stage3_tap
        self.input_size = tuple(int(s) for s in input_size)
        self.taps = tuple(tuple(t) for t in (split_stage3(taps) if stage3_tap == "first_block" else taps))
        self._tap_steps = tuple(tuple(_parse_step(n) for n in t) for t in self.taps)
        if self.head == "concat":  # the reference head replaces the backbone's
            for name in ("fc", "classifier"):
                if hasattr(backbone, name):
                    setattr(backbone, name, None)
        # The backbone's modules are this model's children under their own names (plain torchreid keys); the
        # backbone object itself is kept unregistered, as a view of them.
        object.__setattr__(self, "_backbone", backbone)
        for name, module in backbone.named_children():
            self.add_module(name, module)

        channels, sizes = self._probe_taps()
        strides = self._tap_strides(sizes)
        w = dict(side_stream_widths(channels[3]), **(widths or {}))
        self.widths = w
        self.embedding_dim = int(getattr(backbone, "feature_dim", channels[4]))
        cell = dict(state_mode=state_mode, eval_state=eval_state, momentum=momentum)
        # Side stream up to the last stage it serves: every stage in branch mode, the deepest rectified one here.
        depth = 4 if mode == "branch" else STAGES.index(self.rectify_stages[-1]) + 1

        def make_cell(cin, cout, stride, size):
            out = (conv_output_size(size[0], stride), conv_output_size(size[1], stride))
            if cell_type == "conv":
                return ConvAdapter(cin, cout, stride=stride), out
            return BConvCell(cin, cout, out, stride=stride, **cell), out

        self.bconv1, size = make_cell(3, w["bconv1"], 2, self.input_size)
        self.bconv2, size = make_cell(w["bconv1"], w["bconv2"], 2, size)
        self._check_size("stem", size, sizes[0])
        side_in = w["bconv2"]
        for k in range(1, depth + 1):
            fuse_in = channels[k - 1] + side_in
            setattr(self, f"fuse{k}", FuseBlock(fuse_in, w[f"fuse{k}"]))
            cell_name = f"bconv{k + 2}"
            module, size = make_cell(w[f"fuse{k}"], w[cell_name], strides[k], size)
            setattr(self, cell_name, module)
            self._check_size(STAGES[k - 1], size, sizes[k])
            side_in = w[cell_name]
            if STAGES[k - 1] in self.rectify_stages:
                setattr(self, f"rectify{k}", Rectifier(side_in, channels[k]))
        self._depth = depth

        if self.head == "concat":
            self.feature_dim = int(feature_dim or self.embedding_dim)
            self.reduce = nn.Sequential(nn.Linear(channels[4] + w["bconv6"], self.feature_dim),
                                        nn.BatchNorm1d(self.feature_dim), nn.ReLU(inplace=True))
            self.classifier = nn.Linear(self.feature_dim, num_classes)
        else:
            self.feature_dim = self.embedding_dim
            if self.head == "residual":
                self.side_proj = nn.Linear(w["bconv6"], self.feature_dim)
        self._backbone_frozen = False
        self._init_side_stream(cell_init)
        self.register_load_state_dict_pre_hook(PTLNet._upgrade_hook)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        # The backbone is a view of this model's children: replacing one of them (torchreid's usual new
        # ``classifier`` for new identities) replaces it in the backbone too, so both keep one module.
        backbone = self.__dict__.get("_backbone")
        if backbone is not None and backbone._modules.get(name) is not None and isinstance(value, nn.Module):
            backbone._modules[name] = value

    # -- construction helpers -----------------------------------------------------------------------------------
    @property
    def backbone(self):
        """The wrapped torchreid model (its modules are this model's children; see the module docstring)."""
        return self._backbone

    @torch.no_grad()
    def _probe_taps(self):
        """Channels and spatial sizes of the five taps, from one forward of a blank image at ``input_size``."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            param = next(self.backbone.parameters())
            x = torch.zeros(1, 3, *self.input_size, device=param.device, dtype=param.dtype)
            outs = []
            for k in range(5):
                x = self._run_tap(k, x)
                outs.append(x)
        finally:
            self.backbone.train(was_training)
        return [o.shape[1] for o in outs], [tuple(o.shape[-2:]) for o in outs]

    def _tap_strides(self, sizes):
        strides = [None]
        for prev, cur in zip(sizes[:-1], sizes[1:]):
            stride = prev[0] // cur[0]
            if stride < 1 or conv_output_size(prev[0], stride) != cur[0]:
                raise ValueError(
                    f"backbone taps {prev} -> {cur} are not a plain stride apart; input_size {self.input_size} may "
                    f"not suit this backbone; use an input size that is a multiple of {INPUT_SIZE_MULTIPLE}"
                )
            strides.append(stride)
        return strides

    def _check_size(self, tap, side, backbone):
        if tuple(side) != tuple(backbone):
            raise ValueError(
                f"side stream is {side} at the {tap} tap but the backbone gives {backbone} for input_size "
                f"{self.input_size}; use an input size that is a multiple of {INPUT_SIZE_MULTIPLE}"
            )

    def _init_side_stream(self, cell_init):
        for m in self.side_modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode=cell_init, nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        # The paths into the pretrained model start at exactly zero.
        for m in self.side_modules():
            if isinstance(m, Rectifier):
                m.reset_parameters()
        if self.head == "residual":
            nn.init.zeros_(self.side_proj.weight)
            nn.init.zeros_(self.side_proj.bias)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    @staticmethod
    def upgrade_state_dict(state_dict, prefix=""):
        """Key names of checkpoints written before the backbone kept its own names (``backbone.conv1.weight``
        -> ``conv1.weight``); other keys are left as they are."""
        old = prefix + "backbone."
        if not any(k.startswith(old) for k in state_dict):
            return state_dict
        return type(state_dict)((prefix + k[len(old) :] if k.startswith(old) else k, v) for k, v in state_dict.items())

    def _upgrade_hook(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        upgraded = self.upgrade_state_dict(state_dict, prefix)
        if upgraded is not state_dict:
            state_dict.clear()
            state_dict.update(upgraded)
        hint = self.mismatch_hint(state_dict, prefix) if strict else None
        if hint:
            error_msgs.append(hint)

    @classmethod
    def saved_options(cls, state_dict, prefix=""):
        """The options that shape the PTL head (``mode``, ``head``, ``rectify_stages``) of the model
        ``state_dict`` was saved from, read from its keys; ``None`` for a state dict without a PTL head (a plain
        torchreid checkpoint)."""
        keys = [k[len(prefix):] for k in cls.upgrade_state_dict(state_dict, prefix) if k.startswith(prefix)]
        rectified = sorted({k.split(".")[0] for k in keys if k.startswith("rectify")})
        if rectified:
            return {"mode": "rectify", "rectify_stages": [STAGES[int(name[len("rectify"):]) - 1] for name in rectified]}
        if "reduce.0.weight" in keys:
            return {"mode": "branch", "head": "concat"}
        if "side_proj.weight" in keys:
            return {"mode": "branch", "head": "residual"}
        return None

    def mismatch_hint(self, state_dict, prefix=""):
        """How to build a model that loads ``state_dict`` when it is a PTL checkpoint of another shape (mode,
        head or rectified stages) than this model, e.g. one saved under an older default; ``None`` otherwise."""
        saved = self.saved_options(state_dict, prefix)
        mine = self.build_options()
        if saved is None or all(mine[k] == v for k, v in saved.items()):
            return None
        config = ", ".join(f"ptl.{k} {v}" for k, v in saved.items())
        options = ", ".join(f"{k}={v!r}" for k, v in saved.items())
        return (f"this checkpoint was saved from a PTL model with {config}; build the model with {options} "
                f"(config: {config}) to load it")

    # -- PTL API ------------------------------------------------------------------------------------------------
    def build_options(self):
        """The ``build_model`` options (plain types) that rebuild this architecture with its current cell
        settings, e.g. for a pruned model's file."""
        cell = next(self.cells(), None)
        options = dict(
            input_size=list(self.input_size),
            widths={k: int(v) for k, v in self.widths.items()},
            mode=self.mode,
            head=self.head or "residual",
            rectify_stages=list(self.rectify_stages or STAGES),
            side_pool=self.side_pool,
            cell_type=self.cell_type,
            stage3_tap=self.stage3_tap,
        )
        if self.head == "concat":
            options["feature_dim"] = int(self.feature_dim)
        if cell is not None:
            options.update(
                state_mode=str(cell.state_mode),
                eval_state=str(cell.eval_state),
                momentum=None if cell.momentum is None else float(cell.momentum),
            )
        return options

    def side_modules(self):
        """The modules outside the backbone (cells, fuse blocks, rectifiers, the PTL head's own layers)."""
        backbone = {id(m) for m in self.backbone.children()}
        for child in self.children():
            if id(child) not in backbone:
                yield from child.modules()

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
        """Mean over cells of the carried state's root-mean-square magnitude (0.0 after a reset or without
        cells)."""
        values = [c.state_rms() for c in self.cells()]
        return sum(values) / len(values) if values else 0.0

    def backbone_parameters(self):
        """The pretrained part: the backbone's parameters but its identity classifier, which is new for every
        target dataset and so counts with the PTL parameters."""
        classifier = {id(p) for p in self.classifier.parameters()}
        return (p for p in self.backbone.parameters() if id(p) not in classifier)

    def ptl_parameters(self):
        """Parameters of the side stream, the PTL head and the classifier (everything but
        :meth:`backbone_parameters`)."""
        backbone = {id(p) for p in self.backbone_parameters()}
        return (p for p in self.parameters() if id(p) not in backbone)

    def freeze_backbone(self, frozen=True):
        """Train only the cells, the head and the classifier: backbone weights get no gradient and its
        BatchNorms keep their running statistics (eval mode) while frozen."""
        self._backbone_frozen = bool(frozen)
        for p in self.backbone_parameters():
            p.requires_grad_(not frozen)
        self.backbone.train(self.training and not frozen)
        return self

    @property
    def backbone_frozen(self):
        return self._backbone_frozen

    def train(self, mode=True):
        super().train(mode)
        self.backbone.train(mode and not self._backbone_frozen)
        return self

    # -- forward ------------------------------------------------------------------------------------------------
    def _run_tap(self, k, x):
        for attr, start, stop in self._tap_steps[k]:
            module = getattr(self, attr)
            if start is None and stop is None:
                x = module(x)
            else:
                for block in list(module)[start:stop]:
                    x = block(x)
        return x

    def _pool_side(self, h, dtype):
        h = h.to(dtype)
        pooled = F.adaptive_max_pool2d(h, 1) if self.side_pool == "max" else F.adaptive_avg_pool2d(h, 1)
        return torch.flatten(pooled, 1)

    def _stages(self, x):
        """Backbone maps of the last stage and the side stream's last output."""
        h = self.bconv2(self.bconv1(x))
        x = self._run_tap(0, x)
        for k in range(1, 5):
            if k <= self._depth:
                fuse = getattr(self, f"fuse{k}")
                h = getattr(self, f"bconv{k + 2}")(fuse(h, x) if k == 1 else fuse(x, h))
            x = self._run_tap(k, x)
            rectifier = self._modules.get(f"rectify{k}")
            if rectifier is not None:
                x = rectifier(x, h)
        return x, h

    def _featuremaps(self, last, h):
        return torch.cat([last, h.to(last.dtype)], 1) if self.head == "concat" else last

    def featuremaps(self, x):
        """The maps the head pools: the backbone's last stage (with the concat head, concatenated with the
        bconv6 maps)."""
        return self._featuremaps(*self._stages(x))

    def forward(self, x, return_featuremaps=False):
        last, h = self._stages(x)
        if return_featuremaps:
            return self._featuremaps(last, h)
        v = torch.flatten(self.global_avgpool(last), 1)
        if self.head == "concat":
            v = self.reduce(torch.cat([v, self._pool_side(h, v.dtype)], 1))
        else:
            fc = getattr(self, "fc", None)
            if fc is not None:
                v = fc(v)
            if self.head == "residual":
                v = v + self.side_proj(self._pool_side(h, v.dtype))
        if not self.training:
            return v
        y = self.classifier(v)
        if self.loss == "softmax":
            return y
        return y, v
