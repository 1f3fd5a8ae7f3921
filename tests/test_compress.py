"""COP pruning: criterion against hand computation, dependency groups, surgery, presets, targets, save/reload."""
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ptl_torchreid  # noqa: F401  (registers the ptl_* models)
from ptl_torchreid import _torchreid
from ptl_torchreid.compress import (
    PRESETS,
    UnsupportedLayerError,
    build_graph,
    count_flops,
    count_params,
    kept_fraction,
    load_pruned_model,
    pruning_info,
    register_pruned_model,
    save_pruned_model,
    shrink,
)
from ptl_torchreid.compress import prune_cop as _prune_cop
from ptl_torchreid.compress.criterion import COPSelector, group_correlation
from ptl_torchreid.models import BConvCell, build_model

torchreid = _torchreid.torchreid


def prune_cop(*args, **kwargs):
    """These tests are about COP's paper mode (the data-free correlation criterion) unless they say otherwise."""
    kwargs.setdefault("criterion", "cop")
    return _prune_cop(*args, **kwargs)


# -- small models -----------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    """a (3->4, 1x1) -> b (4->6, 3x3) -> c (6->5, 1x1); c reaches the output and is kept."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1, bias=False)
        self.b = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.c = nn.Conv2d(6, 5, 1, bias=False)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


class TwoCost(nn.Module):
    """Early layers: large maps, few weights (FLOP-heavy). Late layers: small maps, many weights (param-heavy)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.early = nn.Conv2d(16, 16, 3, padding=1)
        self.mid = nn.Conv2d(16, 128, 1)
        self.late = nn.Conv2d(128, 128, 3, padding=1)
        self.head = nn.Conv2d(128, 8, 1)

    def forward(self, x):
        x = F.relu(self.early(F.relu(self.stem(x))))
        x = F.adaptive_avg_pool2d(x, 4)
        return self.head(F.relu(self.late(F.relu(self.mid(x)))))


class Gadget(nn.Module):
    """Residual add, concatenation, channel gate, depthwise conv, PReLU, a channel split (kept: splitting by
    position cannot follow pruning) and flatten into a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.PReLU(16)
        self.left = nn.Conv2d(16, 16, 1)
        self.right = nn.Conv2d(16, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw_bn = nn.BatchNorm2d(8)
        self.gate = nn.Conv2d(8, 8, 1)
        self.fuse = nn.Conv2d(24, 12, 1)   # reads cat[left + stem, gated right]
        self.split_a = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x):
        s = self.act(self.bn(self.stem(x)))
        left = self.left(s) + s
        r = F.relu(self.dw_bn(self.dw(self.right(s))))
        r = r * torch.sigmoid(self.gate(F.adaptive_avg_pool2d(r, 1)))
        y = self.fuse(torch.cat([left, r], 1))
        a, b = torch.chunk(y, 2, dim=1)
        y = torch.cat([self.split_a(a), b], 1)
        y = F.adaptive_avg_pool2d(y, 4)
        return self.fc(torch.flatten(y, 1))


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def _ptl_with_state(name, seed=0):
    torch.manual_seed(seed)
    model = build_model(name, num_classes=5)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 256, 128))  # running BN stats and a running cell state
    return model.eval()


# -- criterion against a hand computation -----------------------------------------------------------------------
def _hand_correlation(w):
    """mean over kernel positions of |corrcoef| between input-channel columns of a consumer weight."""
    out, n = w.shape[:2]
    w = w.reshape(out, n, -1)
    acc = np.zeros((n, n))
    for p in range(w.shape[2]):
        acc += np.abs(np.corrcoef(w[:, :, p].T))
    return acc / w.shape[2]


def _hand_redundancy(corr, k):
    c = corr.copy()
    np.fill_diagonal(c, 0)
    c = c / c.max()
    return np.array([np.sort(row)[::-1][:k].mean() for row in c]), c


