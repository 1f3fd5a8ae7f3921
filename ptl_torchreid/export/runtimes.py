"""Embedding functions over numpy batches ``[N, 3, H, W]`` float32 -> ``[N, D]`` for PyTorch eager, ONNX Runtime
and OpenVINO (CPU), each with an optional thread count: what parity checks and benchmarks call."""
import os
import os.path as osp

import numpy as np
import torch

__all__ = ["TorchRunner", "OnnxRuntimeRunner", "OpenVINORunner", "runner_for"]


class TorchRunner:
    """PyTorch eager (eval mode, no gradients). ``threads`` sets torch's intra-op threads while it runs."""

    name = "pytorch"

    def __init__(self, net, threads=None):
        self.net = net.eval()
        self.threads = threads

    @torch.no_grad()
    def __call__(self, images):
        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            return self.net(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).numpy()
        finally:
            torch.set_num_threads(previous)


class OnnxRuntimeRunner:
    """An ONNX file on ONNX Runtime's CPU execution provider."""

    name = "onnxruntime"

    def __init__(self, path, threads=None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images):
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})[0]


class OpenVINORunner:
    """An OpenVINO IR (``.xml``), an ONNX file or an ``openvino.Model`` compiled for the CPU. fp32 layers run in
    fp32 (OpenVINO may otherwise pick bf16 on CPUs that have it)."""

    name = "openvino"

    def __init__(self, model, threads=None):
        import openvino as ov

        core = ov.Core()
        if not isinstance(model, ov.Model):
            model = core.read_model(str(model))
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, images):
        self.request.infer({0: np.ascontiguousarray(images, dtype=np.float32)})
        return self.request.get_output_tensor(0).data.copy()


def runner_for(path, threads=None):
    """ONNX Runtime for ``.onnx``, OpenVINO for ``.xml`` (or an ``*_openvino_model`` folder)."""
    path = str(path)
    if osp.isdir(path):
        xml = [f for f in sorted(os.listdir(path)) if f.endswith(".xml")]
        if not xml:
            raise FileNotFoundError(f"no OpenVINO .xml file in {path}")
        path = osp.join(path, xml[0])
    if path.endswith(".onnx"):
        return OnnxRuntimeRunner(path, threads)
    if path.endswith(".xml"):
        return OpenVINORunner(path, threads)
    raise ValueError(f"{path}: expected an .onnx file, an OpenVINO .xml file or an *_openvino_model folder")
