"""Benchmark COP pruning: real CPU speed-up at a FLOP target, peers at equal FLOPs, PTL at baseline cost.

    PYTHONPATH=. python tools/benchmark_prune.py                # all sections, markdown tables on stdout
    PYTHONPATH=. python tools/benchmark_prune.py --rounds 7 --threads 2 --out bench_prune.md

Section 1 prunes ResNet-50 (torchreid, random weights: latency does not depend on the values) to a 50% FLOP
reduction with COP's presets and, when the ``torch-pruning`` package is installed, with Torch-Pruning's global
magnitude (L1) and random pruning to the same FLOPs (bisection on its channel ratio); then it measures the CPU
embedding latency of every model at batch 32, 256x128, in interleaved rounds (one forward of each model per
round, so load from other processes hits all of them alike). FLOPs come from torch.utils.flop_counter.
Section 2 prunes ptl_resnet50 down to ResNet-50's FLOPs ("PTL at baseline cost").

``--accuracy`` adds section 3, accuracy on the synthetic transfer pair with the training engine (CPU: set
OMP_NUM_THREADS=1 on a shared machine; about an hour on one core):

    OMP_NUM_THREADS=1 PYTHONPATH=. python tools/benchmark_prune.py --accuracy --work-dir log/bench_prune

ResNet-50 (``--accuracy-arch``) is trained on synthetic_source (or starts from ``--source-weights``, e.g. the
model-zoo osnet_x0_25 MSMT17 weights with ``--accuracy-arch osnet_x0_25``); then, with the same fine-tuning
budget on synthetic_target, the unpruned model, COP (faster, balanced) and Torch-Pruning L1 / random at equal
FLOPs (50% at 128x64) are fine-tuned and evaluated (Rank-1, mAP). For "PTL at baseline cost", the PTL model
(backbone from the same source model; its mode from ``--ptl-mode``) is trained on synthetic_target, pruned to the
plain model's FLOPs and fine-tuned again, without (row ``ptl``) and with (row ``ptl+kd``) distillation from the
unpruned PTL model it was cut from; ``--ptl-side-weights`` prunes it once per weight on the side stream's
importance (``prune_cop``'s ``importance_weights``; its default for PTL models unless given). Row ``ptl_first``
prunes the PTL model before its fine-tuning instead, and gives it the plain model's budget.

Each accuracy row records the architecture its first seed's model ended with (channel counts, in the results
file). ``--latency-of`` times those architectures against the unpruned model as section 1 does, e.g. the models
an iterative schedule leaves, which section 1's random-weight cuts do not show:

    PYTHONPATH=. python tools/benchmark_prune.py --latency-of log/bench_prune/accuracy.json --threads 1 2
"""
import argparse
import copy
import os
import os.path as osp
import sys
import time
import warnings
from math import nan

import ptl_torchreid  # noqa: F401  (before torch: the package sets OpenMP waiting, see _openmp.py)

# isort: split
import torch

from ptl_torchreid import _torchreid
from ptl_torchreid.benchmarking.measure import cpu_model, load_average
from ptl_torchreid.benchmarking.pruning import prune_cop_to_target
from ptl_torchreid.benchmarking.report import mean_std
from ptl_torchreid.compress import (
                                    SIDE_STREAM,
                                    build_graph,
                                    build_pruned_architecture,
                                    compare_latency,
                                    count_flops,
                                    count_params,
                                    make_pruning_info,
                                    prune_cop,
)
from ptl_torchreid.compress.cop import COMPENSATIONS, DEFAULT_SIDE_STREAM_WEIGHT, step_reductions, variant_name
from ptl_torchreid.compress.scores import CRITERIA, DATA_CRITERIA
from ptl_torchreid.engine import build_datamanager, build_engine, run
from ptl_torchreid.engine.distill import Distillation
from ptl_torchreid.models import MODES, build_model, is_ptl, load_pretrained_weights


class BenchmarkError(ValueError):
    """Rows that cannot run or result files that cannot join; the message names the option or file."""


def _load():
    return f"{load_average():.2f}"


def _torch_pruning_to_flops(model, target_flops, input_size, importance, round_to=None, tol=0.003,
                            before_step=None):
    """Torch-Pruning global pruning of a copy of ``model`` whose FLOPs land just under ``target_flops``;
    ``before_step(net)`` runs before each pruning step (e.g. to compute the gradients Taylor importance reads)."""
    import torch_pruning as tp

    def prune(ratio):
        net = copy.deepcopy(model).eval()
        # Same constraint as COP: the layers producing the embedding, and the classifier, keep their width.
        graph = build_graph(net, input_size)
        ignored = [net.classifier] + [r.module for g in graph.groups if g.frozen and "output" in g.frozen
                                      for r in g.producers]
        pruner = tp.pruner.MetaPruner(net, torch.randn(1, 3, *input_size), importance=importance,
                                      global_pruning=True, pruning_ratio=ratio, ignored_layers=ignored,
                                      round_to=round_to)
        if before_step is not None:
            before_step(net)
        pruner.step()
        return net, count_flops(net, input_size)

    lo, hi = 0.0, 0.95
    best = None
    for _ in range(25):
        mid = (lo + hi) / 2
        torch.manual_seed(0)  # random importance: the same draw for every ratio
        net, flops = prune(mid)
        if flops <= target_flops:
            best, hi = (net, flops), mid
            if flops >= target_flops * (1 - tol):
                break
        else:
            lo = mid
    return best[0]