def test_correlation_and_importance_match_hand_computation():
    torch.manual_seed(0)
    model = Tiny()
    graph = build_graph(model, input_size=(8, 8))
    ga, gb = graph.group_of("a"), graph.group_of("b")
    assert ga.prunable and gb.prunable and not graph.group_of("c").prunable

    wb = model.b.weight.detach().double().numpy()
    wc = model.c.weight.detach().double().numpy()
    corr_a, _ = group_correlation(graph, ga)
    corr_b, _ = group_correlation(graph, gb)
    np.testing.assert_allclose(corr_a, _hand_correlation(wb), atol=1e-10)
    np.testing.assert_allclose(corr_b, _hand_correlation(wc), atol=1e-10)

    alpha, beta, gamma = 1.0, 2.0, 0.5
    sel = COPSelector(graph, alpha, beta, gamma, topk=3)
    r_a, norm_a = _hand_redundancy(_hand_correlation(wb), 3)
    r_b, _ = _hand_redundancy(_hand_correlation(wc), 3)
    np.testing.assert_allclose(sel.states[ga.index].r, r_a, atol=1e-6)
    np.testing.assert_allclose(sel.states[gb.index].r, r_b, atol=1e-6)

    # F, P of a layer plus its consumer, on 8x8 maps; FLOPs = 2 x multiply-adds.
    f_a, p_a = 2 * 64 * (4 * 3) + 2 * 64 * (6 * 4 * 9), 4 * 3 + 6 * 4 * 9
    f_b, p_b = 2 * 64 * (6 * 4 * 9) + 2 * 64 * (5 * 6), 6 * 4 * 9 + 5 * 6
    fh = np.log2([f_a, f_b]) / np.log2([f_a, f_b]).max()
    ph = np.log2([p_a, p_b]) / np.log2([p_a, p_b]).max()
    want_a = alpha * (1 - r_a) + beta * (1 - fh[0]) + gamma * (1 - ph[0])
    want_b = alpha * (1 - r_b) + beta * (1 - fh[1]) + gamma * (1 - ph[1])
    np.testing.assert_allclose(sel.unit_importance(ga.index), want_a, atol=1e-6)
    np.testing.assert_allclose(sel.unit_importance(gb.index), want_b, atol=1e-6)

    # Removing a filter zeroes its row and column: the others' redundancy is the top-k of the zeroed matrix.
    u = int(np.argmax(r_a))
    sel.remove_unit(ga.index, u)
    zeroed = norm_a.copy()
    zeroed[u, :] = zeroed[:, u] = 0
    want = np.array([np.sort(row)[::-1][:3].mean() for row in zeroed])
    alive = np.arange(4) != u
    np.testing.assert_allclose(sel.states[ga.index].r[alive], want[alive], atol=1e-6)
    # ... and the cost terms are recomputed: layer a now has 3 filters, b reads 3 channels.
    f_a2 = 2 * 64 * (3 * 3) + 2 * 64 * (6 * 3 * 9)
    f_b2 = 2 * 64 * (6 * 3 * 9) + 2 * 64 * (5 * 6)
    fh2 = np.log2([f_a2, f_b2]) / np.log2([f_a2, f_b2]).max()
    np.testing.assert_allclose(sel.cost_terms()[0], fh2, atol=1e-9)


def test_greedy_removes_global_argmin_across_layers():
    torch.manual_seed(1)
    graph = build_graph(TwoCost(), input_size=(16, 16))
    sel = COPSelector(graph, *PRESETS["balanced"], topk=3)
    groups_hit = set()
    for _ in range(40):
        everything = {(gi, u): v for gi in sel.order for u, v in enumerate(sel.unit_importance(gi))}
        best = min(everything, key=everything.get)
        removed = sel.step()
        assert removed == [best]
        groups_hit.add(best[0])
    assert len(groups_hit) > 1  # the ordering is global, not layer by layer


def test_filter_feeding_nothing_is_removed_first():
    torch.manual_seed(2)
    model = Tiny()
    with torch.no_grad():
        model.b.weight[:, 2] = 0  # b ignores a's filter 2
    graph = build_graph(model, input_size=(8, 8))
    ga = graph.group_of("a")
    sel = COPSelector(graph, *PRESETS["balanced"])
    assert sel.states[ga.index].best() == 2


