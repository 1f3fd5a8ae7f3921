#!/usr/bin/env python
"""Benchmark a torchreid baseline against its PTL twin in one run: accuracy, speed, memory, FLOPs.

Both models are trained by the package's own machinery (``ptl_torchreid.config`` + the CLI builders + the PTL
engine), exactly as ``ptl-torchreid`` trains them, on the same data, seeds and schedule. Seeds are interleaved
(baseline, PTL, then PTL, baseline, ...) so both models see the same machine load.

Comparison (default mode): optional pretraining of the plain model on the source domain (done once and cached),
then fine-tuning of every model from those same weights (PTL loads them into its backbone) over several seeds,
then a side-by-side table -- Rank-1/Rank-5/mAP (mean ± std over seeds), training time per iteration and
images/s, embedding throughput, evaluation time, FLOPs and parameters (torch.utils.flop_counter), peak training
memory (a fresh subprocess per model), and each ratio to the baseline -- plus CMC and training-curve plots.
``--ablation`` adds PTL variants (state mode, eval state, reset policy, backbone freezing) and their table.

Speed mode (``--speed``): training step and embedding throughput of resnet50 vs ptl_resnet50 (batch 32, 256x128
by default) measured interleaved on random batches, against their FLOP ratios, plus peak training memory.

    # synthetic transfer pair (pretrain on synthetic_source, fine-tune on synthetic_target), 3 seeds:
    python tools/benchmark.py --seeds 1 2 3 --out bench.md --plots docs/benchmark
    # with the cell ablation:
    python tools/benchmark.py --seeds 1 2 3 --ablation --out bench.md
    # a real dataset: fine-tune a Market-1501 model pretrained on MSMT17, both from the same weights:
    python tools/benchmark.py --config-file configs/resnet50_market1501.yaml --root ~/reid-data \\
        --pretrain-config configs/resnet50_msmt17.yaml --seeds 1 2 3 --out market.md
    # or from weights you already have (or --no-pretrain: both start from ImageNet):
    python tools/benchmark.py --config-file configs/resnet50_market1501.yaml --root ~/reid-data \\
        --pretrain-weights log/resnet50_msmt17/model/model.pth.tar-120 -s market1501 -t market1501
    # speed and memory targets:
    python tools/benchmark.py --speed --out speed.md

Trailing ``KEY VALUE`` pairs override config keys of both stages (pretraining and fine-tuning), e.g.
``data.height 128 data.width 64``. Logs and checkpoints go to ``--work-dir``.
"""
import argparse
import contextlib
import copy
import dataclasses
import hashlib
import importlib
import json
import math
import os
import os.path as osp
import subprocess
import sys
import time

import ptl_torchreid  # noqa: F401  (before torch: the package sets OpenMP waiting, see _openmp.py)

# isort: split
import torch

from ptl_torchreid import _torchreid
from ptl_torchreid.benchmarking import measure as bm
from ptl_torchreid.benchmarking import report as br
from ptl_torchreid.benchmarking.spec import ModelSpec, parse_spec
from ptl_torchreid.config import (
    ConfigError,
    engine_run_kwargs,
    is_ptl_model_name,
    load_config,
    merge_from_list,
    validate_config,
)
from ptl_torchreid.engine import HookBase, build_datamanager, build_engine, preflight, run

torchreid = _torchreid.torchreid

_TOOLS = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(_TOOLS)
SYNTHETIC_FINETUNE_CONFIG = osp.join(REPO, "configs", "osnet_x0_25_synthetic_source_to_target.yaml")
SYNTHETIC_PRETRAIN_CONFIG = osp.join(REPO, "configs", "osnet_x0_25_synthetic_source.yaml")


# ---------------------------------------------------------------------------------------------------------
# What is compared
# ---------------------------------------------------------------------------------------------------------

def main_specs(baseline, ptl, extra=()):
    """The compared models: the baseline first (ratios are to it), then PTL, then any extra specs."""
    other_eval = {"eval_state": "zero"}
    specs = [ModelSpec("baseline", baseline, note="plain torchreid fine-tuning"),
             ModelSpec("PTL", ptl, extra_evals={"PTL, eval_state zero": other_eval},
                       note="config's ptl section")]
    return specs + list(extra)


def ablation_specs(ptl, reset_iters, freeze_epochs):
    """PTL variants, one cell choice changed at a time from the config's ``ptl`` section."""
    variants = [
        ("state_mode slot", ["ptl.state_mode", "slot"]),
        ("reset never", ["ptl.reset_policy", "never"]),
        (f"reset iter {reset_iters}", ["ptl.reset_policy", "iter", "ptl.reset_every_n_iters",
                                               str(reset_iters)]),
        (f"freeze backbone {freeze_epochs} ep", ["ptl.freeze_backbone_epochs", str(freeze_epochs)]),
        ("freeze backbone throughout", ["ptl.freeze_backbone_epochs", "-1"]),
    ]
    # Final evaluation only: the curves are plotted for the main models.
    return [ModelSpec("PTL, " + label, ptl, tuple(opts) + ("test.eval_freq", "-1"), group="ablation",
                      note=" ".join(opts)) for label, opts in variants]


def _import(path):
    module, _, fn = path.partition(":")
    if not fn:
        raise ValueError(f"builder {path!r} must be 'module:function'")
    return getattr(importlib.import_module(module), fn)


def spec_config(base, spec, **overrides):
    """``base`` with the spec's model name and options, plus ``overrides`` (dotted key -> value), validated."""
    cfg = base.clone()
    cfg.defrost()
    merge_from_list(cfg, ["model.name", spec.name] + list(spec.opts))
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    validate_config(cfg)
    return cfg


