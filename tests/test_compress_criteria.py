"""COP's data-aware and scale-aware criteria, compensation, distillation wiring, and the recorded defaults."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tiny import run_tool

from ptl_torchreid.compress import build_graph, load_pruned_model, prune_cop, pruning_info, save_pruned_model, shrink
from ptl_torchreid.compress.calibration import recalibrate_batchnorm
from ptl_torchreid.compress.compensate import compensate, reconstruction_error, refit_consumer
from ptl_torchreid.compress.cop import (
    DEFAULT_COMPENSATE,
    DEFAULT_CRITERION,
    DEFAULT_DATA_FREE_CRITERION,
    step_reductions,
    variant_name,
)
from ptl_torchreid.compress.criterion import correlation_state
from ptl_torchreid.compress.scores import (
    ActivationState,
    activation_statistics,
    bn_relu_energy,
    magnitude_strength,
    taylor_scores,
)
from ptl_torchreid.engine.distill import Distillation
from ptl_torchreid.models import build_model


class Net(nn.Module):
    """conv a (3->6) -> BN -> ReLU -> conv b (6->5, 3x3) -> ReLU -> pool -> features (5) -> classifier.
    a's 6 output channels are the one prunable group the tests look at."""

    def __init__(self, classes=4):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 5, 3, padding=1)
        self.classifier = nn.Linear(5, classes)

    def forward(self, x):
        v = F.adaptive_avg_pool2d(F.relu(self.b(F.relu(self.bn(self.a(x))))), 1).flatten(1)
        return self.classifier(v) if self.training else v


def _net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    net.bn.weight.data.uniform_(0.2, 2.0)
    net.bn.bias.data.uniform_(-0.5, 0.5)
    net.bn.running_mean.uniform_(-0.2, 0.2)
    net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _group_of_a(graph):
    return graph.group_of("a")


def _input_of_b(net, x):
    with torch.no_grad():
        return F.relu(net.bn(net.a(x)))


def test_magnitude_criterion_matches_hand_computation():
    net = _net()
    graph = build_graph(net, (8, 8))
    group = _group_of_a(graph)
    gamma, beta = net.bn.weight.detach().double().numpy(), net.bn.bias.detach().double().numpy()
    # E[relu(gamma z + beta)^2] by numerical integration over z ~ N(0, 1).
    z = np.linspace(-12, 12, 200001)
    pdf = np.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    energy = np.array([np.trapezoid(np.maximum(g * z + b, 0) ** 2 * pdf, z) for g, b in zip(gamma, beta)])
    np.testing.assert_allclose(bn_relu_energy(gamma, beta), energy, rtol=1e-6)
    w2 = (net.b.weight.detach().double().numpy() ** 2).sum((0, 2, 3))
    m = np.sqrt(w2 * energy)
    np.testing.assert_allclose(magnitude_strength(group), m / m.max(), rtol=1e-6)
    paper = correlation_state(graph, group)
    scaled = correlation_state(graph, group, strength=m / m.max())
    np.testing.assert_allclose(scaled.r, 1 - ((1 - paper.r) + m / m.max()) / 2, rtol=1e-6)


def test_magnitude_alone_removes_the_weakest_folded_filters():
    net = _net()
    gamma, beta = net.bn.weight.detach().double().numpy(), net.bn.bias.detach().double().numpy()
    w2 = (net.b.weight.detach().double().numpy() ** 2).sum((0, 2, 3))
    m = np.sqrt(w2 * bn_relu_energy(gamma, beta))
    # 'magnitude' keeps the strongest of a's 6 channels (BatchNorm-folded scale x consumer column norm)
    pruned = prune_cop(net, prune_rate=0.5, input_size=(8, 8), criterion="magnitude")
    kept = pruned.bn.weight.detach().double().numpy()
    np.testing.assert_allclose(np.sort(kept), np.sort(gamma[np.argsort(m)[3:]]), rtol=1e-6)


