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
(backbone from the same source model) is trained on synthetic_target, pruned to the plain model's FLOPs and
fine-tuned again.
"""
import argparse
import copy
import os
import os.path as osp
import sys
import time
import warnings

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import ptl_torchreid  # noqa: E402,F401  (before torch: the package sets OpenMP waiting, see _openmp.py)

import torch  # noqa: E402

from ptl_torchreid import _torchreid  # noqa: E402
from ptl_torchreid.compress import build_graph, compare_latency, count_flops, count_params, prune_cop  # noqa
from ptl_torchreid.models import build_model  # noqa: E402

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from bench_measure import cpu_model, load_average  # noqa: E402
from bench_report import mean_std  # noqa: E402


def _load():
    return "{:.2f}".format(load_average())


def _torch_pruning_to_flops(model, target_flops, input_size, importance, round_to=None, tol=0.003):
    """Torch-Pruning global pruning of a copy of ``model`` whose FLOPs land just under ``target_flops``."""
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
SOURCE_CONFIG = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), "configs",
                         "osnet_x0_25_synthetic_source.yaml")
TARGET_CONFIG = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), "configs",
                         "osnet_x0_25_synthetic_source_to_target.yaml")


def _config(path, root, save_dir, epochs, arch, seed=None, evaluate=False):
    from ptl_torchreid.config import load_config

    opts = ["model.name", arch, "data.root", root, "data.save_dir", save_dir, "train.max_epoch", str(epochs),
            "train.stepsize", str([max(1, int(epochs * 0.75))]), "train.progress_bar", "False",
            "model.load_weights", "", "test.evaluate", str(bool(evaluate))]
    if seed is not None:
        opts += ["train.seed", str(seed)]
    return load_config(path, opts)


def _train(cfg, model):
    """Train ``model`` with the engine as ``cfg`` says (or only evaluate it, with ``test.evaluate``) and return
    its results on the first target."""
    from ptl_torchreid import cli
    from ptl_torchreid.config import engine_run_kwargs

    _torchreid.torchreid.utils.set_random_seed(cfg.train.seed)
    dm = cli.build_datamanager(cfg)
    if model.classifier.out_features != dm.num_train_pids:  # new identities: new classifier
        model.classifier = torch.nn.Linear(model.classifier.in_features, dm.num_train_pids)
        torch.nn.init.normal_(model.classifier.weight, 0, 0.01)
        torch.nn.init.zeros_(model.classifier.bias)
    engine = cli.build_engine(cfg, dm, model)
    t = time.perf_counter()
    results = engine.run(**engine_run_kwargs(cfg))
    res = next(iter(results.values()))
    return dict(rank1=res["cmc"][1], mAP=res["mAP"], minutes=(time.perf_counter() - t) / 60)


def _prune_cop_fitting(model, size, reduction=0.5, **kwargs):
    """COP to a FLOP reduction; where the preset's channel rounding cannot reach it (narrow models such as
    osnet_x0_25), halve ``round_to`` until it can. Returns (model, round_to used)."""
    from ptl_torchreid.compress.cop import check_options

    round_to = kwargs.pop("round_to", None) or check_options(flops_reduction=reduction, **kwargs)["round_to"]
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
    import numpy as np
    from scipy.stats import spearmanr

    from ptl_torchreid.compress.criterion import COPSelector

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


def accuracy_section(args):
    from ptl_torchreid.cli import load_initial_weights

    arch, work, root = args.accuracy_arch, args.work_dir, osp.join(args.work_dir, "reid-data")
    size = (128, 64)
    seeds = args.seeds
    source_ckpt = args.source_weights
    origin = "given weights {}".format(osp.basename(source_ckpt)) if source_ckpt else \
        "trained {} epochs on synthetic_source".format(args.source_epochs)
    lines = ["## Accuracy after fine-tuning on synthetic_target ({}, 128x64)".format(arch), "",
             "Source model: {} ({}); every model below then gets the same budget of {} epochs on "
             "synthetic_target (triplet + softmax, Adam, the recipe of "
             "configs/osnet_x0_25_synthetic_source_to_target.yaml), once per fine-tuning seed ({}), and is "
             "evaluated on its query/gallery. Pruned models are cut from the source model to 50% of its FLOPs at "
             "128x64 (Torch-Pruning bisected to COP faster's FLOPs), then fine-tuned. Pruning is data-free and "
             "deterministic, so the seeds vary the fine-tuning only. 'before': the pruned model evaluated right "
             "after pruning, without fine-tuning (what the criterion kept).".format(
                 arch, origin, args.target_epochs, ", ".join(map(str, seeds))), "",
             "| model | GFLOPs (128x64) | params (M) | Rank-1 before | mAP before | Rank-1 | mAP | mAP per seed "
             "| train min / seed |",
             "|---|---|---|---|---|---|---|---|---|"]
    if not source_ckpt:
        cfg = _config(SOURCE_CONFIG, root, osp.join(work, "source"), args.source_epochs, arch)
        torch.manual_seed(0)
        _train(cfg, build_model(arch, num_classes=1, loss="triplet"))
        source_ckpt = osp.join(work, "source", "model", "model-best.pth.tar")

    def source_model():
        m = build_model(arch, num_classes=1, loss="triplet")
        load_initial_weights(m, source_ckpt)
        return m.eval()

    def finetune(name, make_model, tag, epochs=None, before=True):
        """Fine-tune a fresh ``make_model()`` once per seed; returns the first seed's trained model."""
        first = None
        rank1, mAP, minutes = [], [], []
        pre = "- | -"
        if before:
            cfg = _config(TARGET_CONFIG, root, osp.join(work, tag + "_before"), 0, arch, evaluate=True)
            res = _train(cfg, make_model())
            pre = "{:.1%} | {:.1%}".format(res["rank1"], res["mAP"])
        for seed in seeds:
            model = make_model()
            cfg = _config(TARGET_CONFIG, root, osp.join(work, "{}_seed{}".format(tag, seed)),
                          epochs or args.target_epochs, arch, seed=seed)
            res = _train(cfg, model)
            rank1.append(res["rank1"] * 100)
            mAP.append(res["mAP"] * 100)
            minutes.append(res["minutes"])
            if first is None:
                first = model
        (r_m, r_s), (m_m, m_s) = mean_std(rank1), mean_std(mAP)
        lines.append("| {} | {:.3f} | {:.3f} | {} | {:.1f} ± {:.1f} | {:.1f} ± {:.1f} | {} | {:.1f} |".format(
            name, count_flops(first, size) / 1e9, count_params(first) / 1e6, pre, r_m, r_s, m_m, m_s,
            " ".join("{:.1f}".format(v) for v in mAP), sum(minutes) / len(minutes)))
        print("\n".join(lines), flush=True)
        return first

    rho, groups = redundancy_vs_scale(source_model(), size)
    lines[-2:-2] = ["COP redundancy against filter scale in the source model: median Spearman correlation {:.2f} "
                    "between a filter's redundancy and its BatchNorm |gamma| over {} groups of 8 or more "
                    "channels.".format(rho, groups), ""]
    finetune("{} (unpruned)".format(arch), source_model, "baseline")
    cop_faster, round_to = _prune_cop_fitting(source_model(), size, preset="faster")
    target = count_flops(cop_faster, size)
    variants = [("COP faster (round_to={})".format(round_to), lambda: copy.deepcopy(cop_faster), "cop_faster")]
    # Each variant prunes once (data-free, deterministic); every seed fine-tunes a fresh copy.
    for name, tag, kwargs in (
            ("COP faster, max_prune_ratio=0.5", "cop_faster_cap", dict(preset="faster", max_prune_ratio=0.5)),
            ("COP faster, filter by filter (round_to=1, group_cost=mean)", "cop_faster_r1",
             dict(preset="faster", round_to=1, group_cost="mean")),
            ("COP balanced", "cop_balanced", dict(preset="balanced")),
            ("COP balanced, max_prune_ratio=0.5", "cop_balanced_cap", dict(preset="balanced", max_prune_ratio=0.5))):
        pruned, used = _prune_cop_fitting(source_model(), size, **kwargs)
        name += "" if "round_to" in name else ", round_to={}".format(used)
        variants.append((name, lambda pruned=pruned: copy.deepcopy(pruned), tag))
    try:
        import torch_pruning as tp
    except ImportError:
        lines.append("(torch-pruning not installed: peers skipped)")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            l1 = _torch_pruning_to_flops(source_model(), target, size, tp.importance.MagnitudeImportance(p=1))
            rnd = _torch_pruning_to_flops(source_model(), target, size, tp.importance.RandomImportance())
        variants += [("Torch-Pruning L1 (global)", lambda: copy.deepcopy(l1), "tp_l1"),
                     ("Torch-Pruning random (global)", lambda: copy.deepcopy(rnd), "tp_random")]
    for name, make, tag in variants:
        finetune(name, make, tag)

    # PTL at baseline cost: the PTL model trained on the target, pruned to the plain model's FLOPs, fine-tuned.
    base_flops = count_flops(source_model(), size)

    def ptl_model():
        ptl = build_model("ptl_" + arch, num_classes=1, loss="triplet", input_size=size)
        load_initial_weights(ptl, source_ckpt)  # the plain source model goes into the PTL backbone
        return ptl

    ptl = finetune("ptl_{} (unpruned)".format(arch), ptl_model, "ptl", before=False)  # seed 1's model is pruned
    small, _ = _prune_cop_fitting(ptl, size, reduction=1 - base_flops / count_flops(ptl, size), preset="faster")
    extra = max(1, args.target_epochs // 2)
    finetune("ptl_{} pruned to {}'s FLOPs (+{} epochs)".format(arch, arch, extra), lambda: copy.deepcopy(small),
             "ptl_pruned", extra)
    return lines + [""]


def _table(models, lats, base_name, base_flops, size, threads):
    """Markdown table: cost columns, then latency and speed-up (vs ``base_name``) per thread count; with one
    thread also the speed-up in process CPU time, which load from other processes does not distort."""
    head = "| model | GFLOPs | FLOP reduction | params (M) |"
    sep = "|---|---|---|---|"
    for t in threads:
        head += " latency {0} thr. (s) | speed-up {0} thr. |".format(t)
        sep += "---|---|"
        if t == 1:
            head += " speed-up 1 thr. (CPU time) |"
            sep += "---|"
    rows = [head, sep]
    for name, model in models.items():
        flops = count_flops(model, size)
        row = "| {} | {:.2f} | {:.1%} | {:.2f} |".format(name, flops / 1e9, 1 - flops / base_flops,
                                                        count_params(model) / 1e6)
        for t in threads:
            lat, base = lats[t][name], lats[t][base_name]
            row += " {:.3f} | {:.2f}x |".format(lat["median"], base["median"] / lat["median"])
            if t == 1:
                row += " {:.2f}x |".format(base["cpu_median"] / lat["cpu_median"])
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
    args = parser.parse_args(argv)
    size = (args.height, args.width)
    threads = args.threads or sorted({1, torch.get_num_threads()})
    lines = ["# COP pruning benchmark", "",
             "{}, {} cores visible, torch {}; load average at start {}.".format(
                 cpu_model() or "unknown CPU", os.cpu_count(), torch.__version__, _load())]

    if args.only_accuracy:
        lines += [""] + accuracy_section(args)
        return _emit(lines, args)
    lines += ["Latency: median over {} interleaved rounds of an eval-mode embedding of a batch of {} at {}x{}, with "
              "{} torch threads; speed-up = ratio of medians.".format(
                  args.rounds, args.batch_size, size[0], size[1], " and ".join(map(str, threads))), ""]

    # -- section 1 ----------------------------------------------------------------------------------------------
    torch.manual_seed(0)
    base = build_model("resnet50", num_classes=751).eval()
    base_flops = count_flops(base, size)
    models, notes = {"resnet50 (unpruned)": base}, []
    variants = [("COP faster (default: round_to=16, group_cost=sum)", dict(preset="faster")),
                ("COP faster, round_to=8", dict(preset="faster", round_to=8)),
                ("COP faster, group_cost=mean", dict(preset="faster", group_cost="mean")),
                ("COP balanced", dict(preset="balanced")),
                ("COP smaller", dict(preset="smaller"))]
    for name, kwargs in variants:
        t = time.perf_counter()
        models[name] = prune_cop(base, flops_reduction=args.reduction, input_size=size, **kwargs)
        notes.append("{}: pruning took {:.1f} s".format(name, time.perf_counter() - t))
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
    lines += ["## ResNet-50 at a {:.0%} FLOP reduction".format(args.reduction), ""]
    lines += _table(models, lats, "resnet50 (unpruned)", base_flops, size, threads)
    lines += [""] + ["- " + n for n in notes] + [""]

    # -- section 2 ----------------------------------------------------------------------------------------------
    if not args.skip_ptl:
        torch.manual_seed(0)
        ptl = build_model("ptl_resnet50", num_classes=751, input_size=size).eval()
        ptl_flops = count_flops(ptl, size)
        reduction = 1 - base_flops / ptl_flops
        pruned = prune_cop(ptl, flops_reduction=reduction, preset="faster", input_size=size)
        trio = {"resnet50": base, "ptl_resnet50": ptl, "ptl_resnet50 pruned": pruned}
        lats = {t: compare_latency(trio, size, args.batch_size, rounds=args.rounds, num_threads=t) for t in threads}
        lines += ["## PTL at baseline cost: ptl_resnet50 pruned (faster) by {:.1%} to ResNet-50's FLOPs".format(
            reduction), ""]
        lines += _table(trio, lats, "resnet50", base_flops, size, threads)
        lines += [""]
    if args.accuracy:
        lines += accuracy_section(args)
    return _emit(lines, args)


def _emit(lines, args):
    lines.append("Load average at end: {}.".format(_load()))
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
