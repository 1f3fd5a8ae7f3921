"""COP: correlation-based filter pruning (Wang et al., IJCAI 2019) for torchreid and PTL models.

    from ptl_torchreid.compress import prune_cop, save_pruned_model, load_pruned_model
    small = prune_cop(model, flops_reduction=0.5, preset="faster")
    save_pruned_model(small, "pruned.pth", arch="resnet50")
    model = load_pruned_model("pruned.pth")          # no pruning run needed

Modules: ``pruners`` (one registered pruner per layer type: detection, slicing, channel configuration, costs;
``bconv_pruner`` registers the BConv-Cell's), ``trace`` and ``graph`` (channel dependency graph), ``criterion``
(correlation, redundancy, costs, greedy selection), ``scores`` (further criteria), ``calibration``, ``compensate``,
``surgery`` (physical shrinking, channel configuration), ``io`` (saving/reloading pruned models), ``measure``
(FLOPs by torch's counter, parameters, latency), ``weighting`` (importance weights by module), ``cop``
(``prune_cop``).
"""
from . import bconv_pruner  # noqa: F401  (registers the BConv-Cell's pruner)
from .cop import PruneReport, check_target, kept_fraction, prune_cop
from .criterion import PRESET_OPTIONS, PRESETS
from .graph import ChannelGraph, UnsupportedLayerError, build_graph
from .io import (
                 build_kwargs_of,
                 build_pruned_architecture,
                 is_pruned_checkpoint,
                 load_pruned_model,
                 make_pruning_info,
                 pruning_info,
                 register_pruned_model,
                 save_pruned_model,
)
from .measure import compare_latency, count_flops, count_params
from .pruners import KeepChannels, LayerPruner, register_layer_pruner, resize_tensor, select_channels
from .surgery import apply_channel_config, channel_config, shrink
from .weighting import SIDE_STREAM

__all__ = ["prune_cop", "PruneReport", "PRESETS", "PRESET_OPTIONS", "check_target", "kept_fraction", "build_graph",
           "ChannelGraph", "UnsupportedLayerError", "shrink", "channel_config", "apply_channel_config", "count_flops",
           "count_params", "compare_latency", "save_pruned_model", "load_pruned_model", "build_pruned_architecture",
           "pruning_info", "is_pruned_checkpoint", "register_pruned_model", "build_kwargs_of", "make_pruning_info",
           "LayerPruner", "KeepChannels", "register_layer_pruner", "select_channels", "resize_tensor",
           "SIDE_STREAM"]