def test_presets_move_pruning_towards_flops_or_params():
    def removed(preset):
        torch.manual_seed(3)
        _, rep = prune_cop(TwoCost(), prune_rate=0.3, preset=preset, input_size=(64, 64), round_to=1,
                           return_report=True)
        kept = kept_fraction(rep)
        return 1 - (kept["stem"] + kept["early"]) / 2, 1 - (kept["mid"] + kept["late"]) / 2

    fast_early, fast_late = removed("faster")
    small_early, small_late = removed("smaller")
    assert fast_early > small_early   # faster cuts the FLOP-heavy early layers harder
    assert small_late > fast_late     # smaller cuts the parameter-heavy late layers harder


# -- dependency graph and surgery -------------------------------------------------------------------------------
def test_graph_groups_of_resnet_bottlenecks():
    model = torchreid.models.build_model("resnet50", num_classes=4, pretrained=False)
    graph = build_graph(model)
    g = graph.group_of("layer2.0.conv3")
    producers = {r.name for r in g.producers}
    assert producers == {"layer2.0.conv3", "layer2.0.downsample.0", "layer2.1.conv3", "layer2.2.conv3",
                         "layer2.3.conv3"}
    assert {"layer3.0.conv1", "layer3.0.downsample.0", "layer2.1.conv1"} <= {r.name for r in g.consumers}
    assert g.prunable
    # The last stage feeds the embedding and keeps its width.
    assert not graph.group_of("layer4.0.conv3").prunable
    assert graph.group_of("layer1.0.conv1").prunable


def _zero_units(graph, dead):
    """Make units contribute nothing: zero their filters, gate rows, BN affine and cell running state."""
    with torch.no_grad():
        for rec in graph.records:
            idx = torch.from_numpy(np.flatnonzero(dead[rec.out_units])).long()
            if not len(idx):
                continue
            m = rec.module
            if rec.kind == "cell":
                c = m.out_channels
                m.conv.weight[torch.cat([idx + k * c for k in range(4)])] = 0
                m.running_state[:, idx] = 0
            elif rec.kind in ("conv", "linear", "depthwise", "norm"):
                m.weight[idx] = 0
                if m.bias is not None:
                    m.bias[idx] = 0


def _dead_units(graph, fraction, seed=0):
    rng = np.random.default_rng(seed)
    dead = np.zeros(graph.num_units, dtype=bool)
    for g in graph.prunable_groups():
        k = int(g.size * fraction)
        dead[g.offset + rng.choice(g.size, size=min(k, g.size - 1), replace=False)] = True
    return dead


@pytest.mark.parametrize("make", [lambda: _randomize_bn(Gadget()), lambda: _ptl_with_state("ptl_osnet_x0_25")],
                         ids=["gadget", "ptl_osnet_x0_25"])
def test_pruning_filters_that_are_already_zero_changes_nothing(make):
    torch.manual_seed(4)
    model = make().eval()
    size = (32, 32) if isinstance(model, Gadget) else (256, 128)
    graph = build_graph(model, input_size=size)
    assert len(graph.prunable_groups()) >= 2
    dead = _dead_units(graph, 0.4)
    _zero_units(graph, dead)
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        before = model(x)
    params_before = count_params(model)
    shrink(graph, ~dead)
    with torch.no_grad():
        after = model(x)
    assert count_params(model) < params_before
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_gadget_channel_mappings():
    torch.manual_seed(5)
    model = Gadget()
    graph = build_graph(model, input_size=(32, 32))
    stem = graph.group_of("stem")
    assert {r.name for r in stem.producers} == {"stem", "left"}       # left(s) + s couples them
    assert graph.group_of("right").size == 8
    assert {r.name for r in graph.group_of("right").producers} == {"right", "gate"}  # r * gate(r)
    assert not graph.group_of("fuse").prunable and any("chunk" in n for n in graph.notes)
    # Prune two units of the stem group and one of the right group: fuse loses the matching input columns.
    alive = np.ones(graph.num_units, dtype=bool)
    alive[stem.offset + np.array([1, 5])] = False
    alive[graph.group_of("right").offset + 3] = False
    w = model.fuse.weight.detach().clone()
    fc = model.fc.weight.detach().clone()
    shrink(graph, alive)
    keep_cols = [i for i in range(24) if i not in (1, 5, 16 + 3)]
    torch.testing.assert_close(model.fuse.weight, w[:, keep_cols])
    assert model.dw.groups == model.dw.in_channels == 7
    assert model.left.out_channels == model.stem.out_channels == model.bn.num_features == 14
    assert model.act.weight.shape == (14,)
    torch.testing.assert_close(model.fc.weight, fc)  # behind the split nothing changes
    model(torch.randn(2, 3, 32, 32))


