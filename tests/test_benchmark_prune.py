"""tools/benchmark_prune.py: COP at a FLOP target on a narrow model falls back to finer channel rounding; the
accuracy section's rows, recipe and merged report."""
import json
import math

import pytest
import torch
from tiny import run_tool

from ptl_torchreid.benchmarking.pruning import prune_cop_to_target, redundancy_vs_scale
from ptl_torchreid.compress import count_flops, make_pruning_info, prune_cop
from ptl_torchreid.models import build_model

SIZE = (128, 64)


def test_narrow_model_gets_finer_rounding_and_reaches_the_target():
    model = build_model("osnet_x0_25", num_classes=4).eval()
    with pytest.raises(ValueError, match="cannot reach"):  # the preset's round_to=16 is too coarse here
        prune_cop(model, flops_reduction=0.5, preset="faster", input_size=SIZE)
    pruned, round_to = prune_cop_to_target(model, SIZE, preset="faster")
    assert round_to == 8
    reduction = 1 - count_flops(pruned, SIZE) / count_flops(model, SIZE)
    assert abs(reduction - 0.5) <= 0.02


def test_fitting_keeps_an_explicit_round_to_that_works_and_reraises_other_errors():
    model = build_model("resnet18", num_classes=4).eval()
    _, round_to = prune_cop_to_target(model, SIZE, preset="faster", round_to=4)
    assert round_to == 4
    with pytest.raises(ValueError, match="unknown preset"):
        prune_cop_to_target(model, SIZE, preset="fastest")


def test_redundancy_vs_scale_reports_a_correlation_per_group():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=4).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.1, 1.0)
    rho, groups = redundancy_vs_scale(model, SIZE)
    assert groups > 5 and -1.0 <= rho <= 1.0


def test_accuracy_rows_are_every_variant_and_unknown_rows_are_named(tmp_path):
    proc = run_tool("benchmark_prune.py", "--only-accuracy", "--rows", "taylor+ls+kd", "cop+kd", "nope",
                    "--work-dir", tmp_path)
    assert proc.returncode != 0 and "--rows: unknown nope;" in proc.stderr
    choices = proc.stderr.split("choose from")[1]
    assert "taylor+ls+kd" in choices  # every criterion[+ls][+kd] is a row
    assert "magnitude+steps3" in choices and "cop+ls+steps2" in choices  # and its iterative schedules
    assert not (tmp_path / "reid-data").exists()  # refused before any work


