"""``prune_cop``: COP filter pruning of a whole model to a FLOP, parameter or filter-count target."""
import copy
import numbers
import warnings
from dataclasses import dataclass, field

from ..models import unwrap
from .calibration import calibration_images, recalibrate_batchnorm
from .compensate import compensate as compensate_consumers
from .criterion import GROUP_COSTS, PRESET_OPTIONS, PRESETS, COPSelector, correlation_state
from .graph import build_graph
from .measure import count_flops, count_params
from .scores import (
    CRITERIA,
    DATA_CRITERIA,
    ActivationState,
    StaticState,
    activation_statistics,
    magnitude_strength,
    relative_redundancy,
    taylor_scores,
)
from .surgery import shrink
from .weighting import SIDE_STREAM, check_importance_weights, group_weights

__all__ = ["prune_cop", "PruneReport", "check_target", "check_options", "kept_fraction", "variant_name",
           "step_reductions", "compensation_mode", "COMPENSATIONS", "DEFAULT_CRITERION", "DEFAULT_DATA_FREE_CRITERION",
           "DEFAULT_COMPENSATE", "DEFAULT_SIDE_STREAM_WEIGHT"]

# Chosen by measurement (docs/BENCHMARKS.md, "COP criteria, compensation and recovery" and "Compensation under
# the calibration images' BatchNorm statistics", OSNet x0.25): the BatchNorm-folded magnitude in COP's selection
# (no data needed, so the criterion with and without calibration data); with data, the least-squares refit under
# the calibration images' BatchNorm statistics, ahead of Torch-Pruning's L1 on 10 of 10 seeds (the refit under
# the source statistics, 'ls', cost mAP after fine-tuning).
DEFAULT_CRITERION = "magnitude"
DEFAULT_DATA_FREE_CRITERION = "magnitude"
DEFAULT_COMPENSATE = "bn+ls"
# A PTL model's side stream goes first: with its filters' importance halved, ptl_osnet_x0_25 pruned to
# osnet_x0_25's FLOPs kept +5.6 mAP [+2.6, +8.6] (branch) and +6.5 [+1.2, +11.7] (rectify) more than unweighted
# after fine-tuning; 0 (the side stream to its floor) was level in branch mode and 5.4 points worse in rectify
# mode (docs/BENCHMARKS.md, "PTL at baseline cost with the side stream cut first"). On ResNet-50 it was -1.4
# [-3.4, +0.6], and at equal FLOPs it is slower than the unweighted cut on both backbones (README).
DEFAULT_SIDE_STREAM_WEIGHT = 0.5

# What is done after the cut, on the calibration images: nothing; 'bn' re-estimates the BatchNorm statistics;
# 'ls' refits the layers reading pruned channels by least squares under the model's running statistics; 'bn+ls'
# refits under the calibration images' own statistics (those fine-tuning normalises with) and re-estimates them.
COMPENSATIONS = ("none", "bn", "ls", "bn+ls")


def compensation_mode(compensate):
    """One of ``COMPENSATIONS`` for ``compensate`` (False and True stand for 'none' and 'ls')."""
    if compensate is False or compensate is True:
        return "ls" if compensate else "none"
    if compensate not in COMPENSATIONS:
        raise ValueError(f"compensate={compensate!r} is not valid; choose one of {', '.join(COMPENSATIONS)} "
                         "(True is 'ls', False is 'none')")
    return compensate


def variant_name(criterion, compensate="none", distill=False):
    """The name a pruning variant has in tables, logs and saved pruning info, e.g. 'cop_activation+bn+ls'."""
    mode = compensation_mode(compensate)
    return criterion + ("" if mode == "none" else "+" + mode) + ("+kd" if distill else "")


def step_reductions(total, steps):
    """Reductions for an iterative schedule, each relative to the model of its step, that reach ``total`` in
    ``steps`` equal steps of the original: after step s, 1 - total * s / steps of the original is left."""
    left = [1 - total * s / steps for s in range(steps + 1)]
    return [1 - left[s] / left[s - 1] for s in range(1, steps + 1)]


_TARGETS = ("flops_reduction", "params_reduction", "prune_rate")