def test_activation_criterion_matches_hand_computation_and_downdates():
    net = _net()
    x = torch.randn(16, 3, 8, 8)
    graph = build_graph(net, (8, 8))
    group = _group_of_a(graph)
    state = ActivationState(group, activation_statistics(graph, x)[group.index])
    feats = _input_of_b(net, x).double().permute(0, 2, 3, 1).reshape(-1, 6).numpy()
    cov = np.cov(feats, rowvar=False, bias=True)
    w2 = (net.b.weight.detach().double().numpy() ** 2).sum((0, 2, 3))

    def hand(alive):
        idx = np.flatnonzero(alive)
        sub = cov[np.ix_(idx, idx)]
        precision = np.linalg.inv(sub + 1e-6 * np.mean(np.diag(cov)) * np.eye(len(idx)))
        d = np.zeros(6)
        d[idx] = w2[idx] / np.diag(precision)
        return d

    d0 = hand(np.ones(6, bool))
    np.testing.assert_allclose(state.r, 1 - np.sqrt(d0) / np.sqrt(d0.max()), atol=1e-6)
    alive = np.ones(6, bool)
    for u in (state.best(), None):
        if u is None:
            u = state.best()
        state.remove(u)
        alive[u] = False
        d = hand(alive)
        # Normalised by the initial largest damage, clipped at 0 where a channel lost its predictor.
        np.testing.assert_allclose(state.r[alive], np.clip(1 - np.sqrt(d[alive]) / np.sqrt(d0.max()), 0, 1),
                                   atol=1e-5)


def test_taylor_criterion_matches_exact_jacobian():
    net = _net()
    x = torch.randn(3, 3, 8, 8)
    graph = build_graph(net, (8, 8))
    group = _group_of_a(graph)
    scores = taylor_scores(graph, x, projections=None)[group.index]
    h = _input_of_b(net, x)
    expected = np.zeros(6)
    for n in range(len(x)):
        def embed(mask, n=n):
            return F.adaptive_avg_pool2d(F.relu(net.b(h[n:n + 1] * mask.view(1, 6, 1, 1))), 1).flatten()
        jac = torch.autograd.functional.jacobian(embed, torch.ones(6))  # (5, 6)
        expected += (jac ** 2).sum(0).double().numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    # Random projections estimate the same quantity.
    approx = taylor_scores(graph, x, projections=400)[group.index]
    np.testing.assert_allclose(approx, expected, rtol=0.35)


def _with_copy(net, copy_of=1, dup=4, scale=2.5):
    """Make a's filter ``dup`` an exact copy of filter ``copy_of`` up to a positive scale (no BN in between)."""
    net.bn = nn.Identity()
    with torch.no_grad():
        net.a.weight[dup] = scale * net.a.weight[copy_of]
    return net


def test_compensation_of_an_exactly_redundant_filter_is_exact():
    net = _with_copy(_net())
    x = torch.randn(24, 3, 8, 8)
    with torch.no_grad():
        reference = net(x)
    graph = build_graph(net, (8, 8))
    group = _group_of_a(graph)
    # The data criterion sees the copy: the pair has the least unexplained variance.
    state = ActivationState(group, activation_statistics(graph, x)[group.index])
    assert state.best() in (1, 4)
    parent = _with_copy(_net())
    alive = np.ones(graph.num_units, bool)
    alive[group.offset + 4] = False
    shrink(graph, alive)
    with torch.no_grad():
        cut = net(x)
    fits = compensate(graph, parent, alive, x)
    with torch.no_grad():
        after = net(x)
    assert [f[0] for f in fits] == ["b"]
    assert (cut - reference).abs().max() > 1e-2  # the cut alone changes the output
    assert (after - reference).abs().max() < 1e-5


def _with_scaled_copy_before_bn(copy_of=1, dup=4, scale=2.5):
    """a's filter ``dup`` is ``scale`` times filter ``copy_of``, with the same BatchNorm affine parameters, so that
    under any batch statistics the two normalised channels are equal; the running statistics (another domain's)
    do not describe the data."""
    net = _net()
    with torch.no_grad():
        net.a.weight[dup] = scale * net.a.weight[copy_of]
        net.bn.weight[dup], net.bn.bias[dup] = net.bn.weight[copy_of], net.bn.bias[copy_of]
        net.bn.running_mean.uniform_(2.0, 3.0)
        net.bn.running_var.uniform_(5.0, 9.0)
    return net


@pytest.mark.parametrize("mode", ["bn+ls", "ls"])
def test_compensation_under_the_calibration_statistics_is_exact_with_batch_statistics(mode):
    """Fine-tuning normalises with batch statistics: 'bn+ls' reproduces the parent's output as it is then (exact
    for a copy up to scale), 'ls' only under the stale running statistics."""
    x = torch.randn(24, 3, 8, 8) + 0.5  # one batch: its statistics are the recalibrated ones
    net, parent = _with_scaled_copy_before_bn(), _with_scaled_copy_before_bn()
    with torch.no_grad():
        reference = parent.train()(x)  # the classifier's logits, with batch statistics
    graph = build_graph(net, (8, 8))
    alive = np.ones(graph.num_units, bool)
    alive[_group_of_a(graph).offset + 4] = False
    shrink(graph, alive)
    fits = compensate(graph, parent.eval(), alive, x, recalibrate=mode == "bn+ls")
    with torch.no_grad():
        after = net.train()(x)
        evaluated = net.eval()(x)
    assert [f[0] for f in fits] == ["b"]
    error = (after - reference).abs().max()
    if mode == "bn+ls":
        assert error < 1e-4
        with torch.no_grad():  # the parent's statistics were re-estimated in place: its eval forward is the same
            torch.testing.assert_close(evaluated, parent.eval()(x), atol=1e-4, rtol=1e-4)
    else:
        assert error > 1e-2