def test_flatten_into_linear_slices_blocks_of_columns():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.fc = nn.Linear(6 * 2 * 2, 7)

        def forward(self, x):
            return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 2).view(x.shape[0], -1))

    model = Net()
    graph = build_graph(model, input_size=(8, 8))
    g = graph.group_of("conv")
    assert g.prunable
    alive = np.ones(graph.num_units, dtype=bool)
    alive[g.offset + 4] = False
    w = model.fc.weight.detach().clone()
    shrink(graph, alive)
    torch.testing.assert_close(model.fc.weight, torch.cat([w[:, :16], w[:, 20:]], 1))


def test_bconv_cell_output_channel_removes_all_four_gate_rows():
    torch.manual_seed(6)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = BConvCell(3, 6, (8, 8), stride=1)
            self.out = nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.out(self.cell(x))

    model = Net()
    model.cell.configure(state_mode="slot")
    model.train()
    model(torch.randn(2, 3, 8, 8))  # a carried per-slot training state, shape (2, 6, 8, 8)
    model.eval()
    with torch.no_grad():
        model.cell.running_state.normal_()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        h = model.cell(x)
    state = model.cell.state.clone()
    graph = build_graph(model, input_size=(8, 8))
    g = graph.group_of("cell")
    alive = np.ones(graph.num_units, dtype=bool)
    alive[g.offset + np.array([0, 4])] = False
    shrink(graph, alive)
    assert model.cell.conv.weight.shape == (16, 3, 3, 3) and model.cell.running_state.shape == (1, 4, 8, 8)
    torch.testing.assert_close(model.cell.state, state[:, [1, 2, 3, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model.cell(x), h[:, [1, 2, 3, 5]])  # each channel keeps its own gates
    model.train()
    model(x)  # training state update works with the smaller state


FOUR_MODELS = ["resnet50", "ptl_resnet50", "osnet_x0_25", "ptl_osnet_x0_25"]


@pytest.mark.parametrize("name", FOUR_MODELS)
def test_flop_target_consistent_groups_and_running_model(name):
    torch.manual_seed(7)
    model = build_model(name, num_classes=6, loss="triplet")
    x = torch.randn(2, 3, 256, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # estimate == counter, target met within tolerance
        pruned, rep = prune_cop(model, flops_reduction=0.3, preset="faster", return_report=True)
    assert abs(rep.flops_reduction - 0.3) <= 0.02
    assert rep.flops_after == count_flops(pruned)
    pruned.eval()
    with torch.no_grad():
        assert pruned(x).shape == model.eval()(x).shape
    pruned.train()
    logits, feats = pruned(x)
    assert logits.shape == (2, 6)
    (logits.sum() + feats.sum()).backward()
    net = pruned.backbone if name.startswith("ptl") else pruned
    if "resnet" in name:
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            widths = {layer[0].downsample[0].out_channels} | {b.conv3.out_channels for b in layer} | \
                     {b.bn3.num_features for b in layer}
            assert len(widths) == 1
        assert rep.groups and any(after < before for _, before, after in rep.groups)
    if name.startswith("ptl"):
        stem = net.conv1.out_channels if "resnet" in name else net.conv1.conv.out_channels
        assert pruned.fuse1[0].in_channels == pruned.bconv2.out_channels + stem
        assert pruned.mode == "rectify"  # the default; branch mode's side_proj: test_ptl_head
        for k in range(1, 5):  # each rectifier reads its cell's (pruned) output and writes its stage's channels
            rectifier = getattr(pruned, f"rectify{k}")
            assert rectifier.scale.in_channels == getattr(pruned, f"bconv{k + 2}").out_channels
            assert rectifier.scale.out_channels == rectifier.shift.out_channels
        if "resnet" in name:
            assert pruned.rectify4.scale.out_channels == net.layer4[-1].conv3.out_channels
        assert pruned.fuse4[0].in_channels == pruned.bconv5.out_channels + (
            net.layer3[-1].conv3.out_channels if "resnet" in name else net.conv4[-1].conv3.conv.out_channels)
        for cell in pruned.cells():
            assert cell.conv.out_channels == 4 * cell.out_channels == 4 * cell.running_state.shape[1]


def test_faster_rounds_channels_to_multiples_of_16():
    model = build_model("osnet_x0_25", num_classes=3)
    _, rep = prune_cop(model, flops_reduction=0.3, preset="faster", return_report=True)
    assert all(after % 16 == 0 or after == before for _, before, after in rep.groups)
    assert any(after < before for _, before, after in rep.groups)
    _, rep8 = prune_cop(model, flops_reduction=0.3, preset="faster", round_to=8, return_report=True)
    assert all(after % 8 == 0 or after == before for _, before, after in rep8.groups)
    assert any(after % 16 for _, before, after in rep8.groups)


@pytest.mark.parametrize("value", [0.2, 0.3, 0.45])
def test_coarse_rounding_still_lands_within_two_points(value):
    # At 64x32 one 16-channel cut of an early OSNet layer is worth several percent of the FLOPs; the last cuts
    # go to groups whose cut fits the remaining distance.
    model = build_model("osnet_x0_25", num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _, rep = prune_cop(model, flops_reduction=value, preset="faster", input_size=(64, 32), return_report=True)
    assert value <= rep.flops_reduction <= value + 0.02
    assert all(after % 16 == 0 or after == before for _, before, after in rep.groups)


def test_group_cost_sum_prunes_coupled_groups_harder():
    model = build_model("osnet_x0_25", num_classes=3)

    def coupled_kept(group_cost):
        _, rep = prune_cop(model, flops_reduction=0.3, preset="faster", group_cost=group_cost, return_report=True)
        return np.mean([after / before for name, before, after in rep.groups if "coupled" in name])

    assert coupled_kept("sum") < coupled_kept("mean")


def test_max_prune_ratio_keeps_part_of_every_group_and_still_reaches_the_target():
    model = build_model("osnet_x0_25", num_classes=3)
    _, free = prune_cop(model, flops_reduction=0.5, preset="balanced", return_report=True)
    assert min(after / before for _, before, after in free.groups) < 0.5  # the unlimited run cuts deeper
    _, rep = prune_cop(model, flops_reduction=0.5, preset="balanced", max_prune_ratio=0.5, return_report=True)
    assert all(after >= before / 2 for _, before, after in rep.groups)
    assert abs(rep.flops_reduction - 0.5) <= 0.02
    assert rep.as_dict()["max_prune_ratio"] == 0.5 and "max_prune_ratio=0.5" in str(rep)
    with pytest.raises(ValueError, match="max_prune_ratio=0.1 the prunable layers allow at most"):
        prune_cop(model, flops_reduction=0.5, max_prune_ratio=0.1)


def test_params_and_rate_targets():
    model = build_model("osnet_x0_25", num_classes=3)
    _, rep = prune_cop(model, params_reduction=0.25, preset="smaller", return_report=True)
    assert 0.25 <= rep.params_reduction < 0.27
    _, rep = prune_cop(model, prune_rate=0.2, preset="balanced", return_report=True)
    assert 0.2 <= rep.prune_rate < 0.21


def test_rate_zero_changes_nothing_and_original_is_untouched():
    torch.manual_seed(8)
    model = _ptl_with_state("ptl_osnet_x0_25")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        y = model(x)
    same = prune_cop(model, prune_rate=0.0).eval()
    smaller = prune_cop(model, flops_reduction=0.2)
    with torch.no_grad():
        torch.testing.assert_close(same(x), y, rtol=0, atol=0)
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=0)
    assert count_params(smaller) < count_params(model)


# -- validation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(flops_reduction=-0.1), "flops_reduction=-0.1 is not valid"),
    (dict(flops_reduction=1.0), "flops_reduction=1.0 is not valid"),
    (dict(prune_rate=1.5), "prune_rate=1.5 is not valid"),
    (dict(params_reduction=True), "params_reduction=True is not valid"),
    (dict(prune_rate="0.3"), "prune_rate='0.3' is not valid"),
    (dict(), "exactly one pruning target"),
    (dict(prune_rate=0.1, flops_reduction=0.1), "exactly one pruning target"),
    (dict(prune_rate=0.1, preset="fastest"), "unknown preset 'fastest'"),
    (dict(prune_rate=0.1, alpha=-1), "alpha=-1 is not valid"),
    (dict(prune_rate=0.1, round_to=0), "round_to=0 is not valid"),
    (dict(prune_rate=0.1, group_cost="max"), "group_cost='max' is not valid"),
    (dict(prune_rate=0.1, max_prune_ratio=0), "max_prune_ratio=0 is not valid"),
    (dict(prune_rate=0.1, max_prune_ratio=1.5), "max_prune_ratio=1.5 is not valid"),
    (dict(prune_rate=0.1, exclude=["nope"]), "exclude names ['nope'] are not modules"),
    (dict(prune_rate=0.1, tolerance=-1), "tolerance=-1 is not valid"),
])
def test_invalid_arguments_give_clear_errors(kwargs, message):
    with pytest.raises(ValueError) as info:
        prune_cop(Tiny(), input_size=(8, 8), **kwargs)
    assert message in str(info.value)


def test_unsupported_layer_is_named_and_can_be_excluded():
    class Scale(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.s = nn.Parameter(torch.ones(c))

        def forward(self, x):
            return x * self.s.view(1, -1, 1, 1)

    class Net(Tiny):
        def __init__(self):
            super().__init__()
            self.scale = Scale(4)

        def forward(self, x):
            return self.c(F.relu(self.b(self.scale(F.relu(self.a(x))))))

    with pytest.raises(UnsupportedLayerError, match=r"'scale' of type Scale.*exclude=\['scale'\]"):
        prune_cop(Net(), prune_rate=0.2, input_size=(8, 8))
    pruned = prune_cop(Net(), prune_rate=0.2, input_size=(8, 8), exclude=["scale"])
    assert pruned.a.out_channels == 4 and pruned.b.out_channels < 6
    pruned(torch.randn(2, 3, 8, 8))


def test_grouped_conv_and_unknown_ops_keep_their_channels_with_a_note():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.b = nn.Conv2d(8, 8, 1)
            self.c = nn.Conv2d(8, 8, 1)
            self.d = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = self.grouped(self.a(x))
            x = torch.roll(self.b(x), 1, dims=1)
            return self.d(F.relu(self.c(x)))

    graph = build_graph(Net(), input_size=(8, 8))
    notes = " ".join(graph.notes)
    assert "grouped" in notes and "roll" in notes
    assert not graph.group_of("a").prunable and not graph.group_of("b").prunable
    assert graph.group_of("c").prunable
    pruned = prune_cop(Net(), prune_rate=0.3, input_size=(8, 8))
    assert pruned.grouped.weight.shape == (8, 4, 3, 3) and pruned.c.out_channels < 8
    pruned(torch.randn(2, 3, 8, 8))


def test_operations_that_move_channels_by_position_keep_them():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 8, 1)
            self.c = nn.Conv2d(8, 8, 1)
            self.d = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = self.a(x).transpose(2, 3).transpose(2, 3)       # spatial only
            y = self.b(x)
            y[:, 0] = 0                                         # written by position
            z = self.c(F.relu(y))
            z = z.permute(0, 2, 3, 1).permute(0, 3, 1, 2)       # channels leave dimension 1
            return self.d(z)

    graph = build_graph(Net(), input_size=(8, 8))
    assert graph.group_of("a").prunable
    assert "__setitem__" in graph.group_of("b").frozen
    assert "permute" in graph.group_of("c").frozen


def test_ptl_model_must_be_pruned_at_its_input_size():
    model = build_model("ptl_osnet_x0_25", num_classes=3, input_size=(128, 64))
    with pytest.raises(ValueError, match=r"built for input_size=\(128, 64\).*pass input_size=\(128, 64\)"):
        prune_cop(model, prune_rate=0.1)
    pruned = prune_cop(model, prune_rate=0.1, input_size=(128, 64))
    pruned.eval()(torch.randn(2, 3, 128, 64))


def test_unreachable_target_is_explained():
    with pytest.raises(ValueError, match="cannot reach flops_reduction=0.95"):
        prune_cop(Tiny(), flops_reduction=0.95, input_size=(8, 8))


# -- save / reload ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["osnet_x0_25", "ptl_osnet_x0_25"])
def test_save_and_reload_pruned_model(tmp_path, name):
    torch.manual_seed(9)
    model = _ptl_with_state(name) if name.startswith("ptl") else build_model(name, num_classes=5).eval()
    pruned, rep = prune_cop(model, flops_reduction=0.3, return_report=True)
    pruned.eval()
    path = str(tmp_path / "pruned.pth")
    save_pruned_model(pruned, path, arch=name, report=rep, extra=dict(epoch=3))

    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain types only
    assert raw["epoch"] == 3 and raw["pruning"]["arch"] == name
    assert raw["pruning"]["report"]["flops_after"] == rep.flops_after
    assert pruning_info(path)["num_classes"] == 5

    x = torch.randn(2, 3, 256, 128)
    reloaded = load_pruned_model(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), pruned(x), rtol=0, atol=0)
    assert count_flops(reloaded) == rep.flops_after

    registered = register_pruned_model(path)
    extractor = torchreid.utils.FeatureExtractor(model_name=registered, model_path=path, device="cpu",
                                                 verbose=False)
    torch.testing.assert_close(extractor(x), pruned(x), rtol=0, atol=0)


