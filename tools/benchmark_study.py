#!/usr/bin/env python
"""The powered PTL accuracy study: plain fine-tuning against PTL variants on the synthetic transfer pair.

Everything that decides the comparison is fixed before any variant is trained: the data (an enlarged
synthetic_target, set by ``--set``), the pretrained source model (trained once, cached), the seeds, and the
budget (``--min-steps`` fine-tuning steps for every variant). Each seed trains every selected variant from the
same source weights, in alternating order, so the per-seed differences are paired. The report gives each
variant's mAP and Rank-1, the paired difference to plain fine-tuning with a 95% t-interval, the same against
the variant's capacity-matched adapter where one was run, the direct-transfer result before fine-tuning
(epoch 0), and costs (training step time during the runs, FLOPs, parameters), plus a PNG of the differences.

    # osnet_x0_25, the main variants and the state-isolating ablations, 5 seeds:
    python tools/benchmark_study.py --seeds 1 2 3 4 5 --variants plain branch rectify branch-stateless \\
        rectify-stateless branch-adapter rectify-adapter --out study.md --plots docs/plots/study
    # resnet50 on its own recipe (Adam 3e-4), pretrained and fine-tuned at the same 64x32:
    python tools/benchmark_study.py --config-file configs/resnet50_synthetic_source_to_target.yaml \\
        --pretrain-config configs/resnet50_synthetic_source.yaml --work-dir log/study_r50 --out study_r50.md

``--budget-minutes`` stops before a seed that would not fit; the report is rewritten after every seed, with
complete seeds only, so the pairs stay complete. Runs can be split over processes (one per core, down to one
variant on one seed each) and the reports joined with ``--merge a.json b.json ...``, which checks that they share
the design and together cover every variant on every seed; a study without ``plain`` is paired with it once merged.
With ``--variants``, a merge takes only those variants, e.g. the ones that later runs added seeds to.
Trailing ``KEY VALUE`` pairs override config keys of both stages.
"""
import argparse
import json
import math
import os
import os.path as osp
import statistics
import sys
import time

import ptl_torchreid  # noqa: F401  (before torch: the package sets OpenMP waiting, see _openmp.py)

# isort: split
import benchmark as bench  # the comparison script beside this one
import torch

from ptl_torchreid.benchmarking import measure as bm
from ptl_torchreid.benchmarking import report as br
from ptl_torchreid.benchmarking.report import fmt_paired, paired
from ptl_torchreid.benchmarking.spec import ModelSpec
from ptl_torchreid.config import engine_run_kwargs

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
STATELESS = ("ptl.reset_policy", "iter", "ptl.reset_every_n_iters", "1", "ptl.eval_state", "zero")
BRANCH, RECTIFY = ("ptl.mode", "branch"), ("ptl.mode", "rectify")  # explicit: a variant must not follow the default

# label -> (PTL model?, config overrides, what it tests). 'plain' is the torchreid baseline.
VARIANTS = {
    "plain": (False, (), "plain torchreid fine-tuning"),
    "branch": (True, BRANCH, "side stream into the embedding (zero-initialised projection)"),
    "rectify": (True, RECTIFY, "cells modulate stages 1-3 and the last stage (FiLM)"),
    "rectify-last": (True, RECTIFY + ("ptl.rectify_stages", "['last']"), "rectify the last stage only"),
    "rectify-early": (True, RECTIFY + ("ptl.rectify_stages", "['stage1', 'stage2']"), "rectify stages 1 and 2 only"),
}


def _add_state_controls(labels):
    """The controls that isolate the state, for each of ``labels``: the same variant with its state reset before
    every step, and with stateless conv adapters of the cells' size instead of cells. Returns their names."""
    stateless, adapter = {}, {}
    for label in labels:
        opts = VARIANTS[label][1]
        stateless[label], adapter[label] = f"{label}-stateless", f"{label}-adapter"
        VARIANTS[stateless[label]] = (True, opts + STATELESS, f"{label}, state reset before every step")
        VARIANTS[adapter[label]] = (True, opts + ("ptl.cell_type", "conv"),
                                    f"{label} with plain conv adapters instead of cells (capacity-matched)")
    return stateless, adapter