def spec_engine(cfg, spec, checkpoints=None):
    """Data manager, model and engine for ``cfg``, built as ``ptl-torchreid`` builds them (``checkpoints``: the
    files :func:`ptl_torchreid.engine.preflight` read)."""
    if not spec.builder:
        return build_engine(cfg, checkpoints=checkpoints)
    datamanager = build_datamanager(cfg)
    model = _import(spec.builder)(cfg, datamanager.num_train_pids)
    return build_engine(cfg, datamanager=datamanager, model=model, checkpoints=checkpoints)


# ---------------------------------------------------------------------------------------------------------
# Training runs with measurements
# ---------------------------------------------------------------------------------------------------------

class Recorder(HookBase):
    """Records, without changing what the engine does: the duration of every training step (forward, loss,
    backward, optimizer step; data loading excluded), each epoch's logged losses, and each evaluation's
    results and duration."""

    def __init__(self):
        self.iter_times = []
        self.epochs = []
        self.evals = []
        self._step_start = self._test_start = None

    def before_step(self):
        bm.sync(self.trainer.device)
        self._step_start = time.perf_counter()

    def after_step(self):
        bm.sync(self.trainer.device)
        self.iter_times.append(time.perf_counter() - self._step_start)

    def after_epoch(self):
        engine = self.trainer
        self.epochs.append(dict(engine.epoch_summary, epoch=engine.epoch + 1))

    def before_test(self):
        self._test_start = time.perf_counter()

    def after_test(self):
        engine = self.trainer
        seconds = time.perf_counter() - self._test_start
        results = copy.deepcopy(engine.last_results)
        first = next(iter(results.values())) if results else {"mAP": float("nan")}
        self.evals.append({"epoch": engine.epoch + 1, "seconds": seconds, "mAP": first["mAP"], "results": results})


