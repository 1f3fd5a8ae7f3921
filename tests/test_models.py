"""PTL models: registration in torchreid, forward contract, determinism, pretrained loading, device agnosticism."""
import os
import os.path as osp
import re
import socket
import time

import pytest
import torch
from tiny import shared_weights

import ptl_torchreid
from ptl_torchreid import models
from ptl_torchreid._torchreid import model_factory, torchreid
from ptl_torchreid.models import backbones

SMALL = "ptl_osnet_x0_25"


def small_model(**kw):
    torch.manual_seed(0)
    return torchreid.models.build_model(SMALL, num_classes=7, pretrained=False, **kw)


def test_all_names_registered_and_listed(capsys):
    torchreid.models.show_avai_models()
    listed = capsys.readouterr().out
    for name in models.PTL_MODELS:
        assert name in model_factory()
        assert name in listed


def test_registration_is_idempotent_and_collision_safe(monkeypatch):
    registry = model_factory()
    before = dict(registry)
    models.register_models()
    assert registry == before
    foreign = lambda **kw: None  # noqa: E731
    monkeypatch.setitem(registry, "ptl_resnet50", foreign)
    with pytest.warns(UserWarning, match="ptl_resnet50"):
        models.register_models()
    assert registry["ptl_resnet50"] is foreign


# Every name in both state modes; the ResNet-50 models (slow to build) run one loss per mode.
MODEL_CASES = [(name, mode) for name in sorted(models.PTL_MODELS) for mode in ("dataset", "slot")]


@pytest.mark.parametrize("name,state_mode", MODEL_CASES)
def test_every_model_trains_and_evaluates(name, state_mode):
    heavy = "resnet50" in name
    torch.manual_seed(0)
    x = torch.randn(2, 3, 256, 128)
    for loss in ("softmax", "triplet"):
        model = torchreid.models.build_model(name, num_classes=5, loss=loss, pretrained=False)
        model.configure_cells(state_mode=state_mode)
        model.train()
        out = model(x)
        if loss == "softmax":
            assert out.shape == (2, 5)
            out.sum().backward()
        else:
            logits, feats = out
            assert logits.shape == (2, 5) and feats.shape == (2, model.feature_dim)
            (logits.sum() + feats.sum()).backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        assert model.state_norm() > 0
        model.eval()
        with torch.no_grad():
            assert model(x).shape == (2, model.feature_dim)
            fmap = model(x, return_featuremaps=True)
        assert fmap.dim() == 4 and fmap.shape[0] == 2
        if heavy:
            break


def test_reference_side_stream_widths_for_resnet50():
    model = models.build_model("ptl_resnet50", num_classes=3, mode="branch")
    assert model.widths == models.ptl.REFERENCE_WIDTHS
    assert model.bconv1.conv.weight.shape == (64, 3, 3, 3)
    assert model.fuse1[0].in_channels == 32 + 64 and model.fuse2[0].in_channels == 256 + 64
    assert model.fuse3[0].in_channels == 512 + 256 and model.fuse4[0].in_channels == 1024 + 512
    assert model.bconv6.stride == 2 and model.bconv6.state_size == (8, 4)
    assert models.build_model("ptl_resnet50_fc512", num_classes=3, mode="branch").bconv6.stride == 1  # last_stride=1
    assert model.side_proj.in_features == 128 and model.feature_dim == 2048
    reference = models.build_model("ptl_resnet50", num_classes=3, mode="branch", head="concat", input_size=(64, 32))
    assert reference.reduce[0].in_features == 2048 + 128 and reference.feature_dim == 2048
    assert isinstance(dict(model.named_children())["classifier"], torch.nn.Linear)