@dataclass
class PruneReport:
    """What a pruning run did. FLOPs are counted by ``torch.utils.flop_counter`` at ``input_size``, batch 1."""
    preset: str
    alpha: float
    beta: float
    gamma: float
    target: str
    value: float
    input_size: tuple
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    round_to: int = 1
    group_cost: str = "mean"
    max_prune_ratio: float = 1.0
    filters_removed: int = 0
    filters_total: int = 0
    groups: list = field(default_factory=list)  # (group name, channels before, channels after)
    notes: list = field(default_factory=list)
    criterion: str = "cop"
    compensate: str = "none"  # one of COMPENSATIONS
    defaults: list = field(default_factory=list)  # options that took their default (criterion, compensate, ...)
    calibration_images: int = 0
    compensation: list = field(default_factory=list)  # (layer, squared error before, after the refit)
    steps: int = 1          # pruning steps with fine-tuning between them (the prune command's --steps)
    distill: bool = False   # fine-tuned with distillation from the unpruned model (the prune command's --distill)
    importance_weights: dict = field(default_factory=dict)  # {module name: factor on its filters' importance}

    @property
    def variant(self):
        return variant_name(self.criterion, self.compensate, self.distill)

    @property
    def flops_reduction(self):
        return 1.0 - self.flops_after / self.flops_before if self.flops_before else 0.0

    @property
    def params_reduction(self):
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def prune_rate(self):
        return self.filters_removed / self.filters_total if self.filters_total else 0.0

    def as_dict(self):
        """Plain types only (fits a ``weights_only`` checkpoint)."""
        return dict(preset=self.preset, alpha=self.alpha, beta=self.beta, gamma=self.gamma, target=self.target,
                    value=float(self.value), round_to=int(self.round_to), group_cost=str(self.group_cost),
                    max_prune_ratio=float(self.max_prune_ratio),
                    input_size=list(self.input_size), flops_before=int(self.flops_before),
                    flops_after=int(self.flops_after), params_before=int(self.params_before),
                    params_after=int(self.params_after), filters_removed=int(self.filters_removed),
                    filters_total=int(self.filters_total),
                    groups=[[str(n), int(a), int(b)] for n, a, b in self.groups], notes=list(self.notes),
                    criterion=str(self.criterion), compensate=str(self.compensate), variant=self.variant,
                    defaults=[str(d) for d in self.defaults], calibration_images=int(self.calibration_images),
                    steps=int(self.steps), distill=bool(self.distill),
                    importance_weights={str(k): float(v) for k, v in self.importance_weights.items()},
                    compensation=[[str(n), float(a), float(b)] for n, a, b in self.compensation])

    def __str__(self):
        lines = [
            f"COP pruning, {self.variant}{' (default)' if 'criterion' in self.defaults else ''}, preset {self.preset} "
            f"(alpha={self.alpha:g}, beta={self.beta:g}, gamma={self.gamma:g}, round_to={self.round_to}, "
            f"group_cost={self.group_cost}, max_prune_ratio={self.max_prune_ratio:g}), target "
            f"{self.target}={self.value:g}",
            f"  FLOPs  {self.flops_before:>14,d} -> {self.flops_after:>14,d}  (-{self.flops_reduction:.1%})",
            f"  params {self.params_before:>14,d} -> {self.params_after:>14,d}  (-{self.params_reduction:.1%})",
            f"  filters removed {self.filters_removed} of {self.filters_total} prunable ({self.prune_rate:.1%})",
        ]
        if self.importance_weights:
            weights = ", ".join(f"{k} x{v:g}" for k, v in self.importance_weights.items())
            default = " (the default for PTL models)" if "importance_weights" in self.defaults else ""
            lines.insert(1, f"  importance weighted by module: {weights}{default}")
        if self.compensation:
            before = sum(b for _, b, _ in self.compensation)
            after = sum(a for _, _, a in self.compensation)
            lines.append(
                f"  compensation: {len(self.compensation)} layers refitted on {self.calibration_images} calibration "
                f"images, reconstruction error -{1 - after / before if before else 0.0:.1%}"
            )
        if self.compensate in ("bn", "bn+ls"):
            lines.append(f"  BatchNorm statistics re-estimated on {self.calibration_images} calibration images")
        return "\n".join(lines)

    def layer_table(self):
        return "\n".join(f"  {n:<55s} {a:>5d} -> {b:>5d}" for n, a, b in self.groups)


