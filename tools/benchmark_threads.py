#!/usr/bin/env python3
"""Training-step time of the README demo with torch's default CPU threading vs ``train.cpu_threads auto`` and
passive OpenMP waiting, on a quiet machine and with competing busy processes that this script starts.

Each setting runs in its own process, started anew for every load case after the case's busy processes (OpenMP
settings are read when torch starts, and ours are chosen from the load seen then), running the demo config
(``configs/synthetic_demo.yaml``: ptl_osnet_x0_25, batch 32, 128x64, data loading in-process) through the
engine's ``forward_backward`` for ``--steps`` batches after ``--warmup`` untimed ones; wall and CPU time of the
timed steps (data loading included, as in the demo). Settings:

- ``torch default``: torch imported before ptl_torchreid (so nothing is set), ``train.cpu_threads 0``;
- ``ours``: the package imported first (passive waiting when other processes keep the CPUs busy),
  ``train.cpu_threads auto``;
- fixed: 1 thread; one thread per CPU with passive waiting; one per CPU with a short spin (GOMP_SPINCOUNT).

Busy processes are single-threaded Python loops, each bounded to ``--busy-timeout`` seconds and stopped by
the script after its load case. Runs are interleaved (every setting once per round) so that drifting load
from elsewhere hits all settings alike. OMP_*/MKL_*/GOMP_*/KMP_* variables of the calling shell are removed
from the children's environment.

    python tools/benchmark_threads.py --loads 1 2 --rounds 3 --out log/bench/threads_busy.md
    python tools/benchmark_threads.py --loads 0 --rounds 9 --out log/bench/threads_quiet.md  # idle machine

(on a small VM, three rounds of the quiet case cannot tell settings 5% apart; nine could)
"""
import argparse
import json
import os
import os.path as osp
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import ptl_torchreid  # noqa: F401  (before torch: the package sets OpenMP waiting, see _openmp.py)

# isort: split
import torch

from ptl_torchreid.config import load_config
from ptl_torchreid.engine import build_datamanager, build_engine
from ptl_torchreid.utils.cpu_threads import apply_cpu_threads, openmp_waiting, usable_cpus

_TOOLS = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(_TOOLS)

DEMO_CONFIG = osp.join(REPO, "configs", "synthetic_demo.yaml")
SHORT_SPIN = "10000"  # GOMP_SPINCOUNT: spin ~1/30 of libgomp's default before sleeping
CLEARED_PREFIXES = ("OMP_", "MKL_", "GOMP_", "KMP_")
BASELINE = "torch default"
OURS = "ours (auto)"


def settings(cpus):
    """``{label: (import torch first, train.cpu_threads, extra environment)}``; the first is the baseline."""
    return {
        BASELINE: (True, 0, {}),
        OURS: (False, "auto", {}),
        "1 thread": (True, 1, {}),
        f"{cpus} threads, passive": (True, cpus, {"OMP_WAIT_POLICY": "PASSIVE"}),
        f"{cpus} threads, short spin": (True, cpus, {"GOMP_SPINCOUNT": SHORT_SPIN}),
    }


def demo_config(root, save_dir, cpu_threads="auto"):
    return load_config(DEMO_CONFIG, ["data.root", root, "data.save_dir", save_dir, "train.progress_bar", "False",
                                     "use_gpu", "False", "train.cpu_threads", str(cpu_threads)])


def child(spec):
    """The measured process: builds the demo once, then for every ``measure`` line on standard input chooses its
    threads (``auto`` samples the load anew) and times the demo's training steps; one JSON line per result."""
    cfg = demo_config(spec["root"], spec["save_dir"], spec["cpu_threads"])
    engine = build_engine(cfg)
    engine.model.train()
    batches = _batches(engine.train_loader)
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() != "measure":
            break
        choice = apply_cpu_threads(cfg.train.cpu_threads)
        for _ in range(spec["warmup"]):
            engine.forward_backward(next(batches))
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(spec["steps"]):
            engine.forward_backward(next(batches))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        print("RESULT " + json.dumps({"wall": wall, "cpu": cpu, "threads": choice.threads, "load": choice.load,
                                      "waiting": openmp_waiting()}), flush=True)


def _batches(loader):
    """The loader's batches, epoch after epoch (the demo's epoch is a few dozen batches)."""
    while True:
        yield from loader


class Worker:
    """One measured process per setting (OpenMP settings are fixed when torch starts), kept for all cases."""

    def __init__(self, label, setting, spec):
        torch_first, cpu_threads, extra = setting
        pre = "import torch; " if torch_first else ""
        code = (f"import sys, json; sys.path.insert(0, {_TOOLS!r}); {pre}import benchmark_threads as b; "
                "b.child(json.loads(sys.argv[1]))")
        self.label = label
        self.proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(dict(spec, cpu_threads=cpu_threads))],
                                     env=_child_env(extra), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self._expect("READY")

    def _expect(self, prefix):
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"setting '{self.label}' failed (exit {self.proc.wait()}); its error is above")

    def measure(self):
        self.proc.stdin.write("measure\n")
        return json.loads(self._expect("RESULT "))

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _child_env(extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEARED_PREFIXES)}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def start_busy(n, seconds):
    """``n`` single-threaded busy loops, each ending by itself after ``seconds``."""
    code = f"import time\nend = time.time() + {float(seconds)}\nwhile time.time() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def stop_busy(procs):
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def loadavg():
    try:
        one, five, fifteen = os.getloadavg()
        return f"{one:.2f} {five:.2f} {fifteen:.2f}"
    except OSError:
        return "n/a"


