"""COP helpers for the pruning benchmark: pruning to a FLOP target whatever the model's width, and how COP's
redundancy relates to filter strength."""
import numpy as np
from scipy.stats import spearmanr

from ..compress import build_graph, prune_cop
from ..compress.cop import check_options
from ..compress.criterion import COPSelector

__all__ = ["prune_cop_to_target", "redundancy_vs_scale"]


def prune_cop_to_target(model, size, reduction=0.5, **kwargs):
    """COP to a FLOP reduction; where the preset's channel rounding cannot reach it (narrow models such as
    osnet_x0_25), halve ``round_to`` until it can. Returns (model, round_to used)."""
    checked = {k: v for k, v in kwargs.items() if k != "calibration"}
    round_to = kwargs.pop("round_to", None) or check_options(
        flops_reduction=reduction, has_data=kwargs.get("calibration") is not None, **checked)["round_to"]
    while True:
        try:
            return prune_cop(model, flops_reduction=reduction, input_size=size, round_to=round_to,
                             **kwargs), round_to
        except ValueError as err:
            if "cannot reach" not in str(err) or round_to == 1:
                raise
            round_to = max(1, round_to // 2)


def redundancy_vs_scale(model, size, min_channels=8):
    """Median Spearman correlation, over the prunable groups of at least ``min_channels`` channels that have
    BatchNorm, between COP's redundancy of a filter and its BatchNorm |gamma| (summed over the group's norms).
    Near 0: COP's choice within a layer ignores how strong a filter is. Returns (median, number of groups)."""
    selector = COPSelector(build_graph(model, size), 1.0, 0.0, 0.0)
    rhos = []
    for state in selector.states.values():
        group = state.group
        scale = np.zeros(group.size)
        for rec in group.members:
            if rec.kind == "norm" and rec.module.weight is not None and rec.module.weight.numel() == group.size:
                scale += rec.module.weight.detach().abs().cpu().numpy()
        if group.size >= min_channels and scale.any():
            rhos.append(spearmanr(state.r, scale).correlation)
    return (float(np.median(rhos)) if rhos else float("nan")), len(rhos)
