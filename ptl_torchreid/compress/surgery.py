"""Physical shrinking: slice the weights of every traced layer to the channels that survive.

Each layer slices its input and output channel dimensions by the labels the dependency graph gave them, so all
layers agree on every tensor's channels by construction. The modules stay the same objects (same names, same
``state_dict`` keys); only their tensors and channel attributes get smaller.

``channel_config`` / ``apply_channel_config`` describe and restore those shapes, so a pruned model can be rebuilt
from its architecture name plus the configuration (see ``compress.io``).
"""
import numpy as np
import torch

from .pruners import layer_pruner

__all__ = ["shrink", "channel_config", "apply_channel_config"]


def _index(mask):
    return torch.from_numpy(np.flatnonzero(mask)).long()


@torch.no_grad()
def shrink(graph, alive):
    """Remove, in place, every unit of ``graph`` whose entry in the boolean array ``alive`` is False."""
    alive = np.asarray(alive, dtype=bool)
    if alive.shape != (graph.num_units,):
        raise ValueError(f"alive must have one entry per unit ({graph.num_units}), got shape {alive.shape}")
    for g in graph.groups:
        dead = ~alive[g.offset:g.offset + g.size]
        if dead.any() and not g.prunable:
            raise ValueError(f"group {g.name} cannot be pruned: {g.frozen or 'single channel'}")
        if dead.all():
            raise ValueError(f"group {g.name} would lose all its {g.size} channels; keep at least one")
    for rec in graph.records:
        keep_in, keep_out = alive[rec.in_units], alive[rec.out_units]
        if not (keep_in.all() and keep_out.all()):
            rec.pruner.prune(rec.module, _index(keep_in), _index(keep_out))
    return graph.model


# -- channel configuration --------------------------------------------------------------------------------------
def channel_config(model):
    """Channel counts of every channel-indexed layer, as plain Python types: ``{module name: {attr: int}}``."""
    cfg = {}
    for name, m in model.named_modules():
        pruner = layer_pruner(m)
        config = pruner.channel_config(m) if pruner is not None else None
        if config is not None:
            cfg[name] = config
    return cfg


@torch.no_grad()
def apply_channel_config(model, config):
    """Give ``model``'s layers the channel counts in ``config`` (from :func:`channel_config`), in place. The
    resized tensors are zeros: load the pruned ``state_dict`` afterwards."""
    modules = dict(model.named_modules())
    unknown = sorted(set(config) - set(modules))
    if unknown:
        raise ValueError(f"the channel configuration names modules the model does not have: {', '.join(unknown[:5])}; "
                         "was it saved from another architecture?")
    for name, cfg in config.items():
        m = modules[name]
        pruner = layer_pruner(m)
        if pruner is None or pruner.channel_config(m) is None:
            raise ValueError(
                f"module {name!r} of type {type(m).__name__} has a channel configuration but is not a layer the pruner "
                "knows"
            )
        pruner.apply_channel_config(m, {k: int(v) for k, v in cfg.items()})
    return model