def check_target(flops_reduction=None, params_reduction=None, prune_rate=None):
    """Validate that exactly one target is given, as a number in [0, 1); returns (name, value)."""
    given = {k: v for k, v in zip(_TARGETS, (flops_reduction, params_reduction, prune_rate)) if v is not None}
    if len(given) != 1:
        raise ValueError(
            "give exactly one pruning target out of flops_reduction, params_reduction and prune_rate (got "
            f"{', '.join(given) or 'none'})"
        )
    ((name, value),) = given.items()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"{name}={value!r} is not valid: it is the fraction to remove, a number in [0, 1) (e.g. 0.5 removes half)"
        )
    return name, float(value)


def _weights(preset, alpha, beta, gamma):
    if preset not in PRESETS:
        raise ValueError(
            f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)} (or give alpha, beta and gamma)"
        )
    a, b, c = PRESETS[preset]
    a, b, c = (a if alpha is None else alpha), (b if beta is None else beta), (c if gamma is None else gamma)
    for name, v in (("alpha", a), ("beta", b), ("gamma", c)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or v < 0:
            raise ValueError(f"{name}={v!r} is not valid; importance weights are numbers >= 0")
    if a == b == c == 0:
        raise ValueError("alpha, beta and gamma are all 0: the importance would not rank anything")
    return float(a), float(b), float(c)


def check_criterion(criterion=None, compensate=None, has_data=False):
    """Resolve ``criterion`` and ``compensate`` (None: the measured defaults for data or no data).
    Returns (criterion, compensate, names of the options that took their default)."""
    defaults = []
    if criterion is None:
        criterion = DEFAULT_CRITERION if has_data else DEFAULT_DATA_FREE_CRITERION
        defaults.append("criterion")
    if criterion not in CRITERIA:
        raise ValueError(
            f"criterion={criterion!r} is not valid; choose one of {', '.join(CRITERIA)} ('cop' is the paper's method)"
        )
    if criterion in DATA_CRITERIA and not has_data:
        raise ValueError(
            f"criterion={criterion!r} needs calibration data: pass calibration= (a DataLoader of torchreid "
            "batches or an image tensor) to prune_cop, or use the prune command with a config (its "
            f"training data); the data-free criteria are {', '.join(c for c in CRITERIA if c not in DATA_CRITERIA)}"
        )
    if compensate is None:
        compensate = DEFAULT_COMPENSATE if has_data else "none"
        defaults.append("compensate")
    compensate = compensation_mode(compensate)
    if compensate != "none" and not has_data:
        raise ValueError(
            f"compensate={compensate!r} works on calibration data: pass calibration= (a DataLoader of "
            "torchreid batches or an image tensor)"
        )
    return criterion, compensate, defaults


def check_options(
    flops_reduction=None,
    params_reduction=None,
    prune_rate=None,
    preset="balanced",
    alpha=None,
    beta=None,
    gamma=None,
    topk=3,
    round_to=None,
    min_channels=1,
    group_cost=None,
    max_prune_ratio=None,
    criterion=None,
    compensate=None,
    has_data=False,
    importance_weights=None,
):
    """Validate ``prune_cop``'s options (everything but the model; module names in ``importance_weights`` are
    checked against it when pruning) and resolve the preset's and the criterion's defaults. Returns dict(target,
    value, weights, round_to, group_cost, max_prune_ratio, criterion, compensate, defaults, importance_weights);
    raises ValueError naming the bad option."""
    target, value = check_target(flops_reduction, params_reduction, prune_rate)
    criterion, compensate, defaults = check_criterion(criterion, compensate, has_data)
    weights = _weights(preset, alpha, beta, gamma)
    if group_cost is not None and group_cost not in GROUP_COSTS:
        raise ValueError(f"group_cost={group_cost!r} is not valid; choose one of {', '.join(GROUP_COSTS)}")
    if round_to is None:
        round_to = PRESET_OPTIONS[preset]["round_to"]
    if group_cost is None:
        group_cost = PRESET_OPTIONS[preset]["group_cost"]
    for name, v in (("topk", topk), ("round_to", round_to), ("min_channels", min_channels)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name}={v!r} is not valid; use an integer >= 1")
    if max_prune_ratio is None:
        max_prune_ratio = 1.0
    elif (
        isinstance(max_prune_ratio, bool)
        or not isinstance(max_prune_ratio, numbers.Real)
        or not 0.0 < float(max_prune_ratio) <= 1.0
    ):
        raise ValueError(
            f"max_prune_ratio={max_prune_ratio!r} is not valid; use a fraction in (0, 1] (the most of any layer's "
            "channels that may go; 1 = no limit)"
        )
    return dict(
        target=target,
        value=value,
        weights=weights,
        round_to=round_to,
        group_cost=group_cost,
        max_prune_ratio=float(max_prune_ratio),
        criterion=criterion,
        compensate=compensate,
        defaults=defaults,
        importance_weights=check_importance_weights(importance_weights),
    )


def _selection_states(graph, criterion, images, topk):
    """{group index: selection state} of ``criterion`` for the prunable groups of ``graph``."""
    groups = graph.prunable_groups()
    if criterion == "cop":
        return None  # COPSelector's own (the paper's)
    if criterion == "cop_magnitude":
        return {g.index: correlation_state(graph, g, topk, magnitude_strength(g)) for g in groups}
    if criterion == "magnitude":
        return {g.index: StaticState(g, 1.0 - magnitude_strength(g)) for g in groups}
    if criterion == "cop_activation":
        stats = activation_statistics(graph, images)
        return {g.index: ActivationState(g, stats.get(g.index, [])) for g in groups}
    scores = taylor_scores(graph, images)
    return {g.index: StaticState(g, relative_redundancy(scores[g.index])) for g in groups}


def prune_cop(
    model,
    flops_reduction=None,
    params_reduction=None,
    prune_rate=None,
    preset="balanced",
    input_size=(256, 128),
    alpha=None,
    beta=None,
    gamma=None,
    topk=3,
    round_to=None,
    min_channels=1,
    exclude=(),
    group_cost=None,
    max_prune_ratio=None,
    inplace=False,
    tolerance=0.02,
    return_report=False,
    verbose=False,
    criterion=None,
    calibration=None,
    compensate=None,
    calibration_size=64,
    importance_weights=None,
):
    """Prune ``model`` with COP and return the smaller model (an ordinary module with fewer channels).

    Exactly one target:
        flops_reduction: fraction of FLOPs to remove (counted at ``input_size``, batch 1, eval forward).
        params_reduction: fraction of parameters to remove.
        prune_rate: fraction of the prunable filters to remove.

    Args:
        preset: ``'faster'`` (alpha, beta, gamma = 1, 3, 0), ``'smaller'`` (1, 0, 3) or ``'balanced'`` (1, 1, 1);
            ``alpha``/``beta``/``gamma`` override single weights. The preset also sets the defaults of
            ``round_to`` and ``group_cost`` (``PRESET_OPTIONS``).
        input_size: (height, width) the model runs at; FLOPs depend on it.
        topk: k of the redundancy (mean of the top-k correlations).
        round_to: keep a multiple of this many channels per group; default 16 for ``'faster'`` (channel counts
            that vectorised CPU/GPU kernels handle well), 1 (filter by filter, as in the paper) otherwise.
        group_cost: F_l / P_l of channels coupled across layers (residual stages): ``'mean'`` (each layer plus
            its consumer, averaged over the coupled layers; default of ``'smaller'``/``'balanced'``) or ``'sum'``
            (every layer the channels touch, what a cut really saves; default of ``'faster'``).
        min_channels: smallest number of channels a group keeps.
        max_prune_ratio: largest fraction of any group's channels that may be removed (default: no limit, as in
            the paper); e.g. 0.75 keeps at least a quarter of every layer.
        exclude: names of modules whose input and output channels are kept.
        importance_weights: {module name: factor} multiplying the importance of the filters a module (and its
            submodules) produces in the global ranking: below 1 that module is cut first, above 1 last, 0 cuts it
            to its floor before anything else (``compress.weighting``). ``'side_stream'`` names a PTL model's
            side stream (``PTLNet.side_modules()``). Unlike ``exclude``, nothing is kept whole, so a target stays
            reachable. Default (None): ``{'side_stream': DEFAULT_SIDE_STREAM_WEIGHT}`` for PTL models (chosen by
            measurement), no weighting for others; ``{}`` turns the weighting off.
        inplace: prune ``model`` itself instead of a copy.
        tolerance: a FLOP target missed by more than this (as counted after surgery) gives a warning; near the
            target, cuts that would overshoot by more than half of it give way to cuts that fit.
        return_report: also return a :class:`PruneReport`.
        verbose: print the report, the channels kept per layer group and the graph's notes.
        criterion: how filters are scored within COP's cost-aware selection (``compress.scores``): ``'cop'``
            (the paper's consumer-weight correlation, data-free), ``'cop_magnitude'`` (correlation combined with
            the BatchNorm-folded filter magnitude, data-free), ``'magnitude'`` (that magnitude alone, data-free:
            L1-style pruning in COP's cost-aware selection), ``'cop_activation'`` (how well the other channels
            predict a channel's feature maps on calibration images, weighted by what it feeds) or ``'taylor'``
            (first-order change of the embedding). Default: ``DEFAULT_CRITERION`` with calibration data,
            ``DEFAULT_DATA_FREE_CRITERION`` without (both ``'magnitude'``, the best measured).
        calibration: a DataLoader of torchreid batches (or any iterable of them) or an image tensor
            (N, 3, H, W), from the training data; the first ``calibration_size`` images are used.
        compensate: what is done after the cut on the calibration images, one of ``COMPENSATIONS``: ``'bn'``
            re-estimates the BatchNorm statistics; ``'ls'`` (or True) refits every layer reading pruned channels
            by least squares so that it reproduces its unpruned output (``compress.compensate``) under the model's
            running statistics; ``'bn+ls'`` refits under the calibration images' own statistics. Default
            ``DEFAULT_COMPENSATE`` with calibration data (chosen by measurement), ``'none'`` without.

    Channels that reach the model's output (the embedding) are never pruned, so the feature size, the classifier
    and anything downstream stay compatible. BatchNorm statistics, BConv-Cell running states and concatenation
    consumers are sliced with their channels. The module is left in the training mode it had.
    """
    opts = check_options(
        flops_reduction,
        params_reduction,
        prune_rate,
        preset,
        alpha,
        beta,
        gamma,
        topk,
        round_to,
        min_channels,
        group_cost,
        max_prune_ratio,
        criterion,
        compensate,
        has_data=calibration is not None,
        importance_weights=importance_weights,
    )
    criterion, compensate = opts["criterion"], opts["compensate"]
    target, value, (a, b, c) = opts["target"], opts["value"], opts["weights"]
    round_to, group_cost, max_prune_ratio = opts["round_to"], opts["group_cost"], opts["max_prune_ratio"]
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or tolerance < 0:
        raise ValueError(f"tolerance={tolerance!r} is not valid; use a fraction >= 0 (0.02 = 2 points)")
    input_size = tuple(int(s) for s in input_size)
    net = unwrap(model)
    built_for = getattr(net, "input_size", None)  # PTL models: the cells' state shapes follow it
    if built_for is not None and tuple(built_for) != input_size:
        raise ValueError(
            f"the model was built for input_size={tuple(built_for)} but pruning was asked at input_size={input_size}; "
            f"pass input_size={tuple(built_for)} (FLOPs and the cells' states depend on it)"
        )
    if not inplace:
        net = copy.deepcopy(net)
    importance_weights = opts["importance_weights"]
    if importance_weights is None:  # PTL models: the side stream first; other models: no weighting
        importance_weights = {SIDE_STREAM: DEFAULT_SIDE_STREAM_WEIGHT} if hasattr(net, "side_modules") else {}
        opts["defaults"].append("importance_weights")

    images = None
    if calibration is not None:
        param = next(iter(net.parameters()))
        images = calibration_images(calibration, calibration_size).to(param.device, param.dtype)
        if tuple(images.shape[-2:]) != input_size:
            raise ValueError(
                f"calibration images are {images.shape[-2]}x{images.shape[-1]} but input_size is "
                f"{input_size[0]}x{input_size[1]}; use images of the size the model runs at"
            )
    flops_before, params_before = count_flops(net, input_size), count_params(net)
    graph = build_graph(net, input_size, exclude=exclude)
    selector = COPSelector(
        graph,
        a,
        b,
        c,
        topk=topk,
        round_to=round_to,
        min_channels=min_channels,
        group_cost=group_cost,
        max_prune_ratio=max_prune_ratio,
        states=_selection_states(graph, criterion, images, topk),
        weights=group_weights(net, graph, importance_weights),
    )
    flops_outside = flops_before - selector.flops  # layers the graph does not change
    params_outside = params_before - selector.params

    def reached():
        if target == "flops_reduction":
            return flops_outside + selector.flops <= (1.0 - value) * flops_before
        if target == "params_reduction":
            return params_outside + selector.params <= (1.0 - value) * params_before
        return selector.removed_filters >= value * selector.total_filters

    def accept(flops, params, filters):
        # Near the target, a cut that would overshoot it by more than half the tolerance yields to the next
        # group in importance order whose cut fits (only matters with coarse round_to on small models).
        if target == "flops_reduction":
            after = 1 - (flops_outside + selector.flops - flops) / flops_before
        elif target == "params_reduction":
            after = 1 - (params_outside + selector.params - params) / params_before
        else:
            after = (selector.removed_filters + filters) / max(1, selector.total_filters)
        return after <= value + tolerance / 2

    while value > 0 and not reached():
        if not selector.step(accept):
            got = {
                "flops_reduction": 1 - (flops_outside + selector.flops) / flops_before,
                "params_reduction": 1 - (params_outside + selector.params) / params_before,
                "prune_rate": selector.removed_filters / max(1, selector.total_filters),
            }[target]
            raise ValueError(
                f"cannot reach {target}={value:g}: with min_channels={min_channels}, round_to={round_to} and "
                f"max_prune_ratio={max_prune_ratio:g} the prunable layers allow at most {got:.3f}. Lower the target or "
                "min_channels/round_to, or raise max_prune_ratio. Parts of the model that are kept: "
                f"{'; '.join(graph.notes) or 'channels reaching the output, and single-channel layers'}"
            )
    sizes = [(g.name, g.size, int(selector.alive[g.offset : g.offset + g.size].sum())) for g in graph.prunable_groups()]
    refit = compensate in ("ls", "bn+ls")
    parent = copy.deepcopy(net) if refit else None
    shrink(graph, selector.alive)
    fits = compensate_consumers(graph, parent, selector.alive, images, recalibrate=compensate == "bn+ls") \
        if refit else []
    del parent
    if compensate == "bn":
        recalibrate_batchnorm(net, images)

    flops_after, params_after = count_flops(net, input_size), count_params(net)
    if flops_after != flops_outside + selector.flops:
        warnings.warn(
            f"FLOPs counted after pruning ({flops_after:,}) differ from the pruner's estimate "
            f"({flops_outside + selector.flops:,}); the target was steered by the estimate",
            RuntimeWarning,
        )
    if target == "flops_reduction" and abs((1 - flops_after / flops_before) - value) > tolerance:
        warnings.warn(
            f"FLOP reduction {1 - flops_after / flops_before:.3f} misses the requested {value:.3f} by more than "
            f"{tolerance}",
            RuntimeWarning,
        )
    report = PruneReport(
        preset=preset,
        alpha=a,
        beta=b,
        gamma=c,
        target=target,
        value=value,
        round_to=round_to,
        group_cost=group_cost,
        max_prune_ratio=max_prune_ratio,
        input_size=input_size,
        flops_before=flops_before,
        flops_after=flops_after,
        params_before=params_before,
        params_after=params_after,
        filters_removed=int(selector.removed_filters),
        filters_total=int(selector.total_filters),
        groups=sizes,
        notes=list(graph.notes) + ([] if images is not None or "compensate" not in opts["defaults"] else [
            f"no calibration data: pruned without compensation; with calibration= (a DataLoader of torchreid "
            f"batches or an image tensor from the training data) the default compensation is '{DEFAULT_COMPENSATE}'"
        ]),
        criterion=criterion,
        compensate=compensate,
        defaults=opts["defaults"],
        calibration_images=0 if images is None else len(images),
        compensation=fits,
        importance_weights=importance_weights,
    )
    if verbose:
        print(report)
        print(report.layer_table())
        for note in graph.notes:
            print("note: " + note)
    return (net, report) if return_report else net


def kept_fraction(report):
    """Per-group fraction of channels kept, by group name (for inspection and tests)."""
    return {n: after / before for n, before, after in report.groups}
