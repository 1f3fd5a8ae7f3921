"""tools/benchmark.py: end to end on a tiny config (tables and plots written), and its measuring helpers."""
import json
import mmap
import os.path as osp

import pytest
import torch
import torch.nn as nn
from tiny import run_tool

from ptl_torchreid.benchmarking import measure as bm
from ptl_torchreid.benchmarking import report as br
from ptl_torchreid.benchmarking.spec import ModelSpec, parse_spec

TINY = ["data.synthetic.num_train_ids", "8", "data.synthetic.num_test_ids", "6", "data.synthetic.num_cameras", "2",
        "data.synthetic.images_per_id_per_camera", "2", "data.height", "64", "data.width", "32",
        "train.batch_size", "8", "sampler.num_instances", "2", "test.batch_size", "32"]


def _nonempty_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and osp.getsize(path) > 1000


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Data root and work dir shared by the end-to-end tests (the second reuses the cached pretraining)."""
    root = tmp_path_factory.mktemp("bench")
    return {"root": str(root / "data"), "work": str(root / "work")}


def _argv(shared, tmp_path, *extra):
    return ["--seeds", "1", "--epochs", "1", "--pretrain-epochs", "1", "--eval-freq", "1", "--throughput-rounds",
            "1", "--threads", "1", "--root", shared["root"], "--work-dir", shared["work"],
            "--out", str(tmp_path / "bench.md"), "--json", str(tmp_path / "bench.json"),
            "--plots", str(tmp_path / "plots" / "bench")] + list(extra) + TINY


def _benchmark(argv):
    """Runs tools/benchmark.py with ``argv``; returns (exit status, stdout)."""
    proc = run_tool("benchmark.py", *argv)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    return proc.returncode, proc.stdout


def test_compare_end_to_end_tiny(shared, tmp_path):
    argv = _argv(shared, tmp_path, "--spec", "rebuilt=osnet_x0_25@ptl_torchreid.engine:build_model")
    assert _benchmark(argv)[0] == 0

    text = (tmp_path / "bench.md").read_text()
    assert text.startswith("Command: `python tools/benchmark.py")
    assert "load average" in text
    for row in ("Rank-1 (%)", "Rank-5 (%)", "mAP (%)", "training step", "training images/s", "embedding images/s",
                "evaluation time", "GFLOPs / image, inference", "GFLOPs / image, training step", "parameters (M)",
                "peak training memory"):
        assert row in text, row
    # Baseline, PTL and the extra column built by the spec's builder; ratios to the baseline.
    assert "baseline (osnet_x0_25)" in text and "PTL (ptl_osnet_x0_25)" in text and "rebuilt (osnet_x0_25)" in text
    assert "PTL/baseline" in text and "rebuilt/baseline" in text
    assert "### PTL ablation" not in text

    plots = str(tmp_path / "plots" / "bench")
    for suffix in ("_cmc.png", "_training.png"):
        assert _nonempty_png(plots + suffix), suffix
        assert osp.basename(plots + suffix) in text  # linked from the Markdown

    report = json.loads((tmp_path / "bench.json").read_text())
    costs = report["costs"]
    assert costs["PTL"]["flops"]["inference"] > costs["baseline"]["flops"]["inference"] > 0
    assert costs["PTL"]["params"] > costs["baseline"]["params"]
    for label in ("baseline", "PTL", "rebuilt"):
        mem = costs[label]["memory"]
        assert mem["peak_bytes"] > 0 and mem["train_bytes"] is not None
        assert costs[label]["step_seconds"] > 0 and costs[label]["embed_images_per_s"] > 0
    base_run = report["runs"]["baseline"][0]
    assert base_run["iter_times"] and base_run["epochs"][0]["epoch"] == 1 and base_run["evals"]
    # Every model fine-tuned from the same pretrained weights; PTL loads them into its backbone.
    weights = report["pretrain_weights"]
    assert weights and osp.isfile(weights)
    for label in ("baseline", "PTL", "rebuilt"):
        assert weights in open(report["runs"][label][0]["log"]).read()
    assert "into the PTL backbone" in open(report["runs"]["PTL"][0]["log"]).read()


def test_ablation_end_to_end_tiny_reuses_pretraining(shared, tmp_path):
    argv = _argv(shared, tmp_path, "--ablation", "--no-memory")
    rc, out = _benchmark(argv)
    assert rc == 0
    assert "pretraining: reusing" in out
    text = (tmp_path / "bench.md").read_text()
    assert "### PTL ablation" in text
    for variant in ("state_mode slot", "eval_state zero", "reset never", "reset iter 4", "freeze backbone 3 ep",
                    "freeze backbone throughout"):
        assert variant in text, variant
    assert _nonempty_png(str(tmp_path / "plots" / "bench_ablation.png"))
    report = json.loads((tmp_path / "bench.json").read_text())
    assert "PTL, eval_state zero" in report["runs"]["PTL"][0]["extra_results"]


def test_speed_mode_tiny(tmp_path):
    out = tmp_path / "speed.md"
    argv = ["--speed", "--models", "osnet_x0_25", "ptl_osnet_x0_25", "--batch-size", "4", "--height", "64",
            "--width", "32", "--rounds", "1", "--threads", "1", "--work-dir", str(tmp_path / "work"),
            "--out", str(out)]
    rc, _ = _benchmark(argv)
    assert rc in (0, 1)  # 1: a target missed, which a tiny noisy run may well do
    text = out.read_text()
    for row in ("training step (s, median)", "embedding images/s", "GFLOPs / image, training step",
                "peak training memory", "training time ratio ptl_osnet_x0_25/osnet_x0_25",
                "embedding time ratio", "peak training memory ratio"):
        assert row in text, row


def test_train_and_inference_flops_of_a_conv_matches_the_arithmetic():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    flops = bm.train_and_inference_flops(conv, 16, 8)
    macs = 3 * 8 * 9 * 16 * 8
    assert flops["inference"] == 2 * macs
    # Backward: gradients of the weights only (the input needs none) -> one more conv's worth.
    assert flops["train"] == 2 * (2 * macs)


def test_train_and_inference_flops_leaves_the_model_untouched():
    from ptl_torchreid.models import build_model

    model = build_model("ptl_osnet_x0_25", 4, input_size=(64, 32))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flops = bm.train_and_inference_flops(model, 64, 32)
    assert flops["train"] > flops["inference"] > 0
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(c.state is None for c in model.cells())


def test_interleaved_alternates_order_and_skips_warmup():
    calls = []
    tasks = {n: (lambda n=n: calls.append(n) or 1.0) for n in "AB"}
    times = bm.interleaved(tasks, rounds=3, warmup=1)
    assert calls == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert times == {"A": [1.0, 1.0, 1.0], "B": [1.0, 1.0, 1.0]}


def test_peak_rss_sees_a_temporary_allocation():
    if bm.rss_bytes() is None or not bm.reset_peak_rss():
        pytest.skip("needs Linux /proc")
    base = bm.rss_bytes()
    # 64 MiB of fresh anonymous memory, touched: unlike a tensor, it cannot land in memory the allocator
    # already holds resident from earlier tests
    x = mmap.mmap(-1, 64 * 2 ** 20)
    x.write(b"\1" * len(x))
    x.close()
    assert bm.peak_rss_bytes() - base > 48 * 2 ** 20


def test_model_spec_round_trip_and_parsing():
    spec = parse_spec("pruned=ptl_resnet50@ptl_torchreid.engine:build_model,ptl.lr_mult=10")
    assert (spec.label, spec.name, spec.builder, spec.opts) == (
        "pruned", "ptl_resnet50", "ptl_torchreid.engine:build_model", ("ptl.lr_mult", "10"))
    assert ModelSpec.from_json(spec.to_json()) == spec
    with pytest.raises(SystemExit):
        parse_spec("no-model-name")


def test_mean_std_and_formatting():
    assert br.mean_std([0.5]) == (0.5, 0.0)
    m, s = br.mean_std([0.1, 0.3])
    assert m == pytest.approx(0.2) and s == pytest.approx(0.1414, abs=1e-4)
    assert br.fmt_mean_std([0.1, 0.3]) == "20.0 ± 14.1"
    assert br.fmt_mean_std([0.25]) == "25.0"
    assert br.fmt_ratio(3.0, 2.0) == "1.50x" and br.fmt_ratio(1.0, 0.0) == "-"