def test_batchnorm_recalibration_measures_the_images_statistics():
    net = _net()
    x = torch.randn(40, 3, 8, 8) * 3 + 1  # batches of 32 and 8
    recalibrate_batchnorm(net, x)
    with torch.no_grad():
        a = net.a(x)
    first, second = a[:32].transpose(0, 1).flatten(1), a[32:].transpose(0, 1).flatten(1)
    torch.testing.assert_close(net.bn.running_mean, (first.mean(1) + second.mean(1)) / 2)
    torch.testing.assert_close(net.bn.running_var, (first.var(1) + second.var(1)) / 2)
    assert not net.training and net.bn.momentum == 0.1
    single = torch.randn(33, 3, 8, 8)  # a last batch of one image joins the batch before
    recalibrate_batchnorm(net, single)
    with torch.no_grad():
        torch.testing.assert_close(net.bn.running_var, net.a(single).transpose(0, 1).flatten(1).var(1))


def test_bn_compensation_makes_the_eval_forward_the_batch_forward_on_the_calibration_images():
    torch.manual_seed(0)
    model = build_model("osnet_x0_25", num_classes=5).eval()
    images = torch.randn(16, 3, 64, 32)
    pruned, report = prune_cop(model, flops_reduction=0.3, preset="faster", round_to=4, input_size=(64, 32),
                               calibration=images, compensate="bn", return_report=True)
    assert report.compensate == "bn" and report.variant == "magnitude+bn" and not report.compensation
    assert "BatchNorm statistics re-estimated on 16 calibration images" in str(report)
    uncompensated, plain = prune_cop(model, flops_reduction=0.3, preset="faster", round_to=4, input_size=(64, 32),
                                     calibration=images, compensate="none", return_report=True)
    assert plain.variant == "magnitude"

    def eval_against_batch_statistics(net):
        with torch.no_grad():
            evaluated = net.eval()(images)
            for m in net.modules():  # batch statistics, nothing else in train mode
                m.train(isinstance(m, nn.modules.batchnorm._BatchNorm))
            batch = net(images)
        return float((evaluated - batch).norm() / batch.norm())

    recalibrated, stale = eval_against_batch_statistics(pruned), eval_against_batch_statistics(uncompensated)
    # Not 0: the running variance is the unbiased estimate, the batch forward divides by the biased one, and an
    # untrained network amplifies that difference with depth (measured: 0.17 against 0.99 without 'bn').
    assert recalibrated < 0.25 * stale


