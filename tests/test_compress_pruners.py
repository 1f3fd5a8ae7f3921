"""Layer pruners: a registered pruner for a custom module type carries it through graph, selection, surgery, costs
and the saved channel configuration; the README's example runs."""
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ptl_torchreid  # noqa: F401  (registers the ptl_* models)
from ptl_torchreid.compress import (
    KeepChannels,
    LayerPruner,
    UnsupportedLayerError,
    apply_channel_config,
    build_graph,
    channel_config,
    count_flops,
    prune_cop,
    register_layer_pruner,
    resize_tensor,
    select_channels,
)
from ptl_torchreid.compress.pruners import layer_pruner
from ptl_torchreid.models import BConvCell

README = Path(__file__).resolve().parents[1] / "README.md"


def _custom_types():
    """A dense 1x1 channel mixer and a per-channel scale with their own weights, unknown to the pruner, and
    pruners for them that count their calls. Fresh classes per test, so registrations do not leak."""

    class Mix(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(cout, cin) / cin ** 0.5)

        def forward(self, x):
            return torch.einsum("oi,nihw->nohw", self.weight, x)

    class Scale(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.factor = nn.Parameter(torch.rand(channels) + 0.5)

        def forward(self, x):
            return x * self.factor.view(1, -1, 1, 1)

    class Counting(LayerPruner):
        def __init__(self):
            self.calls = {}

        def count(self, method):
            self.calls[method] = self.calls.get(method, 0) + 1

    class MixPruner(Counting):
        kind = "mix"

        def prune(self, module, keep_in, keep_out):
            self.count("prune")
            select_channels(module, "weight", 0, keep_out)
            select_channels(module, "weight", 1, keep_in)

        def channel_config(self, module):
            self.count("channel_config")
            return {"cin": module.weight.shape[1], "cout": module.weight.shape[0]}

        def apply_channel_config(self, module, config):
            self.count("apply_channel_config")
            resize_tensor(module, "weight", (config["cout"], config["cin"]))

        def kernel(self, module):
            self.count("kernel")
            return super().kernel(module)

        def cost(self, module):
            self.count("cost")
            return lambda cin, cout: (cout * cin, cout * cin)

    class ScalePruner(Counting):
        kind = "scale"
        produces = False

        def prune(self, module, keep_in, keep_out):
            self.count("prune")
            assert torch.equal(keep_in, keep_out)  # channel-wise: the same channels on both sides
            select_channels(module, "factor", 0, keep_out)

        def channel_config(self, module):
            return {"channels": module.factor.numel()}

        def apply_channel_config(self, module, config):
            resize_tensor(module, "factor", (config["channels"],))

        def cost(self, module):
            self.count("cost")
            return lambda cin, cout: (0, cout)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(16)
            self.mix = Mix(16, 24)
            self.scale = Scale(24)
            self.head = nn.Conv2d(24, 8, 1)

        def forward(self, x):
            x = F.relu(self.bn(self.stem(x)))
            x = F.relu(self.scale(self.mix(x)))
            return F.adaptive_avg_pool2d(self.head(x), 1).flatten(1)

    return Mix, Scale, MixPruner, ScalePruner, Net


def test_registered_pruner_prunes_a_custom_layer_end_to_end():
    Mix, Scale, MixPruner, ScalePruner, Net = _custom_types()
    torch.manual_seed(0)
    model = Net().eval()
    with pytest.raises(UnsupportedLayerError, match="register_layer_pruner"):
        build_graph(model, input_size=(16, 16))

    mix_pruner = register_layer_pruner(Mix, MixPruner())
    scale_pruner = register_layer_pruner(Scale, ScalePruner())
    graph = build_graph(model, input_size=(16, 16))
    assert [r.kind for r in graph.records] == ["conv", "norm", "mix", "scale", "conv"]
    # The mixer makes new channels (its own group, scaled channel-wise) and consumes the stem's.
    mixed = graph.group_of("mix")
    assert mixed.prunable and {r.name for r in mixed.members} == {"mix", "scale", "head"}
    assert "mix" in {r.name for r in graph.group_of("stem").consumers}

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the custom costs must agree with torch's FLOP counter
        pruned, report = prune_cop(model, flops_reduction=0.3, input_size=(16, 16), criterion="cop",
                                   return_report=True)
    assert report.flops_after == count_flops(pruned, (16, 16)) < count_flops(model, (16, 16))
    cout, cin = pruned.mix.weight.shape
    assert cout < 24 or cin < 16
    assert pruned.scale.factor.shape == (cout,) and pruned.head.in_channels == cout
    assert pruned.stem.out_channels == cin == pruned.bn.num_features
    assert pruned(torch.randn(2, 3, 16, 16)).shape == (2, 8)
    assert {"prune", "kernel", "cost"} <= set(mix_pruner.calls)
    assert {"prune", "cost"} <= set(scale_pruner.calls)

    # The channel configuration rebuilds the pruned shapes on a fresh model, which then loads the weights.
    config = channel_config(pruned)
    assert config["mix"] == {"cin": cin, "cout": cout} and config["scale"] == {"channels": cout}
    fresh = apply_channel_config(Net(), config)
    fresh.load_state_dict(pruned.state_dict())
    assert mix_pruner.calls["apply_channel_config"] == 1
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(fresh.eval()(x), pruned.eval()(x))


def test_a_type_registered_to_keep_its_channels_is_pruned_around():
    Mix, _, _, _, _ = _custom_types()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.mix = Mix(8, 8)
            self.b = nn.Conv2d(8, 8, 1)
            self.c = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.c(F.relu(self.b(self.mix(F.relu(self.a(x))))))

    register_layer_pruner(Mix, KeepChannels("{name} is kept whole", "{name}: a {type} keeps its channels"))
    graph = build_graph(Net(), input_size=(8, 8))
    assert graph.notes == ["mix: a Mix keeps its channels"]
    assert graph.group_of("a").frozen == "mix is kept whole" and graph.group_of("b").prunable
    pruned = prune_cop(Net(), prune_rate=0.3, input_size=(8, 8), criterion="cop")
    assert pruned.mix.weight.shape == (8, 8) and pruned.a.out_channels == 8 and pruned.b.out_channels < 8
    assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 4, 8, 8)


def test_register_layer_pruner_checks_its_arguments():
    Mix, _, MixPruner, _, _ = _custom_types()
    with pytest.raises(TypeError, match="LayerPruner instance"):
        register_layer_pruner(Mix, MixPruner)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layer_pruner("Mix", MixPruner())


def test_subclasses_share_their_parents_pruner_and_the_cell_has_its_own():
    class MyConv(nn.Conv2d):
        pass

    assert layer_pruner(MyConv(3, 4, 1)) is layer_pruner(nn.Conv2d(3, 4, 1))
    cell = BConvCell(4, 4, (8, 4))
    assert layer_pruner(cell).kind == "cell" and layer_pruner(cell) is not layer_pruner(cell.conv)


def test_readme_custom_layer_example_runs():
    text = README.read_text()
    section = text[text.index("### Pruning a custom layer type"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    small = namespace["small"]
    assert small.conv1[1].weight.shape[0] == small.conv1[0].conv.out_channels < 16