STATELESS_OF, ADAPTER_OF = _add_state_controls(("branch", "rectify", "rectify-early"))
VARIANTS.update({
    "branch-maxpool": (True, BRANCH + ("ptl.side_pool", "max"), "branch, max-pooled side stream (reference)"),
    "branch-fan_in": (True, BRANCH + ("ptl.cell_init", "fan_in"), "branch, fan_in gate init (reference)"),
    "branch-block-tap": (True, BRANCH + ("ptl.stage3_tap", "first_block"),
                         "branch, stage-3 tap after its first block (reference)"),
    "concat-head": (True, BRANCH + ("ptl.head", "concat"),
                    "the reference's concat-and-reduce head (not function-preserving)"),
    "reference-as-run": (True, BRANCH + ("ptl.head", "concat", "ptl.side_pool", "max", "ptl.cell_init", "fan_in",
                                         "ptl.stage3_tap", "first_block") + STATELESS,
                         "the reference's choices with its state re-initialised before every forward"),
})

# The enlarged target domain: >= 200 test identities and >= 1000 fine-tuning steps at batch 32.
DEFAULT_SETS = ["data.synthetic.num_train_ids=160", "data.synthetic.num_test_ids=200", "data.height=64",
                "data.width=32"]
DEFAULT_PRETRAIN_SETS = ["data.height=64", "data.width=32"]


def spec_of(label, baseline):
    is_ptl, opts, note = VARIANTS[label]
    # Final evaluation only; the cost of intermediate evaluations would differ between variants.
    return ModelSpec(label, "ptl_" + baseline if is_ptl else baseline, tuple(opts) + ("test.eval_freq", "-1"),
                     note=note)


def fix_budget(base, min_steps):
    """Epochs so that every variant gets at least ``min_steps`` steps (LR steps scaled with them)."""
    engine = bench.spec_engine(base, ModelSpec("probe", base.model.name))
    per_epoch = len(engine.train_loader)
    epochs = max(1, math.ceil(min_steps / per_epoch))
    bench._set_epochs(base, epochs)
    return per_epoch, epochs, engine.datamanager


def direct_transfer(cfg, spec):
    """Rank-1 / mAP of the model before fine-tuning (epoch 0)."""
    engine = bench.spec_engine(cfg, spec)
    kwargs = engine_run_kwargs(cfg)
    engine.test(**bench._test_kwargs(kwargs))
    first = next(iter(engine.last_results.values()))
    return {"mAP": first["mAP"], "rank1": first["cmc"][1]}


