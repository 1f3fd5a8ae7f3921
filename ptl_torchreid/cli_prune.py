"""The ``prune`` command: COP-prune a trained model, fine-tune it with the engine, evaluate, save.

    ptl-torchreid prune --config-file configs/osnet_x0_25_synthetic_source_to_target.yaml \\
        --flops-reduction 0.5 --preset faster model.load_weights log/.../model-best.pth.tar train.max_epoch 10

The config is the usual one: ``model.load_weights`` is the trained model to prune, ``data.*`` the data to
fine-tune on and evaluate, ``train.*`` the fine-tuning schedule (``train.max_epoch 0`` evaluates the pruned model
without fine-tuning). It prints parameters, FLOPs, latency, Rank-1 and mAP before and after; the engine's
checkpoints under ``<save_dir>/model`` carry the channel configuration, and the final model is written to
``--out`` (default ``<save_dir>/model/pruned.pth.tar``). All of them reload with ``load_pruned_model`` or as
``model.load_weights`` of any command.
"""
import argparse
import os.path as osp

from ptl_torchreid import _torchreid
from ptl_torchreid.compress import (
    PRESETS,
    SIDE_STREAM,
    compare_latency,
    count_flops,
    count_params,
    make_pruning_info,
    prune_cop,
    save_pruned_model,
)
from ptl_torchreid.compress.cop import (
    COMPENSATIONS,
    DEFAULT_COMPENSATE,
    DEFAULT_CRITERION,
    check_options,
    step_reductions,
)
from ptl_torchreid.compress.criterion import GROUP_COSTS
from ptl_torchreid.compress.scores import CRITERIA
from ptl_torchreid.config import ConfigError, resume_path
from ptl_torchreid.engine import build_datamanager, build_engine, build_model, run
from ptl_torchreid.engine.defaults import take_checkpoint
from ptl_torchreid.engine.distill import Distillation

__all__ = ["add_prune_arguments", "add_cop_arguments", "run_prune", "prune_options"]

torchreid = _torchreid.torchreid


def add_cop_arguments(group, target_required=False):
    """The pruning target and ``prune_cop``'s options, as flags of ``group`` (a parser or an argument group)."""
    target = group.add_mutually_exclusive_group(required=target_required)
    target.add_argument("--flops-reduction", type=float, help="fraction of FLOPs to remove, e.g. 0.5")
    target.add_argument("--params-reduction", type=float, help="fraction of parameters to remove")
    target.add_argument("--prune-rate", type=float, help="fraction of prunable filters to remove")
    group.add_argument("--preset", default="balanced", choices=sorted(PRESETS),
                       help="faster (FLOPs), smaller (parameters) or balanced")
    group.add_argument("--alpha", type=float, default=None, help="redundancy weight (overrides the preset)")
    group.add_argument("--beta", type=float, default=None, help="FLOP weight (overrides the preset)")
    group.add_argument("--gamma", type=float, default=None, help="parameter weight (overrides the preset)")
    group.add_argument("--round-to", type=int, default=None, help="keep multiples of this many channels per layer")
    group.add_argument("--group-cost", default=None, choices=GROUP_COSTS,
                       help="cost of residual-coupled layers: mean over the layers or their sum")
    group.add_argument("--topk", type=int, default=3, help="k of the redundancy (top-k correlations)")
    group.add_argument("--min-channels", type=int, default=1)
    group.add_argument("--max-prune-ratio", type=float, default=None,
                       help="most of any layer's channels that may go, e.g. 0.5 (default: no limit)")
    group.add_argument("--exclude", nargs="+", default=(), help="module names whose channels are kept")
    group.add_argument(
        "--importance-weight",
        nargs="+",
        default=(),
        metavar="MODULE=W",
        help="multiply the importance of a module's filters in the global ranking by W: below 1 it is cut first, "
        f"above 1 last (e.g. {SIDE_STREAM}=0.5 for a PTL model's side stream)",
    )
    group.add_argument(
        "--criterion",
        default=None,
        choices=CRITERIA,
        help=f"filter criterion inside COP's cost-aware selection; 'cop' is the paper's (default: {DEFAULT_CRITERION}, "
        "the best measured)",
    )
    group.add_argument(
        "--compensate",
        default=None,
        nargs="?",
        const="ls",
        choices=COMPENSATIONS,
        help="after the cut, on the calibration images: 'bn' re-estimates BatchNorm statistics, 'ls' (the flag "
        "alone) refits the layers reading pruned channels by least squares, 'bn+ls' refits under the images' own "
        f"BatchNorm statistics (default: {DEFAULT_COMPENSATE}, the best measured)",
    )
    group.add_argument(
        "--calibration-images",
        type=int,
        default=64,
        help="training images for the data-aware criteria and compensation",
    )


