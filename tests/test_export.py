"""Export to ONNX / OpenVINO (INT8): parity with PyTorch, dynamic batch, frozen PTL state, sidecar, errors."""
import hashlib
import json
import os
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

from tiny import TINY_DATA  # noqa: E402

from ptl_torchreid.cli import main  # noqa: E402
from ptl_torchreid.compress import load_pruned_model, prune_cop, save_pruned_model  # noqa: E402
from ptl_torchreid.export import (  # noqa: E402
    OnnxRuntimeRunner,
    ParityError,
    QuantizationRejected,
    UnsupportedModelError,
    export_model,
    export_onnx,
    pipeline,  # noqa: E402
    read_sidecar,
)
from ptl_torchreid.models import build_model  # noqa: E402

SIZE = (16, 8)


class TinyNet(nn.Module):
    """conv-BN-ReLU-pool embedding with a classifier in training mode: torchreid's forward contract."""

    def __init__(self, classes=6):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.classifier = nn.Linear(8, classes)

    def forward(self, x):
        v = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return v if not self.training else self.classifier(v)


def tiny():
    torch.manual_seed(0)
    return TinyNet().eval()


def loader(n, seed, ids=3):
    """One batch of images whose identity shifts their mean, so the embedding separates identities."""
    g = torch.Generator().manual_seed(seed)
    pids = torch.arange(n) % ids
    imgs = torch.randn(n, 3, *SIZE, generator=g) + pids.view(-1, 1, 1, 1).float()
    return [{"img": imgs, "pid": pids, "camid": torch.full((n,), seed)}]


EVAL_SETS = [("toy", loader(6, 0), loader(9, 1))]


def calibration():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((4, 3, *SIZE)).astype(np.float32) for _ in range(4)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One full export of the tiny model (ONNX, OpenVINO, INT8) shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("deploy")
    result = export_model(tiny(), str(out), "tiny", dataset="toy", fmt="openvino", int8=True, input_size=SIZE,
                          eval_sets=EVAL_SETS, calibration=calibration(), mean=(0.5, 0.5, 0.5),
                          std=(0.25, 0.25, 0.25), dist_metric="cosine")
    return out, result


def test_dynamic_batch_onnx_matches_pytorch_at_any_batch(exported):
    _, result = exported
    parity = result.checks["onnx"]["parity"]["batches"]
    assert sorted(parity) == [1, 7, 32] and all(p["max_abs"] <= 1e-4 for p in parity.values())
    runner = OnnxRuntimeRunner(result.files["onnx"])
    assert isinstance(runner.session.get_inputs()[0].shape[0], str)  # symbolic, not a fixed size
    model = tiny()
    for b in (1, 2, 5, 33):
        x = torch.randn(b, 3, *SIZE)
        with torch.no_grad():
            np.testing.assert_allclose(runner(x.numpy()), model(x).numpy(), atol=1e-5)


def test_static_batch_is_fixed_to_one(tmp_path):
    path = str(tmp_path / "tiny.onnx")
    assert sorted(export_onnx(tiny(), path, input_size=SIZE, dynamic_batch=False)) == [1]
    assert OnnxRuntimeRunner(path).session.get_inputs()[0].shape[0] == 1


def _perturb_batch(monkeypatch, batch, delta):
    original = OnnxRuntimeRunner.__call__

    def perturbed(self, images):
        out = original(self, images)
        return out + delta if len(images) == batch else out

    monkeypatch.setattr(OnnxRuntimeRunner, "__call__", perturbed)


def test_parity_failure_names_the_batch_and_writes_nothing(tmp_path, monkeypatch):
    _perturb_batch(monkeypatch, 7, 2e-3)
    with pytest.raises(ParityError, match=r"batch 7: max-abs difference 0\.002"):
        export_model(tiny(), str(tmp_path), "tiny", dataset="toy", input_size=SIZE, eval_sets=EVAL_SETS)
    assert os.listdir(tmp_path) == []  # neither the file, nor its sidecar, nor the staging folder


