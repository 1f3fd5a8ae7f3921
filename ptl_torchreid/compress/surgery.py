"""Physical shrinking: slice the weights of every traced layer to the channels that survive.

Each layer slices its input and output channel dimensions by the labels the dependency graph gave them, so all
layers agree on every tensor's channels by construction. The modules stay the same objects (same names, same
``state_dict`` keys); only their tensors and channel attributes get smaller.

``channel_config`` / ``apply_channel_config`` describe and restore those shapes, so a pruned model can be rebuilt
from its architecture name plus the configuration (see ``compress.io``).
"""
import numpy as np
import torch
import torch.nn as nn

from ..models.bconv import BConvCell
from .graph import leaf_kind

__all__ = ["shrink", "channel_config", "apply_channel_config"]


def _replace(module, name, tensor):
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        setattr(module, name, tensor)


def _select(module, name, dim, index):
    t = getattr(module, name, None)
    if t is None:
        return
    _replace(module, name, t.detach().index_select(dim, index.to(t.device)).clone())


def _index(mask):
    return torch.from_numpy(np.flatnonzero(mask)).long()


def _shrink_layer(rec, keep_in, keep_out):
    m, kind = rec.module, rec.kind
    if keep_in.all() and keep_out.all():
        return
    if kind == "conv":
        _select(m, "weight", 0, _index(keep_out))
        _select(m, "weight", 1, _index(keep_in))
        _select(m, "bias", 0, _index(keep_out))
        m.in_channels, m.out_channels = int(keep_in.sum()), int(keep_out.sum())
    elif kind == "depthwise":
        keep = _index(keep_out)
        _select(m, "weight", 0, keep)
        _select(m, "bias", 0, keep)
        m.in_channels = m.out_channels = m.groups = len(keep)
    elif kind == "linear":
        _select(m, "weight", 0, _index(keep_out))
        _select(m, "weight", 1, _index(keep_in))
        _select(m, "bias", 0, _index(keep_out))
        m.in_features, m.out_features = int(keep_in.sum()), int(keep_out.sum())
    elif kind == "norm":
        keep = _index(keep_out)
        for name in ("weight", "bias", "running_mean", "running_var"):
            _select(m, name, 0, keep)
        m.num_features = len(keep)
    elif kind == "prelu":
        _select(m, "weight", 0, _index(keep_out))
        m.num_parameters = int(keep_out.sum())
    elif kind == "cell":
        c = m.out_channels
        out = _index(keep_out)
        rows = torch.cat([out + k * c for k in range(4)])  # the i, f, o, g gate blocks of each channel
        _select(m.conv, "weight", 0, rows)
        _select(m.conv, "weight", 1, _index(keep_in))
        _select(m.conv, "bias", 0, rows)
        _select(m, "running_state", 1, out)
        if m.state is not None:
            _select(m, "state", 1, out)
        m.in_channels, m.out_channels = int(keep_in.sum()), len(out)
        m.conv.in_channels, m.conv.out_channels = m.in_channels, 4 * m.out_channels
    else:
        raise AssertionError(f"no surgery for layer kind {kind!r}")


@torch.no_grad()
def shrink(graph, alive):
    """Remove, in place, every unit of ``graph`` whose entry in the boolean array ``alive`` is False."""
    alive = np.asarray(alive, dtype=bool)
    if alive.shape != (graph.num_units,):
        raise ValueError(f"alive must have one entry per unit ({graph.num_units}), got shape {alive.shape}")
    for g in graph.groups:
        dead = ~alive[g.offset:g.offset + g.size]
        if dead.any() and not g.prunable:
            raise ValueError("group {} cannot be pruned: {}".format(g.name, g.frozen or "single channel"))
        if dead.all():
            raise ValueError(f"group {g.name} would lose all its {g.size} channels; keep at least one")
    for rec in graph.records:
        _shrink_layer(rec, alive[rec.in_units], alive[rec.out_units])
    return graph.model


# -- channel configuration --------------------------------------------------------------------------------------
def channel_config(model):
    """Channel counts of every channel-indexed layer, as plain Python types: ``{module name: {attr: int}}``."""
    cfg = {}
    for name, m in model.named_modules():
        kind = leaf_kind(m)
        if kind in ("conv", "depthwise", "grouped"):
            cfg[name] = dict(in_channels=int(m.in_channels), out_channels=int(m.out_channels), groups=int(m.groups))
        elif kind == "linear":
            cfg[name] = dict(in_features=int(m.in_features), out_features=int(m.out_features))
        elif kind == "norm":
            cfg[name] = dict(num_features=int(m.num_features))
        elif kind == "prelu":
            cfg[name] = dict(num_parameters=int(m.num_parameters))
        elif kind == "cell":
            cfg[name] = dict(in_channels=int(m.in_channels), out_channels=int(m.out_channels))
    return cfg


def _resize(module, name, shape):
    t = getattr(module, name, None)
    if t is not None and tuple(t.shape) != tuple(shape):
        _replace(module, name, t.new_zeros(shape))


@torch.no_grad()
def apply_channel_config(model, config):
    """Give ``model``'s layers the channel counts in ``config`` (from :func:`channel_config`), in place. The
    resized tensors are zeros: load the pruned ``state_dict`` afterwards."""
    modules = dict(model.named_modules())
    unknown = sorted(set(config) - set(modules))
    if unknown:
        raise ValueError("the channel configuration names modules the model does not have: {}; was it saved from "
                         "another architecture?".format(", ".join(unknown[:5])))
    for name, cfg in config.items():
        m = modules[name]
        cfg = {k: int(v) for k, v in cfg.items()}
        if isinstance(m, nn.modules.conv._ConvNd):
            m.in_channels, m.out_channels, m.groups = cfg["in_channels"], cfg["out_channels"], cfg["groups"]
            _resize(m, "weight", (m.out_channels, m.in_channels // m.groups) + tuple(m.kernel_size))
            _resize(m, "bias", (m.out_channels,))
        elif isinstance(m, nn.Linear):
            m.in_features, m.out_features = cfg["in_features"], cfg["out_features"]
            _resize(m, "weight", (m.out_features, m.in_features))
            _resize(m, "bias", (m.out_features,))
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            m.num_features = cfg["num_features"]
            for t in ("weight", "bias", "running_mean", "running_var"):
                _resize(m, t, (m.num_features,))
        elif isinstance(m, nn.PReLU):
            m.num_parameters = cfg["num_parameters"]
            _resize(m, "weight", (m.num_parameters,))
        elif isinstance(m, BConvCell):
            m.in_channels, m.out_channels = cfg["in_channels"], cfg["out_channels"]
            _resize(m, "running_state", (1, m.out_channels) + tuple(m.state_size))
            m.reset_state()
        else:
            raise ValueError(
                f"module {name!r} of type {type(m).__name__} has a channel configuration but is not a layer the pruner "
                "knows"
            )
    return model
