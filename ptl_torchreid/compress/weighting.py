"""Importance weights by module: steer COP's global ranking toward (weight < 1) or away from (weight > 1) parts
of a model, e.g. the side stream of a PTL model, without excluding anything.

A weight multiplies the importance of every filter the named module produces (and those of its submodules), so
the cost-aware ranking keeps its meaning inside and across the weighted parts; 0 makes those filters go first,
down to each layer's floor (``min_channels``, ``round_to``, ``max_prune_ratio``).
"""
import math
import numbers

__all__ = ["SIDE_STREAM", "check_importance_weights", "group_weights"]

# The name that stands for a PTL model's side stream (its cells, fuse blocks, rectifiers, the PTL head's own layers:
# ``PTLNet.side_modules()``).
SIDE_STREAM = "side_stream"


def check_importance_weights(weights):
    """``weights`` ({module name: weight}) as a plain dict, each weight a finite number >= 0; None (the default
    weighting) stays None."""
    if weights is None:
        return None
    if not isinstance(weights, dict):
        raise ValueError(f"importance_weights={weights!r} is not valid; give a dict {{module name: weight >= 0}}")
    checked = {}
    for name, w in weights.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"importance_weights: {name!r} is not a module name")
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
            raise ValueError(
                f"importance_weights[{name!r}]={w!r} is not valid; use a number >= 0 (below 1 prunes the module "
                "first, above 1 last, 1 changes nothing)"
            )
        checked[name] = float(w)
    return checked


def _modules_of(net, name):
    """ids of the modules ``name`` covers: the module and its submodules, or a PTL model's side stream."""
    if name == SIDE_STREAM:
        if not hasattr(net, "side_modules"):
            raise ValueError(f"importance_weights: {SIDE_STREAM!r} names a PTL model's side stream; this model "
                             f"({type(net).__name__}) has none")
        return {id(m) for m in net.side_modules()}
    try:
        found = net.get_submodule(name)  # names are non-empty (check_importance_weights)
    except AttributeError:
        names = sorted(n for n, _ in net.named_children())
        raise ValueError(
            f"importance_weights: {name!r} is not a module of the model; use names of model.named_modules(), e.g. "
            f"{names[:6]}" + (f", or {SIDE_STREAM!r} for the side stream" if hasattr(net, "side_modules") else "")
        ) from None
    return {id(m) for m in found.modules()}


def group_weights(net, graph, weights):
    """{prunable group index: weight} for ``weights`` ({module name: weight}, checked). A group's weight is the
    mean over its producing layers of the weight of the module that covers each (the last given wins where names
    overlap; 1 where none does)."""
    covers = [(_modules_of(net, name), w) for name, w in weights.items()]
    result = {}
    for group in graph.prunable_groups():
        per_producer = []
        for rec in group.producers:
            w = 1.0
            for ids, weight in covers:
                if id(rec.module) in ids:
                    w = weight
            per_producer.append(w)
        result[group.index] = sum(per_producer) / len(per_producer)
    return result
