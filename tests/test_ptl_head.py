"""A PTL model starts as the model it fine-tunes, and torchreid's own loaders work on it.

Every loading route (our loader, torchreid's ``load_pretrained_weights`` and ``FeatureExtractor``, the config's
``model.load_weights``, ImageNet weights via ``pretrained=True``) must give a PTL model whose eval embedding is
the plain torchreid model's, for every registered name and both ways of using the side stream.
"""
import os
import os.path as osp

import pytest
import torch
from tiny import shared_weights

import ptl_torchreid  # noqa: F401  (registers the ptl_* models)
from ptl_torchreid import _torchreid, models
from ptl_torchreid.config import ConfigError, get_default_config, merge_from_list, validate_config
from ptl_torchreid.engine import build_model as build_model_from_config
from ptl_torchreid.models import backbones
from ptl_torchreid.utils import CheckpointMismatchError

torchreid = _torchreid.torchreid
SIZE = (64, 32)
MODES = [dict(mode="branch"), dict(mode="rectify")]


def plain_and_file(name, tmp_path, num_classes=5):
    """A plain torchreid model with non-trivial BatchNorm statistics, saved as a torchreid checkpoint."""
    torch.manual_seed(1)
    plain = torchreid.models.build_model(name, num_classes=num_classes, loss="triplet", pretrained=False)
    for m in plain.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    path = str(tmp_path / f"{name}.pth.tar")
    torch.save({"state_dict": plain.state_dict(), "epoch": 1}, path)
    return plain.eval(), path