def add_prune_arguments(parser):
    g = parser.add_argument_group("pruning (COP)")
    add_cop_arguments(g)
    g.add_argument("--out", default="", help="pruned model file (default <save_dir>/model/pruned.pth.tar)")
    g.add_argument("--latency-batch", type=int, default=32, help="batch of the latency measurement (0: skip)")
    g.add_argument("--latency-rounds", type=int, default=3)
    g.add_argument("--skip-eval-before", action="store_true", help="do not evaluate the unpruned model")
    g.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="distil the unpruned model into the pruned one during the fine-tuning (default: on, the best measured "
             "recovery on OSNet and ResNet-50; it costs a forward of the unpruned model per step)",
    )
    g.add_argument(
        "--distill-feature-weight",
        type=float,
        default=1.0,
        help="weight of the embedding distillation loss (normalised features, squared distance)",
    )
    g.add_argument(
        "--distill-logit-weight",
        type=float,
        default=0.0,
        help="weight of the logit (KL) distillation loss; only when the classifiers match",
    )
    g.add_argument("--distill-temperature", type=float, default=4.0)
    g.add_argument(
        "--steps",
        type=int,
        default=1,
        help="prune in this many steps, each followed by train.max_epoch / steps epochs of fine-tuning",
    )


def prune_options(args, has_data=False):
    """``prune_cop`` keyword arguments from the parsed flags, validated before any work starts; ``has_data``:
    training images will be passed as calibration."""
    options = dict(
        flops_reduction=args.flops_reduction,
        params_reduction=args.params_reduction,
        prune_rate=args.prune_rate,
        preset=args.preset,
        alpha=args.alpha,
        beta=args.beta,
        gamma=args.gamma,
        round_to=args.round_to,
        group_cost=args.group_cost,
        topk=args.topk,
        min_channels=args.min_channels,
        max_prune_ratio=args.max_prune_ratio,
        exclude=tuple(args.exclude),
        criterion=args.criterion,
        compensate=args.compensate,
    )
    checked = {k: v for k, v in options.items() if k != "exclude"}
    try:
        options["importance_weights"] = checked["importance_weights"] = parse_importance_weights(
            args.importance_weight)
        check_options(has_data=has_data, **checked)
        if args.calibration_images < 2:
            raise ValueError(f"--calibration-images {args.calibration_images} is too few; use 2 or more")
        if getattr(args, "steps", 1) < 1:
            raise ValueError(f"--steps {args.steps} is not valid; use 1 or more")
        if getattr(args, "steps", 1) > 1 and args.prune_rate is not None:
            raise ValueError("--steps works with --flops-reduction or --params-reduction")
        if getattr(args, "distill", False):
            Distillation.check(args.distill_feature_weight, args.distill_logit_weight, args.distill_temperature)
    except ValueError as e:
        raise ConfigError(f"prune: {e} (see ptl-torchreid prune --help)") from None
    return options


def parse_importance_weights(pairs):
    """{module name: weight} from ``--importance-weight`` values 'NAME=W' (None when none are given)."""
    weights = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not sep or not name or weight is None:
            raise ValueError(f"--importance-weight {pair!r} is not valid; write MODULE=W, e.g. {SIDE_STREAM}=0.5")
        weights[name] = weight
    return weights or None


def step_targets(options, steps):
    """Per-step ``prune_cop`` targets (relative to the model of that step) reaching the total in ``steps``."""
    name = "flops_reduction" if options["flops_reduction"] is not None else "params_reduction"
    return [{name: r} for r in step_reductions(options[name], steps)]


def _evaluate(engine, cfg):
    eval_cfg = cfg.clone()
    eval_cfg.defrost()
    eval_cfg.test.evaluate, eval_cfg.test.visrank = True, False
    return run(eval_cfg, engine=engine)


def _first(results):
    if not results:
        return None, None
    res = next(iter(results.values()))
    return res["cmc"].get(1), res["mAP"]


def _fmt(v, pct=False):
    if v is None:
        return "-"
    if pct:
        return f"{v:.1%}"
    return f"{v:,d}" if isinstance(v, int) else f"{v:.4f}"