# -- accuracy (section 3) ---------------------------------------------------------------------------------------
CONFIGS = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), "configs")


def recipe(arch):
    """(source config, target config) of ``arch``'s synthetic transfer pair: its own recipe where configs/ has one
    (ResNet-50: softmax, Adam 3e-4 at 64x32, on which it learns), else OSNet's (softmax + triplet, Adam 1e-3,
    128x64)."""
    own = [osp.join(CONFIGS, f"{arch}_synthetic_source{tail}.yaml") for tail in ("", "_to_target")]
    if all(osp.isfile(p) for p in own):
        return tuple(own)
    return tuple(osp.join(CONFIGS, f"osnet_x0_25_synthetic_source{tail}.yaml") for tail in ("", "_to_target"))


def _config(path, root, save_dir, epochs, arch, seed=None, evaluate=False):
    from ptl_torchreid.config import load_config

    opts = ["model.name", arch, "data.root", root, "data.save_dir", save_dir, "train.max_epoch", str(epochs),
            "train.stepsize", str([max(1, int(epochs * 0.75))]), "train.progress_bar", "False",
            "model.load_weights", "", "test.evaluate", str(bool(evaluate))]
    if seed is not None:
        opts += ["train.seed", str(seed)]
    return load_config(path, opts)


def _train(cfg, model, teacher=None):
    """Train ``model`` with the engine as ``cfg`` says (or only evaluate it, with ``test.evaluate``) and return
    its results on the first target; ``teacher``: distil this model's features during the training."""
    _torchreid.torchreid.utils.set_random_seed(cfg.train.seed)
    dm = build_datamanager(cfg)
    if model.classifier.out_features != dm.num_train_pids:  # new identities: new classifier
        model.classifier = torch.nn.Linear(model.classifier.in_features, dm.num_train_pids)
        torch.nn.init.normal_(model.classifier.weight, 0, 0.01)
        torch.nn.init.zeros_(model.classifier.bias)
    engine = build_engine(cfg, dm, model)
    hooks = [Distillation(teacher, feature_weight=1.0)] if teacher is not None else []
    t = time.perf_counter()
    results = run(cfg, hooks=hooks, engine=engine)
    res = next(iter(results.values()))
    return dict(rank1=res["cmc"][1], mAP=res["mAP"], minutes=(time.perf_counter() - t) / 60)


# A pruned row's key is its variant name: criterion, the compensation ('+bn', '+ls' or '+bn+ls'), '+kd' for
# distillation, and '+steps<k>' for the iterative schedule (k cuts, the fine-tuning budget split between them). The
# default rows; every other criterion[+compensation][+kd][+steps<k>] combination can be asked for by name.
# The default rows: every criterion without and with the default compensation, distillation and the iterative
# schedule on the default, Torch-Pruning's criteria, PTL at baseline cost.
ACCURACY_ROWS = ("baseline", "cop", "cop+bn+ls", "cop_magnitude", "cop_magnitude+bn+ls", "magnitude", "magnitude+bn+ls",
                 "cop_activation", "cop_activation+bn+ls", "taylor", "taylor+bn+ls", "magnitude+bn+ls+kd",
                 "magnitude+bn+ls+steps3", "tp_l1", "tp_taylor", "tp_random", "ptl", "ptl+kd")
# 'ptl': PTL at baseline cost, pruned with the default criterion and compensation; 'ptl+kd': the same pruned model
# also distilled from the unpruned PTL model it was cut from (the prune command's default recovery); 'ptl_first':
# the PTL model pruned before its fine-tuning, which then gets the plain rows' budget (not a default row).
PTL_ROWS = ("ptl", "ptl+kd", "ptl_first")
VALID_ROWS = ("baseline", "tp_l1", "tp_taylor", "tp_random") + PTL_ROWS + tuple(
    variant_name(c, comp, kd) + tail for c in CRITERIA for comp in COMPENSATIONS for kd in (False, True)
    for tail in ("", "+steps2", "+steps3", "+steps4"))
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def _calibration_batch(root, work, arch, count=64):
    """The first ``count`` training images of synthetic_target (the fine-tuning data) as the train loader gives
    them, with their identities."""
    cfg = _config(recipe(arch)[1], root, osp.join(work, "calibration"), 0, arch)
    _torchreid.torchreid.utils.set_random_seed(0)
    imgs, pids = [], []
    for batch in build_datamanager(cfg).train_loader:
        imgs.append(batch["img"])
        pids.append(batch["pid"])
        if sum(len(i) for i in imgs) >= count:
            break
    return torch.cat(imgs)[:count], torch.cat(pids)[:count]


