"""The whole export: frozen eval graph -> ONNX (-> OpenVINO, -> INT8) -> checks -> files and sidecar JSONs.

Files are written to a staging folder inside ``out_dir`` and moved into place only after their checks pass, so
a failed check leaves nothing that looks exported (an earlier export of the same name is kept as it was).
"""
import os
import os.path as osp
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .graph import ExportError, example_input, frozen_eval_model, model_input_size, probe_embedding, ptl_state_summary
from .onnx_format import write_onnx
from .openvino_format import quantize_int8, write_openvino
from .parity import (
    DEFAULT_BATCH_SIZES,
    MAX_ABS,
    MIN_COSINE,
    RETRIEVAL_POINTS,
    check_parity,
    compare_retrieval,
    feature_differences,
    retrieval_metrics,
    take_batch,
)
from .runtimes import OnnxRuntimeRunner, OpenVINORunner, TorchRunner
from .sidecar import IMAGENET_MEAN, IMAGENET_STD, make_sidecar, model_stem, write_sidecar

__all__ = ["FORMATS", "INT8_MAX_MAP_DROP", "ExportResult", "QuantizationRejected", "export_model", "export_onnx",
           "export_openvino"]

FORMATS = ("onnx", "openvino")
INT8_MAX_MAP_DROP = 1.0  # points of mAP the INT8 model may lose against fp32


class QuantizationRejected(ExportError):
    """The INT8 model lost more mAP than allowed; it was not written (the fp32 files were)."""


@dataclass
class ExportResult:
    stem: str
    input_size: tuple
    feature_dim: int
    files: dict = field(default_factory=dict)      # kind ('onnx', 'openvino', 'openvino_int8') -> model path
    sidecars: dict = field(default_factory=dict)   # kind -> JSON path
    checks: dict = field(default_factory=dict)     # kind -> verification record (as in the sidecar)
    reference: dict = field(default_factory=dict)  # set name -> PyTorch {"rank1", "mAP"}

    def table(self):
        """Markdown: one row per written model with its worst parity figures and Rank-1/mAP per set."""
        rows = ["| model | file | max-abs (worst batch) | min cosine | " + " | ".join(
            f"Rank-1 / mAP {s}" for s in self.reference) + " |"]
        rows.append("|" + "---|" * (4 + len(self.reference)))
        rows.append("| pytorch | - | - | - | " + " | ".join(
            f"{m['rank1']:.1%} / {m['mAP']:.1%}" for m in self.reference.values()) + " |")
        for kind, path in self.files.items():
            check = self.checks[kind]
            batches = check["parity"]["batches"].values()
            worst = max(b["max_abs"] for b in batches)
            cos = min(b["min_cosine"] for b in batches)
            rows.append(f"| {kind} | {path} | {worst:.2e} | {cos:.7f} | " + " | ".join(
                f"{m['rank1']:.1%} / {m['mAP']:.1%}" for m in check["retrieval"].values()) + " |")
        return "\n".join(rows)


def _move_into_place(src, dst):
    if osp.isdir(dst):
        shutil.rmtree(dst)
    elif osp.exists(dst):
        os.remove(dst)
    os.replace(src, dst)


def _parity_images(images, input_size, batch_sizes):
    if images is not None and len(images):
        return np.asarray(images, dtype=np.float32), "given images"
    return example_input(input_size, max(batch_sizes)).numpy(), "seeded random inputs"


class _Step:
    """Prints a step and how long it took."""

    def __init__(self, log, text):
        self.log, self.text = log, text

    def __enter__(self):
        self.t0 = time.time()
        self.log("=> " + self.text + " ...")
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.log(f"   done in {time.time() - self.t0:.1f}s")
        return False