def test_merged_report_gives_the_recipe_input_size_and_pairs_with_l1(tmp_path):
    def result(key, maps):
        return dict(key=key, name=key, variant=key, gflops=0.3, mparams=10.0, before=(1.0, 2.0), minutes=1.0,
                    rank1={str(s): m for s, m in maps.items()}, mAP={str(s): m for s, m in maps.items()})

    a = dict(header=["## ResNet-50"], size=[64, 32], results=[result("tp_l1", {1: 40.0, 2: 42.0})])
    b = dict(header=["## other run"], size=[64, 32], results=[result("magnitude", {1: 41.0, 2: 45.0}),
                                                              result("baseline", {1: 46.0, 2: 46.0})])
    for name, data in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(data))
    proc = run_tool("benchmark_prune.py", "--report", tmp_path / "a.json", tmp_path / "b.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GFLOPs (64x32)" in proc.stdout and "## ResNet-50" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| magnitude |"))
    assert "+2.0 ± 12.7" in row  # differences 1 and 3: mean 2, half-width t(1 dof) 12.706 * std 1.414 / sqrt 2
    assert "-3.0 ± 25.4" in row  # to the unpruned model: -5 and -1
    baseline = next(line for line in proc.stdout.splitlines() if line.startswith("| baseline |"))
    assert baseline.count("| - |") == 1  # paired with L1, not with itself

    # the same row from two runs joins its seeds, and a seed run again with the same results counts once; two
    # different rows under one key, or a seed given twice with other results, are refused with the file named,
    # not silently overwritten
    c = dict(header=["## third"], size=[64, 32], results=[result("magnitude", {3: 44.0})])
    d = dict(header=["## fourth"], size=[64, 32], results=[dict(result("magnitude", {4: 40.0}), name="other")])
    e = dict(header=["## fifth"], size=[64, 32], results=[result("magnitude", {1: 41.0, 2: 44.0})])
    for name, data in (("c.json", c), ("d.json", d), ("e.json", e)):
        (tmp_path / name).write_text(json.dumps(data))
    proc = run_tool("benchmark_prune.py", "--report", tmp_path / "b.json", tmp_path / "c.json", tmp_path / "b.json")
    assert proc.returncode == 0 and "| 1:41.0 2:45.0 3:44.0 |" in proc.stdout
    for other, message in (("d.json", "only the same row joins"), ("e.json", "seed(s) 2 in")):
        proc = run_tool("benchmark_prune.py", "--report", tmp_path / "b.json", tmp_path / other)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
        assert f"{tmp_path / other}: row 'magnitude'" in proc.stderr
        assert "torch threads" not in proc.stderr  # no thread counts recorded: no guess about them

    # a seed that differs between runs with other thread counts: the error says that this is why
    for name, data, count in (("b2.json", b, 2), ("e1.json", e, 1)):
        (tmp_path / name).write_text(json.dumps(dict(data, threads=count)))
    proc = run_tool("benchmark_prune.py", "--report", tmp_path / "b2.json", tmp_path / "e1.json")
    assert proc.returncode == 2 and "seed(s) 2 in" in proc.stderr
    assert "ran with 1 and 2 torch threads" in proc.stderr
    (tmp_path / "c1.json").write_text(json.dumps(dict(c, threads=1)))  # no clash: joined, the counts said
    proc = run_tool("benchmark_prune.py", "--report", tmp_path / "b2.json", tmp_path / "c1.json")
    assert proc.returncode == 0 and "different torch thread counts: b2.json 2, c1.json 1." in proc.stdout

    # the same thread count on other CPUs: the error and the merged header name the CPUs, not the threads
    for name, data, cpu in (("bx.json", b, "Intel Xeon"), ("ea.json", e, "AMD EPYC"), ("ca.json", c, "AMD EPYC")):
        (tmp_path / name).write_text(json.dumps(dict(data, threads=1, cpu=cpu, kernels="AVX512", torch="2.14.1")))
    proc = run_tool("benchmark_prune.py", "--report", tmp_path / "bx.json", tmp_path / "ea.json")
    assert proc.returncode == 2 and "the two ran on AMD EPYC and Intel Xeon, and a seed" in proc.stderr
    assert "torch threads" not in proc.stderr
    proc = run_tool("benchmark_prune.py", "--report", tmp_path / "bx.json", tmp_path / "ca.json")
    assert proc.returncode == 0 and "different CPUs: bx.json Intel Xeon, ca.json AMD EPYC." in proc.stdout
    assert "thread counts" not in proc.stdout


@pytest.mark.slow
def test_source_training_learns_its_identities_and_the_iterative_row_runs(tmp_path):
    """The source model is trained with the source recipe's loss alone (a classifier over its identities; a
    model that also returns its features would get a cross-entropy over the raw features added), and an
    iterative row prunes in its steps with the fine-tuning split between them."""
    proc = run_tool("benchmark_prune.py", "--only-accuracy", "--accuracy-arch", "osnet_x0_25", "--source-epochs",
                    "1", "--target-epochs", "2", "--seeds", "1", "--rows", "magnitude+steps2", "--work-dir",
                    tmp_path, "--results-json", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first_epoch = next(line for line in proc.stdout.splitlines() if line.startswith("epoch 1/1"))
    loss = float(first_epoch.split("loss")[1].split()[0])
    assert loss < math.log(100) + 1.0, first_epoch  # 100 source identities: chance-level cross-entropy is ln 100
    for step in (0, 1):  # one fine-tuning of one epoch after each cut
        assert (tmp_path / f"magnitude_steps2_seed1_step{step}").is_dir()
    row = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert row["key"] == "magnitude+steps2" and set(row["mAP"]) == {"1"}
    source = build_model("osnet_x0_25", num_classes=1)
    assert row["gflops"] * 1e9 == pytest.approx(count_flops(source, SIZE) / 2, rel=0.03)


@pytest.mark.slow
def test_torch_pruning_peer_is_cut_to_the_flops_of_cop_and_every_row_can_be_timed(tmp_path):
    """The peer rows: Torch-Pruning's global L1 pruning, bisected to the FLOPs of COP's paper mode. Each row
    records the architecture it ended with, and ``--latency-of`` times those (also for the PTL rows, which
    ``--before-only`` leaves without any accuracy figure for the unpruned parent)."""
    proc = run_tool("benchmark_prune.py", "--only-accuracy", "--accuracy-arch", "osnet_x0_25", "--source-epochs",
                    "1", "--before-only", "--rows", "tp_l1", "ptl", "--ptl-mode", "branch", "--work-dir", tmp_path,
                    "--results-json", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    peer, ptl, ptl_pruned = json.loads((tmp_path / "r.json").read_text())["results"]
    assert peer["key"] == "tp_l1" and peer["before"] is not None and not peer["mAP"]
    source = build_model("osnet_x0_25", num_classes=1)
    assert peer["gflops"] * 1e9 == pytest.approx(count_flops(source, SIZE) / 2, rel=0.03)
    assert ptl["architecture"]["arch"] == "ptl_osnet_x0_25" and ptl["architecture"]["build_kwargs"]["mode"] == "branch"

    proc = run_tool("benchmark_prune.py", "--latency-of", tmp_path / "r.json", "--threads", "1", "--rounds", "1",
                    "--batch-size", "2", "--height", "128", "--width", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in proc.stdout.splitlines()
             if line.startswith("| ") and "GFLOPs" not in line}
    assert set(table) == {"osnet_x0_25 (unpruned)", "tp_l1", "ptl_branch", "ptl_branch_pruned_side0.5"}
    reduction = {key: float(cells[1].strip().rstrip("%")) for key, cells in table.items()}
    assert reduction["osnet_x0_25 (unpruned)"] == 0.0
    assert reduction["tp_l1"] == pytest.approx(50.0, abs=3.0)  # the saved channel counts, rebuilt
    assert reduction["ptl_branch"] < 0 and reduction["ptl_branch_pruned_side0.5"] == pytest.approx(0.0, abs=3.0)


def test_latency_of_refuses_files_without_architectures_and_rows_of_two_models(tmp_path):
    def row(key, **extra):
        return dict(key=key, name=key, variant=key, gflops=0.1, mparams=1.0, before=None, minutes=1.0,
                    rank1={"1": 1.0}, mAP={"1": 1.0}, **extra)

    (tmp_path / "old.json").write_text(json.dumps(dict(header=[], size=[64, 32], results=[row("magnitude")])))
    proc = run_tool("benchmark_prune.py", "--latency-of", tmp_path / "old.json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"no row in {tmp_path / 'old.json'} records its architecture" in proc.stderr

    for name, arch in (("a.json", "osnet_x0_25"), ("b.json", "ptl_resnet50")):
        info = make_pruning_info(build_model(arch, num_classes=2), arch)
        (tmp_path / name).write_text(json.dumps(dict(header=[], size=[64, 32],
                                                     results=[row(name, architecture=info)])))
    proc = run_tool("benchmark_prune.py", "--latency-of", tmp_path / "a.json", tmp_path / "b.json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "rows of osnet_x0_25, resnet50; time one model's rows at a time" in proc.stderr


@pytest.mark.slow
def test_ptl_at_baseline_cost_in_the_chosen_mode_distils_from_its_unpruned_parent(tmp_path):
    """'ptl+kd': the PTL model of the chosen mode, pruned to the plain model's FLOPs, fine-tuned with feature
    distillation from the unpruned PTL model it was cut from."""
    proc = run_tool("benchmark_prune.py", "--only-accuracy", "--accuracy-arch", "osnet_x0_25", "--source-epochs",
                    "1", "--target-epochs", "2", "--seeds", "1", "--rows", "ptl+kd", "--ptl-mode", "branch",
                    "--work-dir", tmp_path, "--results-json", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    unpruned, pruned = json.loads((tmp_path / "r.json").read_text())["results"]
    assert unpruned["key"] == "ptl_branch" and "(branch, unpruned)" in unpruned["name"]
    # pruned with prune_cop's default for PTL models: the side stream's importance halved
    assert pruned["key"] == "ptl_branch_pruned_side0.5+kd" and pruned["variant"].endswith("+kd")
    assert "(branch)" in pruned["name"] and "side stream weighted x0.5" in pruned["name"]
    assert set(pruned["mAP"]) == {"1"}
    plain = build_model("osnet_x0_25", num_classes=1)
    assert pruned["gflops"] * 1e9 <= count_flops(plain, SIZE) * 1.01 < unpruned["gflops"] * 1e9
    distilled = [line for line in proc.stdout.splitlines() if "loss_kd_f" in line]
    assert distilled, "the pruned PTL model's fine-tuning logs no distillation term"


@pytest.mark.slow
def test_a_seed_of_a_row_does_not_depend_on_the_rows_run_before_it(tmp_path, monkeypatch):
    """The PTL side stream, which the source weights do not fill, is initialised from the seed, not from whatever
    random state the rows run before it in the process left. Both runs use one thread: results repeat bit for
    bit only at the same thread count."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    maps = []
    for rows in (["ptl"], ["magnitude", "ptl"]):
        out = tmp_path / f"{len(rows)}.json"
        proc = run_tool("benchmark_prune.py", "--only-accuracy", "--accuracy-arch", "osnet_x0_25", "--source-epochs",
                        "1", "--target-epochs", "1", "--seeds", "1", "--rows", *rows, "--work-dir", tmp_path / "w",
                        "--results-json", out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        data = json.loads(out.read_text())
        assert data["threads"] == 1 and "Computed with 1 torch CPU thread:" in " ".join(data["header"])
        assert data["torch"] == torch.__version__ and data["cpu"] and data["kernels"]
        maps.append(next(r["mAP"] for r in data["results"] if r["key"] == "ptl_rectify"))
    assert maps[0] == maps[1]