@contextlib.contextmanager
def _quiet(log_path, enabled):
    """Send the engine's console output to ``log_path`` (the run's own log) when ``enabled``."""
    if not enabled:
        yield
        return
    os.makedirs(osp.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as f, contextlib.redirect_stdout(f):
        yield


def train_run(cfg, spec, quiet=True):
    """Train and evaluate one (model, seed) as ``ptl-torchreid train`` does; returns measurements and the engine."""
    log_path = osp.join(cfg.data.save_dir, "train.log")
    with _quiet(log_path, quiet):
        checkpoints = preflight(cfg)
        torchreid.utils.set_random_seed(cfg.train.seed)  # as run() seeds before building
        engine = spec_engine(cfg, spec, checkpoints)
        rec = Recorder()
        t0 = time.perf_counter()
        results = run(cfg, hooks=[rec], engine=engine)
        wall = time.perf_counter() - t0
        final_eval = rec.evals[-1]
        extra = {}
        if spec.extra_evals and engine.is_ptl:
            for label, options in spec.extra_evals.items():
                engine.net.configure_cells(**options)
                engine.test(**_test_kwargs(engine_run_kwargs(cfg)))
                extra[label] = rec.evals.pop()["results"]
            engine.net.configure_cells(eval_state=cfg.ptl.eval_state)
    return {
        "label": spec.label,
        "seed": int(cfg.train.seed),
        "results": results,
        "extra_results": extra,
        "epochs": rec.epochs,
        "evals": [{k: v for k, v in e.items() if k != "results"} for e in rec.evals],
        "iter_times": rec.iter_times,
        "batch_size": int(cfg.train.batch_size),
        "eval_seconds": final_eval["seconds"],
        "wall_seconds": wall,
        "log": log_path,
    }, engine


def _test_kwargs(run_kwargs):
    keep = ("dist_metric", "normalize_feature", "visrank", "visrank_topk", "save_dir", "use_metric_cuhk03",
            "ranks")
    return {k: run_kwargs[k] for k in keep}


# ---------------------------------------------------------------------------------------------------------
# Peak memory: a fresh subprocess per model
# ---------------------------------------------------------------------------------------------------------

def probe_memory(cfg, spec, work_dir, steps=3, random_batch=False, threads=None, timeout=3600):
    """Peak memory of training ``spec`` in a fresh process: ``{'device', 'setup_bytes', 'peak_bytes',
    'train_bytes'}``; ``train_bytes`` is the peak during ``steps`` training steps minus the memory after setup
    (model, optimizer, data loaded): activations, gradients, optimizer state and temporaries."""
    os.makedirs(work_dir, exist_ok=True)
    cfg_path = osp.join(work_dir, f"probe_{_slug(spec.label)}.yaml")
    with open(cfg_path, "w") as f:
        f.write(cfg.dump())
    cmd = [sys.executable, osp.abspath(__file__), "--probe-memory", cfg_path, "--probe-spec", spec.to_json(),
           "--probe-steps", str(steps)]
    if random_batch:
        cmd.append("--probe-random-batch")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    raise RuntimeError(f"memory probe for {spec.label} failed (exit {proc.returncode}):\n"
                       f"{(proc.stdout + proc.stderr)[-3000:]}")


def _first_item(items):
    return items[0]


def _probe_main(args):
    """Subprocess side of :func:`probe_memory`: build the engine, load batches, then train ``steps`` steps."""
    spec = ModelSpec.from_json(args.probe_spec)
    cfg = load_config(args.probe_memory)
    with contextlib.redirect_stdout(sys.stderr):
        torchreid.utils.set_random_seed(cfg.train.seed)
        engine = spec_engine(cfg, spec)
        if args.probe_random_batch:
            num_classes = engine.datamanager.num_train_pids
            batch = {
                "img": torch.randn(cfg.train.batch_size, 3, cfg.data.height, cfg.data.width),
                "pid": torch.randint(0, num_classes, (cfg.train.batch_size,)),
            }
            batches = [batch] * args.probe_steps
        else:
            batches = []
            while len(batches) < args.probe_steps:
                for b in engine.train_loader:
                    batches.append(b)
                    if len(batches) == args.probe_steps:
                        break
        # The engine's own epoch loop over these batches (state reset, freezing, optimizer, scheduler): a loader
        # whose items are the prepared batches, in order.
        engine.train_loader = torch.utils.data.DataLoader(batches, batch_size=1, shuffle=False, collate_fn=_first_item)
        engine.epoch, engine.max_epoch = 0, 1
        kwargs = engine_run_kwargs(cfg)
        device = engine.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            setup = torch.cuda.memory_allocated(device)
        else:
            import gc

            gc.collect()
            bm.release_free_memory()  # freed heap from loading the data would otherwise hide in "setup"
            setup = bm.rss_bytes()
            heap_setup = bm.heap_in_use_bytes()
            if not bm.reset_peak_rss():
                print("note: cannot reset the peak-RSS mark; the peak includes setup", file=sys.stderr)
        heap = bm.HeapPeak() if device.type == "cpu" else contextlib.nullcontext()
        with heap:
            engine.train(print_freq=10**9, fixbase_epoch=kwargs["fixbase_epoch"], open_layers=kwargs["open_layers"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        else:
            peak = bm.peak_rss_bytes()
    out = {
        "device": device.type,
        "setup_bytes": setup,
        "peak_bytes": peak,
        "train_bytes": peak - setup if setup is not None else None,
        "measure": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)",
    }
    if device.type == "cpu" and heap.peak is not None and heap_setup is not None:
        out["heap_setup_bytes"] = heap_setup
        out["heap_train_bytes"] = heap.peak - heap_setup
    print("PROBE " + json.dumps(out))
    return 0


def _slug(text):
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


# ---------------------------------------------------------------------------------------------------------
# Comparison mode
# ---------------------------------------------------------------------------------------------------------


def _config_hash(cfg):
    return hashlib.sha1(cfg.dump().encode()).hexdigest()[:10]


def pretrain(args, baseline_name):
    """Train the plain baseline on the pretraining config once; returns the checkpoint path (cached by config)."""
    cfg = load_config(args.pretrain_config, opts=list(args.opts), root=args.root or None, validate=False)
    merge_from_list(cfg, ["model.name", baseline_name, "train.progress_bar", "False"])
    if args.pretrain_init:
        merge_from_list(cfg, ["model.load_weights", args.pretrain_init])
    _set_epochs(cfg, args.pretrain_epochs)
    _apply_sets(cfg, args.pretrain_set, "--pretrain-set")
    cfg.data.save_dir = ""
    key = _config_hash(cfg)
    cfg.data.save_dir = osp.join(args.work_dir, f"pretrain_{baseline_name}_{key}")
    validate_config(cfg)
    path = osp.join(cfg.data.save_dir, "model", f"model.pth.tar-{cfg.train.max_epoch}")
    if osp.isfile(path):
        print(f"pretraining: reusing {path} (same config)")
        return path, cfg
    print(
        f"pretraining {baseline_name} on {'+'.join(cfg.data.sources)} for {cfg.train.max_epoch} epoch(s) (log: "
        f"{osp.join(cfg.data.save_dir, 'train.log')}) ..."
    )
    t0 = time.perf_counter()
    run, _ = train_run(cfg, ModelSpec("pretrain", baseline_name), quiet=not args.verbose)
    res = next(iter(run["results"].values()))
    print(
        f"pretraining done in {time.perf_counter() - t0:.0f}s; on {'+'.join(cfg.data.targets)}: mAP {res['mAP']:.1%}, "
        f"Rank-1 {res['cmc'][1]:.1%}"
    )
    if not osp.isfile(path):
        raise RuntimeError(f"pretraining did not write {path}")
    return path, cfg


def _set_epochs(cfg, epochs):
    """Set ``train.max_epoch`` and scale the LR steps with it (a 10-epoch run of a 20-epoch config with a step
    at 15 steps at 7); steps that fall on or after the last epoch are dropped."""
    if epochs is None or epochs == cfg.train.max_epoch:
        return
    old = max(1, cfg.train.max_epoch)
    steps = sorted({max(1, int(s * epochs / old)) for s in cfg.train.stepsize})
    cfg.train.max_epoch = epochs
    cfg.train.stepsize = [s for s in steps if s < epochs] or [max(1, epochs)]


def _apply_sets(cfg, items, flag):
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        merge_from_list(cfg, [key, value])


def finetune_base_config(args):
    cfg = load_config(
        args.config_file,
        opts=list(args.opts),
        sources=args.sources,
        targets=args.targets,
        root=args.root or None,
        validate=False,
    )
    _set_epochs(cfg, args.epochs)
    _apply_sets(cfg, args.set, "--set")
    cfg.train.progress_bar = False
    cfg.test.eval_freq = args.eval_freq
    # Report the CMC curve up to --cmc-rank (the engine drops ranks beyond the gallery size).
    cfg.test.ranks = list(range(1, args.cmc_rank + 1))
    return cfg


def compare(args):
    base = finetune_base_config(args)
    baseline = args.baseline or (
        base.model.name if not is_ptl_model_name(base.model.name) else base.model.name[len("ptl_") :]
    )
    ptl = args.ptl or "ptl_" + baseline
    specs = main_specs(baseline, ptl, [parse_spec(s) for s in args.spec or []])
    if args.ablation:
        specs += ablation_specs(ptl, args.ablation_reset_iters, args.ablation_freeze_epochs)

    load_start = bm.load_average()
    weights, pre_cfg = "", None
    if args.pretrain_weights:
        weights = args.pretrain_weights
    elif not args.no_pretrain:
        weights, pre_cfg = pretrain(args, baseline)
    if weights:
        base.model.load_weights = weights

    runs = {s.label: [] for s in specs}
    engines = {}
    for i, seed in enumerate(args.seeds):
        order = specs if i % 2 == 0 else specs[::-1]
        for spec in order:
            save_dir = osp.join(args.work_dir, _slug(spec.label), f"seed{seed}")
            cfg = spec_config(base, spec, **{"train.seed": seed, "data.save_dir": save_dir})
            run, engine = train_run(cfg, spec, quiet=not args.verbose)
            runs[spec.label].append(run)
            if spec.group == "main":
                engines[spec.label] = (engine, cfg)
            first = next(iter(run["results"].values()))
            print(
                f"seed {seed} {spec.label:<32} mAP {100 * first['mAP']:5.1f}  Rank-1 {100 * first['cmc'][1]:5.1f}  "
                f"step {bm.median(run['iter_times'][1:]):.3f}s  ({run['wall_seconds']:.0f}s)",
                flush=True,
            )

    main = [s for s in specs if s.group == "main"]
    costs = measure_costs(args, main, engines)
    load_end = bm.load_average()
    report = {
        "mode": "compare",
        "command": _command_line(),
        "machine": bm.machine_description(next(iter(engines.values()))[0].device),
        "load_average": [load_start, load_end],
        "pretrain_weights": weights,
        "pretrain_config": pre_cfg.dump() if pre_cfg is not None else None,
        "finetune_config": base.dump(),
        "specs": [dataclasses.asdict(s) for s in specs],
        "runs": runs,
        "costs": costs,
        "throughput_rounds": args.throughput_rounds,
    }
    text = compare_markdown(report, specs)
    print("\n" + text)
    _write_outputs(args, report, text, lambda prefix: compare_plots(report, specs, prefix))
    return 0


def measure_costs(args, specs, engines):
    """FLOPs, parameters, embedding throughput (interleaved) and peak training memory of each main spec."""
    costs = {}
    tasks = {}
    for spec in specs:
        engine, cfg = engines[spec.label]
        net = engine.net
        h, w = cfg.data.height, cfg.data.width
        flops = bm.train_and_inference_flops(net, h, w, device=engine.device)
        costs[spec.label] = {"flops": flops, "params": bm.count_params(net), "height": h, "width": w}
        x = torch.randn(cfg.test.batch_size, 3, h, w, device=engine.device)
        tasks[spec.label] = _embed_task(engine, x)
    times = bm.interleaved(tasks, rounds=args.throughput_rounds, warmup=1)
    for spec in specs:
        engine, cfg = engines[spec.label]
        t = bm.median(times[spec.label])
        costs[spec.label].update(
            embed_seconds=t, embed_batch=cfg.test.batch_size, embed_images_per_s=cfg.test.batch_size / t
        )
    # Training steps timed again, alternating between the models, on one real batch each: the runs above
    # happen one after another, so a change of machine load between them would bias their own timings.
    # (This changes the trained weights, so it comes after every evaluation.)
    tasks = {}
    for spec in specs:
        engine, cfg = engines[spec.label]
        tasks[spec.label] = _train_step_task(engine, next(iter(engine.train_loader)))
    times = bm.interleaved(tasks, rounds=args.throughput_rounds, warmup=1)
    for spec in specs:
        costs[spec.label]["step_seconds"] = bm.median(times[spec.label])
        costs[spec.label]["step_times"] = times[spec.label]
    if not args.no_memory:
        for spec in specs:
            engine, cfg = engines[spec.label]
            print(f"peak memory of {spec.label} (fresh process) ...", flush=True)
            costs[spec.label]["memory"] = probe_memory(
                cfg, spec, osp.join(args.work_dir, "probes"), threads=args.threads
            )
    return costs


def _embed_task(engine, x):
    """Time one eval-mode forward (the embedding) as the engine's feature extraction runs it."""
    autocast = getattr(engine, "autocast", contextlib.nullcontext)

    def task():
        engine.model.eval()
        with torch.no_grad(), autocast():
            return _timed(engine, lambda: engine.extract_features(x))

    return task


def _timed(engine, step):
    """Seconds ``step()`` takes on the engine's device (synchronised before and after)."""
    bm.sync(engine.device)
    t0 = time.perf_counter()
    step()
    bm.sync(engine.device)
    return time.perf_counter() - t0


def _accuracy(run, target, key):
    res = run["results"][target]
    return res["mAP"] if key == "mAP" else res["cmc"].get(key)


def _targets(runs):
    first = next(iter(runs.values()))[0]
    return list(first["results"])


def compare_markdown(report, specs):
    runs, costs = report["runs"], report["costs"]
    main = [s for s in specs if s.group == "main"]
    base = main[0]
    targets = _targets(runs)
    header = (
        ["metric"]
        + [f"{s.label} ({s.name})" for s in main]
        + [f"{s.label}/{base.label}" for s in main[1:]]
        + [f"{s.label} − {base.label}" for s in main[1:]]
    )
    rows = []
    n_seeds = len(runs[base.label])

    def paired_diff(spec, fn):
        diffs = [fn(a) - fn(b) for a, b in zip(_by_seed(runs[spec.label]), _by_seed(runs[base.label]))]
        return br.fmt_mean_std(diffs)

    for target in targets:
        suffix = f" [{target}]" if len(targets) > 1 else ""
        for key, name in ((1, "Rank-1 (%)"), (5, "Rank-5 (%)"), ("mAP", "mAP (%)")):
            fn = lambda r, key=key, target=target: _accuracy(r, target, key)  # noqa: E731
            if any(fn(r) is None for s in main for r in runs[s.label]):
                continue
            means = {s.label: br.mean_std([fn(r) for r in runs[s.label]])[0] for s in main}
            rows.append(
                [name + suffix]
                + [br.fmt_mean_std([fn(r) for r in runs[s.label]]) for s in main]
                + [br.fmt_ratio(means[s.label], means[base.label]) for s in main[1:]]
                + [paired_diff(s, fn) for s in main[1:]]
            )

    def cost_row(name, values, fmt, higher_is_better=False):
        cells = [fmt(values[s.label]) if values.get(s.label) is not None else "-" for s in main]
        ratios = [br.fmt_ratio(values.get(s.label), values.get(base.label)) for s in main[1:]]
        rows.append([name] + cells + ratios + [""] * (len(main) - 1))

    c = costs
    batch = runs[base.label][0]["batch_size"]
    step = {k: c[k]["step_seconds"] for k in c}
    cost_row(f"training step (ms, batch {batch}, interleaved)", {k: 1000 * v for k, v in step.items()}, "{:.0f}".format)
    cost_row("training images/s (interleaved)", {k: batch / v for k, v in step.items()}, "{:.1f}".format)
    in_run = {s.label: bm.median([t for r in runs[s.label] for t in r["iter_times"][1:]]) for s in main}
    cost_row("training step (ms, median during the runs)", {k: 1000 * v for k, v in in_run.items()}, "{:.0f}".format)
    emb_batch = c[base.label]["embed_batch"]
    cost_row(
        f"embedding images/s (eval forward, batch {emb_batch})",
        {k: c[k]["embed_images_per_s"] for k in c},
        "{:.1f}".format,
    )
    cost_row(
        "evaluation time (s, final test, median)",
        {s.label: bm.median([r["eval_seconds"] for r in runs[s.label]]) for s in main},
        "{:.2f}".format,
    )
    cost_row("GFLOPs / image, inference", {k: c[k]["flops"]["inference"] / 1e9 for k in c}, "{:.3f}".format)
    cost_row("GFLOPs / image, training step", {k: c[k]["flops"]["train"] / 1e9 for k in c}, "{:.3f}".format)
    cost_row("parameters (M)", {k: c[k]["params"] / 1e6 for k in c}, "{:.3f}".format)
    if all("memory" in c[k] for k in c):
        mem = c[base.label]["memory"]
        what = f"peak training memory (MB, {'allocated' if mem['device'] == 'cuda' else 'RSS'} over setup)"
        cost_row(what, {k: c[k]["memory"]["train_bytes"] / 2**20 for k in c}, "{:.0f}".format)
        if all("heap_train_bytes" in c[k]["memory"] for k in c):
            cost_row(
                "peak training memory (MB, heap in use over setup)",
                {k: c[k]["memory"]["heap_train_bytes"] / 2**20 for k in c},
                "{:.0f}".format,
            )
        cost_row("peak memory, absolute (MB)", {k: c[k]["memory"]["peak_bytes"] / 2**20 for k in c}, "{:.0f}".format)
    lines = [
        f"### Side by side ({n_seeds} seed{'s' if n_seeds > 1 else ''}: "
        f"{', '.join(str(r['seed']) for r in _by_seed(runs[base.label]))})",
        "",
        br.markdown_table(header, rows),
        "",
    ]
    rounds = report["throughput_rounds"]
    lines.append(
        "Accuracy: mean ± sample std over seeds; the last column is the paired per-seed difference "
        "(mean ± std). Costs: training step = forward + loss + backward + optimizer step, data loading "
        "excluded; 'interleaved': one training batch per model, timed after training with the models "
        f"alternating, median of {rounds} rounds; 'during the runs': median over all iterations of all "
        "seeds but each run's first (runs are sequential, so load changes between them show here); "
        "embedding throughput: eval-mode forward of a fixed random batch after training, models "
        f"alternating, median of {rounds} rounds; "
        "evaluation time: the engine's whole final test (feature extraction with data loading, "
        "distances, ranking); peak training memory: a fresh process per model, peak during 3 training "
        "steps over the memory after setup, as the kernel's peak RSS (includes freed memory the "
        "allocator keeps) and as malloc's heap in use sampled after every aten operation."
    )

    per_seed = []
    for s in [x for x in specs]:
        for target in targets:
            vals = [
                f"{100 * _accuracy(r, target, 'mAP'):.1f}/{100 * _accuracy(r, target, 1):.1f}"
                for r in _by_seed(runs[s.label])
            ]
            per_seed.append([s.label, target] + vals)
    seeds = [r["seed"] for r in _by_seed(runs[base.label])]
    lines += [
        "",
        "Per seed (mAP/Rank-1, %):",
        "",
        br.markdown_table(["model", "target"] + [f"seed {sd}" for sd in seeds], per_seed),
    ]

    abl = ablation_markdown(report, specs)
    if abl:
        lines += ["", abl]
    return "\n".join(lines)


def _by_seed(runs):
    return sorted(runs, key=lambda r: r["seed"])


def ablation_rows(report, specs):
    """(label, setting, per-seed mAP list, per-seed Rank-1 list) for the baseline, PTL and every variant."""
    runs = report["runs"]
    target = _targets(runs)[0]
    rows = []
    for s in specs[:2] + [x for x in specs if x.group == "ablation"]:
        rs = _by_seed(runs[s.label])
        rows.append(
            (
                s.label,
                s.note or "",
                [r["results"][target]["mAP"] for r in rs],
                [r["results"][target]["cmc"][1] for r in rs],
            )
        )
        for extra, options in s.extra_evals.items():
            if all(extra in r["extra_results"] for r in rs):
                rows.append(
                    (
                        extra,
                        "same trained models, evaluated with " + ", ".join(f"{k} {v}" for k, v in options.items()),
                        [r["extra_results"][extra][target]["mAP"] for r in rs],
                        [r["extra_results"][extra][target]["cmc"][1] for r in rs],
                    )
                )
    return rows


def ablation_markdown(report, specs):
    if not any(s.group == "ablation" for s in specs):
        return ""
    rows = ablation_rows(report, specs)
    base_map = rows[0][2]
    ptl_map = rows[1][2]
    table = []
    for label, setting, maps, r1s in rows:
        d_base = br.fmt_mean_std([a - b for a, b in zip(maps, base_map)])
        d_ptl = br.fmt_mean_std([a - b for a, b in zip(maps, ptl_map)]) if label != rows[0][0] else ""
        table.append(
            [
                label,
                setting,
                br.fmt_mean_std(r1s),
                br.fmt_mean_std(maps),
                d_base,
                d_ptl,
                " ".join(f"{100 * m:.1f}" for m in maps),
            ]
        )
    header = ["variant", "setting", "Rank-1 (%)", "mAP (%)", "Δ mAP vs baseline", "Δ mAP vs PTL", "mAP per seed"]
    return "\n".join(
        [
            f"### PTL ablation ({_targets(report['runs'])[0]})",
            "",
            br.markdown_table(header, table),
            "",
            "Δ: paired per-seed difference in mAP points (mean ± std). Each variant changes one "
            "setting of the PTL row; everything else (data, seeds, schedule, pretrained weights) is "
            "shared.",
        ]
    )


def compare_plots(report, specs, prefix):
    runs = report["runs"]
    main = [s for s in specs if s.group == "main"]
    target = _targets(runs)[0]
    curves = {}
    for s in main:
        curves[f"{s.label} ({s.name})"] = [
            [v for _, v in sorted(r["results"][target]["cmc"].items(), key=lambda kv: int(kv[0]))]
            for r in runs[s.label]
        ]
    n = len(runs[main[0].label])
    paths = [
        br.plot_cmc(
            curves, prefix + "_cmc.png", title=f"CMC on {target} (mean over {n} seed{'s' if n > 1 else ''})"
        )
    ]
    training = {f"{s.label} ({s.name})": runs[s.label] for s in main}
    paths.append(br.plot_training(training, prefix + "_training.png", title=f"fine-tuning on {target}"))
    if any(s.group == "ablation" for s in specs):
        rows = [(label, maps) for label, _, maps, _ in ablation_rows(report, specs)]
        paths.append(br.plot_ablation(rows, prefix + "_ablation.png", title=f"PTL ablation on {target}"))
    return paths


# ---------------------------------------------------------------------------------------------------------
# Speed mode
# ---------------------------------------------------------------------------------------------------------


def speed(args):
    names = args.models or ["resnet50", "ptl_resnet50"]
    if len(names) < 2:
        raise SystemExit("--speed needs a baseline and at least one other model (--models A B)")
    opts = [
        "model.pretrained",
        "False",
        "data.sources",
        "['synthetic_reid']",
        "data.targets",
        "['synthetic_reid']",
        "data.height",
        str(args.height),
        "data.width",
        str(args.width),
        "train.batch_size",
        str(args.batch_size),
        "data.workers",
        "0",
        "train.progress_bar",
        "False",
        "data.synthetic.num_train_ids",
        "8",
        "data.synthetic.num_test_ids",
        "2",
        "data.synthetic.num_cameras",
        "2",
        "data.synthetic.images_per_id_per_camera",
        "1",
        "data.save_dir",
        osp.join(args.work_dir, "speed"),
        "data.root",
        args.root or osp.join(args.work_dir, "reid-data"),
    ]
    base = load_config(args.config_file or None, opts=opts + list(args.opts), validate=False)
    specs = [ModelSpec(n, n) for n in names]
    load_start = bm.load_average()

    engines, train_tasks, infer_tasks, info = {}, {}, {}, {}
    for spec in specs:
        cfg = spec_config(base, spec)
        with _quiet(osp.join(cfg.data.save_dir, spec.label + ".log"), not args.verbose):
            torchreid.utils.set_random_seed(cfg.train.seed)
            engine = spec_engine(cfg, spec)
        engines[spec.label] = (engine, cfg)
        g = torch.Generator().manual_seed(0)
        batch = {
            "img": torch.randn(args.batch_size, 3, args.height, args.width, generator=g),
            "pid": torch.randint(0, engine.datamanager.num_train_pids, (args.batch_size,), generator=g),
        }
        train_tasks[spec.label] = _train_step_task(engine, batch)
        infer_tasks[spec.label] = _embed_task(engine, batch["img"].to(engine.device))
        info[spec.label] = {
            "flops": bm.train_and_inference_flops(engine.net, args.height, args.width, device=engine.device),
            "params": bm.count_params(engine.net),
        }
    print(f"machine: {bm.machine_description(engines[names[0]][0].device)}; load average {load_start:.1f}", flush=True)
    print(f"timing {args.rounds} training steps per model, interleaved ...", flush=True)
    train_times = bm.interleaved(train_tasks, rounds=args.rounds, warmup=1)
    print(f"timing {args.rounds} embedding batches per model, interleaved ...", flush=True)
    infer_times = bm.interleaved(infer_tasks, rounds=args.rounds, warmup=1)
    if not args.no_memory:
        for spec in specs:
            engine, cfg = engines[spec.label]
            print(f"peak memory of {spec.label} (fresh process) ...", flush=True)
            info[spec.label]["memory"] = probe_memory(
                cfg, spec, osp.join(args.work_dir, "probes"), random_batch=True, threads=args.threads
            )
    load_end = bm.load_average()
    report = {
        "mode": "speed",
        "command": _command_line(),
        "machine": bm.machine_description(engines[names[0]][0].device),
        "load_average": [load_start, load_end],
        "batch_size": args.batch_size,
        "height": args.height,
        "width": args.width,
        "rounds": args.rounds,
        "train_times": train_times,
        "infer_times": infer_times,
        "info": info,
        "optimizer": base.train.optim,
        "loss": base.loss.name,
    }
    text = speed_markdown(report, [s.label for s in specs])
    print("\n" + text)
    _write_outputs(args, report, text, None)
    return 0 if report.get("targets_met", True) else 1


def _train_step_task(engine, batch):
    def task():
        engine.model.train()
        return _timed(engine, lambda: engine.forward_backward(batch))

    return task


def speed_markdown(report, labels):
    base = labels[0]
    tt, it, info = report["train_times"], report["infer_times"], report["info"]
    b = report["batch_size"]
    med_t = {k: bm.median(v) for k, v in tt.items()}
    med_i = {k: bm.median(v) for k, v in it.items()}
    header = ["metric"] + labels + [f"{k}/{base}" for k in labels[1:]]
    rows = []

    def row(name, values, fmt):
        rows.append(
            [name] + [fmt(values[k]) for k in labels] + [br.fmt_ratio(values[k], values[base]) for k in labels[1:]]
        )

    row("training step (s, median)", med_t, "{:.3f}".format)
    row("training images/s", {k: b / v for k, v in med_t.items()}, "{:.2f}".format)
    row("embedding forward (s / batch, median)", med_i, "{:.3f}".format)
    row("embedding images/s", {k: b / v for k, v in med_i.items()}, "{:.2f}".format)
    row("GFLOPs / image, training step", {k: info[k]["flops"]["train"] / 1e9 for k in labels}, "{:.2f}".format)
    row("GFLOPs / image, inference", {k: info[k]["flops"]["inference"] / 1e9 for k in labels}, "{:.2f}".format)
    row("parameters (M)", {k: info[k]["params"] / 1e6 for k in labels}, "{:.2f}".format)
    has_mem = all("memory" in info[k] for k in labels)
    if has_mem:
        row(
            "peak training memory (MB, RSS over setup)",
            {k: info[k]["memory"]["train_bytes"] / 2**20 for k in labels},
            "{:.0f}".format,
        )
        if all("heap_train_bytes" in info[k]["memory"] for k in labels):
            row(
                "peak training memory (MB, heap in use over setup)",
                {k: info[k]["memory"]["heap_train_bytes"] / 2**20 for k in labels},
                "{:.0f}".format,
            )
        row("peak memory, absolute (MB)", {k: info[k]["memory"]["peak_bytes"] / 2**20 for k in labels}, "{:.0f}".format)

    targets = []
    met_all = True
    for k in labels[1:]:
        flop_t = info[k]["flops"]["train"] / info[base]["flops"]["train"]
        flop_i = info[k]["flops"]["inference"] / info[base]["flops"]["inference"]
        time_t = med_t[k] / med_t[base]
        time_i = med_i[k] / med_i[base]
        # Per-round paired ratios show how much the load moved the result.
        rr_t = sorted(a / c for a, c in zip(tt[k], tt[base]))
        rr_i = sorted(a / c for a, c in zip(it[k], it[base]))
        for name, t, f, rr in (("training time", time_t, flop_t, rr_t), ("embedding time", time_i, flop_i, rr_i)):
            ok = t <= 1.10 * f
            met_all &= ok
            targets.append(
                [
                    f"{name} ratio {k}/{base}",
                    f"{t:.2f} (rounds {rr[0]:.2f}-{rr[-1]:.2f})",
                    f"{f:.2f}",
                    f"{t / f:.2f}",
                    "<= 1.10",
                    "yes" if ok else "NO",
                ]
            )
        if has_mem:
            measures = [("train_bytes", "RSS" if info[k]["memory"]["device"] == "cpu" else "allocated")]
            if all("heap_train_bytes" in info[x]["memory"] for x in (k, base)):
                measures.append(("heap_train_bytes", "heap in use"))
            for key, what in measures:
                m = info[k]["memory"][key] / info[base]["memory"][key]
                ok = m <= 1.5
                met_all &= ok
                targets.append(
                    [
                        f"peak training memory ratio {k}/{base} ({what})",
                        f"{m:.2f}",
                        "-",
                        "-",
                        "<= 1.50",
                        "yes" if ok else "NO",
                    ]
                )
    report["targets_met"] = met_all
    lines = [
        f"### Speed and memory: batch {b}, {report['height']}x{report['width']}, {report['optimizer']} + "
        f"{report['loss']} loss, {report['rounds']} rounds interleaved",
        "",
        br.markdown_table(header, rows),
        "",
        br.markdown_table(["target", "time ratio", "FLOP ratio", "time / FLOP ratio", "limit", "met"], targets),
        "",
        "Times: one training step (forward, loss, backward, optimizer step) or one eval-mode embedding forward on a "
        "fixed random batch (no data loading); models alternate every round (ABBA order); medians. Memory: a "
        "fresh process per model, peak during 3 training steps minus the memory after setup; 'RSS': the "
        "kernel's peak resident set (includes freed memory the allocator keeps, i.e. fragmentation); 'heap "
        "in use': malloc's bytes in use, sampled after every aten operation (the CPU analogue of CUDA's "
        "max_memory_allocated).",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Output and command line
# ---------------------------------------------------------------------------------------------------------


def _command_line():
    argv = [a if a and all(c.isalnum() or c in "-_./=:,@[]'" for c in a) else json.dumps(a) for a in sys.argv[1:]]
    return "python tools/benchmark.py " + " ".join(argv)


def _write_outputs(args, report, text, plot_fn):
    plots = []
    if plot_fn is not None and args.plots:
        plots = plot_fn(args.plots)
        for p in plots:
            print(f"plot written to {p}")
    if args.out:
        head = [
            f"Command: `{report['command']}`",
            "",
            f"Machine: {report['machine']}; load average {report['load_average'][0]:.1f} at the start, "
            f"{report['load_average'][1]:.1f} at the end.",
            "",
        ]
        if plots:
            rel = [osp.relpath(p, osp.dirname(osp.abspath(args.out)) or ".") for p in plots]
            text = text + "\n\n" + "\n".join(f"![{osp.basename(p)}]({r})" for p, r in zip(plots, rel))
        d = osp.dirname(args.out)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(head) + text + "\n")
        print(f"table written to {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=_json_default)
        print(f"raw results written to {args.json}")


def _json_default(o):
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config-file",
        default=None,
        help=f"fine-tuning config (default: {osp.relpath(SYNTHETIC_FINETUNE_CONFIG, REPO)} for the comparison, "
        "the package defaults for --speed)",
    )
    p.add_argument("--root", default="", help="dataset root (data.root) for both stages")
    p.add_argument("-s", "--sources", nargs="+", help="fine-tuning source datasets (data.sources)")
    p.add_argument("-t", "--targets", nargs="+", help="fine-tuning target datasets (data.targets)")
    p.add_argument("--baseline", default=None, help="plain torchreid model (default: the config's model.name)")
    p.add_argument("--ptl", default=None, help="PTL model (default: ptl_<baseline>)")
    p.add_argument(
        "--spec", action="append", help="extra column LABEL=MODEL[@module:function][,KEY=VALUE...], e.g. a pruned model"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="train.seed values")
    p.add_argument(
        "--epochs", type=int, default=None, help="fine-tuning epochs (train.max_epoch; the LR steps are scaled with it)"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="config override for the fine-tuning stage only (repeatable)",
    )
    p.add_argument("--eval-freq", type=int, default=2, help="evaluate every N epochs (for the mAP curve)")
    p.add_argument("--cmc-rank", type=int, default=20, help="CMC curve up to this rank")
    p.add_argument(
        "--pretrain-config",
        default=None,
        help="config to pretrain the plain model on the source domain (default with the synthetic "
        f"config: {osp.relpath(SYNTHETIC_PRETRAIN_CONFIG, REPO)})",
    )
    p.add_argument(
        "--pretrain-epochs",
        type=int,
        default=None,
        help="pretraining epochs (train.max_epoch; the LR steps are scaled with it)",
    )
    p.add_argument(
        "--pretrain-init",
        default=None,
        help="initial weights of the pretraining stage (model.load_weights there), e.g. a model-zoo file",
    )
    p.add_argument(
        "--pretrain-set",
        action="append",
        metavar="KEY=VALUE",
        help="config override for the pretraining stage only (repeatable)",
    )
    p.add_argument("--pretrain-weights", default=None, help="start every model from these weights instead")
    p.add_argument("--no-pretrain", action="store_true", help="no pretraining; models start as the config says")
    p.add_argument("--ablation", action="store_true", help="add the PTL cell ablation")
    p.add_argument("--ablation-reset-iters", type=int, default=4, help="N of the 'reset iter N' variant")
    p.add_argument("--ablation-freeze-epochs", type=int, default=3, help="K of the 'freeze K epochs' variant")
    p.add_argument(
        "--throughput-rounds",
        type=int,
        default=10,
        help="timed embedding batches and training steps per model after training",
    )
    p.add_argument("--speed", action="store_true", help="speed/memory mode (random batches, no training run)")
    p.add_argument("--models", nargs="+", default=None, help="--speed: baseline first (default resnet50 ptl_resnet50)")
    p.add_argument("--batch-size", type=int, default=32, help="--speed: batch size")
    p.add_argument("--height", type=int, default=256, help="--speed: input height")
    p.add_argument("--width", type=int, default=128, help="--speed: input width")
    p.add_argument("--rounds", type=int, default=5, help="--speed: timed rounds (one step per model per round)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--work-dir", default="log/benchmark", help="logs, checkpoints, cached pretraining")
    p.add_argument("--out", default=None, help="write the tables as Markdown to this file")
    p.add_argument("--json", default=None, help="write all raw measurements to this JSON file")
    p.add_argument("--plots", default=None, help="plot file prefix, e.g. docs/benchmark -> docs/benchmark_cmc.png")
    p.add_argument("--verbose", action="store_true", help="show the engine's output instead of logging it")
    p.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-steps", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--probe-random-batch", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides for both stages")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.opts = list(args.opts or [])
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe_memory:
        return _probe_main(args)
    try:
        if args.speed:
            return speed(args)
        if args.config_file is None:
            args.config_file = SYNTHETIC_FINETUNE_CONFIG
            if args.pretrain_config is None and not args.pretrain_weights and not args.no_pretrain:
                args.pretrain_config = SYNTHETIC_PRETRAIN_CONFIG
        if args.pretrain_config is None and not args.pretrain_weights:
            args.no_pretrain = True
        if not args.seeds:
            raise SystemExit("--seeds needs at least one seed")
        return compare(args)
    except ConfigError as e:
        print(f"benchmark: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