def test_ptl_file_pruned_before_modes_existed_reloads_as_the_concat_branch_model(tmp_path):
    """Such files name no mode: they are branch models with the concat head and ``backbone.``-prefixed keys,
    whatever the default mode is today."""
    torch.manual_seed(9)
    model = build_model("ptl_osnet_x0_25", num_classes=5, mode="branch", head="concat", input_size=(64, 32))
    pruned, rep = prune_cop(model.eval(), flops_reduction=0.3, input_size=(64, 32), return_report=True)
    path = str(tmp_path / "old.pth")
    save_pruned_model(pruned, path, arch="ptl_osnet_x0_25", report=rep)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    backbone = set(dict(pruned.backbone.named_children()))
    old_key = lambda k: "backbone." + k if k.split(".")[0] in backbone else k  # noqa: E731
    for key in ("mode", "head"):
        del raw["pruning"]["build_kwargs"][key]
    raw["pruning"]["channels"] = {old_key(k): v for k, v in raw["pruning"]["channels"].items()}
    raw["state_dict"] = {old_key(k): v for k, v in raw["state_dict"].items()}
    torch.save(raw, path)

    reloaded = load_pruned_model(path).eval()
    assert (reloaded.mode, reloaded.head) == ("branch", "concat")
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), pruned.eval()(x), rtol=0, atol=0)


