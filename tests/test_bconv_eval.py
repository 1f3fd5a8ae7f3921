"""BConv-Cell eval path: plain operations (traceable), bit-identical to the training-path arithmetic."""
import pytest
import torch

from ptl_torchreid.models import build_model
from ptl_torchreid.models.bconv import BConvCell, _CellUpdate, cell_output


def trained_cell(**kw):
    torch.manual_seed(0)
    cell = BConvCell(6, 5, state_size=(4, 3), stride=2, **kw)
    for _ in range(3):  # a non-zero running state
        cell(torch.randn(4, 6, 8, 6))
    return cell.eval()


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("eval_state", ["running", "zero"])
def test_eval_output_is_bit_identical_to_the_autograd_function(batch, eval_state):
    cell = trained_cell(eval_state=eval_state)
    assert cell.running_state.abs().sum() > 0
    x = torch.randn(batch, 6, 8, 6)
    gates = cell.conv(x).float()
    prev = cell._previous_state(batch, gates[:, :cell.out_channels])
    reference, _ = _CellUpdate.apply(gates, prev)
    with torch.no_grad():
        assert torch.equal(cell(x), reference)
    assert torch.equal(cell(x), reference)  # with autograd on, eval also takes the plain path
    assert torch.equal(cell_output(gates, prev), reference)


def test_training_path_still_uses_the_memory_saving_function(monkeypatch):
    cell = trained_cell().train()
    calls = []
    original = _CellUpdate.apply
    monkeypatch.setattr(_CellUpdate, "apply", lambda *a: calls.append(1) or original(*a))
    cell(torch.randn(2, 6, 8, 6))
    assert calls == [1]
    cell.eval()(torch.randn(2, 6, 8, 6))
    assert calls == [1]


def test_eval_model_traces_to_plain_operations():
    model = build_model("ptl_osnet_x0_25", num_classes=4, input_size=(64, 32)).eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        kinds = {n.kind() for n in traced.inlined_graph.nodes()}
        assert "prim::PythonOp" not in kinds
        assert torch.equal(traced(x), model(x))
