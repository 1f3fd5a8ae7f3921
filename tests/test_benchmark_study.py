"""tools/benchmark_study.py: paired intervals by hand, and a tiny study split over two runs and merged."""
import json
import os.path as osp

import pytest
from scipy import stats
from tiny import run_tool

from ptl_torchreid.benchmarking.report import paired


def test_paired_difference_and_t_interval_by_hand():
    p = paired([0.50, 0.52, 0.49], [0.48, 0.49, 0.49])
    assert p["diffs"] == pytest.approx([2.0, 3.0, 0.0])
    sd = (((2 - 5 / 3) ** 2 + (3 - 5 / 3) ** 2 + (0 - 5 / 3) ** 2) / 2) ** 0.5
    half = stats.t.ppf(0.975, 2) * sd / 3 ** 0.5
    assert p["mean"] == pytest.approx(5 / 3) and p["std"] == pytest.approx(sd)
    assert p["ci"] == pytest.approx((5 / 3 - half, 5 / 3 + half))
    assert paired([0.5], [0.4]) is None  # one seed gives no interval


@pytest.mark.slow
def test_tiny_study_over_two_processes_merges_into_one_paired_report(tmp_path):
    common = ["--variants", "plain", "branch", "rectify", "--min-steps", "2", "--pretrain-epochs", "1",
              "--root", str(tmp_path / "data"), "--work-dir", str(tmp_path / "work"),
              "--set", "data.synthetic.num_train_ids=6", "--set", "data.synthetic.num_test_ids=4",
              "--set", "data.height=64", "--set", "data.width=32",
              "data.synthetic.num_cameras", "2", "data.synthetic.images_per_id_per_camera", "2",
              "train.batch_size", "8", "sampler.num_instances", "2", "test.batch_size", "32"]
    for seed in ("1", "2"):
        proc = run_tool("benchmark_study.py", "--seeds", seed, "--json", tmp_path / f"s{seed}.json", *common)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.load(open(tmp_path / "s1.json"))
    assert one["steps_per_variant"] >= 2 and one["seeds"] == [1]
    # zero-initialised paths: before fine-tuning every variant is the plain model
    assert one["epoch0"]["branch"] == one["epoch0"]["rectify"] == one["epoch0"]["plain"]
    proc = run_tool("benchmark_study.py", "--merge", tmp_path / "s1.json", tmp_path / "s2.json", "--out",
                    tmp_path / "m.md", "--plots", tmp_path / "m")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = open(tmp_path / "m.md").read()
    assert "Seeds 1, 2" in text and "95% CI" in text and osp.getsize(tmp_path / "m_delta.png") > 1000
    proc = run_tool("benchmark_study.py", "--merge", tmp_path / "s1.json", tmp_path / "s1.json")
    assert proc.returncode == 2 and "plain seed 1 is in" in proc.stderr and "Traceback" not in proc.stderr

    # split by variants: an ablation run later over the same seed and source model joins the same report
    proc = run_tool("benchmark_study.py", "--seeds", "1", "--json", tmp_path / "s1a.json", "--pretrain-weights",
                    one["pretrain_weights"], *common[:1], "rectify-adapter", *common[4:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_tool("benchmark_study.py", "--merge", tmp_path / "s1.json", tmp_path / "s1a.json", "--json",
                    tmp_path / "v.json", "--step-rounds", "1", "--work-dir", tmp_path / "work")
    assert proc.returncode == 0, proc.stderr[-3000:]
    joined = json.load(open(tmp_path / "v.json"))
    assert joined["variants"] == ["plain", "branch", "rectify", "rectify-adapter"] and joined["seeds"] == [1]
    # the train-step column comes from one interleaved timing of all variants, not from runs at other loads
    assert set(joined["step_interleaved"]) == set(joined["variants"]) and "variants alternating" in proc.stdout
    assert joined["runs"]["plain"] == one["runs"]["plain"] and len(joined["runs"]["rectify-adapter"]) == 1
    # a grid with holes would unpair the differences: the missing runs are named
    proc = run_tool("benchmark_study.py", "--merge", tmp_path / "s1a.json", tmp_path / "s2.json")
    assert proc.returncode == 2 and "no run of" in proc.stderr
    assert "plain seed 1" in proc.stderr and "rectify-adapter seed 2" in proc.stderr
    # any split joins once the grid is complete: seed 1 by variants, seed 2 whole
    proc = run_tool("benchmark_study.py", "--merge", tmp_path / "s1.json", tmp_path / "s2.json", tmp_path / "s1a.json",
                    tmp_path / "s2a.json", "--json", tmp_path / "g.json")
    assert proc.returncode == 2 and "s2a.json" in proc.stderr  # not written yet: the file is named
    proc = run_tool("benchmark_study.py", "--seeds", "2", "--json", tmp_path / "s2a.json", "--pretrain-weights",
                    one["pretrain_weights"], *common[:1], "rectify-adapter", *common[4:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_tool("benchmark_study.py", "--merge", tmp_path / "s1.json", tmp_path / "s2.json", tmp_path / "s1a.json",
                    tmp_path / "s2a.json", "--json", tmp_path / "g.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    grid = json.load(open(tmp_path / "g.json"))
    assert grid["seeds"] == [1, 2] and [r["seed"] for r in grid["runs"]["rectify-adapter"]] == [1, 2]
    assert "Δ mAP vs its adapter" in proc.stdout
    # --variants merges a subset: here the variants with seed 2 too, though s1a.json's adapter has seed 1 only
    proc = run_tool("benchmark_study.py", "--merge", tmp_path / "s1.json", tmp_path / "s2.json", tmp_path / "s1a.json",
                    "--variants", "plain", "rectify", "--json", tmp_path / "sub.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sub = json.load(open(tmp_path / "sub.json"))
    assert sub["variants"] == ["plain", "rectify"] and sub["seeds"] == [1, 2]
    assert set(sub["runs"]) == set(sub["epoch0"]) == {"plain", "rectify"}
    proc = run_tool("benchmark_study.py", "--merge", tmp_path / "s1.json", tmp_path / "s1a.json", tmp_path / "s2.json",
                    "--variants", "plain", "rectify-adapter", "branch-adapter")
    assert proc.returncode == 2 and "--variants: no report holds branch-adapter" in proc.stderr

    # a run from before an option existed merges when the newer run has it at its default, not otherwise
    adapter = json.load(open(tmp_path / "s1a.json"))
    assert "  flip: false\n" in adapter["finetune_config"]
    base = adapter["finetune_config"]
    for name, config in (("older", base.replace("  flip: false\n", "")),
                         ("other_lr", base.replace("  lr: ", "  lr: 1").replace("flip: false", "flip: true"))):
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(adapter, finetune_config=config)))
    assert run_tool("benchmark_study.py", "--merge", tmp_path / "s1.json", tmp_path / "older.json").returncode == 0
    proc = run_tool("benchmark_study.py", "--merge", tmp_path / "s1.json", tmp_path / "other_lr.json")
    assert proc.returncode == 2 and "config keys test.flip, train.lr differ" in proc.stderr

    # a base-config difference that no merged variant reads (the package's default PTL mode, which every PTL
    # variant names itself) does not change the design; one that a variant reads does
    assert base.count("  mode: rectify\n") == 1 and base.count("  momentum: 0.1\n") == 1
    for name, config in (("old_default_mode", base.replace("  mode: rectify\n", "  mode: branch\n")),
                         ("other_momentum", base.replace("  momentum: 0.1\n", "  momentum: 0.5\n"))):
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(adapter, finetune_config=config)))
    assert run_tool("benchmark_study.py", "--merge", tmp_path / "s1.json", tmp_path / "old_default_mode.json"
                    ).returncode == 0
    proc = run_tool("benchmark_study.py", "--merge", tmp_path / "s1.json", tmp_path / "other_momentum.json")
    assert proc.returncode == 2 and "config keys ptl.momentum differ" in proc.stderr
