"""Importance weights by module in COP's global ranking: a PTL model's side stream (or any named module) cut
first, last, or as usual; the weights recorded in the report and the saved pruning info; the flags of the
prune tools and the benchmark; errors that name the bad weight or module."""
import argparse
import json

import pytest
import torch
from tiny import run_tool

import ptl_torchreid  # noqa: F401  (registers the ptl_* models)
from ptl_torchreid.cli_prune import add_cop_arguments, prune_options
from ptl_torchreid.compress import (
    SIDE_STREAM,
    count_flops,
    load_pruned_model,
    prune_cop,
    pruning_info,
    save_pruned_model,
)
from ptl_torchreid.compress.cop import DEFAULT_SIDE_STREAM_WEIGHT
from ptl_torchreid.config import ConfigError
from ptl_torchreid.models import build_model

SIZE = (128, 64)
SIDE_PREFIXES = ("bconv", "fuse", "side_proj")


def _ptl_branch():
    torch.manual_seed(0)
    return build_model("ptl_osnet_x0_25", num_classes=3, input_size=SIZE, mode="branch").eval()


def _prune(model, weights=None, reduction=0.1, **kwargs):
    return prune_cop(model, flops_reduction=reduction, preset="faster", round_to=8, input_size=SIZE,
                     criterion="magnitude", importance_weights=weights, return_report=True, **kwargs)


def _cut(report, side):
    """Channels removed from the side stream's groups (side=True) or the backbone's."""
    return sum(before - after for name, before, after in report.groups if name.startswith(SIDE_PREFIXES) == side)


def test_a_zero_weight_cuts_the_side_stream_first_and_spares_the_backbone():
    model = _ptl_branch()
    _, plain = _prune(model, {})
    _, weighted = _prune(model, {SIDE_STREAM: 0.0})
    assert _cut(plain, side=False) > 0  # unweighted, the cut reaches the backbone
    assert _cut(weighted, side=False) == 0 and _cut(weighted, side=True) > _cut(plain, side=True)
    assert weighted.flops_reduction == pytest.approx(0.1, abs=0.01)  # the target is still met


def test_a_weight_above_one_protects_the_side_stream():
    model = _ptl_branch()
    _, plain = _prune(model, {}, reduction=0.3)
    _, protected = _prune(model, {SIDE_STREAM: 100.0}, reduction=0.3)
    assert _cut(plain, side=True) > 0
    assert _cut(protected, side=True) < _cut(plain, side=True)


def test_weight_one_changes_nothing():
    model = _ptl_branch()
    pruned, plain = _prune(model, {})
    same, weighted = _prune(model, {SIDE_STREAM: 1.0})
    assert weighted.groups == plain.groups
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(same(x), pruned(x))


def test_a_module_name_weights_the_module_and_its_submodules():
    torch.manual_seed(0)
    model = build_model("osnet_x0_25", num_classes=3).eval()
    _, report = _prune(model, {"conv4": 0.0}, reduction=0.05)
    cut = {name: before - after for name, before, after in report.groups if before != after}
    assert cut and all(name.startswith("conv4.") for name in cut)


def test_weights_are_recorded_printed_saved_and_reloaded(tmp_path):
    model = _ptl_branch()
    pruned, report = _prune(model, {SIDE_STREAM: 0.5})
    assert report.as_dict()["importance_weights"] == {SIDE_STREAM: 0.5}
    assert f"importance weighted by module: {SIDE_STREAM} x0.5" in str(report)
    path = tmp_path / "pruned.pth.tar"
    save_pruned_model(pruned, path, arch="ptl_osnet_x0_25", report=report)
    assert pruning_info(path)["report"]["importance_weights"] == {SIDE_STREAM: 0.5}
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(load_pruned_model(path).eval()(x), pruned(x))
    assert _prune(model, {})[1].as_dict()["importance_weights"] == {}


@pytest.mark.parametrize("weights, message", [
    ({"conv9": 0.5}, "'conv9' is not a module of the model"),
    ({SIDE_STREAM: -1.0}, "importance_weights['side_stream']=-1.0 is not valid"),
    ({SIDE_STREAM: float("nan")}, "is not valid; use a number >= 0"),
    ([("conv4", 0.5)], "give a dict"),
])
def test_bad_weights_are_named(weights, message):
    with pytest.raises(ValueError, match="importance_weights") as err:
        _prune(_ptl_branch(), weights)
    assert message in str(err.value)


def test_the_side_stream_of_a_model_without_one_is_an_error():
    with pytest.raises(ValueError, match="names a PTL model's side stream; this model"):
        _prune(build_model("osnet_x0_25", num_classes=3).eval(), {SIDE_STREAM: 0.5})


def _options(*flags):
    parser = argparse.ArgumentParser()
    add_cop_arguments(parser, target_required=True)
    return prune_options(parser.parse_args(["--flops-reduction", "0.1", *flags]))