def _prune_and_finetune(cfg, args, datamanager, model, options):
    """Prune ``model`` (in ``args.steps`` steps, each followed by its share of ``train.max_epoch``), fine-tune
    with the engine (distilling ``model`` with ``--distill``); returns (pruned, report, results)."""
    size = (cfg.data.height, cfg.data.width)
    steps = args.steps
    targets = step_targets(options, steps) if steps > 1 else [{}]
    kwargs = {k: v for k, v in options.items() if not (steps > 1 and k in ("flops_reduction", "params_reduction"))}
    current, first, results = model, None, {}
    epochs_left = cfg.train.max_epoch
    for step, target in enumerate(targets, 1):
        try:
            pruned, report = prune_cop(
                current,
                input_size=size,
                return_report=True,
                calibration=datamanager.train_loader,
                calibration_size=args.calibration_images,
                **dict(kwargs, **target),
            )
        except ValueError as e:  # invalid preset/weights, unreachable target, unsupported layer
            raise ConfigError(f"pruning {cfg.model.name}: {e}") from None
        epochs = epochs_left // (steps - step + 1)
        epochs_left -= epochs
        report.distill = bool(args.distill) and epochs > 0  # distillation happens in the fine-tuning only
        first = first or report
        if steps > 1:
            print(f"=> Pruning step {step} of {steps}")
        print(report)
        print(report.layer_table())
        for note in report.notes:
            print("note: " + note)
        step_cfg = cfg.clone()
        step_cfg.defrost()
        step_cfg.train.max_epoch = epochs
        engine = build_engine(step_cfg, datamanager, pruned)
        hooks = [Distillation(model, args.distill_feature_weight, args.distill_logit_weight,
                              args.distill_temperature)] if report.distill else []
        info = make_pruning_info(pruned, cfg.model.name, report=report)
        engine.checkpoint_extras["pruning"] = info  # every checkpoint of the fine-tuning reloads as a pruned model
        if epochs > 0:
            print(
                f"=> Fine-tuning the pruned model for {epochs} "
                f"epochs{' with distillation from the unpruned model' if report.distill else ''}"
            )
            results = run(step_cfg, hooks=hooks, engine=engine)
        elif step == steps:
            results = _evaluate(engine, step_cfg)
        current = pruned
    if steps > 1:  # one report for the whole run: costs against the unpruned model, the total target
        name = "flops_reduction" if options["flops_reduction"] is not None else "params_reduction"
        report.flops_before, report.params_before = first.flops_before, first.params_before
        report.value, report.steps = options[name], steps
    return pruned, report, results


def run_prune(cfg, args):
    options = prune_options(args, has_data=True)
    if not cfg.model.load_weights:
        raise ConfigError("prune needs the trained model to prune: set model.load_weights")
    if resume_path(cfg):
        raise ConfigError("prune starts from model.load_weights and does not resume; unset train.resume / model.resume")
    torchreid.utils.set_random_seed(cfg.train.seed)
    datamanager = build_datamanager(cfg)
    checkpoint = take_checkpoint(cfg, cfg.model.load_weights, args.checkpoints)
    model = build_model(cfg, datamanager.num_train_pids, checkpoint=checkpoint)
    size = (cfg.data.height, cfg.data.width)

    before = {}
    if not args.skip_eval_before:
        print("=> Evaluating the model before pruning")
        before = _evaluate(build_engine(cfg, datamanager, model), cfg)
    pruned, report, after = _prune_and_finetune(cfg, args, datamanager, model, options)

    out = args.out or osp.join(cfg.data.save_dir, "model", "pruned.pth.tar")
    save_pruned_model(
        pruned,
        out,
        cfg.model.name,
        report=report,
        extra={"results": after, "config": cfg.dump(), "model_name": cfg.model.name},
    )

    rows = [
        ("params", count_params(model), count_params(pruned)),
        (f"FLOPs ({size[0]}x{size[1]})", count_flops(model, size), count_flops(pruned, size)),
    ]
    if args.latency_batch > 0:
        lat = compare_latency({"before": model, "after": pruned}, size, args.latency_batch, rounds=args.latency_rounds)
        device = next(pruned.parameters()).device
        rows.append(
            (f"latency s (batch {args.latency_batch}, {device.type})", lat["before"]["median"], lat["after"]["median"])
        )
    r1_before, map_before = _first(before)
    r1_after, map_after = _first(after)
    lines = ["", "| | before | after |", "|---|---|---|"]
    lines += [f"| {n} | {_fmt(b)} | {_fmt(a)} |" for n, b, a in rows]
    target = next(iter(after), "")
    lines += [
        f"| Rank-1 ({target}) | {_fmt(r1_before, True)} | {_fmt(r1_after, True)} |",
        f"| mAP ({target}) | {_fmt(map_before, True)} | {_fmt(map_after, True)} |",
        "",
        f"Pruned model saved to {out} (reload: ptl_torchreid.compress.load_pruned_model, or as model.load_weights)",
    ]
    print("\n".join(lines))
    return after