def test_retrieval_mismatch_is_an_error(tmp_path, monkeypatch):
    original = OnnxRuntimeRunner.__call__
    # Gallery features (the batch of 9) in reverse order; the feature check at batches 1/7/32 still passes.
    monkeypatch.setattr(OnnxRuntimeRunner, "__call__", lambda self, x: original(self, x)[::-1].copy()
                        if len(x) == 9 else original(self, x))
    with pytest.raises(ParityError, match="on 'toy': (Rank-1|mAP) .* points apart"):
        export_model(tiny(), str(tmp_path), "tiny", dataset="toy", input_size=SIZE, eval_sets=EVAL_SETS)
    assert os.listdir(tmp_path) == []


def test_unsupported_models_are_clear_errors(tmp_path):
    class TwoOutputs(TinyNet):
        def forward(self, x):
            v = super().forward(x)
            return v, v

    with pytest.raises(UnsupportedModelError, match=r"returns tuple in eval mode.*\[batch, dim\]"):
        export_onnx(TwoOutputs(), str(tmp_path / "x.onnx"), input_size=SIZE)
    ptl = build_model("ptl_osnet_x0_25", num_classes=3, input_size=(64, 32))
    with pytest.raises(UnsupportedModelError, match="built for input size 64x32"):
        export_onnx(ptl, str(tmp_path / "x.onnx"), input_size=(128, 64))
    assert os.listdir(tmp_path) == []


def test_openvino_int8_accepted_within_one_map_point_with_sidecars(exported):
    out, result = exported
    assert set(result.files) == {"onnx", "openvino", "openvino_int8"}
    assert result.files["onnx"] == str(out / "tiny_toy.onnx")
    assert result.files["openvino"] == str(out / "tiny_toy_openvino_model" / "tiny_toy.xml")
    assert not [f for f in os.listdir(out) if f.startswith(".export-")]
    side = read_sidecar(result.files["onnx"])
    assert side["arch"] == "tiny" and side["dataset"] == "toy" and side["precision"] == "fp32"
    assert side["input"]["shape"] == ["batch", 3, 16, 8] and side["input"]["pixel_order"] == "RGB"
    assert side["input"]["mean"] == [0.5] * 3 and side["input"]["std"] == [0.25] * 3
    assert side["output"] == {"name": "features", "feature_dim": 8, "l2_normalize": True, "dist_metric": "cosine"}
    assert side["model_sha256"] == hashlib.sha256(open(result.files["onnx"], "rb").read()).hexdigest()
    assert side["verification"]["passed"] and sorted(side["verification"]["parity"]["batches"]) == ["1", "32", "7"]
    ov_side = read_sidecar(result.files["openvino"])
    assert ov_side["runtime"] == "openvino" and ov_side["weights_file"] == "tiny_toy.bin"
    int8 = read_sidecar(result.files["openvino_int8"])
    assert int8["precision"] == "int8"
    drop = int8["verification"]["map_drop_points"]["toy"]
    assert drop <= 1.0
    assert int8["verification"]["retrieval"]["toy"]["mAP"] == pytest.approx(result.reference["toy"]["mAP"] - drop / 100)
    assert min(b["min_cosine"] for b in int8["verification"]["parity"]["batches"].values()) > 0.99


def test_int8_rejected_beyond_the_map_limit_keeps_fp32_only(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "INT8_MAX_MAP_DROP", -1.0)  # no INT8 model can pass: the rejection path
    with pytest.raises(QuantizationRejected, match="on 'toy' its mAP is .* points lower"):
        export_model(tiny(), str(tmp_path), "tiny", dataset="toy", fmt="onnx", int8=True, input_size=SIZE,
                     eval_sets=EVAL_SETS, calibration=calibration())
    assert sorted(os.listdir(tmp_path)) == ["tiny_toy.json", "tiny_toy.onnx"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["branch", "rectify"])