def run_study(args):
    base = bench.finetune_base_config(args)
    baseline = base.model.name[len("ptl_"):] if base.model.name.startswith("ptl_") else base.model.name
    specs = [spec_of(v, baseline) for v in args.variants]
    load_start = bm.load_average()
    if args.pretrain_weights:
        weights, pre_cfg = args.pretrain_weights, None
    else:
        weights, pre_cfg = bench.pretrain(args, baseline)
    base.model.load_weights = weights
    per_epoch, epochs, dm = fix_budget(base, args.min_steps)
    test_loaders = dm.test_loader[base.data.targets[0]]
    n_query, n_gallery = len(test_loaders["query"].dataset), len(test_loaders["gallery"].dataset)
    print(f"budget: {epochs} epochs x {per_epoch} steps = {epochs * per_epoch} fine-tuning steps per variant; "
          f"{dm.num_train_pids} train ids, {n_query} query, {n_gallery} gallery", flush=True)

    t_start = time.perf_counter()
    runs = {s.label: [] for s in specs}
    epoch0 = {}
    seeds_done = []
    for i, seed in enumerate(args.seeds):
        elapsed = (time.perf_counter() - t_start) / 60
        if seeds_done and args.budget_minutes and elapsed + elapsed / len(seeds_done) > args.budget_minutes:
            print(f"stopping before seed {seed}: {elapsed:.0f} of {args.budget_minutes:.0f} budget minutes used",
                  flush=True)
            break
        order = specs if i % 2 == 0 else specs[::-1]
        for spec in order:
            save_dir = osp.join(args.work_dir, bench._slug(spec.label), f"seed{seed}")
            cfg = bench.spec_config(base, spec, **{"train.seed": seed, "data.save_dir": save_dir})
            if spec.label not in epoch0:
                with bench._quiet(osp.join(save_dir, "epoch0.log"), not args.verbose):
                    epoch0[spec.label] = direct_transfer(cfg, spec)
            run, engine = bench.train_run(cfg, spec, quiet=not args.verbose)
            first = next(iter(run["results"].values()))
            run.update(mAP=first["mAP"], rank1=first["cmc"][1], steps=len(run["iter_times"]))
            run.pop("results")
            run["iter_median"] = bm.median(run.pop("iter_times")[1:])
            if spec.label not in runs or not runs[spec.label]:
                run["flops"] = bm.train_and_inference_flops(engine.net, cfg.data.height, cfg.data.width)
                run["params"] = bm.count_params(engine.net)
            runs[spec.label].append(run)
            print(
                f"seed {seed} {spec.label:<18} mAP {100 * run['mAP']:5.1f}  Rank-1 {100 * run['rank1']:5.1f}  "
                f"{run['steps']} steps  step {run['iter_median']:.3f}s  ({run['wall_seconds']:.0f}s)",
                flush=True,
            )
        seeds_done.append(seed)
        write_outputs(
            args,
            make_report(
                args, base, weights, pre_cfg, epochs * per_epoch, seeds_done, epoch0, runs, load_start, t_start
            ),
        )
    return make_report(args, base, weights, pre_cfg, epochs * per_epoch, seeds_done, epoch0, runs, load_start, t_start)


def make_report(args, base, weights, pre_cfg, steps, seeds_done, epoch0, runs, load_start, t_start):
    return {
        "command": "python tools/benchmark_study.py " + " ".join(sys.argv[1:]),
        "machine": bm.machine_description(torch.device("cpu")),
        "load_average": [load_start, bm.load_average()],
        "pretrain_weights": weights,
        "pretrain_config": pre_cfg.dump() if pre_cfg else None,
        "finetune_config": base.dump(),
        "seeds": list(seeds_done),
        "steps_per_variant": steps,
        "variants": list(args.variants),
        "epoch0": epoch0,
        "runs": {k: [r for r in v if r["seed"] in seeds_done] for k, v in runs.items()},
        "minutes": (time.perf_counter() - t_start) / 60,
    }


def config_differences(dump_a, dump_b):
    """Keys whose values differ between two config dumps. A key in one dump only (an option the package gained
    between the two runs) counts only where its value there is not the package's default."""
    from functools import reduce

    from yacs.config import CfgNode

    from ptl_torchreid.config import config_keys, get_default_config

    def values(node):
        return {key: reduce(lambda n, part: n[part], key.split("."), node) for key in config_keys(node)}

    a, b = (values(CfgNode.load_cfg(dump)) for dump in (dump_a, dump_b))
    defaults = values(get_default_config())
    differing = []
    for key in sorted(set(a) | set(b)):
        if key in a and key in b:
            if a[key] != b[key]:
                differing.append(key)
        elif (a[key] if key in a else b[key]) != defaults.get(key, object()):
            differing.append(key)
    return differing


def reads_base_key(variant, key):
    """Whether ``variant`` trains with the base config's value of ``key``: not where it sets the key itself, nor for
    ``ptl.*`` keys in a variant without a PTL model. A difference no merged variant reads (the package's default
    PTL mode changed between two runs whose variants all name their mode) does not change the design."""
    is_ptl, overrides, _ = VARIANTS[variant]
    return key not in overrides[0::2] and (is_ptl or not key.startswith("ptl."))


class MergeError(ValueError):
    """Reports that cannot be joined into one paired study; the message names the file and what differs."""