def test_the_flag_parses_module_weights():
    assert _options("--importance-weight", "side_stream=0.5", "conv4=2")["importance_weights"] == \
        {"side_stream": 0.5, "conv4": 2.0}
    assert _options()["importance_weights"] is None
    for bad in ("side_stream", "side_stream=half", "=0.5"):
        with pytest.raises(ConfigError, match="--importance-weight .* is not valid; write MODULE=W"):
            _options("--importance-weight", bad)
    with pytest.raises(ConfigError, match="is not valid; use a number >= 0"):
        _options("--importance-weight", "conv4=-2")


def test_prune_tool_weights_the_side_stream_and_names_an_unknown_module(tmp_path):
    model = _ptl_branch()
    weights = tmp_path / "w.pth"
    torch.save({"state_dict": model.state_dict()}, weights)
    common = ["--arch", "ptl_osnet_x0_25", "--weights", weights, "--flops-reduction", "0.1", "--preset", "faster",
              "--round-to", "8", "--criterion", "magnitude", "--height", "128", "--width", "64", "--latency-batch",
              "0", "--show-layers"]
    proc = run_tool("prune.py", *common, "--importance-weight", "side_stream=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "importance weighted by module: side_stream x0" in proc.stdout
    proc = run_tool("prune.py", *common, "--importance-weight", "layer9=0.5")
    assert proc.returncode == 2 and "'layer9' is not a module of the model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_benchmark_side_weights_need_ptl_rows_and_non_negative_values(tmp_path):
    base = ["--only-accuracy", "--accuracy-arch", "osnet_x0_25", "--work-dir", tmp_path]
    proc = run_tool("benchmark_prune.py", *base, "--rows", "baseline", "--ptl-side-weights", "0.25")
    assert proc.returncode == 2 and "add --rows ptl ptl+kd" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_tool("benchmark_prune.py", *base, "--rows", "ptl", "--ptl-side-weights", "1", "-0.5")
    assert proc.returncode == 2 and "--ptl-side-weights 1 -0.5: use numbers >= 0" in proc.stderr


@pytest.mark.slow
def test_benchmark_prunes_each_ptl_model_once_per_side_weight_after_or_before_fine_tuning(tmp_path):
    """'ptl' prunes the fine-tuned PTL parent, 'ptl_first' the PTL model as built; each once per side weight."""
    out = tmp_path / "r.json"
    proc = run_tool("benchmark_prune.py", "--only-accuracy", "--accuracy-arch", "osnet_x0_25", "--source-epochs",
                    "1", "--seeds", "1", "--rows", "ptl", "ptl_first", "--ptl-mode", "branch",
                    "--ptl-side-weights", "1", "0", "--before-only", "--work-dir", tmp_path, "--results-json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["key"]: r for r in json.loads(out.read_text())["results"]}
    pruned = ["ptl_branch_pruned", "ptl_branch_pruned_side0", "ptl_branch_first", "ptl_branch_first_side0"]
    assert set(rows) == {"ptl_branch", *pruned}
    assert "side stream weighted x0" in rows["ptl_branch_pruned_side0"]["name"]
    assert "weighted" not in rows["ptl_branch_pruned"]["name"]
    assert "before fine-tuning" in rows["ptl_branch_first"]["name"]
    plain = count_flops(build_model("osnet_x0_25", num_classes=1), SIZE)
    for key in pruned:
        assert rows[key]["gflops"] * 1e9 <= plain * 1.01 and rows[key]["before"] is not None
    side = {key: sum(v for name, attrs in rows[key]["architecture"]["channels"].items()
                     if name.startswith(SIDE_PREFIXES) for v in attrs.values()) for key in pruned}
    assert side["ptl_branch_pruned_side0"] < side["ptl_branch_pruned"]
    assert side["ptl_branch_first_side0"] < side["ptl_branch_first"]


def test_ptl_models_default_to_the_side_stream_first_and_an_empty_dict_turns_it_off():
    model = _ptl_branch()
    _, default = _prune(model)
    _, explicit = _prune(model, {SIDE_STREAM: DEFAULT_SIDE_STREAM_WEIGHT})
    _, off = _prune(model, {})
    assert default.importance_weights == {SIDE_STREAM: DEFAULT_SIDE_STREAM_WEIGHT}
    assert "importance_weights" in default.defaults and "importance_weights" not in explicit.defaults
    assert "(the default for PTL models)" in str(default)
    assert default.groups == explicit.groups and off.importance_weights == {}
    assert _cut(off, side=True) < _cut(default, side=True)
    plain = _prune(build_model("osnet_x0_25", num_classes=3).eval())[1]
    assert plain.importance_weights == {} and "importance_weights" in plain.defaults