def test_ptl_model_graph_holds_its_frozen_state(tmp_path, mode):
    torch.manual_seed(0)
    model = build_model("ptl_osnet_x0_25", num_classes=3, input_size=(64, 32), mode=mode)
    with torch.no_grad():
        # the paths from the side stream start at zero; make them live, as after fine-tuning
        for name, p in model.named_parameters():
            if name.startswith(("side_proj.", "rectify")) and name.endswith("weight"):
                p.normal_(0, 0.1)
        for _ in range(3):  # training batches move the running (eval) state away from zero
            model(torch.randn(4, 3, 64, 32))
    model.eval()
    path = str(tmp_path / "ptl.onnx")
    export_onnx(model, path, input_size=(64, 32))
    runner = OnnxRuntimeRunner(path)
    assert [i.name for i in runner.session.get_inputs()] == ["images"]  # no state input ...
    assert [o.name for o in runner.session.get_outputs()] == ["features"]  # ... and no state output
    x = torch.randn(7, 3, 64, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    first = runner(x.numpy())
    np.testing.assert_allclose(first, expected, atol=1e-4)
    runner(torch.randn(32, 3, 64, 32).numpy())
    np.testing.assert_array_equal(runner(x.numpy()), first)  # nothing carried between calls
    np.testing.assert_allclose(runner(x[:1].numpy()), expected[:1], atol=1e-4)  # batch-independent
    model.configure_cells(eval_state="zero")
    with torch.no_grad():
        zero_state = model(x).numpy()
    assert np.abs(zero_state - first).max() > 1e-3  # the running state is in the graph, not zeros


@pytest.mark.slow
def test_cli_exports_a_pruned_model_to_openvino(tmp_path, data_root):
    torch.manual_seed(0)
    pruned = prune_cop(build_model("osnet_x0_25", num_classes=4), flops_reduction=0.3, input_size=(64, 32))
    ckpt = str(tmp_path / "pruned.pth.tar")
    save_pruned_model(pruned, ckpt, arch="osnet_x0_25")
    out = tmp_path / "deploy"
    status = main(["export", "--format", "openvino", "--out", str(out)] + TINY_DATA + [
        "data.root", data_root, "data.save_dir", str(tmp_path / "log"), "model.name", "osnet_x0_25",
        "model.pretrained", "False", "use_gpu", "False", "model.load_weights", ckpt, "test.batch_size", "8",
        "train.batch_size", "4"])
    assert status == 0
    stem = "osnet_x0_25_cop_synthetic_reid"
    onnx_path = out / (stem + ".onnx")
    assert sorted(os.listdir(out)) == [stem + ".json", stem + ".onnx", stem + "_openvino_model"]
    side = json.loads((out / (stem + ".json")).read_text())
    assert side["source_checkpoint"]["sha256"] == hashlib.sha256(open(ckpt, "rb").read()).hexdigest()
    assert side["pruning"]["arch"] == "osnet_x0_25" and side["input"]["height"] == 64
    assert side["input"]["mean"] == [0.485, 0.456, 0.406] and side["output"]["feature_dim"] == 512
    ver = side["verification"]
    assert ver["passed"] and set(ver["retrieval"]) == {"synthetic_reid"}
    assert ver["retrieval"]["synthetic_reid"]["mAP"] == pytest.approx(
        ver["pytorch_retrieval"]["synthetic_reid"]["mAP"], abs=1e-3)
    reloaded = load_pruned_model(ckpt).eval()
    x = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        np.testing.assert_allclose(OnnxRuntimeRunner(str(onnx_path))(x.numpy()), reloaded(x).numpy(), atol=1e-4)
    assert osp.isfile(out / (stem + "_openvino_model") / (stem + ".json"))


def test_cli_export_needs_weights(tmp_path, capsys, data_root):
    status = main(["export"] + TINY_DATA + ["data.root", data_root, "data.save_dir", str(tmp_path),
                                            "model.name", "osnet_x0_25"])
    assert status == 2
    err = capsys.readouterr().err
    assert "set model.load_weights" in err and "Traceback" not in err