@pytest.mark.parametrize("seed", range(6))
def test_compensation_never_increases_reconstruction_error(seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(7, 4, 3, padding=1, bias=seed % 2 == 0)
    x = torch.randn(6, 7, 6, 6)
    if seed >= 3:  # ill-conditioned: collinear and constant channels
        x[:, 3] = 0.5 * x[:, 2]
        x[:, 5] = 1.0
    keep = torch.tensor([0, 2, 3, 5, 6])
    with torch.no_grad():
        y = conv(x)
        if conv.bias is not None:
            y = y - conv.bias[:, None, None]
    small = nn.Conv2d(5, 4, 3, padding=1, bias=conv.bias is not None)
    with torch.no_grad():
        small.weight.copy_(conv.weight[:, keep])
        if conv.bias is not None:
            small.bias.copy_(conv.bias)
            y = y + conv.bias[:, None, None]
    before = reconstruction_error(small, x[:, keep], y)
    fit = refit_consumer(small, x[:, keep], y, ridge=0.0 if seed == 5 else 1e-6)
    after = reconstruction_error(small, x[:, keep], y)
    assert fit is not None and after <= before * (1 + 1e-9)
    assert fit[1] <= fit[0]


class _Trainer:
    """What the Distillation hook reads and writes of the engine: ``model``, ``outputs``, ``loss``,
    ``step_summary``."""

    def __init__(self, model):
        self.model, self.outputs, self.loss, self.step_summary = model, None, None, {}


def test_distillation_parent_gets_no_gradient_and_the_loss_falls():
    parent = _net(seed=1)
    student = _net(seed=2).train()
    trainer = _Trainer(student)
    kd = Distillation(parent, feature_weight=1.0, logit_weight=1.0)
    kd.trainer = trainer
    kd.before_train()
    optimizer = torch.optim.Adam(student.parameters(), lr=0.02)
    x, pids = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    terms = []
    for _ in range(40):
        kd.before_step()
        trainer.outputs = student(x)
        trainer.loss = F.cross_entropy(trainer.outputs, pids) * 0.0  # only the distillation term trains
        trainer.step_summary = {}
        kd.before_backward()
        optimizer.zero_grad()
        trainer.loss.backward()
        optimizer.step()
        terms.append(trainer.step_summary["loss_kd_f"] + trainer.step_summary["loss_kd_l"])
    assert all(p.grad is None for p in kd.parent.parameters())
    assert all(not p.requires_grad for p in kd.parent.parameters())
    assert terms[-1] < 0.5 * terms[0]
    kd.after_train()
    assert not student._forward_pre_hooks and not student.classifier._forward_pre_hooks


def test_distillation_options_are_checked():
    with pytest.raises(ValueError, match="would add nothing"):
        Distillation(_net(), feature_weight=0, logit_weight=0)
    with pytest.raises(ValueError, match="temperature"):
        Distillation(_net(), temperature=0)


def test_default_selection_is_recorded_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = build_model("osnet_x0_25", num_classes=5).eval()
    images = torch.randn(8, 3, 64, 32)
    pruned, report = prune_cop(model, flops_reduction=0.3, preset="faster", round_to=4, input_size=(64, 32),
                               calibration=images, return_report=True)
    assert (report.criterion, report.compensate) == (DEFAULT_CRITERION, DEFAULT_COMPENSATE)
    assert report.defaults == ["criterion", "compensate", "importance_weights"] and report.calibration_images == 8
    assert report.importance_weights == {}  # a plain model: no weighting by default
    assert f"COP pruning, {report.variant} (default)," in str(report)
    path = str(tmp_path / "pruned.pth")
    save_pruned_model(pruned, path, arch="osnet_x0_25", report=report)
    info = pruning_info(path)["report"]
    assert info["criterion"] == DEFAULT_CRITERION and info["compensate"] == DEFAULT_COMPENSATE
    assert info["defaults"] == ["criterion", "compensate", "importance_weights"]
    assert info["variant"] == variant_name(DEFAULT_CRITERION, DEFAULT_COMPENSATE)
    reloaded = load_pruned_model(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), pruned.eval()(images))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the data-free default loses nothing against the default with data
        _, free = prune_cop(model, flops_reduction=0.3, preset="faster", round_to=4, input_size=(64, 32),
                            return_report=True)
        _, paper = prune_cop(model, flops_reduction=0.3, preset="faster", round_to=4, input_size=(64, 32),
                             criterion="cop", return_report=True)
    assert free.criterion == DEFAULT_DATA_FREE_CRITERION and free.compensate == "none"
    assert paper.variant == "cop" and paper.defaults == ["compensate", "importance_weights"]  # no data: off
    assert any(f"the default compensation is '{DEFAULT_COMPENSATE}'" in note for note in free.notes)
    assert not any("no calibration data" in note for note in report.notes)


@pytest.mark.parametrize("kwargs, message", [
    (dict(criterion="cop_activation"), "criterion='cop_activation' needs calibration data"),
    (dict(criterion="taylor"), "criterion='taylor' needs calibration data"),
    (dict(criterion="cop", compensate=True), "compensate='ls' works on calibration data"),
    (dict(criterion="cop", compensate="bn"), "compensate='bn' works on calibration data"),
    (dict(compensate="adabn", calibration=torch.randn(4, 3, 8, 8)), "compensate='adabn' is not valid"),
    (dict(criterion="l2"), "criterion='l2' is not valid"),
    (dict(calibration=torch.randn(4, 3, 16, 16)), "calibration images are 16x16"),
    (dict(calibration=[{"img": torch.randn(1, 3, 8, 8)}]), "gave 1 images"),
])
def test_data_needing_options_without_data_give_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prune_cop(_net(), prune_rate=0.2, input_size=(8, 8), **kwargs)


def test_prune_tool_without_data_rejects_a_data_criterion(tmp_path):
    proc = run_tool("prune.py", "--arch", "osnet_x0_25", "--flops-reduction", "0.3", "--criterion", "taylor")
    assert proc.returncode != 0 and "needs calibration data" in proc.stderr


