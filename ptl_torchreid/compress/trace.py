"""The traced forward behind the channel graph: every channel of every tensor carries an integer label.

Layers the pruners know (``pruners.leaf_pruner``) are seen by module hooks; everything between them by a
``TorchFunctionMode``, one torch operation at a time, through the operation tables below. Labels are united where
an operation combines channels (a residual addition), concatenated where it concatenates them, and *frozen* (never
pruned, with the reason) where the trace cannot tell how channels move. ``graph.build_graph`` runs the trace and
turns the labels into units and groups.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .pruners import UNSUPPORTED, KeepChannels, UnsupportedLayerError, leaf_pruner

__all__ = ["LayerRecord", "UnionFind", "Tracer"]

_EXCLUDED = KeepChannels("excluded by the caller ({name})", "{name}: excluded; its input and output channels are kept")


class UnionFind:
    """Channel labels, the sets they are united into, and the reason each frozen label is kept."""

    def __init__(self):
        self.parent = []
        self.frozen = {}  # label -> reason (resolved to roots at the end)

    def new(self, n, frozen=None):
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        labels = np.arange(start, start + n, dtype=np.int64)
        if frozen:
            self.freeze(labels, frozen)
        return labels

    def find(self, a):
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def union_arrays(self, a, b):
        for x, y in zip(a.tolist(), b.tolist()):
            self.union(x, y)

    def freeze(self, labels, reason):
        for x in np.asarray(labels).tolist():
            self.frozen.setdefault(x, reason)

    def roots(self):
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


class LayerRecord:
    """One leaf module as seen by the trace: its pruner, the channel labels of its input and output, and the work
    it does. ``kind`` is its pruner's (``'conv'``, ``'norm'``, ``'cell'``, ...)."""

    def __init__(self, name, module, pruner):
        self.name = name
        self.module = module
        self.pruner = pruner
        self.kind = pruner.kind
        self.in_labels = None
        self.out_labels = None
        self.positions = 0  # output positions per sample, summed over calls (FLOPs: 2 * multiply-adds * this)
        self.calls = 0
        # Filled by the graph after the trace: global unit index of each input/output channel.
        self.in_units = None
        self.out_units = None

    def __repr__(self):
        size_in, size_out = (None if labels is None else len(labels) for labels in (self.in_labels, self.out_labels))
        return f"LayerRecord({self.name}, {self.kind}, in={size_in}, out={size_out})"


# ---------------------------------------------------------------------------------------------------------------
# Operation tables for the traced forward (matched by function object, or by name as a fallback).
_PASSTHROUGH = """relu relu_ relu6 hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ selu selu_ celu celu_ gelu silu
mish hardswish hardsigmoid sigmoid sigmoid_ tanh tanh_ softplus softsign tanhshrink hardshrink softshrink threshold
threshold_ logsigmoid rrelu rrelu_ dropout dropout_ dropout1d dropout2d dropout3d feature_dropout alpha_dropout
feature_alpha_dropout contiguous clone detach detach_ to float half double bfloat16 type type_as cpu cuda
requires_grad_ abs abs_ neg neg_ exp exp_ log log_ sqrt sqrt_ rsqrt square sign floor ceil round reciprocal sin cos
clamp clamp_ clip clip_ clamp_min clamp_min_ clamp_max clamp_max_ nan_to_num avg_pool1d avg_pool2d avg_pool3d
max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
adaptive_max_pool3d adaptive_max_pool1d_with_indices adaptive_max_pool2d_with_indices lp_pool1d lp_pool2d
interpolate upsample upsample_nearest upsample_bilinear pad zeros_like ones_like empty_like full_like rand_like
randn_like __neg__ __abs__ __pos__""".split()
_ELEMENTWISE = """add add_ sub sub_ subtract mul mul_ multiply div div_ divide true_divide true_divide_ maximum
minimum fmax fmin where lerp lerp_ addcmul addcmul_ addcdiv addcdiv_ pow pow_ __add__ __radd__ __iadd__ __sub__
__rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__ __rtruediv__ __itruediv__ __pow__ __rpow__ __ipow__ gt lt ge
le eq ne greater less greater_equal less_equal __gt__ __lt__ __ge__ __le__ __eq__ __ne__ logical_and logical_or
logical_not __and__ __or__ __invert__""".split()
_REDUCTIONS = "mean sum nansum nanmean amax amin max min std var prod logsumexp".split()
_DIMWISE = "softmax log_softmax softmin cumsum cumprod normalize".split()
_CAT = "cat concat concatenate".split()
_SPLIT = "chunk split tensor_split split_with_sizes unsafe_chunk unsafe_split".split()
_RESHAPE = """view reshape flatten squeeze squeeze_ unsqueeze unsqueeze_ view_as reshape_as unflatten ravel""".split()
_PERMUTE = "permute transpose transpose_ swapaxes swapdims movedim".split()
_EXPAND = "expand expand_as repeat broadcast_to".split()
_GETITEM = ["__getitem__"]