def test_loading_a_checkpoint_without_pruning_entry_says_what_is_wrong(tmp_path):
    path = str(tmp_path / "plain.pth")
    torch.save({"state_dict": Tiny().state_dict()}, path)
    with pytest.raises(ValueError, match="not a pruned-model checkpoint"):
        load_pruned_model(path)
    with pytest.raises(FileNotFoundError):
        load_pruned_model(os.path.join(str(tmp_path), "missing.pth"))


# -- whole-model behaviour on ResNet-50 -------------------------------------------------------------------------
@pytest.mark.slow
def test_resnet50_presets_direction_and_half_flops():
    model = torchreid.models.build_model("resnet50", num_classes=4, pretrained=False)
    _, fast = prune_cop(model, flops_reduction=0.5, preset="faster", return_report=True)
    _, small = prune_cop(model, flops_reduction=0.5, preset="smaller", return_report=True)
    assert abs(fast.flops_reduction - 0.5) <= 0.02 and abs(small.flops_reduction - 0.5) <= 0.02
    kf, ks = kept_fraction(fast), kept_fraction(small)
    early = [n for n in kf if n.startswith("layer1") or n == "conv1"]
    late = [n for n in kf if n.startswith("layer4")]
    assert np.mean([kf[n] for n in early]) < np.mean([ks[n] for n in early])
    assert np.mean([ks[n] for n in late]) < np.mean([kf[n] for n in late])
    assert small.params_reduction > fast.params_reduction