def export_model(model, out_dir, arch, *, dataset=None, fmt="onnx", int8=False, input_size=None, images=None,
                 eval_sets=(), calibration=None, batch_sizes=DEFAULT_BATCH_SIZES, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, dist_metric="euclidean", normalize_feature=False, source_checkpoint=None,
                 pruning=None, dynamic_batch=True, name=None, max_abs=MAX_ABS, min_cosine=MIN_COSINE, log=print):
    """Export ``model``'s eval-mode embedding function and verify it; returns an :class:`ExportResult`.

    Args:
        model: any torchreid, ``ptl_*`` or pruned model (a copy is exported in eval mode; ``model`` is untouched).
        out_dir: output folder. Files: ``<name>.onnx``, ``<name>_openvino_model/<name>.xml`` (``fmt='openvino'``),
            ``<name>_int8_openvino_model/<name>_int8.xml`` (``int8``), each with a ``.json`` sidecar beside it.
        arch, dataset: name the files ``<arch>_<dataset>`` (unless ``name``) and go into the sidecar.
        fmt: ``'onnx'`` or ``'openvino'`` (the ONNX file, its intermediate, is written and checked too).
        int8: also quantise with NNCF on ``calibration`` (numpy batches); accepted only when its mAP is within
            ``INT8_MAX_MAP_DROP`` points of PyTorch fp32 on every ``eval_sets`` entry.
        input_size: (height, width); a PTL model's own size is used (and required).
        images: preprocessed images ``[N, 3, H, W]`` for the parity check at ``batch_sizes`` (default: seeded
            random inputs). eval_sets: ``[(name, query loader, gallery loader)]`` for the Rank-1/mAP check.
        mean, std, dist_metric, normalize_feature: preprocessing and distance the sidecar records.
        source_checkpoint: the file the weights came from (its SHA-256 goes into the sidecar).
        pruning: the pruned checkpoint's ``pruning`` entry (recorded without its layer report).
        max_abs, min_cosine: fp32 feature tolerances (default 1e-4 and 0.99999).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
    if int8 and not eval_sets:
        raise ValueError("int8=True needs eval_sets: the INT8 model is accepted only after its mAP is compared "
                         "with fp32")
    if int8 and not calibration:
        raise ValueError("int8=True needs calibration batches (preprocessed training images)")
    net = frozen_eval_model(model)
    size = model_input_size(net, input_size)
    feature_dim = probe_embedding(net, size, f"'{arch}'")
    stem = name or model_stem(arch, dataset)
    images, images_kind = _parity_images(images, size, batch_sizes)
    if not dynamic_batch:
        batch_sizes = (1,)
    eval_sets = list(eval_sets)
    result = ExportResult(stem=stem, input_size=size, feature_dim=feature_dim)
    reference = TorchRunner(net)
    common = dict(arch=arch, dataset=dataset, input_size=size, feature_dim=feature_dim, mean=mean, std=std,
                  l2_normalize=bool(normalize_feature or dist_metric == "cosine"), dist_metric=dist_metric,
                  dynamic_batch=dynamic_batch, source_checkpoint=source_checkpoint, ptl=ptl_state_summary(net),
                  pruning=_pruning_record(pruning),
                  exporter={"method": "torch.onnx.export(dynamo=True)", "torch": torch.__version__})
    tolerance = {"max_abs": max_abs, "min_cosine": min_cosine, "retrieval_points": RETRIEVAL_POINTS}

    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=out_dir, prefix=".export-")
    try:
        onnx_path = osp.join(staging, stem + ".onnx")
        with _Step(log, f"exporting {arch} to ONNX ({size[0]}x{size[1]}, {'dynamic' if dynamic_batch else 'static'} "
                        "batch)"):
            write_onnx(net, onnx_path, size, dynamic_batch=dynamic_batch)
        if eval_sets:
            with _Step(log, f"PyTorch Rank-1/mAP on {', '.join(s[0] for s in eval_sets)}"):
                result.reference = {s[0]: retrieval_metrics(reference, s[1], s[2], dist_metric, normalize_feature)
                                    for s in eval_sets}

        def verify(kind, runner):
            with _Step(log, f"checking {kind} against PyTorch (batches {', '.join(map(str, batch_sizes))}, then "
                            "Rank-1/mAP)"):
                parity = check_parity(reference, runner, images, batch_sizes, max_abs=max_abs,
                                      min_cosine=min_cosine, name=f"{kind} ({runner.name})")
                retrieval = compare_retrieval(result.reference, runner, eval_sets, dist_metric=dist_metric,
                                              normalize_feature=normalize_feature, name=kind) if eval_sets else {}
            return {"passed": True, "onnx_checker": "passed", "images": images_kind, "tolerance": tolerance,
                    "parity": {"runtime": runner.name, "batches": parity}, "retrieval": retrieval,
                    "pytorch_retrieval": result.reference}

        staged = {"onnx": (onnx_path, verify("onnx", OnnxRuntimeRunner(onnx_path)), "onnx", "fp32")}
        ov_model = None
        if fmt == "openvino" or int8:
            with _Step(log, "converting to OpenVINO IR"):
                xml = osp.join(staging, stem + "_openvino_model", stem + ".xml")
                ov_model = write_openvino(onnx_path, xml)
            if fmt == "openvino":
                staged["openvino"] = (xml, verify("openvino", OpenVINORunner(xml)), "openvino", "fp32")
        for kind, (path, check, runtime, precision) in staged.items():
            top = path if kind == "onnx" else osp.dirname(path)
            final_top = osp.join(out_dir, osp.relpath(top, staging))
            _move_into_place(top, final_top)
            final = osp.join(out_dir, osp.relpath(path, staging))
            result.files[kind], result.checks[kind] = final, check
            result.sidecars[kind] = write_sidecar(final, make_sidecar(final, runtime=runtime, precision=precision,
                                                                      verification=check, **common))
        if int8:
            _export_int8(ov_model, calibration, staging, out_dir, stem, reference, images, images_kind, batch_sizes,
                         eval_sets, result, dist_metric, normalize_feature, common, log)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log("Exported:\n" + result.table())
    return result


def _export_int8(ov_model, calibration, staging, out_dir, stem, reference, images, images_kind, batch_sizes,
                 eval_sets, result, dist_metric, normalize_feature, common, log):
    int8_stem = stem + "_int8"
    xml = osp.join(staging, int8_stem + "_openvino_model", int8_stem + ".xml")
    n_calibration = sum(len(b) for b in calibration)
    with _Step(log, f"INT8 post-training quantisation with NNCF ({n_calibration} calibration images)"):
        quantize_int8(ov_model, calibration, xml)
    runner = OpenVINORunner(xml)
    with _Step(log, "INT8 Rank-1/mAP against fp32"):
        parity = {}
        for b in batch_sizes:
            x = take_batch(images, int(b))
            diff, cos = feature_differences(reference(x), runner(x))
            parity[int(b)] = {"max_abs": diff, "min_cosine": cos}
        retrieval = {s[0]: retrieval_metrics(runner, s[1], s[2], dist_metric, normalize_feature) for s in eval_sets}
    drops = {s: (result.reference[s]["mAP"] - m["mAP"]) * 100 for s, m in retrieval.items()}
    check = {
        "passed": all(d <= INT8_MAX_MAP_DROP for d in drops.values()),
        "images": images_kind,
        "calibration_images": int(sum(len(b) for b in calibration)),
        "tolerance": {"max_map_drop_points": INT8_MAX_MAP_DROP},
        "parity": {"runtime": "openvino", "batches": parity, "enforced": False},
        "retrieval": retrieval,
        "pytorch_retrieval": result.reference,
        "map_drop_points": drops,
    }
    if not check["passed"]:
        result.checks["openvino_int8"] = check
        worst = max(drops, key=drops.get)
        raise QuantizationRejected(
            f"the INT8 model was rejected and not written: on '{worst}' its mAP is {retrieval[worst]['mAP']:.2%} "
            f"against {result.reference[worst]['mAP']:.2%} in fp32, {drops[worst]:.2f} points lower (at most "
            f"{INT8_MAX_MAP_DROP} allowed). The fp32 files are in place: {', '.join(result.files.values())}. Try more "
            "calibration images (--calibration-images)."
        )
    final_dir = osp.join(out_dir, int8_stem + "_openvino_model")
    _move_into_place(osp.dirname(xml), final_dir)
    final = osp.join(final_dir, int8_stem + ".xml")
    result.files["openvino_int8"], result.checks["openvino_int8"] = final, check
    result.sidecars["openvino_int8"] = write_sidecar(
        final, make_sidecar(final, runtime="openvino", precision="int8", verification=check, **common)
    )


def _pruning_record(pruning):
    if not pruning:
        return None
    return {k: v for k, v in dict(pruning).items() if k in ("method", "arch", "format", "build_kwargs")}


def _export_checked(model, path, input_size, dynamic_batch, images, batch_sizes, openvino):
    net = frozen_eval_model(model)
    size = model_input_size(net, input_size)
    probe_embedding(net, size)
    if not dynamic_batch:
        batch_sizes = (1,)
    images, _ = _parity_images(images, size, batch_sizes)
    directory = osp.dirname(osp.abspath(str(path)))
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(dir=directory, prefix=".export-")
    try:
        staged = osp.join(staging, osp.basename(str(path)))
        onnx_path = osp.splitext(staged)[0] + ".onnx"
        write_onnx(net, onnx_path, size, dynamic_batch=dynamic_batch)
        if openvino:
            write_openvino(onnx_path, staged)
            runner = OpenVINORunner(staged)
        else:
            runner = OnnxRuntimeRunner(staged)
        parity = check_parity(TorchRunner(net), runner, images, batch_sizes)
        _move_into_place(staged, str(path))
        if openvino:
            _move_into_place(osp.splitext(staged)[0] + ".bin", osp.splitext(str(path))[0] + ".bin")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return parity


def export_onnx(model, path, input_size=(256, 128), dynamic_batch=True, images=None, batch_sizes=DEFAULT_BATCH_SIZES):
    """Export ``model``'s eval-mode embedding function to the ONNX file ``path`` and check it (onnx.checker,
    ONNX Runtime against PyTorch at ``batch_sizes`` on ``images`` or seeded random inputs); returns the
    parity figures ``{batch: {"max_abs", "min_cosine"}}``; raises :class:`ParityError` and writes nothing on a
    mismatch. For the full export (Rank-1/mAP check, INT8, sidecar) see :func:`export_model`."""
    return _export_checked(model, path, input_size, dynamic_batch, images, batch_sizes, openvino=False)


def export_openvino(
    model, xml_path, input_size=(256, 128), dynamic_batch=True, images=None, batch_sizes=DEFAULT_BATCH_SIZES
):
    """:func:`export_onnx`, then OpenVINO IR ``xml_path`` (+ ``.bin``), checked on OpenVINO's CPU plugin."""
    return _export_checked(model, xml_path, input_size, dynamic_batch, images, batch_sizes, openvino=True)
