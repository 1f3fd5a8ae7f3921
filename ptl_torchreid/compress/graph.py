"""Channel dependency graph: which channels of which layers must be pruned together.

One traced forward (eval mode, no gradients) on a dummy input records how channels flow through the model:

* Layers with channel-indexed weights are *leaves* (convolutions, linears, normalisations, BConv-Cells, any type
  with a registered layer pruner, see ``pruners``); module hooks see their inputs and outputs.
* Everything between leaves (residual additions, concatenations, channel gates, pooling, flatten/view, ...) is
  seen by a ``TorchFunctionMode`` as individual torch operations (``trace``).

Every channel of every traced tensor carries an integer label. Producers (dense convs, linears, BConv-Cells)
create fresh labels for their output channels; channel-wise layers (BatchNorm, depthwise convs, activations,
pooling) pass labels through; element-wise operations between tensors *unite* the labels of the channels they
combine (a residual addition couples the last conv of each block with the projection); concatenation along the
channel dimension concatenates label lists (the fuse conv's input columns map back to their sources). Labels that
end up united form one *unit*: a set of channels removed together everywhere they occur. Units produced by the
same layer form a *group* (a layer, or a residual stage of coupled layers), the granularity at which COP scores
filters.

Anything the graph cannot reason about stays correct by construction: the channels involved are *frozen* (never
pruned) with the reason recorded, e.g. channels that reach the model output (the embedding keeps its size),
the input image, grouped (non-depthwise) convolutions, LayerNorm/GroupNorm across channels, or an operation
that mixes channels in an unknown way. A module with its own weights of a type the graph does not know raises
:class:`UnsupportedLayerError` unless it is listed in ``exclude``.
"""
import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from .pruners import UnsupportedLayerError
from .trace import LayerRecord, Tracer, UnionFind

__all__ = ["UnsupportedLayerError", "ChannelGraph", "Group", "LayerRecord", "build_graph"]


class Group:
    """Units (sets of coupled channels) produced by the same layer(s)."""

    def __init__(self, index, roots):
        self.index = index
        self.roots = roots  # union-find root per unit, in unit order
        self.offset = 0  # first global unit index
        self.producers = []  # LayerRecords whose output channels are these units
        self.consumers = []  # dense LayerRecords reading these units (conv/linear/cell inputs)
        self.members = []  # every LayerRecord touching these units (producers, consumers, BN, ...)
        self.frozen = None  # reason, or None when prunable

    @property
    def size(self):
        return len(self.roots)

    @property
    def prunable(self):
        return self.frozen is None and self.size > 1

    @property
    def name(self):
        if not self.producers:
            return "<no producer>"
        extra = len(self.producers) - 1
        return self.producers[0].name + (f" (+{extra} coupled)" if extra else "")

    def __repr__(self):
        return f"Group({self.name}, units={self.size}, {'prunable' if self.prunable else f'frozen: {self.frozen}'})"


class ChannelGraph:
    """The result of tracing a model: layer records, units and groups.

    Attributes:
        records: list of :class:`LayerRecord`, in call order.
        groups: list of :class:`Group`; ``prunable_groups()`` are the ones COP may shrink.
        num_units: total number of units (global unit ``g.offset + u`` is unit ``u`` of group ``g``).
        unit_group: group index per global unit.
        notes: human-readable reasons why parts of the model are not pruned.
    """

    def __init__(self, model, records, groups, num_units, unit_group, notes, input_size, batch):
        self.model = model
        self.records = records
        self.groups = groups
        self.num_units = num_units
        self.unit_group = unit_group
        self.notes = notes
        self.input_size = input_size
        self.batch = batch

    def prunable_groups(self):
        return [g for g in self.groups if g.prunable]

    def record(self, name):
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(name)

    def group_of(self, layer_name):
        """The group whose units are ``layer_name``'s output channels."""
        rec = self.record(layer_name)
        units = rec.out_units
        return self.groups[int(self.unit_group[units[0]])]

    def summary(self):
        lines = []
        for g in self.groups:
            if g.producers:
                state = "prunable" if g.prunable else f"kept: {g.frozen or 'single channel'}"
                lines.append(f"{g.name:<55s} {g.size:>5d}  {state}")
        return "\n".join(lines + ["note: " + n for n in self.notes])


def _as_tuple(size):
    if isinstance(size, int):
        return (size, size)
    return tuple(int(s) for s in size)


