"""Benchmark COP pruning: real CPU speed-up at a FLOP target, peers at equal FLOPs, PTL at baseline cost.

    PYTHONPATH=. python tools/benchmark_prune.py                # all sections, markdown tables on stdout
    PYTHONPATH=. python tools/benchmark_prune.py --rounds 7 --threads 2 --out bench_prune.md

Section 1 prunes ResNet-50 (torchreid, random weights: latency does not depend on the values) to a 50% FLOP
reduction with COP's presets and, when the ``torch-pruning`` package is installed, with Torch-Pruning's global
magnitude (L1) and random pruning to the same FLOPs (bisection on its channel ratio); then it measures the CPU
embedding latency of every model at batch 32, 256x128, in interleaved rounds (one forward of each model per
round, so load from other processes hits all of them alike). FLOPs come from torch.utils.flop_counter.
Section 2 prunes ptl_resnet50 down to ResNet-50's FLOPs ("PTL at baseline cost").

Accuracy after fine-tuning is measured by the ``prune`` command / tools/prune.py with the training engine.
"""
import argparse
import copy
import os
import os.path as osp
import platform
import sys
import time
import warnings

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from ptl_torchreid.compress import compare_latency, count_flops, count_params, prune_cop  # noqa: E402
from ptl_torchreid.models import build_model  # noqa: E402


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load():
    try:
        return "{:.2f}".format(os.getloadavg()[0])
    except (OSError, AttributeError):
        return "n/a"


def _torch_pruning_to_flops(model, target_flops, input_size, importance, round_to=None, tol=0.003):
    """Torch-Pruning global pruning of a copy of ``model`` whose FLOPs land just under ``target_flops``."""
    import torch_pruning as tp

    def prune(ratio):
        net = copy.deepcopy(model).eval()
        # Same constraint as COP: the embedding (last stage width) and the classifier are kept.
        ignored = [net.classifier] + [b.conv3 for b in net.layer4] + [net.layer4[0].downsample[0]]
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


def _row(name, model, base, lat, base_lat, input_size):
    flops, params = count_flops(model, input_size), count_params(model)
    return "| {} | {:.2f} | {:.1%} | {:.2f} | {:.3f} | {:.3f} | {:.2f}x |".format(
        name, flops / 1e9, 1 - flops / base["flops"], params / 1e6, lat["median"], lat["min"],
        base_lat["median"] / lat["median"])


HEADER = ("| model | GFLOPs | FLOP reduction | params (M) | latency median (s) | latency min (s) | speed-up |\n"
          "|---|---|---|---|---|---|---|")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduction", type=float, default=0.5, help="FLOP reduction of section 1")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--no-peers", action="store_true", help="skip the Torch-Pruning comparison")
    parser.add_argument("--skip-ptl", action="store_true", help="skip section 2")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    size = (args.height, args.width)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = ["# COP pruning benchmark", "",
             "{}, {} cores visible, torch {} with {} threads; load average at start {}.".format(
                 _cpu_name(), os.cpu_count(), torch.__version__, torch.get_num_threads(), _load()),
             "Latency: eval-mode embedding of a batch of {} at {}x{}, {} interleaved rounds; speed-up = ratio of "
             "medians.".format(args.batch_size, size[0], size[1], args.rounds), ""]

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
    lat = compare_latency(models, size, args.batch_size, rounds=args.rounds)
    b = dict(flops=base_flops)
    lines += ["## ResNet-50 at a {:.0%} FLOP reduction".format(args.reduction), "", HEADER]
    lines += [_row(n, m, b, lat[n], lat["resnet50 (unpruned)"], size) for n, m in models.items()]
    lines += [""] + ["- " + n for n in notes] + [""]

    # -- section 2 ----------------------------------------------------------------------------------------------
    if not args.skip_ptl:
        torch.manual_seed(0)
        ptl = build_model("ptl_resnet50", num_classes=751, input_size=size).eval()
        ptl_flops = count_flops(ptl, size)
        reduction = 1 - base_flops / ptl_flops
        pruned = prune_cop(ptl, flops_reduction=reduction, preset="faster", input_size=size)
        lat2 = compare_latency({"resnet50": base, "ptl_resnet50": ptl, "ptl_resnet50 pruned": pruned}, size,
                               args.batch_size, rounds=args.rounds)
        lines += ["## PTL at baseline cost: ptl_resnet50 pruned (faster) to ResNet-50's FLOPs "
                  "(reduction {:.1%})".format(reduction), "", HEADER]
        lines += [_row(n, m, b, lat2[n], lat2["resnet50"], size)
                  for n, m in (("resnet50", base), ("ptl_resnet50", ptl), ("ptl_resnet50 pruned", pruned))]
        lines += [""]
    lines.append("Load average at end: {}.".format(_load()))
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
