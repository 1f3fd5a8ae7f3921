"""Writing a model as ONNX with ``torch.onnx.export(..., dynamo=True)`` and checking the file."""
import contextlib
import inspect
import io
import os.path as osp
import warnings

import torch

from .graph import ExportError, UnsupportedModelError, example_input

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "write_onnx", "check_onnx_file"]

INPUT_NAME = "images"
OUTPUT_NAME = "features"


def write_onnx(net, path, input_size, dynamic_batch=True, opset=None, verbose=False):
    """Export ``net`` (already in eval mode, see :func:`~ptl_torchreid.export.graph.frozen_eval_model`) to
    ``path`` as one self-contained file: input ``images`` ``[batch, 3, H, W]`` float32, output ``features``
    ``[batch, D]``; the batch dimension is dynamic unless ``dynamic_batch=False`` (then it is 1).

    Parameters and buffers, a PTL model's frozen cell states included, become graph initialisers. The export runs
    under ``torch.no_grad()``, so modules that switch to memory-saving autograd functions when gradients are on
    take their plain inference path."""
    batch = 2 if dynamic_batch else 1  # an example batch of 1 would let the exporter specialise on it
    x = example_input(input_size, batch)
    dynamic_shapes = {"x": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
    arg_name = _first_argument_name(net)
    if dynamic_shapes is not None and arg_name != "x":
        dynamic_shapes = {arg_name: dynamic_shapes["x"]}
    log = io.StringIO()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (x,), str(path), dynamo=True, external_data=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_shapes)
    except Exception as e:  # the exporter raises many types; all mean "this model does not export"
        raise UnsupportedModelError(f"torch.onnx.export (dynamo) could not export {type(net).__name__}: "
                                    f"{type(e).__name__}: "
                                    f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    finally:
        if verbose:
            print(log.getvalue(), end="")
    check_onnx_file(path)
    return path


def _first_argument_name(net):
    params = [p for p in inspect.signature(net.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return params[0].name if params else "x"


def check_onnx_file(path):
    """``onnx.checker`` (full check, shape inference included) on the file; :class:`ExportError` on failure.
    Returns the loaded ``onnx.ModelProto``."""
    import onnx

    if not osp.isfile(str(path)):
        raise ExportError(f"no ONNX file was written at {path}")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{path} fails onnx.checker: {e}") from e
    return onnx.load(str(path))