def merge_reports(paths, variants=None):
    """One paired report from studies of the same design run as separate processes (one per core, or an ablation
    added later): each report holds some variants over some seeds, every (variant, seed) run comes from exactly one
    report, and together they must cover every variant on every seed, so each difference stays paired.
    ``variants``: merge only these (e.g. the variants that later runs added seeds to); default: all."""
    reports = [json.load(open(p)) for p in paths]
    first = reports[0]
    held = list(dict.fromkeys(v for r in reports for v in r["variants"]))
    if variants is not None:
        absent = [v for v in variants if v not in held]
        if absent:
            raise MergeError(f"--variants: no report holds {', '.join(absent)} (they hold {', '.join(held)})")
    variants = held if variants is None else list(variants)
    for other, path in zip(reports[1:], paths[1:]):
        differing = [key for key in config_differences(first["finetune_config"], other["finetune_config"])
                     if any(reads_base_key(v, key) for v in variants)]
        if differing:
            raise MergeError(f"{path}: fine-tuning config keys {', '.join(differing)} differ from {paths[0]}; only "
                             "studies of the same design merge")
        for key in ("pretrain_weights", "steps_per_variant"):
            if other[key] != first[key]:
                raise MergeError(f"{path}: '{key}' differs from {paths[0]}; only studies of the same design merge")
    cells, epoch0 = {}, {}
    for report, path in zip(reports, paths):
        epoch0.update({v: e for v, e in report["epoch0"].items() if v in variants and v not in epoch0})
        for variant, runs in report["runs"].items():
            if variant not in variants:
                continue
            for run in runs:
                key = (variant, run["seed"])
                if key in cells:
                    raise MergeError(f"{path}: {variant} seed {run['seed']} is in {cells[key][1]} too")
                cells[key] = (run, path)
    seeds = sorted({s for _, s in cells})
    missing = [f"{v} seed {s}" for v in variants for s in seeds if (v, s) not in cells]
    if missing:
        raise MergeError(f"no run of {', '.join(missing)}: every variant needs every seed for paired differences; "
                         "run the missing ones (--variants V --seeds S --json F) and merge their reports too")
    merged = dict(first, variants=variants, seeds=seeds, epoch0=epoch0)
    merged["runs"] = {v: [cells[(v, s)][0] for s in seeds] for v in variants}
    merged["command"] = (
        " && ".join(r["command"] for r in reports) + " && python tools/benchmark_study.py --merge " + " ".join(paths)
    )
    merged["minutes"] = sum(r["minutes"] for r in reports)
    merged["load_average"] = [max(r["load_average"][0] for r in reports), max(r["load_average"][1] for r in reports)]
    return merged


def write_outputs(args, report):
    text = study_markdown(report)
    if args.plots and report["runs"].get("plain"):  # a study without the baseline is plotted once merged
        text += f"\n\n![study]({osp.basename(plot_study(report, args.plots + '_delta.png'))})\n"
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(args.out + ".tmp", args.out)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(args.json + ".tmp", args.json)
    return text


def step_ratio(label, run_step, plain, interleaved):
    if interleaved and "plain" in interleaved:
        return br.fmt_ratio(interleaved[label], interleaved["plain"])
    return br.fmt_ratio(run_step, statistics.median([r["iter_median"] for r in plain])) if plain else "-"