def _taylor_gradients(images, pids):
    """For Torch-Pruning's Taylor importance: gradients of the fine-tuning's triplet loss (hard mining, margin
    0.3) on the calibration images."""
    triplet = _torchreid.torchreid.losses.TripletLoss(margin=0.3)

    def compute(net):
        net.zero_grad()
        net.eval()
        triplet(net(images), pids).backward()
    return compute


def paired_difference(values, reference):
    """Mean and 95% t-interval half-width of the per-seed differences ``values - reference`` (dicts seed -> value);
    (nan, nan) without common seeds."""
    import math

    seeds = sorted(set(values) & set(reference))
    diffs = [values[s] - reference[s] for s in seeds]
    mean, std = mean_std(diffs)
    if len(diffs) < 2:
        return mean, float("nan")
    return mean, T95.get(len(diffs), 1.96) * std / math.sqrt(len(diffs))


def accuracy_table(results, size=(128, 64)):
    """Markdown rows for the accuracy results (list of dicts in run order), with the paired differences to L1
    and to the unpruned model."""
    def seed_maps(row):
        return {int(k): v for k, v in row["mAP"].items()}

    references = [next((r for r in results if r["key"] == key), None) for key in ("tp_l1", "baseline")]
    lines = [f"| model | variant | GFLOPs ({size[0]}x{size[1]}) | params (M) | Rank-1 before | mAP before | Rank-1 "
             "| mAP | mAP - L1 (paired, 95% CI) | mAP - unpruned (paired, 95% CI) | mAP by seed | train min / seed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        maps = seed_maps(r)
        (r_m, r_s), (m_m, m_s) = mean_std(list(r["rank1"].values())), mean_std(list(maps.values()))
        diffs = []
        for reference in references:
            diff = "-"
            if reference is not None and r is not reference:
                d, ci = paired_difference(maps, seed_maps(reference))
                diff = f"{d:+.1f} ± {ci:.1f}"
            diffs.append(diff)
        # No 'before' for the unpruned PTL parent; nothing but 'before' with --before-only
        before = "- | -" if r["before"] is None else f"{r['before'][0]:.1f} | {r['before'][1]:.1f}"
        if not maps:
            lines.append(f"| {r['name']} | {r['variant']} | {r['gflops']:.4f} | {r['mparams']:.3f} | {before} | "
                         "- | - | - | - | - | - |")
            continue
        lines.append(f"| {r['name']} | {r['variant']} | {r['gflops']:.4f} | {r['mparams']:.3f} | {before} | {r_m:.1f} "
                     f"± {r_s:.1f} | {m_m:.1f} ± {m_s:.1f} | {' | '.join(diffs)} | "
                     f"{' '.join(f'{s}:{maps[s]:.1f}' for s in sorted(maps))} | {r['minutes']:.1f} |")
    return lines


def accuracy_section(args):
    import json

    from ptl_torchreid.compress.cop import DEFAULT_COMPENSATE, DEFAULT_CRITERION
    from ptl_torchreid.config import load_config

    arch, work, root = args.accuracy_arch, args.work_dir, osp.join(args.work_dir, "reid-data")
    source_config, target_config = recipe(arch)
    target_cfg = load_config(target_config)
    size = (target_cfg.data.height, target_cfg.data.width)
    losses = "triplet + softmax" if target_cfg.loss.name == "triplet" else target_cfg.loss.name
    seeds = args.seeds
    threads = torch.get_num_threads()
    machine = run_setting(threads)
    rows = args.rows or ACCURACY_ROWS
    unknown = sorted(set(rows) - set(VALID_ROWS))
    if unknown:
        raise BenchmarkError(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(VALID_ROWS)}")
    if any(w < 0 for w in args.ptl_side_weights):
        raise BenchmarkError(f"--ptl-side-weights {' '.join(f'{w:g}' for w in args.ptl_side_weights)}: use numbers "
                             ">= 0 (1: not weighted)")
    if args.ptl_side_weights != [DEFAULT_SIDE_STREAM_WEIGHT] and not set(rows) & set(PTL_ROWS):
        raise BenchmarkError(f"--ptl-side-weights weights the 'ptl' rows' pruning; add --rows {' '.join(PTL_ROWS)}")
    source_ckpt = args.source_weights
    origin = f"given weights {osp.basename(source_ckpt)}" if source_ckpt else \
        f"trained {args.source_epochs} epochs on synthetic_source"
    lines = [f"## Accuracy after fine-tuning on synthetic_target ({arch}, {size[0]}x{size[1]})", "",
             f"Source model: {arch} ({origin}); every model below then gets the same budget of {args.target_epochs} "
             f"epochs on synthetic_target ({losses}, {target_cfg.train.optim} {target_cfg.train.lr:g}, the "
             f"recipe of configs/{osp.basename(target_config)}), once per fine-tuning seed "
             f"({', '.join(map(str, seeds))}), and is evaluated on its query/gallery. Pruned models are cut from the "
             f"source model to 50% of its FLOPs at {size[0]}x{size[1]} with COP's 'faster' preset and the criterion in "
             "the variant column (Torch-Pruning bisected to the FLOPs of COP's paper mode), then fine-tuned. "
             f"Data-aware criteria and compensation use the first {args.calibration_images} training images of "
             "synthetic_target ('+bn': BatchNorm statistics re-estimated on them; '+ls': least-squares refit of the "
             "layers reading pruned channels; '+bn+ls': the refit under the images' own BatchNorm statistics); '+kd' "
             "adds feature distillation from the unpruned model fine-tuned with the same seed. Pruning is "
             "deterministic, so the seeds vary the fine-tuning only (for PTL at baseline cost, each seed's PTL "
             "model is pruned, so they vary the parent too). 'before': the pruned model "
             "right after pruning and compensation, without fine-tuning. Computed with "
             f"{threads} torch CPU thread{'s' if threads > 1 else ''}: {machine['cpu']}, {machine['kernels']} "
             f"kernels, torch {machine['torch']}. A seed's result repeats bit for bit only with the same thread "
             "count, CPU kernels and torch (another one rounds the sums differently, and the fine-tuning amplifies "
             "that).", ""]
    if not source_ckpt:
        cfg = _config(source_config, root, osp.join(work, "source"), args.source_epochs, arch)
        torch.manual_seed(0)
        _train(cfg, build_model(arch, num_classes=1, loss=cfg.loss.name))
        source_ckpt = osp.join(work, "source", "model", "model-best.pth.tar")
    images, pids = _calibration_batch(root, work, arch, args.calibration_images)
    results, teachers = [], {}
    out_json = args.results_json or osp.join(work, "accuracy.json")

    def source_model():
        m = build_model(arch, num_classes=1, loss=target_cfg.loss.name)
        load_pretrained_weights(m, source_ckpt)
        return m.eval()

    def architecture(model):
        """What ``--latency-of`` rebuilds ``model`` from: its channel counts and the name that builds it."""
        return make_pruning_info(model, ("ptl_" if is_ptl(model) else "") + arch)

    def finetune(key, name, variant, make_model, tag, epochs=None, before=True, teacher=None):
        """Fine-tune a fresh ``make_model(seed)`` once per seed; returns the trained models by seed. ``teacher``:
        the model to distil from, by seed."""
        trained, rank1, mAP, minutes = {}, {}, {}, []
        pre = None
        if before:
            cfg = _config(target_config, root, osp.join(work, tag + "_before"), 0, arch, evaluate=True)
            res = _train(cfg, make_model(seeds[0]))
            pre = (res["rank1"] * 100, res["mAP"] * 100)
        for seed in ([] if args.before_only else seeds):
            # Seeded before the model is built: what the source weights leave to initialise (a PTL side stream)
            # must not depend on the rows run before this one in the process.
            _torchreid.torchreid.utils.set_random_seed(seed)
            model = make_model(seed)
            cfg = _config(target_config, root, osp.join(work, f"{tag}_seed{seed}"),
                          epochs or args.target_epochs, arch, seed=seed)
            res = _train(cfg, model, teacher=None if teacher is None else teacher[seed])
            rank1[seed], mAP[seed] = res["rank1"] * 100, res["mAP"] * 100
            minutes.append(res["minutes"])
            trained[seed] = model
        first = trained[seeds[0]] if trained else make_model(seeds[0])
        record(dict(key=key, name=name, variant=variant, gflops=count_flops(first, size) / 1e9,
                    mparams=count_params(first) / 1e6, before=pre, rank1=rank1, mAP=mAP,
                    minutes=sum(minutes) / len(minutes) if minutes else 0.0,
                    architecture=architecture(first)))
        return trained

    def record(result):
        results.append(result)
        with open(out_json, "w") as f:
            json.dump(dict(header=lines, results=results, size=size, **machine), f, indent=1)
        print("\n".join(accuracy_table(results, size)), flush=True)

    def iterative(key, criterion, compensate, calibration, steps, round_to, teacher):
        """The iterative schedule: ``steps`` cuts, each to its share of the 50% reduction, each followed by its
        share of the same fine-tuning budget (as ``prune --steps``)."""
        rank1, mAP, minutes, first = {}, {}, [], None
        for seed in ([] if args.before_only else seeds):
            model, epochs_left, t = source_model(), args.target_epochs, time.perf_counter()
            for step, reduction in enumerate(step_reductions(0.5, steps)):
                model, _ = prune_cop_to_target(model, size, reduction=reduction, preset="faster", round_to=round_to,
                                               criterion=criterion, compensate=compensate, calibration=calibration)
                epochs = epochs_left // (steps - step)
                epochs_left -= epochs
                cfg = _config(target_config, root, osp.join(work, f"{key.replace('+', '_')}_seed{seed}_step{step}"),
                              epochs, arch, seed=seed)
                res = _train(cfg, model, teacher=None if teacher is None else teacher[seed])
            rank1[seed], mAP[seed] = res["rank1"] * 100, res["mAP"] * 100
            minutes.append((time.perf_counter() - t) / 60)
            # Each seed's fine-tuning between the cuts leads to other channel counts: the first seed's stand for
            # the row, as in the one-shot rows.
            if first is None:
                first = model
        name = f"COP faster, {criterion}, {steps} steps of pruning and fine-tuning (round_to={round_to})"
        cost = (count_flops(first, size) / 1e9, count_params(first) / 1e6) if first is not None else (nan, nan)
        record(dict(key=key, name=name, variant=key, gflops=cost[0], mparams=cost[1], before=None,
                    rank1=rank1, mAP=mAP, minutes=sum(minutes) / len(minutes) if minutes else 0.0,
                    architecture=architecture(first) if first is not None else None))

    if "baseline" in rows:
        teachers = finetune("baseline", f"{arch} (unpruned)", "-", lambda seed: source_model(), "baseline")
    paper, round_to = prune_cop_to_target(source_model(), size, preset="faster", criterion="cop")
    target = count_flops(paper, size)
    for key in rows:
        if key == "baseline" or key in PTL_ROWS or key.startswith("tp_"):
            continue
        criterion, *extras = key.split("+")
        compensate = "+".join(e for e in ("bn", "ls") if e in extras) or "none"
        kd = "kd" in extras
        steps = next((int(e[len("steps"):]) for e in extras if e.startswith("steps")), 1)
        if kd and not teachers:
            raise BenchmarkError(f"--rows {key} needs the baseline row in the same run (its models are the teachers)")
        calibration = images if compensate != "none" or criterion in DATA_CRITERIA else None
        if steps > 1:
            iterative(key, criterion, compensate, calibration, steps, round_to, teachers if kd else None)
            continue
        t = time.perf_counter()
        pruned, used = prune_cop_to_target(source_model(), size, preset="faster", round_to=round_to,
                                           criterion=criterion, compensate=compensate, calibration=calibration)
        seconds = time.perf_counter() - t
        paper_tag = " (paper)" if criterion == "cop" else ""
        name = f"COP faster, {criterion}{paper_tag} (round_to={used}, pruning {seconds:.0f} s)"
        finetune(key, name, variant_name(criterion, compensate, kd), lambda seed, pruned=pruned: copy.deepcopy(pruned),
                 key.replace("+", "_"), teacher=teachers if kd else None)
    peers = [k for k in rows if k.startswith("tp_")]
    if peers:
        import torch_pruning as tp

        importances = {"tp_l1": ("Torch-Pruning L1 (global)", tp.importance.MagnitudeImportance(p=1), None),
                       "tp_taylor": ("Torch-Pruning Taylor (global)", tp.importance.TaylorImportance(),
                                     _taylor_gradients(images, pids)),
                       "tp_random": ("Torch-Pruning random (global)", tp.importance.RandomImportance(), None)}
        for key in peers:
            name, imp, before_step = importances[key]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = _torch_pruning_to_flops(source_model(), target, size, imp, before_step=before_step)
            finetune(key, name, key, lambda seed, net=net: copy.deepcopy(net), key)

    ptl_rows = [k for k in rows if k in PTL_ROWS]
    if ptl_rows:
        # PTL at baseline cost: the PTL model trained on the target with each seed, each seed's model pruned to the
        # plain model's FLOPs with the default criterion and compensation, then fine-tuned again with that seed
        # (so the seeds vary the parent too, and pair with the plain model's seeds); 'ptl_first' prunes the PTL
        # model as built instead (source backbone, side stream from the seed) and gives it the plain rows' budget.
        base_flops = count_flops(source_model(), size)
        options = {"mode": args.ptl_mode} if args.ptl_mode else {}

        def ptl_model():
            ptl = build_model("ptl_" + arch, num_classes=1, loss=target_cfg.loss.name, input_size=size, **options)
            load_pretrained_weights(ptl, source_ckpt)  # the plain source model goes into the PTL backbone
            return ptl

        def cut(model, weights):
            return prune_cop_to_target(model, size, reduction=1 - base_flops / count_flops(model, size),
                                       preset="faster", calibration=images, importance_weights=weights)[0]

        mode = ptl_model().mode
        after = [k for k in ptl_rows if k != "ptl_first"]
        parents = {}
        if after:
            parents = finetune(f"ptl_{mode}", f"ptl_{arch} ({mode}, unpruned)", "-", lambda seed: ptl_model(),
                               f"ptl_{mode}", before=False)
            parents = parents or {seeds[0]: ptl_model()}  # --before-only: the PTL model as built
        extra = max(1, args.target_epochs // 2)
        for side in args.ptl_side_weights:
            # side: the factor on the side stream's importance in the global ranking (1: not weighted)
            weights = {} if side == 1 else {SIDE_STREAM: side}
            tail, said = ("", "") if side == 1 else (f"_side{side:g}", f", side stream weighted x{side:g}")
            pruned = {seed: cut(parent, weights) for seed, parent in parents.items()}
            for key in after:
                kd = key.endswith("+kd")
                tag = f"ptl_{mode}_pruned" + ("_kd" if kd else "") + tail
                finetune(f"ptl_{mode}_pruned{tail}" + ("+kd" if kd else ""),
                         f"ptl_{arch} ({mode}) pruned to {arch}'s FLOPs{said} (+{extra} epochs)",
                         variant_name(DEFAULT_CRITERION, DEFAULT_COMPENSATE, kd),
                         lambda seed, pruned=pruned: copy.deepcopy(pruned[seed]), tag, extra,
                         teacher=parents if kd else None)
            if "ptl_first" in ptl_rows:
                finetune(f"ptl_{mode}_first{tail}",
                         f"ptl_{arch} ({mode}) pruned to {arch}'s FLOPs before fine-tuning{said}",
                         variant_name(DEFAULT_CRITERION, DEFAULT_COMPENSATE),
                         lambda seed, weights=weights: cut(ptl_model(), weights), f"ptl_{mode}_first{tail}")
    return lines + accuracy_table(results, size) + [""]


def latency_section(paths, size, batch_size, rounds, threads):
    """Latency of the architectures the accuracy rows ended with (their first seed's channel counts, from
    ``--results-json`` files), rebuilt with fresh weights and timed against the unpruned model at ``size``."""
    import json

    rows, missing = {}, []
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["results"]:
                if not r.get("architecture"):
                    missing.append(f"{r['key']} ({path})")
                elif r["key"] not in rows:
                    rows[r["key"]] = r
    if not rows:
        raise BenchmarkError(f"--latency-of: no row in {', '.join(map(str, paths))} records its architecture (files "
                             "written before rows recorded it); run the rows again")
    # The plain model's name (PTL rows' models are 'ptl_' + it): one reference, so one model family
    archs = {r["architecture"]["arch"].removeprefix("ptl_") for r in rows.values()}
    if len(archs) > 1:
        raise BenchmarkError(f"--latency-of: the files hold rows of {', '.join(sorted(archs))}; time one model's "
                             "rows at a time")
    arch = archs.pop()
    models = {} if "baseline" in rows else {f"{arch} (unpruned)": build_model(arch, num_classes=1).eval()}
    for key, r in rows.items():
        info = dict(r["architecture"])
        if info.get("build_kwargs", {}).get("input_size"):  # PTL cells are built for an input size: the timed one
            info["build_kwargs"] = dict(info["build_kwargs"], input_size=list(size))
        models[key] = build_pruned_architecture(info, f"row '{key}'").eval()
    reference = "baseline" if "baseline" in rows else f"{arch} (unpruned)"
    lats = {t: compare_latency(models, size, batch_size, rounds=rounds, num_threads=t) for t in threads}
    lines = [f"## Latency of the accuracy rows' architectures ({arch})", "",
             "Each row's model as it ended its first seed (channel counts; fresh weights, as latency does not depend "
             f"on them), timed against the unpruned {arch}.", ""]
    lines += _table(models, lats, reference, count_flops(models[reference], size), size, threads)
    if missing:
        lines += ["", "Rows without a recorded architecture, not timed: " + ", ".join(missing) + "."]
    return lines + [""]


def _table(models, lats, base_name, base_flops, size, threads):
    """Markdown table: cost columns, then latency and speed-up (vs ``base_name``) per thread count; with one
    thread also the speed-up in process CPU time, which load from other processes does not distort."""
    head = "| model | GFLOPs | FLOP reduction | params (M) |"
    sep = "|---|---|---|---|"
    for t in threads:
        head += f" latency {t} thr. (s) | speed-up {t} thr. |"
        sep += "---|---|"
        if t == 1:
            head += " speed-up 1 thr. (CPU time) |"
            sep += "---|"
    rows = [head, sep]
    for name, model in models.items():
        flops = count_flops(model, size)
        row = f"| {name} | {flops / 1e9:.2f} | {1 - flops / base_flops:.1%} | {count_params(model) / 1e6:.2f} |"
        for t in threads:
            lat, base = lats[t][name], lats[t][base_name]
            row += f" {lat['median']:.3f} | {base['median'] / lat['median']:.2f}x |"
            if t == 1:
                row += f" {base['cpu_median'] / lat['cpu_median']:.2f}x |"
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduction", type=float, default=0.5, help="FLOP reduction of section 1")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts to measure with (default: 1 and torch's default)")
    parser.add_argument("--no-peers", action="store_true", help="skip the Torch-Pruning comparison")
    parser.add_argument("--skip-ptl", action="store_true", help="skip section 2")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    parser.add_argument("--accuracy", action="store_true", help="add section 3: accuracy after fine-tuning")
    parser.add_argument("--only-accuracy", action="store_true", help="run section 3 only")
    parser.add_argument("--work-dir", default="log/bench_prune", help="data and checkpoints of section 3")
    parser.add_argument("--accuracy-arch", default="resnet50", help="model of section 3 (torchreid name)")
    parser.add_argument("--source-weights", default="",
                        help="start section 3 from these weights instead of training on synthetic_source")
    parser.add_argument("--source-epochs", type=int, default=20)
    parser.add_argument("--target-epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="section 3: fine-tuning seeds")
    parser.add_argument("--rows", nargs="+", default=None,
                        help=f"section 3: rows to run (default: {' '.join(ACCURACY_ROWS)})")
    parser.add_argument("--ptl-mode", choices=MODES, default=None,
                        help="section 3: mode of the PTL models of the 'ptl' rows (default: the models' default)")
    parser.add_argument("--ptl-side-weights", type=float, nargs="+", default=[DEFAULT_SIDE_STREAM_WEIGHT],
                        metavar="W",
                        help="section 3: prune the 'ptl' rows' models once per weight on the side stream's importance "
                             "(below 1 the side stream is cut first, 0 to its floor, 1 not weighted; default "
                             f"{DEFAULT_SIDE_STREAM_WEIGHT:g}, prune_cop's default for PTL models)")
    parser.add_argument("--calibration-images", type=int, default=64,
                        help="section 3: training images for the data-aware criteria and compensation")
    parser.add_argument("--results-json", default="", help="section 3: per-seed results (default in --work-dir)")
    parser.add_argument("--before-only", action="store_true",
                        help="section 3: prune and evaluate without fine-tuning (the 'before' columns only)")
    parser.add_argument("--latency-of", nargs="+", default=None, metavar="JSON",
                        help="only time the architectures the accuracy rows of these --results-json files ended with, "
                             "at --height x --width, against the unpruned model")
    parser.add_argument("--report", nargs="+", default=None,
                        help="only print one accuracy table from these --results-json files (runs split over "
                             "processes)")
    args = parser.parse_args(argv)
    if args.report:
        return merged_report(args.report)
    size = (args.height, args.width)
    threads = args.threads or sorted({1, torch.get_num_threads()})
    lines = ["# COP pruning benchmark", "",
             f"{cpu_model() or 'unknown CPU'}, {os.cpu_count()} cores visible, torch {torch.__version__}; load average "
             f"at start {_load()}."]

    if args.only_accuracy:
        lines += [""] + accuracy_section(args)
        return _emit(lines, args)
    lines += [f"Latency: median over {args.rounds} interleaved rounds of an eval-mode embedding of a batch of "
              f"{args.batch_size} at {size[0]}x{size[1]}, with {' and '.join(map(str, threads))} torch threads; "
              "speed-up = ratio of medians.", ""]
    if args.latency_of:
        lines += latency_section(args.latency_of, size, args.batch_size, args.rounds, threads)
        return _emit(lines, args)

    # -- section 1 ----------------------------------------------------------------------------------------------
    torch.manual_seed(0)
    base = build_model("resnet50", num_classes=751).eval()
    base_flops = count_flops(base, size)
    models, notes = {"resnet50 (unpruned)": base}, []
    paper = dict(criterion="cop")
    variants = [("COP faster, cop (paper criterion; the preset's round_to=16, group_cost=sum)",
                 dict(preset="faster", **paper)),
                ("COP faster, round_to=8", dict(preset="faster", round_to=8, **paper)),
                ("COP faster, group_cost=mean", dict(preset="faster", group_cost="mean", **paper)),
                ("COP balanced", dict(preset="balanced", **paper)),
                ("COP smaller", dict(preset="smaller", **paper)),
                ("COP faster, cop_magnitude", dict(preset="faster", criterion="cop_magnitude")),
                ("COP faster, magnitude (the default criterion)", dict(preset="faster", criterion="magnitude")),
                # Random weights and images: the channel counts this criterion picks, not what it would keep.
                ("COP faster, cop_activation (8 random images)",
                 dict(preset="faster", criterion="cop_activation", compensate="none",
                      calibration=torch.randn(8, 3, *size)))]
    for name, kwargs in variants:
        t = time.perf_counter()
        models[name] = prune_cop(base, flops_reduction=args.reduction, input_size=size, **kwargs)
        notes.append(f"{name}: pruning took {time.perf_counter() - t:.1f} s")
    if not args.no_peers:
        try:
            import torch_pruning as tp
        except ImportError:
            notes.append("torch-pruning is not installed (pip install torch-pruning): peers skipped")
        else:
            target = count_flops(models[variants[0][0]], size)
            for name, imp, round_to in (("Torch-Pruning L1 (global)", tp.importance.MagnitudeImportance(p=1), None),
                                        ("Torch-Pruning L1 (global, round_to=8)",
                                         tp.importance.MagnitudeImportance(p=1), 8),
                                        ("Torch-Pruning random (global)", tp.importance.RandomImportance(), None)):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    models[name] = _torch_pruning_to_flops(base, target, size, imp, round_to)
    lats = {t: compare_latency(models, size, args.batch_size, rounds=args.rounds, num_threads=t) for t in threads}
    lines += [f"## ResNet-50 at a {args.reduction:.0%} FLOP reduction", ""]
    lines += _table(models, lats, "resnet50 (unpruned)", base_flops, size, threads)
    lines += [""] + ["- " + n for n in notes] + [""]

    # -- section 2 ----------------------------------------------------------------------------------------------
    if not args.skip_ptl:
        torch.manual_seed(0)
        ptl = build_model("ptl_resnet50", num_classes=751, input_size=size).eval()
        ptl_flops = count_flops(ptl, size)
        reduction = 1 - base_flops / ptl_flops
        pruned = prune_cop(ptl, flops_reduction=reduction, preset="faster", input_size=size, criterion="cop")
        trio = {"resnet50": base, "ptl_resnet50": ptl, "ptl_resnet50 pruned": pruned}
        lats = {t: compare_latency(trio, size, args.batch_size, rounds=args.rounds, num_threads=t) for t in threads}
        lines += [f"## PTL at baseline cost: ptl_resnet50 pruned (faster) by {reduction:.1%} to ResNet-50's FLOPs", ""]
        lines += _table(trio, lats, "resnet50", base_flops, size, threads)
        lines += [""]
    if args.accuracy:
        lines += accuracy_section(args)
    return _emit(lines, args)


def run_setting(threads):
    """What a seed's result depends on besides the seed: the thread count, the CPU and its kernels, torch."""
    return dict(threads=threads, cpu=cpu_model() or "unknown CPU", kernels=torch.backends.cpu.get_cpu_capability(),
                torch=torch.__version__)


# Settings of a run that change a seed's result, as ``run_setting`` records them; files written before a setting
# was recorded lack it (None), and nothing is guessed about them.
SETTING_PHRASES = {"threads": ("torch thread counts", "with {} and {} torch threads"),
                   "cpu": ("CPUs", "on {} and {}"),
                   "kernels": ("CPU kernels", "with {} and {} CPU kernels"),
                   "torch": ("torch versions", "with torch {} and {}")}


def merged_report(paths):
    """One accuracy table from the result files of several runs (in the order given)."""
    import json

    header, results, by_key, sources, size, settings = None, [], {}, {}, None, {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        settings[path] = {k: data.get(k) for k in SETTING_PHRASES}
        header = header or data["header"]
        size = size or tuple(data.get("size", (128, 64)))  # files written before the size was recorded: 128x64
        for r in data["results"]:  # the same row from several runs: its seeds join
            if r["key"] in by_key:
                row, source = by_key[r["key"]], sources[r["key"]]
                if (row["name"], row["variant"]) != (r["name"], r["variant"]):
                    raise BenchmarkError(f"{path}: row '{r['key']}' is '{r['name']}' ({r['variant']}) there and "
                                         f"'{row['name']}' ({row['variant']}) in {source}; only the same row joins")
                # A seed run again with the same results (the unpruned row, re-run as the teachers of a '+kd'
                # row, reproduces itself) is the same measurement; different results for one seed are refused.
                clash = sorted((s for s in set(row["mAP"]) & set(r["mAP"])
                                if (row["mAP"][s], row["rank1"][s]) != (r["mAP"][s], r["rank1"][s])), key=int)
                if clash:
                    differ = [phrase.format(settings[path][k], settings[source][k])
                              for k, (_, phrase) in SETTING_PHRASES.items()
                              if None not in (settings[path][k], settings[source][k])
                              and settings[path][k] != settings[source][k]]
                    why = (f"; the two ran {', '.join(differ)}, and a seed repeats its result only with the same "
                           "thread count, CPU kernels and torch (set OMP_NUM_THREADS alike, run on one machine "
                           "type)" if differ else "")
                    raise BenchmarkError(f"{path}: row '{r['key']}' has seed(s) {', '.join(clash)} in {source} too, "
                                         f"with other results; give each seed of a row once{why}")
                row["rank1"].update(r["rank1"])
                row["mAP"].update(r["mAP"])
            else:
                sources[r["key"]] = path
                by_key[r["key"]] = r
                results.append(r)
    for k, (label, _) in SETTING_PHRASES.items():  # the header is the first file's, which names its own setting only
        known = {p: s[k] for p, s in settings.items() if s[k] is not None}
        if len(set(known.values())) > 1:
            header = header + [f"The merged runs used different {label}: " +
                               ", ".join(f"{osp.basename(p)} {v}" for p, v in known.items()) + ".", ""]
    text = "\n".join(header + accuracy_table(results, size))
    print(text)
    return text


def _emit(lines, args):
    lines.append(f"Load average at end: {_load()}.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    try:
        main()
    except BenchmarkError as error:
        print(f"benchmark_prune.py: error: {error}", file=sys.stderr)
        sys.exit(2)
