"""OpenVINO IR from a checked ONNX file, and INT8 post-training quantisation with NNCF."""
import os
import os.path as osp

import numpy as np

__all__ = ["write_openvino", "quantize_int8"]


def write_openvino(onnx_path, xml_path):
    """Convert ``onnx_path`` to OpenVINO IR ``xml_path`` (+ ``.bin``) in fp32 (no fp16 weight compression, so
    the parity check holds the same tolerance as ONNX Runtime). Returns the ``openvino.Model``."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    os.makedirs(osp.dirname(osp.abspath(str(xml_path))), exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return model


def quantize_int8(model, calibration_batches, xml_path=None, preset="performance"):
    """NNCF post-training INT8 quantisation of an ``openvino.Model`` (or an IR / ONNX path) over
    ``calibration_batches`` (numpy ``[B, 3, H, W]`` float32 batches of preprocessed training images). Every
    batch is used (``subset_size`` = their count). Saved to ``xml_path`` when given; returns the quantised model."""
    import nncf
    import openvino as ov

    if not isinstance(model, ov.Model):
        model = ov.Core().read_model(str(model))
    batches = [np.ascontiguousarray(b, dtype=np.float32) for b in calibration_batches]
    if not batches:
        raise ValueError("INT8 quantisation needs calibration images; none were given")
    quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches),
                              preset=getattr(nncf.QuantizationPreset, preset.upper()))
    if xml_path is not None:
        os.makedirs(osp.dirname(osp.abspath(str(xml_path))), exist_ok=True)
        ov.save_model(quantized, str(xml_path), compress_to_fp16=False)
    return quantized