def embed(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def build_ptl(name, num_classes=5, **options):
    torch.manual_seed(2)  # other random weights than the plain model
    return models.build_model(name, num_classes=num_classes, loss="triplet", input_size=SIZE, **options)


@pytest.mark.parametrize("options", MODES, ids=["branch", "rectify"])
@pytest.mark.parametrize("name", sorted(models.PTL_MODELS))
def test_ptl_model_starts_as_its_plain_model_after_each_loading_route(name, options, tmp_path):
    plain_name = models.PTL_MODELS[name]
    plain, path = plain_and_file(plain_name, tmp_path)
    x = torch.rand(3, 3, *SIZE)
    expected = embed(plain, x)

    ours = build_ptl(name, **options)
    models.load_pretrained_weights(ours, path, verbose=False)
    torch.testing.assert_close(embed(ours, x), expected, rtol=0, atol=1e-5)

    theirs = build_ptl(name, **options)
    torchreid.utils.load_pretrained_weights(theirs, path)
    torch.testing.assert_close(embed(theirs, x), expected, rtol=0, atol=1e-5)

    cfg = get_default_config()
    merge_from_list(cfg, ["model.name", name, "model.pretrained", "False", "model.load_weights", path,
                          "model.load_weights_mode", "strict", "data.height", str(SIZE[0]), "data.width",
                          str(SIZE[1]), "loss.name", "triplet"] + sum((["ptl." + k, v] for k, v in options.items()),
                                                                     []))
    from_config = build_model_from_config(validate_config(cfg), 5)
    torch.testing.assert_close(embed(from_config, x), expected, rtol=0, atol=1e-5)


def test_imagenet_route_starts_as_the_plain_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _, cached = backbones.imagenet_weights_location("osnet_x0_25")
    os.makedirs(osp.dirname(cached))
    torch.save(torchreid.models.build_model("osnet_x0_25", num_classes=1000, pretrained=False).state_dict(), cached)
    ptl = build_ptl("ptl_osnet_x0_25", pretrained=True)
    plain = torchreid.models.build_model("osnet_x0_25", num_classes=5, loss="triplet", pretrained=False)
    plain.load_state_dict({k: v for k, v in ptl.state_dict().items() if k in plain.state_dict()})
    x = torch.rand(2, 3, *SIZE)
    torch.testing.assert_close(embed(ptl, x), embed(plain, x), rtol=0, atol=1e-5)
    torch.testing.assert_close(ptl.conv1.conv.weight, torch.load(cached)["conv1.conv.weight"])


def test_concat_head_is_the_reference_and_not_function_preserving(tmp_path):
    plain, path = plain_and_file("osnet_x0_25", tmp_path)
    ptl = build_ptl("ptl_osnet_x0_25", mode="branch", head="concat")
    models.load_pretrained_weights(ptl, path, verbose=False)
    assert hasattr(ptl, "reduce") and getattr(ptl, "fc", None) is None
    x = torch.rand(2, 3, *SIZE)
    assert (embed(ptl, x) - embed(plain, x)).abs().max() > 1e-3


@pytest.mark.parametrize("options", MODES + [dict(cell_type="conv")], ids=["branch", "rectify", "adapter"])
def test_one_step_moves_the_side_stream_and_two_reach_every_cell(options):
    model = build_ptl("ptl_osnet_x0_25", **options)
    side = {n: p.detach().clone() for n, p in model.named_parameters()
            if any(p is q for q in model.ptl_parameters())}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, pids = torch.rand(8, 3, *SIZE), torch.arange(4).repeat_interleave(2)
    before = embed(model, x)
    cells = [m for m in model.side_modules() if isinstance(m, (models.BConvCell, models.blocks.ConvAdapter))]
    assert len(cells) == 6
    reached = set()
    for step in range(2):
        model.train()
        logits, feats = model(x)
        torch.nn.functional.cross_entropy(logits, pids % 5).backward()
        for i, cell in enumerate(cells):
            if cell.conv.weight.grad is not None and cell.conv.weight.grad.abs().sum() > 0:
                reached.add(i)
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:
            changed = [n for n, p in model.named_parameters() if n in side and not torch.equal(p, side[n])]
            path = "side_proj" if options.get("mode") == "branch" else "rectify"
            assert any(n.startswith(path) for n in changed)
            assert (embed(model, x) - before).abs().max() > 0
    assert reached == set(range(len(cells)))


def test_torchreid_loader_fills_ptl_model_from_model_zoo_file_and_back(tmp_path):
    path = shared_weights()
    ptl = build_ptl("ptl_osnet_x0_25", num_classes=1041)
    loaded = {k for k, v in torch.load(path, map_location="cpu", weights_only=False).items()}
    backbone_keys = set(ptl.backbone.state_dict())
    assert backbone_keys <= loaded | {k for k in backbone_keys if k.endswith("num_batches_tracked")}
    torchreid.utils.load_pretrained_weights(ptl, path)
    raw = torch.load(path, map_location="cpu", weights_only=False)
    state = ptl.state_dict()
    same = [k for k in raw if k in state and torch.equal(state[k], raw[k].to(state[k].dtype))]
    assert len(same) == len(raw) == len(backbone_keys)  # every tensor of the file, the classifier included

    # every tensor of a PTL checkpoint goes back into a PTL model, and its backbone into a plain model
    ckpt = str(tmp_path / "ptl.pth.tar")
    torch.save({"state_dict": ptl.state_dict()}, ckpt)
    again = build_ptl("ptl_osnet_x0_25", num_classes=1041)
    torchreid.utils.load_pretrained_weights(again, ckpt)
    for k, v in ptl.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v)
    plain = torchreid.models.build_model("osnet_x0_25", num_classes=1041, loss="triplet", pretrained=False)
    torchreid.utils.load_pretrained_weights(plain, ckpt)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, ptl.state_dict()[k])


def test_feature_extractor_with_model_zoo_file_embeds_as_the_plain_model():
    path = shared_weights()
    images = [(torch.rand(256, 128, 3) * 255).to(torch.uint8).numpy() for _ in range(3)]
    plain = torchreid.utils.FeatureExtractor(model_name="osnet_x0_25", model_path=path, device="cpu", verbose=False)
    ptl = torchreid.utils.FeatureExtractor(model_name="ptl_osnet_x0_25", model_path=path, device="cpu",
                                           verbose=False)
    torch.testing.assert_close(ptl(images), plain(images), rtol=0, atol=1e-5)