@torch.no_grad()
def build_graph(model, input_size=(256, 128), exclude=(), example_input=None):
    """Trace ``model`` once and return its :class:`ChannelGraph`.

    Args:
        model: the network (a torchreid or PTL model, or any module made of supported layers).
        input_size: (height, width) of the dummy image (3 channels) when ``example_input`` is not given.
        exclude: names of modules whose input and output channels must not be pruned.
        example_input: a batch to trace with instead of a dummy image (batch size at least 2).
    """
    if example_input is None:
        param = next(iter(model.parameters()), None)
        kw = dict(device=param.device, dtype=param.dtype) if param is not None else {}
        example_input = torch.randn(2, 3, *_as_tuple(input_size), **kw)
    if example_input.shape[0] < 2:
        raise ValueError(
            f"trace the model with a batch of at least 2 samples (got {example_input.shape[0]}); with one sample, "
            "batch and channel reshapes cannot be told apart"
        )
    exclude = list(exclude or ())
    names = {n for n, _ in model.named_modules()}
    missing = [n for n in exclude if n not in names]
    if missing:
        raise ValueError(
            f"exclude names {missing} are not modules of the model; valid names are those of model.named_modules(), "
            f"e.g. {sorted(names - {''})[:5]}"
        )

    tracer = Tracer(model, exclude)
    tracer.batch = example_input.shape[0]
    was_training = model.training
    model.eval()
    tracer.attach()
    try:
        tracer.set(example_input, tracer.uf.new(example_input.shape[1], frozen="model input"))
        with tracer:
            output = model(example_input)
    finally:
        tracer.detach_hooks()
        model.train(was_training)
    for o in tree_flatten(output)[0]:
        if isinstance(o, torch.Tensor) and tracer.get(o) is not None:
            tracer.uf.freeze(tracer.get(o), "reaches the model output (the embedding keeps its size)")
    return _assemble(model, tracer, _as_tuple(example_input.shape[-2:]), tracer.batch)


def _assemble(model, tracer, input_size, batch):
    uf = tracer.uf
    roots = uf.roots()
    frozen_roots = {}
    for label, reason in uf.frozen.items():
        frozen_roots.setdefault(int(roots[label]), reason)
    records = list(tracer.records.values())

    # Groups: units (roots) joined when one producer makes them.
    guf = UnionFind()
    guf.new(len(roots))
    for rec in records:
        if rec.pruner.produces:
            r = roots[rec.out_labels]
            for x in r[1:].tolist():
                guf.union(int(r[0]), x)
    # Units in a stable order: producers' output order first, then anything else that was seen.
    seen, order = set(), []
    for rec in records:
        for labels in (rec.out_labels, rec.in_labels) if rec.pruner.produces else (rec.in_labels,):
            for x in roots[labels].tolist():
                if x not in seen:
                    seen.add(x)
                    order.append(x)
    by_group = {}
    for x in order:
        by_group.setdefault(guf.find(x), []).append(x)
    groups, unit_of_root = [], {}
    offset = 0
    for gi, (_, members) in enumerate(by_group.items()):
        g = Group(gi, np.array(members, dtype=np.int64))
        g.offset = offset
        for u, x in enumerate(members):
            unit_of_root[x] = offset + u
        offset += len(members)
        groups.append(g)
    num_units = offset
    unit_group = np.empty(num_units, dtype=np.int64)
    for g in groups:
        unit_group[g.offset : g.offset + g.size] = g.index
        reasons = [frozen_roots[x] for x in g.roots.tolist() if x in frozen_roots]
        if reasons:
            g.frozen = reasons[0]

    lookup = np.vectorize(unit_of_root.__getitem__, otypes=[np.int64])
    for rec in records:
        rec.in_units = lookup(roots[rec.in_labels])
        rec.out_units = lookup(roots[rec.out_labels]) if rec.out_labels is not rec.in_labels else rec.in_units
        touched = set(unit_group[rec.in_units].tolist()) | set(unit_group[rec.out_units].tolist())
        for gi in sorted(touched):
            groups[gi].members.append(rec)
        if rec.pruner.produces:  # dense layers make their outputs and read their inputs through a full kernel
            for gi in sorted(set(unit_group[rec.out_units].tolist())):
                groups[gi].producers.append(rec)
            for gi in sorted(set(unit_group[rec.in_units].tolist())):
                groups[gi].consumers.append(rec)
    for g in groups:
        if not g.producers and g.frozen is None:
            g.frozen = "no layer produces these channels"
    return ChannelGraph(model, records, groups, num_units, unit_group, list(tracer.notes), input_size, batch)