def study_markdown(report):
    runs, seeds = report["runs"], report["seeds"]
    mAP = {k: [r["mAP"] for r in v] for k, v in runs.items()}
    r1 = {k: [r["rank1"] for r in v] for k, v in runs.items()}
    plain = runs.get("plain")
    ref_cost = plain[0] if plain else None
    interleaved = report.get("step_interleaved")  # preferred: comparable across processes and loads
    rows = []
    for label in report["variants"]:
        first = runs[label][0] if runs[label] else {}
        vs_plain = paired(mAP[label], mAP["plain"]) if plain and label != "plain" else None
        adapter, stateless = ADAPTER_OF.get(label), STATELESS_OF.get(label)
        vs_adapter = paired(mAP[label], mAP[adapter]) if adapter in runs and runs[adapter] else None
        vs_stateless = paired(mAP[label], mAP[stateless]) if stateless in runs and runs[stateless] else None
        e0 = report["epoch0"].get(label, {})
        step = statistics.median([r["iter_median"] for r in runs[label]]) if runs[label] else float("nan")
        rows.append(
            [
                label,
                br.fmt_mean_std(mAP[label]),
                br.fmt_mean_std(r1[label]),
                fmt_paired(vs_plain),
                fmt_paired(vs_stateless),
                fmt_paired(vs_adapter),
                f"{100 * e0.get('mAP', float('nan')):.1f} / {100 * e0.get('rank1', float('nan')):.1f}",
                step_ratio(label, step, plain, interleaved),
                br.fmt_ratio(first.get("flops", {}).get("inference"), ref_cost["flops"]["inference"])
                if ref_cost
                else "-",
                f"{first.get('params', float('nan')) / 1e6:.3f}",
                VARIANTS[label][2],
            ]
        )
    header = [
        "variant",
        "mAP (%)",
        "Rank-1 (%)",
        "Δ mAP vs plain [95% CI]",
        "Δ mAP vs stateless [95% CI]",
        "Δ mAP vs its adapter [95% CI]",
        "epoch 0 mAP / Rank-1",
        "train step vs plain",
        "inference FLOPs vs plain",
        "params (M)",
        "what",
    ]
    per_seed = [[label] + [f"{100 * v:.1f}" for v in mAP[label]] for label in report["variants"]]
    lines = [
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}; load average {report['load_average'][0]:.1f} at the start, "
        f"{report['load_average'][1]:.1f} at the end; {report['minutes']:.0f} minutes of runs (summed over merged "
        "processes).",
        f"Seeds {', '.join(map(str, seeds))} (paired: every variant starts from the same source model for each seed); "
        f"{report['steps_per_variant']} fine-tuning steps per variant.",
        "",
        br.markdown_table(header, rows),
        "",
        "Δ: mean of the per-seed mAP differences in points, with a 95% t-interval over seeds. 'stateless': the "
        "same variant with its state reset before every step and zero state in eval. 'its adapter': the "
        "same variant with stateless conv adapters of about the same size instead of cells. "
        + (
            f"Train step: median of {report['step_rounds']} training steps per variant on one real batch, the "
            f"variants alternating ({report['step_threads']} torch threads). "
            if interleaved
            else "Train step: median step time during the runs (sequential runs, so machine load shows here). "
        )
        + "Epoch 0: evaluated before fine-tuning (direct transfer).",
        "",
        "mAP per seed (%):",
        "",
        br.markdown_table(["variant"] + [f"seed {s}" for s in seeds], per_seed),
    ]
    return "\n".join(lines)


