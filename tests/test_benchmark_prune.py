"""tools/benchmark_prune.py helpers: COP at a FLOP target on a narrow model falls back to finer channel rounding."""
import pytest
import torch

from ptl_torchreid.benchmarking.pruning import prune_cop_to_target, redundancy_vs_scale
from ptl_torchreid.compress import count_flops, prune_cop
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