def run_benchmark(args):
    cpus = usable_cpus()
    table = settings(cpus)
    labels = list(table)
    with tempfile.TemporaryDirectory(prefix="ptl-threads-") as tmp:
        spec = {"root": osp.join(tmp, "reid-data"), "save_dir": osp.join(tmp, "log"), "steps": args.steps,
                "warmup": args.warmup}
        print(f"Generating the demo dataset into {spec['root']} ...", flush=True)
        build_datamanager(demo_config(spec["root"], spec["save_dir"]))
        results = {n_busy: _load_case(n_busy, table, spec, args) for n_busy in args.loads}
    return cpus, labels, results


def _load_case(n_busy, table, spec, args):
    before = loadavg()
    busy = start_busy(n_busy, args.busy_timeout) if n_busy else []
    workers = []
    try:
        time.sleep(1.0 if n_busy else 0.0)  # the loops are running before the settings start and sample the load
        for label, setting in table.items():  # started one after another: startup is not measured
            workers.append(Worker(label, setting, spec))
        runs = {w.label: [] for w in workers}
        for r in range(args.rounds):
            for w in workers:
                res = w.measure()
                if any(p.poll() is not None for p in busy):
                    raise RuntimeError("a busy process ended before its load case did; raise --busy-timeout")
                runs[w.label].append(res)
                print(f"busy={n_busy} round={r + 1} {w.label:<28} wall {res['wall']:6.2f} s  cpu {res['cpu']:6.2f} s  "
                      f"threads {res['threads']}", flush=True)
    finally:
        for w in workers:
            w.close()
        stop_busy(busy)
    return {"runs": runs, "loadavg_before": before, "loadavg_after": loadavg()}


def _median(runs, key):
    return statistics.median(r[key] for r in runs)


def report_markdown(args, cpus, labels, results):
    machine = f"{platform.processor() or platform.machine()} ({platform.platform()})"
    out = [
        f"CPU training-step time of the demo (ptl_osnet_x0_25, batch 32, 128x64, {args.steps} timed steps after "
        f"{args.warmup} warm-up, median of {args.rounds} interleaved rounds), {cpus} usable CPUs, {machine}, "
        f"torch {torch.__version__}.",
        "",
    ]
    header = ("| busy processes | setting | threads | OpenMP waiting | wall s (median) | CPU s (median) "
              "| vs torch default | loadavg before -> after |")
    out += [header, "|---" * (header.count("|") - 1) + "|"]
    checks = []
    for n_busy, res in results.items():
        runs = res["runs"]
        base = _median(runs[BASELINE], "wall")
        fixed = [lab for lab in labels if lab not in (BASELINE, OURS)]
        for label in labels:
            wall = _median(runs[label], "wall")
            threads = "/".join(str(t) for t in sorted({r["threads"] for r in runs[label]}))
            waiting = "/".join(sorted({r["waiting"].split(" (")[0] for r in runs[label]}))
            out.append(f"| {n_busy} | {label} | {threads} | {waiting} | {wall:.2f} | {_median(runs[label], 'cpu'):.2f} "
                       f"| {base / wall:.2f}x | {res['loadavg_before']} -> {res['loadavg_after']} |")
        ours = _median(runs[OURS], "wall")
        best_label = min(fixed + [BASELINE], key=lambda lab: _median(runs[lab], "wall"))
        best = _median(runs[best_label], "wall")
        if n_busy:
            checks.append(
                f"with {n_busy} busy: ours is {base / ours:.2f}x faster than torch's default (target >= 2x): "
                f"{'met' if base / ours >= 2 else 'MISSED'}"
            )
        else:
            checks.append(
                f"quiet: ours is {ours / best - 1:+.1%} vs the best fixed setting ({best_label}) (target within 5%): "
                f"{'met' if ours <= 1.05 * best else 'MISSED'}"
            )
    return "\n".join(out + [""] + ["- " + c for c in checks]) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--loads", type=int, nargs="+", default=[0, 1, 2], help="numbers of competing busy processes, one case each"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per load case")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument(
        "--busy-timeout",
        type=float,
        default=3600.0,
        help="seconds after which a busy process stops by itself (it is stopped after its case)",
    )
    parser.add_argument("--out", type=str, default="", help="also write the Markdown report here")
    args = parser.parse_args(argv)
    if any(n < 0 for n in args.loads) or args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--loads must be >= 0, --rounds and --steps >= 1, --warmup >= 0")
    print(f"loadavg at start: {loadavg()}", flush=True)
    cpus, labels, results = run_benchmark(args)
    text = report_markdown(args, cpus, labels, results)
    print("\n" + text + f"\nloadavg at end: {loadavg()}")
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