def _build_op_table():
    table, by_name = {}, {}
    for kind, names in (
        ("passthrough", _PASSTHROUGH),
        ("elementwise", _ELEMENTWISE),
        ("reduction", _REDUCTIONS),
        ("dimwise", _DIMWISE),
        ("cat", _CAT),
        ("split", _SPLIT),
        ("reshape", _RESHAPE),
        ("permute", _PERMUTE),
        ("expand", _EXPAND),
        ("getitem", _GETITEM),
    ):
        for name in names:
            by_name[name] = kind
            for namespace in (torch, torch.Tensor, F, torch.special):
                obj = getattr(namespace, name, None)
                if obj is not None:
                    try:
                        table[obj] = kind
                    except TypeError:  # unhashable wrapper
                        pass
    return table, by_name


_OP_TABLE, _OP_BY_NAME = _build_op_table()


def _op_kind(func):
    try:
        kind = _OP_TABLE.get(func)
    except TypeError:
        kind = None
    if kind is None:
        kind = _OP_BY_NAME.get(getattr(func, "__name__", None))
    return kind


def _op_name(func):
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


class _Unknown(Exception):
    """An operation whose channel behaviour the graph does not model."""


def _arg(args, kwargs, index, name, default=None):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _norm_dims(dim, ndim):
    if dim is None:
        return None
    dims = dim if isinstance(dim, (list, tuple, torch.Size)) else [dim]
    return {int(d) % ndim for d in dims}