def plot_study(report, path):
    plt = br.pyplot()
    runs = report["runs"]
    labels = [v for v in report["variants"] if v != "plain" and runs.get(v)]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.4))
    for y, label in enumerate(labels[::-1]):
        p = paired([r["mAP"] for r in runs[label]], [r["mAP"] for r in runs["plain"]])
        if p is None:
            continue
        ax.errorbar(
            p["mean"], y, xerr=[[p["mean"] - p["ci"][0]], [p["ci"][1] - p["mean"]]], fmt="o", color="C0", capsize=3
        )
        ax.plot(p["diffs"], [y] * len(p["diffs"]), "k.", markersize=4)
    ax.axvline(0, color="C7", lw=1)
    ax.axvline(1.5, color="C3", lw=1, ls="--", label="target +1.5")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels[::-1], fontsize=8)
    ax.set_xlabel("mAP − plain fine-tuning (points): mean, 95% CI, seeds")
    ax.set_title("PTL variants vs plain fine-tuning (paired seeds)")
    ax.set_ylim(-0.5, len(labels) + 0.3)  # headroom above the first row, so the legend covers no data
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return br.save_figure(fig, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=bench.SYNTHETIC_FINETUNE_CONFIG, help="fine-tuning config")
    p.add_argument("--pretrain-config", default=bench.SYNTHETIC_PRETRAIN_CONFIG, help="source-domain config")
    p.add_argument("--root", default="log/study-data", help="dataset root (the enlarged target lives here)")
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                   help="variants to run (default: plain branch rectify); with --merge, the ones to merge "
                        "(default: every one in the reports)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--min-steps", type=int, default=1000, help="fine-tuning steps every variant gets at least")
    p.add_argument("--budget-minutes", type=float, default=0, help="stop before a seed that would exceed this")
    p.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help=f"fine-tuning overrides (default: {' '.join(DEFAULT_SETS)})",
    )
    p.add_argument(
        "--pretrain-set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help=f"pretraining overrides (default: {' '.join(DEFAULT_PRETRAIN_SETS)})",
    )
    p.add_argument("--pretrain-epochs", type=int, default=None)
    p.add_argument(
        "--pretrain-weights",
        default=None,
        help="start from these source weights (e.g. another study's cached pretraining) instead",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--work-dir", default="log/study")
    p.add_argument("--out", default=None, help="Markdown report")
    p.add_argument("--json", default=None, help="all measurements")
    p.add_argument("--plots", default=None, help="plot prefix: <prefix>_delta.png")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="merge the --json reports of one study's runs split over processes (each variant-seed run in "
             "exactly one report, every variant on every seed); write --out/--json/--plots",
    )
    p.add_argument(
        "--step-rounds",
        type=int,
        default=0,
        help="after the study (or --merge), time this many training steps of every variant, interleaved, for the "
             "train-step column",
    )
    p.add_argument("--verbose", action="store_true")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for both stages")
    args = p.parse_args(argv)
    if args.variants is None and not args.merge:
        args.variants = ["plain", "branch", "rectify"]
    args.set = DEFAULT_SETS if args.set is None else args.set
    args.pretrain_set = DEFAULT_PRETRAIN_SETS if args.pretrain_set is None else args.pretrain_set
    # what benchmark.py's pretraining and base-config helpers read
    args.sources = args.targets = None
    args.epochs, args.eval_freq, args.cmc_rank, args.pretrain_init = None, -1, 20, None
    return args


def interleaved_step_seconds(report, rounds, work_dir):
    """Median seconds of one training step (forward, loss, backward, optimizer step) of each variant of
    ``report``, built from its fine-tuning config and timed alternately on one real batch each, so that machine
    load hits all alike. The step times of the runs do not compare across processes or machine loads."""
    from yacs.config import CfgNode

    from ptl_torchreid.config import get_default_config

    base = get_default_config()
    base.merge_from_other_cfg(CfgNode.load_cfg(report["finetune_config"]))  # an older dump: today's defaults fill in
    baseline = base.model.name[len("ptl_"):] if base.model.name.startswith("ptl_") else base.model.name
    tasks = {}
    for label in report["variants"]:
        spec = spec_of(label, baseline)
        cfg = bench.spec_config(base, spec, **{"data.save_dir": osp.join(work_dir, "step_costs", bench._slug(label))})
        with bench._quiet(osp.join(cfg.data.save_dir, "build.log"), True):
            engine = bench.spec_engine(cfg, spec)
        tasks[label] = bench._train_step_task(engine, next(iter(engine.train_loader)))
    print(f"timing {rounds} training steps of {len(tasks)} variants, interleaved ...", flush=True)
    times = bm.interleaved(tasks, rounds=rounds, warmup=1)
    return {label: bm.median(t) for label, t in times.items()}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.merge:
        try:
            report = merge_reports(args.merge, args.variants)
        except (MergeError, OSError, json.JSONDecodeError) as e:  # the message names the report file
            print(f"benchmark_study.py: error: {e}", file=sys.stderr)
            return 2
    else:
        os.makedirs(args.work_dir, exist_ok=True)
        report = run_study(args)
    if args.step_rounds:
        report["step_interleaved"] = interleaved_step_seconds(report, args.step_rounds, args.work_dir)
        report["step_rounds"], report["step_threads"] = args.step_rounds, args.threads
    print("\n" + write_outputs(args, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