# -- the prune command ------------------------------------------------------------------------------------------
DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic_demo.yaml")
TINY = ["model.name", "osnet_x0_25", "data.synthetic.num_train_ids", "4", "data.synthetic.num_test_ids", "3",
        "data.synthetic.num_cameras", "2", "data.synthetic.images_per_id_per_camera", "2", "data.height", "64",
        "data.width", "32", "data.workers", "0", "train.batch_size", "8", "sampler.num_instances", "2",
        "train.max_epoch", "1", "train.progress_bar", "False"]


def test_prune_command_prunes_finetunes_evaluates_and_saves(tmp_path, capsys):
    from ptl_torchreid.cli import main

    root, save = str(tmp_path / "data"), tmp_path / "run"
    assert main(["--config-file", DEMO, "--root", root] + TINY + ["data.save_dir", str(save / "train")]) == 0
    trained = str(save / "train" / "model" / "model.pth.tar-1")
    capsys.readouterr()
    assert main(["prune", "--config-file", DEMO, "--root", root, "--flops-reduction", "0.3", "--preset", "faster",
                 "--latency-batch", "2", "--latency-rounds", "1"] + TINY +
                ["data.save_dir", str(save / "prune"), "model.load_weights", trained]) == 0
    out = capsys.readouterr().out
    for row in ("| params |", "| FLOPs (64x32) |", "| latency s (batch 2, cpu) |", "| Rank-1 (synthetic_reid) |",
                "| mAP (synthetic_reid) |"):
        assert row in out
    assert "Fine-tuning the pruned model for 1 epochs with distillation from the unpruned model" in out  # default
    pruned_file = save / "prune" / "model" / "pruned.pth.tar"
    info = pruning_info(str(pruned_file))
    assert info["report"]["distill"] is True and info["report"]["variant"].endswith("+kd")
    assert info["arch"] == "osnet_x0_25" and 0.28 <= 1 - info["report"]["flops_after"] / info["report"][
        "flops_before"] <= 0.32
    # The engine's own checkpoints of the fine-tuning carry the channel configuration too.
    engine_ckpt = load_pruned_model(str(save / "prune" / "model" / "model.pth.tar-1"))
    assert count_params(engine_ckpt) == count_params(load_pruned_model(str(pruned_file)))
    after = torch.load(str(pruned_file), weights_only=True)["results"]["synthetic_reid"]["mAP"]
    # Any command reloads the pruned model from model.load_weights, without pruning again.
    assert main(["test", "--config-file", DEMO, "--root", root] + TINY +
                ["data.save_dir", str(save / "test"), "model.load_weights", str(pruned_file)]) == 0
    out = capsys.readouterr().out
    assert "Loaded the pruned osnet_x0_25" in out and f"mAP: {after:.1%}" in out


@pytest.mark.parametrize("flags, message", [
    (["--flops-reduction", "1.5"], "flops_reduction=1.5 is not valid"),
    ([], "exactly one pruning target"),
    (["--prune-rate", "0.2", "--alpha", "-1"], "alpha=-1.0 is not valid"),
    (["--prune-rate", "0.2", "--max-prune-ratio", "2"], "max_prune_ratio=2.0 is not valid"),
])
def test_prune_command_rejects_bad_options_before_any_work(tmp_path, capsys, flags, message):
    from ptl_torchreid.cli import main

    weights = str(tmp_path / "w.pth")
    torch.save({"state_dict": {}}, weights)
    assert main(["prune", "--config-file", DEMO] + flags + TINY + ["data.save_dir", str(tmp_path),
                                                                    "model.load_weights", weights]) == 2
    assert message in capsys.readouterr().err