def test_eval_embedding_is_batch_independent():
    model = small_model()
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, 256, 128))
    model.eval()
    img = torch.randn(1, 3, 256, 128)
    others = torch.randn(6, 3, 256, 128)
    with torch.no_grad():
        alone = model(img)
        in_batch = model(torch.cat([others[:3], img, others[3:]]))[3:4]
        reordered = model(torch.cat([img, others.flip(0)]))[:1]
    torch.testing.assert_close(in_batch, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(reordered, alone, atol=1e-6, rtol=0)


def test_model_reset_and_state_norm():
    model = small_model()
    model.train()
    assert model.state_norm() == 0.0
    model(torch.randn(2, 3, 256, 128))
    assert model.state_norm() > 0
    model.reset_state()
    assert model.state_norm() == 0.0 and all(c.state is None for c in model.cells())


def test_parameter_groups_are_disjoint_and_complete():
    model = small_model()
    ptl = {id(p) for p in model.ptl_parameters()}
    bb = {id(p) for p in model.backbone_parameters()}
    assert ptl and bb and not ptl & bb
    assert ptl | bb == {id(p) for p in model.parameters()}
    assert id(model.classifier.weight) in ptl


def test_freeze_backbone_trains_only_cells_and_head():
    model = small_model()
    model.freeze_backbone(True).train()
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    model(torch.randn(2, 3, 256, 128)).sum().backward()
    assert all(p.grad is None for p in model.backbone_parameters())
    assert all(p.grad is not None for p in model.ptl_parameters())
    torch.testing.assert_close(bn.running_mean, stats)
    model.freeze_backbone(False)
    assert model.backbone.training and all(p.requires_grad for p in model.parameters())


def test_state_dict_round_trip_reproduces_embeddings(tmp_path):
    model = small_model()
    model.train()
    model(torch.randn(4, 3, 256, 128))
    sd = model.state_dict()
    assert any(k.endswith("running_state") for k in sd) and any(k.endswith("_extra_state") for k in sd)
    path = tmp_path / "ptl.pth"
    torch.save({"state_dict": sd}, path)
    other = torchreid.models.build_model(SMALL, num_classes=7, pretrained=False)
    other.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    model.eval(), other.eval()
    x = torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x))


def test_feature_extractor_loads_ptl_checkpoint(tmp_path):
    model = small_model()
    model.train()
    model(torch.randn(4, 3, 256, 128))
    model.eval()
    path = str(tmp_path / "model.pth.tar")
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, path)
    extractor = torchreid.utils.FeatureExtractor(model_name=SMALL, model_path=path, device="cpu", verbose=False)
    img = (torch.rand(256, 128, 3) * 255).to(torch.uint8).numpy()
    feats = extractor([img])
    assert feats.shape == (1, model.feature_dim)
    # same embedding as our model on the same preprocessed input
    x = extractor.preprocess(extractor.to_pil(img)).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(feats, model(x), atol=1e-5, rtol=1e-5)


def test_pretrained_backbone_from_model_zoo_file():
    path = shared_weights()
    model = small_model()
    report = models.load_pretrained_weights(model, path, verbose=False)  # loads under weights_only=True
    raw = torch.load(path, map_location="cpu", weights_only=False)
    raw = raw.get("state_dict", raw)
    raw = {k[7:] if k.startswith("module.") else k: v for k, v in raw.items()}
    backbone = model.backbone.state_dict()
    loaded = [k for k in backbone if k in raw and raw[k].shape == backbone[k].shape]
    assert len(loaded) > 100 and "fc.0.weight" in loaded  # the pretrained embedding layer comes along
    for k in loaded:
        torch.testing.assert_close(backbone[k], raw[k].to(backbone[k].dtype))
    assert set(report.loaded) == set(loaded)
    assert any(k.startswith("classifier") for k in report.skipped)  # 1041-id classifier is reported, not loaded


def test_pretrained_true_offline_fails_fast_with_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.hub.set_dir(str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)
    for name in ("ptl_osnet_x0_25", "ptl_resnet50"):
        start = time.time()
        with pytest.raises(backbones.PretrainedWeightsUnavailable, match="load_weights") as err:
            torchreid.models.build_model(name, num_classes=3, pretrained=True)
        assert time.time() - start < 10
        assert str(tmp_path) in str(err.value)