def test_every_criterion_prunes_a_dataloader_calibrated_model_to_the_target():
    torch.manual_seed(0)
    model = build_model("osnet_x0_25", num_classes=5).eval()
    loader = [{"img": torch.randn(4, 3, 64, 32), "pid": torch.arange(4)} for _ in range(3)]
    for criterion, mode in (("cop", True), ("cop_magnitude", "bn+ls"), ("magnitude", "ls"),
                                  ("cop_activation", "bn+ls"), ("taylor", "ls")):
        pruned, report = prune_cop(model, flops_reduction=0.3, preset="faster", round_to=4, input_size=(64, 32),
                                   criterion=criterion, calibration=loader, calibration_size=10,
                                   compensate=mode, return_report=True)
        assert abs(report.flops_reduction - 0.3) <= 0.02 and report.calibration_images == 10
        assert report.variant == variant_name(criterion, mode) == criterion + "+" + report.compensate
        assert report.compensation and all(after <= before for _, before, after in report.compensation)


def test_iterative_schedule_reaches_the_total_in_equal_steps_of_the_original():
    reductions = step_reductions(0.5, 3)
    left = np.cumprod([1 - r for r in reductions])  # fraction of the original after each step
    assert np.allclose(left, [5 / 6, 4 / 6, 3 / 6])
    assert step_reductions(0.3, 1) == pytest.approx([0.3])


@pytest.mark.slow
def test_prune_command_iterative_with_distillation_records_the_variant(tmp_path, capsys, data_root):
    import os

    from ptl_torchreid.cli import main

    tests_dir = os.path.dirname(os.path.abspath(__file__))
    demo = os.path.join(os.path.dirname(tests_dir), "configs", "synthetic_demo.yaml")
    tiny = ["model.name", "osnet_x0_25", "data.synthetic.num_train_ids", "4", "data.synthetic.num_test_ids", "3",
            "data.synthetic.num_cameras", "2", "data.synthetic.images_per_id_per_camera", "2", "data.height", "64",
            "data.width", "32", "data.workers", "0", "train.batch_size", "8", "sampler.num_instances", "2",
            "train.max_epoch", "2", "train.progress_bar", "False"]
    torch.manual_seed(0)
    weights = str(tmp_path / "w.pth")
    torch.save({"state_dict": build_model("osnet_x0_25", num_classes=4).state_dict()}, weights)
    assert main(["prune", "--config-file", demo, "--root", data_root, "--flops-reduction", "0.4", "--preset",
                 "faster", "--round-to", "4", "--steps", "2", "--calibration-images", "8",
                 "--latency-batch", "0", "--skip-eval-before"] + tiny +
                ["data.save_dir", str(tmp_path / "run"), "model.load_weights", weights]) == 0
    out = capsys.readouterr().out
    assert "Pruning step 2 of 2" in out and "loss_kd_f" in out
    assert out.count("Fine-tuning the pruned model for 1 epochs with distillation") == 2
    info = pruning_info(str(tmp_path / "run" / "model" / "pruned.pth.tar"))["report"]
    assert info["steps"] == 2 and info["distill"] is True
    assert info["variant"] == variant_name(DEFAULT_CRITERION, DEFAULT_COMPENSATE, True)
    assert info["defaults"] == ["criterion", "compensate", "importance_weights"]
    assert 0.38 <= 1 - info["flops_after"] / info["flops_before"] <= 0.42


def test_prune_command_distils_unless_told_not_to():
    import argparse

    from ptl_torchreid.cli_prune import add_prune_arguments

    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    assert parser.parse_args(["--flops-reduction", "0.3"]).distill is True
    assert parser.parse_args(["--flops-reduction", "0.3", "--no-distill"]).distill is False


def test_prune_command_rejects_bad_recovery_options(tmp_path, capsys):
    import os

    from ptl_torchreid.cli import main

    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                        "synthetic_demo.yaml")
    weights = str(tmp_path / "w.pth")
    torch.save({"state_dict": {}}, weights)
    for flags, message in ((["--steps", "0"], "--steps 0 is not valid"),
                           (["--steps", "2", "--prune-rate", "0.2"], "--steps works with"),
                           (["--distill", "--distill-feature-weight", "0"], "would add nothing"),
                           (["--criterion", "nope"], "invalid choice")):
        target = [] if "--prune-rate" in flags else ["--flops-reduction", "0.3"]
        code = None
        try:
            code = main(["prune", "--config-file", demo] + target + flags +
                        ["data.save_dir", str(tmp_path), "model.load_weights", weights])
        except SystemExit as e:  # argparse's own choice check
            code = e.code
        assert code == 2 and message in capsys.readouterr().err