def test_checkpoints_written_before_the_key_change_still_load(tmp_path):
    """Older PTL checkpoints had ``backbone.``-prefixed keys and the concat head."""
    old_style = build_ptl("ptl_osnet_x0_25", mode="branch", head="concat")
    old_style.train()
    old_style(torch.rand(4, 3, *SIZE))  # a carried state and running statistics worth restoring
    side = {n for n, _ in old_style.named_children() if n not in dict(old_style.backbone.named_children())}
    state = {(k if k.split(".")[0] in side else "backbone." + k): v for k, v in old_style.state_dict().items()}
    path = str(tmp_path / "old.pth.tar")
    torch.save({"state_dict": state}, path)

    reloaded = build_ptl("ptl_osnet_x0_25", mode="branch", head="concat")
    report = models.load_pretrained_weights(reloaded, path, mode="strict", verbose=False)
    assert report.ok
    x = torch.rand(2, 3, *SIZE)
    torch.testing.assert_close(embed(reloaded, x), embed(old_style, x), rtol=0, atol=0)
    direct = build_ptl("ptl_osnet_x0_25", mode="branch", head="concat")
    direct.load_state_dict(state)  # torch's own load_state_dict maps the old names too
    torch.testing.assert_close(embed(direct, x), embed(old_style, x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="ptl.head concat"):
        build_ptl("ptl_osnet_x0_25").load_state_dict(state)


def test_a_checkpoint_of_another_ptl_shape_names_the_options_that_load_it(tmp_path, capsys):
    """The default mode is rectify; a checkpoint saved under the branch default (or other rectified stages) says
    which ``ptl.*`` settings rebuild its model, in every loading route, and loads exactly under them."""
    saved = {"branch": build_ptl("ptl_osnet_x0_25", mode="branch"),
             "last": build_ptl("ptl_osnet_x0_25", rectify_stages=("last",))}
    paths = {}
    for label, model in saved.items():
        model.train()
        model(torch.rand(4, 3, *SIZE))  # a carried state worth restoring
        paths[label] = str(tmp_path / f"{label}.pth.tar")
        torch.save({"state_dict": model.state_dict()}, paths[label])

    with pytest.raises(CheckpointMismatchError, match="ptl.mode branch, ptl.head residual"):
        models.load_pretrained_weights(build_ptl("ptl_osnet_x0_25"), paths["branch"], mode="strict", verbose=False)
    with pytest.raises(CheckpointMismatchError, match=r"ptl.mode rectify, ptl.rectify_stages \['last'\]"):
        models.load_pretrained_weights(build_ptl("ptl_osnet_x0_25"), paths["last"], mode="strict", verbose=False)
    with pytest.raises(RuntimeError, match="ptl.mode branch"):  # torch's own strict load_state_dict
        build_ptl("ptl_osnet_x0_25").load_state_dict(saved["branch"].state_dict())
    cfg = get_default_config()
    merge_from_list(cfg, ["model.name", "ptl_osnet_x0_25", "model.pretrained", "False", "model.load_weights",
                          paths["branch"], "model.load_weights_mode", "strict", "data.height", str(SIZE[0]),
                          "data.width", str(SIZE[1]), "loss.name", "triplet"])
    with pytest.raises(CheckpointMismatchError, match="ptl.mode branch"):
        build_model_from_config(validate_config(cfg), 5)
    # match mode loads what fits and says what would load the rest
    models.load_pretrained_weights(build_ptl("ptl_osnet_x0_25"), paths["branch"], mode="match")
    assert "note: this checkpoint was saved from a PTL model with ptl.mode branch" in capsys.readouterr().out

    x = torch.rand(2, 3, *SIZE)
    for label, options in (("branch", dict(mode="branch")), ("last", dict(rectify_stages=("last",)))):
        rebuilt = build_ptl("ptl_osnet_x0_25", **options)
        assert models.load_pretrained_weights(rebuilt, paths[label], mode="strict", verbose=False).ok
        torch.testing.assert_close(embed(rebuilt, x), embed(saved[label], x), rtol=0, atol=0)


def test_rectify_uses_the_carried_state_and_stays_batch_independent_in_eval():
    model = build_ptl("ptl_osnet_x0_25", mode="rectify", rectify_stages=("stage2", "last"))
    assert [n for n, _ in model.named_children() if n.startswith("rectify")] == ["rectify2", "rectify4"]
    for r in (model.rectify2, model.rectify4):  # as after some training: a live path
        torch.nn.init.normal_(r.scale.weight, 0, 0.1)
        torch.nn.init.normal_(r.shift.weight, 0, 0.1)
    model.train()
    for _ in range(3):
        model(torch.rand(4, 3, *SIZE))
    x = torch.rand(1, 3, *SIZE)
    alone = embed(model, x)
    with_others = embed(model, torch.cat([x, torch.rand(5, 3, *SIZE)]))[:1]
    torch.testing.assert_close(with_others, alone, rtol=1e-5, atol=1e-6)
    for cell in model.cells():
        cell.running_state.mul_(3)
    assert (embed(model, x) - alone).abs().max() > 1e-4  # the dataset-level state acts on the features


def test_reference_options_build_what_they_say():
    ref = build_ptl("ptl_resnet50", mode="branch", stage3_tap="first_block", side_pool="max", cell_init="fan_in")
    assert ref.taps[3] == ("layer3[:1]",) and ref.taps[4] == ("layer3[1:]", "layer4")
    assert ref.fuse4[0].in_channels == 1024 + ref.widths["bconv5"]
    plain = torchreid.models.build_model("resnet50", num_classes=5, loss="triplet", pretrained=False)
    plain.load_state_dict({k: v for k, v in ref.state_dict().items() if k in plain.state_dict()})
    x = torch.rand(2, 3, *SIZE)
    torch.testing.assert_close(embed(ref, x), embed(plain, x), rtol=0, atol=1e-5)
    adapter = build_ptl("ptl_osnet_x0_25", cell_type="conv")
    cells = build_ptl("ptl_osnet_x0_25")
    count = lambda m: sum(p.numel() for p in m.ptl_parameters())  # noqa: E731
    assert list(adapter.cells()) == [] and adapter.state_norm() == 0.0
    assert abs(count(adapter) / count(cells) - 1) < 0.02  # capacity-matched


@pytest.mark.parametrize("key, value", [("ptl.mode", "rectfy"), ("ptl.head", "sum"), ("ptl.side_pool", "min"),
                                        ("ptl.cell_init", "xavier"), ("ptl.cell_type", "lstm"),
                                        ("ptl.stage3_tap", "middle"), ("ptl.rectify_stages", "['stage5']"),
                                        ("ptl.head", "concat"), ("ptl.side_pool", "max")])  # branch-only options
def test_config_names_the_bad_ptl_key(key, value):
    cfg = get_default_config()
    merge_from_list(cfg, [key, value])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("options", MODES, ids=["branch", "rectify"])
def test_pruning_follows_the_side_stream_into_the_backbone(options, tmp_path):
    from ptl_torchreid.compress import load_pruned_model, prune_cop, save_pruned_model

    model = build_ptl("ptl_osnet_x0_25", **options)
    for m in model.side_modules():  # a live side stream, as after fine-tuning
        if isinstance(m, models.blocks.Rectifier):
            torch.nn.init.normal_(m.scale.weight, 0, 0.1)
    if options.get("mode") != "rectify":
        torch.nn.init.normal_(model.side_proj.weight, 0, 0.1)
    model.train()
    model(torch.rand(4, 3, *SIZE))
    pruned, report = prune_cop(model, flops_reduction=0.3, input_size=SIZE, return_report=True)
    assert report.flops_reduction > 0.25
    if options.get("mode") == "rectify":
        for k, rectifier in ((1, pruned.rectify1), (2, pruned.rectify2), (3, pruned.rectify3)):
            side = getattr(pruned, f"bconv{k + 2}").out_channels
            width = getattr(pruned, f"fuse{k + 1}")[0].in_channels - side  # the stage's channels
            assert rectifier.scale.out_channels == rectifier.shift.out_channels == width
            assert rectifier.scale.in_channels == side
    x = torch.rand(2, 3, *SIZE)
    path = str(tmp_path / "pruned.pth")
    save_pruned_model(pruned, path, arch="ptl_osnet_x0_25", report=report)
    torch.testing.assert_close(embed(load_pruned_model(path), x), embed(pruned, x), rtol=0, atol=0)
