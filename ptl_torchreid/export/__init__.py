"""Deployment: export plain, ``ptl_*`` and COP-pruned models to ONNX and OpenVINO (fp32, INT8), checked
against PyTorch before anything is reported as exported.

    from ptl_torchreid.export import export_onnx, export_model
    export_onnx(model, "osnet_x0_25_market1501.onnx", input_size=(256, 128), dynamic_batch=True)
    result = export_model(model, "deploy/", arch="osnet_x0_25", dataset="market1501", fmt="openvino",
                          images=images, eval_sets=test_sets(datamanager))

Modules: ``graph`` (the frozen eval-mode function), ``onnx_format`` / ``openvino_format`` (writers, NNCF INT8),
``runtimes`` (PyTorch / ONNX Runtime / OpenVINO embedding functions), ``parity`` (feature and Rank-1/mAP
checks), ``sidecar`` (the JSON next to each model), ``images`` (check images from a torchreid data manager),
``pipeline`` (all of it). onnx, onnxscript, onnxruntime, openvino and nncf come with the ``export`` extra.
"""
from .graph import ExportError, UnsupportedModelError, frozen_eval_model, probe_embedding
from .images import calibration_batches, first_images, test_sets
from .parity import (
                     DEFAULT_BATCH_SIZES,
                     MAX_ABS,
                     MIN_COSINE,
                     RETRIEVAL_POINTS,
                     ParityError,
                     check_parity,
                     compare_retrieval,
                     feature_differences,
                     retrieval_metrics,
)
from .pipeline import (
                     FORMATS,
                     INT8_MAX_MAP_DROP,
                     ExportResult,
                     QuantizationRejected,
                     export_model,
                     export_onnx,
                     export_openvino,
)
from .runtimes import OnnxRuntimeRunner, OpenVINORunner, TorchRunner, runner_for
from .sidecar import make_sidecar, model_stem, read_sidecar, sidecar_path, write_sidecar

__all__ = ["ExportError", "UnsupportedModelError", "ParityError", "QuantizationRejected", "ExportResult",
           "export_model", "export_onnx", "export_openvino", "check_parity", "compare_retrieval",
           "retrieval_metrics", "feature_differences", "frozen_eval_model", "probe_embedding", "TorchRunner",
           "OnnxRuntimeRunner", "OpenVINORunner", "runner_for", "make_sidecar", "write_sidecar", "read_sidecar",
           "sidecar_path", "model_stem", "test_sets", "first_images", "calibration_batches", "FORMATS",
           "DEFAULT_BATCH_SIZES", "MAX_ABS", "MIN_COSINE", "RETRIEVAL_POINTS", "INT8_MAX_MAP_DROP"]
