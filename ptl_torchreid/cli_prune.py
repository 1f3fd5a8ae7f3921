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
import os.path as osp

from ptl_torchreid import _torchreid
from ptl_torchreid.compress import (PRESETS, compare_latency, count_flops, count_params, make_pruning_info,
                                    prune_cop, save_pruned_model)
from ptl_torchreid.compress.cop import check_options
from ptl_torchreid.compress.criterion import GROUP_COSTS
from ptl_torchreid.config import ConfigError, engine_run_kwargs, resume_path

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


def add_prune_arguments(parser):
    g = parser.add_argument_group("pruning (COP)")
    add_cop_arguments(g)
    g.add_argument("--out", default="", help="pruned model file (default <save_dir>/model/pruned.pth.tar)")
    g.add_argument("--latency-batch", type=int, default=32, help="batch of the latency measurement (0: skip)")
    g.add_argument("--latency-rounds", type=int, default=3)
    g.add_argument("--skip-eval-before", action="store_true", help="do not evaluate the unpruned model")


def prune_options(args):
    """``prune_cop`` keyword arguments from the parsed flags, validated before any work starts."""
    options = dict(flops_reduction=args.flops_reduction, params_reduction=args.params_reduction,
                   prune_rate=args.prune_rate, preset=args.preset, alpha=args.alpha, beta=args.beta,
                   gamma=args.gamma, round_to=args.round_to, group_cost=args.group_cost, topk=args.topk,
                   min_channels=args.min_channels, max_prune_ratio=args.max_prune_ratio,
                   exclude=tuple(args.exclude))
    checked = {k: v for k, v in options.items() if k != "exclude"}
    try:
        check_options(**checked)
    except ValueError as e:
        raise ConfigError("prune: {} (see ptl-torchreid prune --help)".format(e)) from None
    return options


def _evaluate(engine, cfg):
    kwargs = engine_run_kwargs(cfg)
    kwargs.update(test_only=True, visrank=False)
    return engine.run(**kwargs)


def _first(results):
    if not results:
        return None, None
    res = next(iter(results.values()))
    return res["cmc"].get(1), res["mAP"]


def _fmt(v, pct=False):
    if v is None:
        return "-"
    if pct:
        return "{:.1%}".format(v)
    return "{:,d}".format(v) if isinstance(v, int) else "{:.4f}".format(v)


def run_prune(cfg, args):
    from ptl_torchreid import cli  # the builders; imported here because cli registers this command

    options = prune_options(args)
    if not cfg.model.load_weights:
        raise ConfigError("prune needs the trained model to prune: set model.load_weights")
    if resume_path(cfg):
        raise ConfigError("prune starts from model.load_weights and does not resume; unset train.resume / "
                          "model.resume")
    torchreid.utils.set_random_seed(cfg.train.seed)
    datamanager = cli.build_datamanager(cfg)
    model = cli.build_model(cfg, datamanager.num_train_pids)
    size = (cfg.data.height, cfg.data.width)

    before = {}
    if not args.skip_eval_before:
        print("=> Evaluating the model before pruning")
        before = _evaluate(cli.build_engine(cfg, datamanager, model), cfg)

    try:
        pruned, report = prune_cop(model, input_size=size, return_report=True, **options)
    except ValueError as e:  # invalid preset/weights, unreachable target, unsupported layer
        raise ConfigError("pruning {}: {}".format(cfg.model.name, e)) from None
    print(report)
    print(report.layer_table())
    for note in report.notes:
        print("note: " + note)

    engine = cli.build_engine(cfg, datamanager, pruned)
    info = make_pruning_info(pruned, cfg.model.name, report=report)
    engine.checkpoint_extras["pruning"] = info  # every checkpoint of the fine-tuning reloads as a pruned model
    if cfg.train.max_epoch > 0:
        print("=> Fine-tuning the pruned model for {} epochs".format(cfg.train.max_epoch))
        after = engine.run(**engine_run_kwargs(cfg))
    else:
        after = _evaluate(engine, cfg)

    out = args.out or osp.join(cfg.data.save_dir, "model", "pruned.pth.tar")
    save_pruned_model(pruned, out, cfg.model.name, report=report,
                      extra={"results": after, "config": cfg.dump(), "model_name": cfg.model.name})

    rows = [("params", count_params(model), count_params(pruned)),
            ("FLOPs ({}x{})".format(*size), count_flops(model, size), count_flops(pruned, size))]
    if args.latency_batch > 0:
        lat = compare_latency({"before": model, "after": pruned}, size, args.latency_batch,
                              rounds=args.latency_rounds)
        device = next(pruned.parameters()).device
        rows.append(("latency s (batch {}, {})".format(args.latency_batch, device.type), lat["before"]["median"],
                     lat["after"]["median"]))
    r1_before, map_before = _first(before)
    r1_after, map_after = _first(after)
    lines = ["", "| | before | after |", "|---|---|---|"]
    lines += ["| {} | {} | {} |".format(n, _fmt(b), _fmt(a)) for n, b, a in rows]
    target = next(iter(after), "")
    lines += ["| Rank-1 ({}) | {} | {} |".format(target, _fmt(r1_before, True), _fmt(r1_after, True)),
              "| mAP ({}) | {} | {} |".format(target, _fmt(map_before, True), _fmt(map_after, True)),
              "", "Pruned model saved to {} (reload: ptl_torchreid.compress.load_pruned_model, or as "
              "model.load_weights)".format(out)]
    print("\n".join(lines))
    return after
