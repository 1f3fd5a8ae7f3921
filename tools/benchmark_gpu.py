#!/usr/bin/env python
"""Training throughput and peak memory of resnet50 vs ptl_resnet50 in fp32 and mixed precision.

Each (model, mode) runs full training steps -- forward, softmax cross-entropy, backward, optimizer step -- on one
synthetic random batch kept on the device, so data loading is not measured. Modes:

    fp32      float32 (PyTorch's default math settings; the TF32 flags in effect are printed)
    amp       autocast (bf16 by default, --amp-dtype fp16 adds a GradScaler)
    amp_cl    autocast + channels_last memory format for the model and the input

Examples:
    python tools/benchmark_gpu.py                                  # GPU, batch 64, 256x128
    python tools/benchmark_gpu.py --out docs/benchmark_gpu.md      # also write the Markdown table
    python tools/benchmark_gpu.py --device cpu --iters 2 --batch-size 4   # quick CPU check of the script
"""
import argparse
import datetime
import math
import os
import os.path as osp
import platform
import time

import ptl_torchreid  # noqa: F401  (before torch: the package sets OpenMP waiting, see _openmp.py)

# isort: split
import torch
import torch.nn.functional as F

from ptl_torchreid import models  # registers the ptl_* models
from ptl_torchreid.utils.amp import autocast_context, check_precision, make_grad_scaler, memory_format

MODES = ("fp32", "amp", "amp_cl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="resnet50,ptl_resnet50", help="comma-separated; baseline first")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    p.add_argument("--amp-dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--num-classes", type=int, default=751, help="classifier size (Market-1501 has 751 ids)")
    p.add_argument("--optim", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 10 on GPU, 1 on CPU)")
    p.add_argument("--iters", type=int, default=30, help="timed steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as Markdown to this file")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    if args.warmup is None:
        args.warmup = 10 if args.device.type == "cuda" else 1
    if args.iters < 1 or args.batch_size < 1:
        p.error("--iters and --batch-size must be at least 1")
    return args


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(name, args):
    kwargs = {"input_size": (args.height, args.width)} if name in models.PTL_MODELS else {}
    torch.manual_seed(args.seed)
    return models.build_model(name, num_classes=args.num_classes, loss="softmax", pretrained=False, **kwargs)


def _train_step(model, optimizer, scaler, x, y, device_type, precision):
    """One training step on the fixed batch ``(x, y)``, as a function returning its loss."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device_type, precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    return step


def bench_one(name, mode, args):
    """Images/s and peak device memory (MiB; None on the CPU) of training steps of ``name`` in ``mode``."""
    device = args.device
    precision = "fp32" if mode == "fp32" else args.amp_dtype
    check_precision(device, precision)
    fmt = memory_format(mode == "amp_cl")
    model = build(name, args).to(device).train()
    model = model.to(memory_format=fmt)
    if args.optim == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, weight_decay=5e-4)
    scaler = make_grad_scaler(device.type, precision)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.height, args.width, generator=gen).to(device)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen).to(device)

    step = _train_step(model, optimizer, scaler, x, y, device.type, precision)
    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        loss = step()
    _sync(device)
    elapsed = time.perf_counter() - start
    loss = float(loss.detach())
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    del step, model, optimizer, x, y
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not math.isfinite(loss):
        raise RuntimeError(f"{name} in mode {mode} gave a non-finite loss {loss}")
    return {"model": name, "mode": mode, "images_per_s": args.batch_size * args.iters / elapsed,
            "peak_mib": peak, "loss": loss}


def run(args):
    results = []
    for name in args.models:
        for mode in args.modes:
            r = bench_one(name, mode, args)
            results.append(r)
            peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"
            print(f"{name:<16} {mode:<7} {r['images_per_s']:>9.1f} img/s  peak {peak}", flush=True)
    return results


def _ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def to_markdown(results, args):
    by = {(r["model"], r["mode"]): r for r in results}
    baseline = args.models[0]
    amp_name = {"fp32": "fp32", "amp": f"AMP ({args.amp_dtype})",
                "amp_cl": f"AMP ({args.amp_dtype}) + channels_last"}
    lines = [
        f"Device: **{device_name(args.device)}**; torch {torch.__version__}; batch {args.batch_size}, "
        f"{args.height}x{args.width}, {args.num_classes} classes, {args.optim.upper()} optimizer, {args.iters} timed "
        f"steps after {args.warmup} warm-up "
        "steps; synthetic data on the device.",
    ]
    if args.device.type == "cuda":
        lines.append(
            f"fp32 math flags: cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
            f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}."
        )
    lines += [
        "",
        f"| model | mode | images/s | peak memory (MiB) | vs fp32 (same model) | vs {baseline} (same mode) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        fp32 = by.get((r["model"], "fp32"))
        base = by.get((baseline, r["mode"]))
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        vs_fp32 = _ratio(r["images_per_s"], fp32["images_per_s"]) if fp32 else "-"
        vs_baseline = _ratio(r["images_per_s"], base["images_per_s"]) if base else "-"
        lines.append(
            f"| {r['model']} | {amp_name[r['mode']]} | {r['images_per_s']:.1f} | {peak} | {vs_fp32} | {vs_baseline} |"
        )
    summary = []
    for model in args.models[1:]:
        fp32 = by.get((model, "fp32"))
        for mode in ("amp", "amp_cl"):
            r = by.get((model, mode))
            if fp32 and r:
                summary.append(
                    f"- {amp_name[mode]} / fp32 {model}: {_ratio(r['images_per_s'], fp32['images_per_s'])}"
                )
    if summary:
        lines += ["", "Throughput ratios:"] + summary
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"device: {device_name(args.device)}", flush=True)
    results = run(args)
    text = to_markdown(results, args)
    print()
    print(text)
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(f"# GPU training benchmark ({datetime.date.today().isoformat()})\n\n")
            f.write(text)
        print("wrote " + args.out)
    return results, text


if __name__ == "__main__":
    main()
