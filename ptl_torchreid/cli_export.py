"""The ``export`` command: a trained (plain, PTL or COP-pruned) model to ONNX / OpenVINO (INT8), verified.

    ptl-torchreid export --config-file configs/synthetic_demo.yaml model.load_weights log/.../model-best.pth.tar \\
        --format openvino --int8 --out deploy/

The config says the model (``model.*``; a pruned file as ``model.load_weights`` rebuilds the pruned model), the
input size and preprocessing (``data.height``, ``data.width``, ``data.norm_mean``, ``data.norm_std``), the data
for the checks (``data.targets``: parity images and Rank-1/mAP; ``data.sources``: INT8 calibration images) and
the distance (``test.dist_metric``, ``test.normalize_feature``). Files are named ``<arch>_<source dataset>``.
"""
import importlib.util
import os.path as osp

from ptl_torchreid.compress import is_pruned_checkpoint, pruning_info
from ptl_torchreid.config import ConfigError
from ptl_torchreid.engine import build_datamanager, build_model
from ptl_torchreid.engine.defaults import take_checkpoint
from ptl_torchreid.export import (
    DEFAULT_BATCH_SIZES,
    FORMATS,
    MAX_ABS,
    MIN_COSINE,
    UnsupportedModelError,
    calibration_batches,
    export_model,
    first_images,
    test_sets,
)

__all__ = ["add_export_arguments", "run_export", "missing_export_packages"]

_PACKAGES = {"onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime", "openvino": "openvino",
             "nncf": "nncf"}


def add_export_arguments(parser):
    g = parser.add_argument_group("export")
    g.add_argument("--format", dest="export_format", choices=FORMATS, default="onnx",
                   help="onnx, or openvino (writes and checks the ONNX file too)")
    g.add_argument("--int8", action="store_true",
                   help="also write an OpenVINO INT8 model (NNCF post-training quantisation on training images), "
                        "kept only if its mAP is within 1 point of fp32")
    g.add_argument("--out", dest="export_out", default="", help="output folder (default <data.save_dir>/export)")
    g.add_argument("--name", dest="export_name", default="",
                   help="file name stem (default <arch>_<source dataset>, as trackers expect)")
    g.add_argument("--calibration-images", type=int, default=300, help="training images NNCF calibrates on")
    g.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES),
                   help="batch sizes of the parity check")
    g.add_argument("--max-abs", type=float, default=MAX_ABS,
                   help="largest fp32 feature difference from PyTorch allowed (default %(default)s)")
    g.add_argument("--min-cosine", type=float, default=MIN_COSINE,
                   help="smallest per-image cosine similarity to PyTorch allowed (default %(default)s)")
    g.add_argument("--static-batch", action="store_true", help="fix the batch dimension to 1")


def missing_export_packages(fmt="onnx", int8=False):
    needed = ["onnx", "onnxscript", "onnxruntime"] + (["openvino"] if fmt == "openvino" or int8 else []) + \
        (["nncf"] if int8 else [])
    return [_PACKAGES[n] for n in needed if importlib.util.find_spec(n) is None]


def _arch_and_pruning(cfg, checkpoint):
    if is_pruned_checkpoint(checkpoint):
        info = pruning_info(checkpoint)
        return info["arch"] + "_cop", info
    return cfg.model.name, None


def run_export(cfg, args):
    """Run the command; returns 0 (the files written are listed in the output)."""
    missing = missing_export_packages(args.export_format, args.int8)
    if missing:
        raise ConfigError(f"export needs {', '.join(missing)}: install them with  pip install "
                          "\"ptl_torchreid[export]\"")
    if not cfg.model.load_weights:
        raise ConfigError("export needs the trained model: set model.load_weights (a checkpoint or a pruned file)")
    if any(b < 1 for b in args.batch_sizes) or args.calibration_images < 1:
        raise ConfigError("export: --batch-sizes and --calibration-images must be positive")
    checkpoint = take_checkpoint(cfg, cfg.model.load_weights, args.checkpoints)
    arch, pruning = _arch_and_pruning(cfg, checkpoint)
    datamanager = build_datamanager(cfg)
    model = build_model(cfg, datamanager.num_train_pids, checkpoint=checkpoint)
    sets = test_sets(datamanager)
    images = first_images([loader for _, q, g in sets for loader in (q, g)], max(args.batch_sizes))
    calibration = calibration_batches(datamanager, args.calibration_images, seed=cfg.train.seed) \
        if args.int8 else None
    dataset = "+".join(cfg.data.sources)
    out = args.export_out or osp.join(cfg.data.save_dir, "export")
    try:
        result = export_model(model, out, arch, dataset=dataset, fmt=args.export_format, int8=args.int8,
                              input_size=(cfg.data.height, cfg.data.width), images=images, eval_sets=sets,
                              calibration=calibration, batch_sizes=tuple(args.batch_sizes),
                              mean=cfg.data.norm_mean, std=cfg.data.norm_std, dist_metric=cfg.test.dist_metric,
                              normalize_feature=cfg.test.normalize_feature, source_checkpoint=cfg.model.load_weights,
                              pruning=pruning, dynamic_batch=not args.static_batch, name=args.export_name or None,
                              max_abs=args.max_abs, min_cosine=args.min_cosine)
    except UnsupportedModelError as e:
        raise ConfigError(f"model.name = '{cfg.model.name}' cannot be exported: {e}") from None
    print("Sidecar JSON next to each model: " + ", ".join(result.sidecars.values()))
    return 0