class Tracer(TorchFunctionMode):
    """One traced forward of ``model``: module hooks on the leaves, torch operations between them."""

    def __init__(self, model, exclude):
        super().__init__()
        self.model = model
        self.exclude = set(exclude)
        self.uf = UnionFind()
        self.labels = {}  # id(tensor) -> (tensor, labels)
        self.records = {}  # name -> LayerRecord (in order of first call)
        self.depth = 0
        self.batch = None
        self.notes = []
        self.names = {}
        self.handles = []
        self.op_name = ""

    # -- labels of tensors ------------------------------------------------------------------------------------
    def get(self, t):
        entry = self.labels.get(id(t))
        if entry is not None and entry[0] is t:
            return entry[1]
        return None

    def set(self, t, labels):
        self.labels[id(t)] = (t, labels)  # holding t keeps its id from being reused during the trace

    def labels_or_frozen(self, t, reason):
        labels = self.get(t)
        if labels is None or t.dim() < 2 or len(labels) != t.shape[1]:
            labels = self.uf.new(t.shape[1] if t.dim() >= 2 else 1, frozen=reason)
        return labels

    # -- module hooks -----------------------------------------------------------------------------------------
    def attach(self):
        for name, module in self.model.named_modules():
            pruner = _EXCLUDED if name in self.exclude else leaf_pruner(module)
            if pruner is None:
                continue
            self.names[module] = (name, pruner)
            self.handles.append(module.register_forward_pre_hook(self._pre_hook))
            self.handles.append(module.register_forward_hook(self._post_hook))
            if pruner is _EXCLUDED:  # its inner modules are not looked at separately
                for sub_name, sub in module.named_modules():
                    if sub is not module:
                        self.exclude.add(name + "." + sub_name)

    def detach_hooks(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _pre_hook(self, module, args):
        self.depth += 1

    def _post_hook(self, module, args, output):
        self.depth -= 1
        if self.depth != 0:
            return  # a leaf inside a leaf (the conv of a BConvCell): its parent accounts for it
        name, pruner = self.names[module]
        if pruner is UNSUPPORTED:
            raise UnsupportedLayerError(
                f"cannot prune through module {name!r} of type {type(module).__name__}: it has its own weights and "
                f"the pruner does not know how they are indexed by channels. Pass exclude=[{name!r}] to keep its "
                "input and output channels unpruned, or register a pruner for its type with "
                "ptl_torchreid.compress.register_layer_pruner."
            )
        tensors = [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]
        outputs = [o for o in tree_flatten(output)[0] if isinstance(o, torch.Tensor)]
        if not tensors or not outputs:
            return
        x, y = tensors[0], outputs[0]
        pruner = pruner.for_input(module, x)
        if isinstance(pruner, KeepChannels):
            self.keep_channels(pruner, name, module, tensors, outputs)
            return
        in_labels = self.labels_or_frozen(x, f"input of {name} is not traced")
        rec = self.records.get(name)
        if rec is None:
            rec = self.records[name] = LayerRecord(name, module, pruner)
            rec.in_labels = in_labels
        else:
            self.uf.union_arrays(rec.in_labels, in_labels)  # a module called twice reads one channel space
        if pruner.produces:
            if rec.out_labels is None:
                rec.out_labels = self.uf.new(y.shape[1])
            out_labels = rec.out_labels
        else:
            out_labels = rec.out_labels = rec.in_labels
        rec.calls += 1
        rec.positions += pruner.positions(y, self.batch)
        self.set(y, out_labels)

    def keep_channels(self, keep, name, module, tensors, outputs):
        """Freeze the channels of a layer's inputs and outputs, with ``keep``'s reason and note."""
        fields = dict(name=name, type=type(module).__name__)
        reason, note = keep.reason.format(**fields), keep.note.format(**fields)
        if keep.detail:
            self.notes.append(keep.detail.format(**fields))
        if note not in self.notes:
            self.notes.append(note)
        for t in tensors:
            if self.get(t) is not None:
                self.uf.freeze(self.get(t), reason)
        for o in outputs:
            if o.dim() >= 2:
                self.set(o, self.uf.new(o.shape[1], frozen=reason))

    # -- torch functions between leaves ----------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            self.record_op(func, args, kwargs, out)
        return out

    def record_op(self, func, args, kwargs, out):
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        traced = [t for t in inputs if self.get(t) is not None]
        if not traced:
            return
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outputs:
            if getattr(func, "__name__", "") == "__setitem__":  # writes channels by position
                for t in traced:
                    self.uf.freeze(self.get(t), "written in place by index (__setitem__)")
            return  # metadata: size(), dim(), shape, ...
        kind = _op_kind(func)
        self.op_name = getattr(func, "__name__", "")
        try:
            if kind is None:
                raise _Unknown()
            labels = getattr(self, "_op_" + kind)(args, kwargs, outputs, traced)
        except _Unknown:
            reason = f"operation {_op_name(func)} is not understood by the dependency graph"
            for t in traced:
                self.uf.freeze(self.get(t), reason)
            labels = [self.uf.new(o.shape[1], frozen=reason) if o.dim() >= 2 else None for o in outputs]
            if reason not in self.notes:
                self.notes.append(reason)
        for o, lab in zip(outputs, labels):
            if lab is not None:
                self.set(o, lab)

    def _first(self, args):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or self.get(x) is None or x.dim() < 2:
            raise _Unknown()
        return x, self.get(x)

    def _same_channels(self, x, outputs):
        for o in outputs:
            if o.dim() < 2 or o.shape[0] != x.shape[0] or o.shape[1] != x.shape[1]:
                raise _Unknown()

    def _op_passthrough(self, args, kwargs, outputs, traced):
        x, labels = self._first(args)
        self._same_channels(x, outputs)
        return [labels] * len(outputs)

    def _op_elementwise(self, args, kwargs, outputs, traced):
        out = outputs[0]
        if out.dim() < 2:
            raise _Unknown()
        channels = out.shape[1]
        coupled, constant = [], False
        for t in tree_flatten((args, kwargs))[0]:
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                continue
            axis = t.dim() - (out.dim() - 1)  # the axis of t that broadcasts against the channel axis
            if axis < 0 or t.shape[axis] == 1 and channels != 1:
                continue
            labels = self.get(t) if t.dim() == out.dim() else None
            if labels is not None:
                coupled.append(labels)
            elif t.shape[axis] == channels:
                constant = True
        if not coupled:
            raise _Unknown()
        for other in coupled[1:]:
            self.uf.union_arrays(coupled[0], other)
        if constant and channels > 1:
            self.uf.freeze(coupled[0], "combined with a per-channel constant that pruning cannot slice")
        return [coupled[0]] + [None] * (len(outputs) - 1)

    def _op_reduction(self, args, kwargs, outputs, traced):
        x, labels = self._first(args)
        other = _arg(args, kwargs, 1, "other")
        if isinstance(other, torch.Tensor):
            return self._op_elementwise(args, kwargs, outputs, traced)
        dims = _norm_dims(_arg(args, kwargs, 1, "dim"), x.dim())
        if dims is None or 1 in dims:
            raise _Unknown()
        self._same_channels(x, [o for o in outputs if o.is_floating_point()] or outputs[:1])
        return [labels if o.dim() >= 2 and o.shape[1] == x.shape[1] else None for o in outputs]

    def _op_dimwise(self, args, kwargs, outputs, traced):
        x, labels = self._first(args)
        dim = _arg(args, kwargs, 1, "dim")
        if not isinstance(dim, int) or dim % x.dim() == 1:
            raise _Unknown()  # along channels, or an implicit dimension
        self._same_channels(x, outputs)
        return [labels] * len(outputs)

    def _op_cat(self, args, kwargs, outputs, traced):
        tensors = list(_arg(args, kwargs, 0, "tensors"))
        out = outputs[0]
        dim = int(_arg(args, kwargs, 1, "dim", 0)) % out.dim() if out.dim() else 0
        if out.dim() < 2:
            raise _Unknown()
        if dim == 1:
            return [np.concatenate([self.labels_or_frozen(t, "concatenated with an untraced tensor") for t in tensors])]
        labelled = [self.get(t) for t in tensors]
        if any(lab is None or len(lab) != out.shape[1] for lab in labelled):
            raise _Unknown()
        for other in labelled[1:]:
            self.uf.union_arrays(labelled[0], other)
        return [labelled[0]]

    def _op_split(self, args, kwargs, outputs, traced):
        x, labels = self._first(args)
        dim = int(_arg(args, kwargs, 2, "dim", 0)) % x.dim()
        if dim == 1:
            raise _Unknown()  # split by position: pruning would move the boundaries
        self._same_channels(x, outputs)
        return [labels] * len(outputs)

    def _op_reshape(self, args, kwargs, outputs, traced):
        x, labels = self._first(args)
        out = outputs[0]
        if out.dim() < 2 or out.shape[0] != x.shape[0] or x.shape[0] != self.batch:
            raise _Unknown()
        per_channel = x[0].numel() // x.shape[1]
        elements = np.repeat(labels, per_channel).reshape(out.shape[1], -1)
        if not (elements == elements[:, :1]).all():
            raise _Unknown()  # a new channel mixes old ones
        return [elements[:, 0].copy()]

    def _op_permute(self, args, kwargs, outputs, traced):
        x, labels = self._first(args)
        rest = [a for a in args[1:]] + [kwargs[k] for k in ("dims", "dim0", "dim1") if k in kwargs]
        if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
            rest = list(rest[0])
        dims = [int(d) % x.dim() for d in rest]
        if self.op_name == "permute":
            keeps = dims[:2] == [0, 1]
        elif self.op_name in ("transpose", "transpose_", "swapaxes", "swapdims"):
            keeps = not ({0, 1} & set(dims))
        else:
            keeps = False
        if not keeps:
            raise _Unknown()
        self._same_channels(x, outputs[:1])
        return [labels]

    def _op_expand(self, args, kwargs, outputs, traced):
        x, labels = self._first(args)
        out = outputs[0]
        if out.dim() != x.dim() or out.shape[1] != x.shape[1]:
            raise _Unknown()
        return [labels]

    def _op_getitem(self, args, kwargs, outputs, traced):
        x, labels = self._first(args)
        index = args[1] if len(args) > 1 else None
        index = index if isinstance(index, tuple) else (index,)
        full = slice(None, None, None)
        ok = (
            isinstance(index[0], slice)
            and (len(index) == 1 or index[1] == full or index[1] is Ellipsis)
            and all(not isinstance(i, torch.Tensor) for i in index)
        )
        if not ok:
            raise _Unknown()
        if outputs[0].dim() < 2 or outputs[0].shape[1] != x.shape[1]:
            raise _Unknown()
        return [labels]