def test_cached_imagenet_weights_are_used(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url, cached = backbones.imagenet_weights_location("osnet_x0_25")
    os.makedirs(osp.dirname(cached))
    reference = torchreid.models.build_model("osnet_x0_25", num_classes=1000, pretrained=False)
    torch.save(reference.state_dict(), cached)
    model = torchreid.models.build_model(SMALL, num_classes=3, pretrained=True)
    torch.testing.assert_close(model.backbone.conv1.conv.weight, reference.conv1.conv.weight)


def test_build_model_errors():
    with pytest.raises(KeyError, match="ptl_resnet50"):
        models.build_model("ptl_resnet5O", num_classes=3)
    with pytest.raises(ValueError, match="not a PTL model"):
        models.build_model("osnet_x0_25", num_classes=3, state_mode="slot")
    with pytest.raises(ValueError, match="multiple of 32"):
        models.build_model(SMALL, num_classes=3, input_size=(250, 130))
    # option checks say which option failed and what is valid, for the config to name its key
    for options, option, choices in ((dict(head="sum"), "head", models.HEADS),
                                     (dict(mode="rectify", rectify_stages=("stage5",)), "rectify_stages", None),
                                     (dict(loss="arcface"), "loss", models.ptl.LOSSES),
                                     (dict(momentum=0.0), "momentum", None)):
        with pytest.raises(models.InvalidOption) as e:
            models.build_model(SMALL, num_classes=3, **options)
        assert (e.value.option, e.value.choices) == (option, choices)
    with pytest.raises(models.InvalidOption, match="cell_type='lstm' is not valid; choose one of bconv, conv"):
        models.check_options(cell_type="lstm")


def test_device_and_dtype_agnostic():
    model = small_model().to(torch.float64)
    x = torch.randn(2, 3, 256, 128, dtype=torch.float64)
    model.train()
    assert model(x).dtype == torch.float64
    model.eval()
    assert model(x).dtype == torch.float64
    # On the meta device every tensor the forward creates must follow its input, never a fixed device.
    meta = small_model().to("meta").train()
    assert meta(torch.empty(2, 3, 256, 128, device="meta")).device.type == "meta"


def test_no_hard_coded_cuda_in_package():
    root = osp.dirname(ptl_torchreid.__file__)
    offenders = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                for line in open(osp.join(dirpath, f)):
                    code = line.split("#", 1)[0]  # comments may mention .cuda(); code may not
                    if re.search(r"\.cuda\(", code):
                        offenders.append(f)
    assert not offenders


def test_unwrap_strips_parallel_wrappers_only():
    net = torch.nn.Linear(2, 2)
    assert models.unwrap(torch.nn.DataParallel(torch.nn.DataParallel(net))) is net
    holder = torch.nn.Module()
    holder.module = net  # a model with a child named "module" is not a wrapper
    assert models.unwrap(holder) is holder and models.unwrap(net) is net


def test_a_new_classifier_replaces_the_backbone_view_too():
    # torchreid's move for new identities: a fresh classifier. The PTL model's backbone is a view of its children,
    # so the optimizer's backbone / PTL split must see the new classifier, not the old one.
    from ptl_torchreid.engine import build_optimizer

    model = small_model()
    old = model.classifier
    model.classifier = torch.nn.Linear(old.in_features, 11)
    assert model.backbone.classifier is model.classifier
    optimizer = build_optimizer(model, optim="adam", lr=1e-3)
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters()}
    ptl_group = next(g for g in optimizer.param_groups if g["name"] == "ptl")
    assert {id(p) for p in model.classifier.parameters()} <= {id(p) for p in ptl_group["params"]}
    assert model(torch.randn(2, 3, 256, 128)).shape == (2, 11)
