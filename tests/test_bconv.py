"""BConv-Cell: equations, carried/detached/reset state, state modes, frozen eval state, buffers."""
import math

import pytest
import torch

from ptl_torchreid.models.bconv import EVAL_STATES, BConvCell, check_state_options
from ptl_torchreid.models.options import InvalidOption


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def scalar_cell(wi, wf, wo, wg, **kw):
    """1 -> 1 channel cell on 1x1 inputs: with padding 1 only the kernel centre touches the pixel."""
    cell = BConvCell(1, 1, state_size=(1, 1), **kw)
    with torch.no_grad():
        cell.conv.weight.zero_()
        for gate, w in enumerate((wi, wf, wo, wg)):
            cell.conv.weight[gate, 0, 1, 1] = w
    return cell


def test_equations_match_hand_computation():
    wi, wf, wo, wg = 0.7, -0.4, 1.3, 0.9
    cell = scalar_cell(wi, wf, wo, wg, state_mode="slot")
    x1, x2 = 0.5, -1.2
    h1 = cell(torch.full((1, 1, 1, 1), x1)).item()
    c1 = sigmoid(wi * x1) * math.tanh(wg * x1)  # C_0 = 0
    assert h1 == pytest.approx(sigmoid(wo * x1) * math.tanh(c1), abs=1e-6)
    h2 = cell(torch.full((1, 1, 1, 1), x2)).item()
    c2 = sigmoid(wf * x2) * c1 + sigmoid(wi * x2) * math.tanh(wg * x2)
    assert h2 == pytest.approx(sigmoid(wo * x2) * math.tanh(c2), abs=1e-6)
    assert cell.state.item() == pytest.approx(c2, abs=1e-6)


def test_gate_conv_is_reference_shape():
    cell = BConvCell(3, 5, state_size=(4, 4), stride=2)
    conv = cell.conv
    assert conv.weight.shape == (20, 3, 3, 3) and conv.bias is None
    assert conv.stride == (2, 2) and conv.padding == (1, 1)


def test_previous_state_is_detached():
    cell = BConvCell(2, 3, state_size=(4, 4))
    x1 = torch.randn(2, 2, 4, 4, requires_grad=True)
    cell(x1)
    assert cell.state.grad_fn is None and not cell.state.requires_grad
    x2 = torch.randn(2, 2, 4, 4, requires_grad=True)
    cell(x2).sum().backward()
    assert x1.grad is None  # no gradient flows into the earlier mini-batch
    assert x2.grad is not None and cell.conv.weight.grad is not None


def test_state_is_carried_and_reset():
    torch.manual_seed(0)
    cell = BConvCell(2, 3, state_size=(4, 4))
    x = torch.randn(2, 2, 4, 4)
    first = cell(x)
    assert cell.state_rms() > 0
    second = cell(x)
    assert not torch.allclose(first, second)  # the carried state changed the output
    cell.reset_state()
    assert cell.state is None and cell.state_rms() == 0.0
    torch.testing.assert_close(cell(x), first)  # reset gives the zero initial state again


def test_dataset_mode_keeps_batch_mean():
    torch.manual_seed(0)
    cell = BConvCell(2, 3, state_size=(4, 4), state_mode="dataset")
    x = torch.randn(5, 2, 4, 4)
    cell(x)
    a_i, a_f, a_o, a_g = cell.conv(x).chunk(4, 1)
    c = torch.sigmoid(a_i) * torch.tanh(a_g)
    assert cell.state.shape == (1, 3, 4, 4)
    torch.testing.assert_close(cell.state, c.mean(0, keepdim=True).detach())
    # the shared state is broadcast to a batch of another size
    y = torch.randn(3, 2, 4, 4)
    out = cell(y)
    a_i, a_f, a_o, a_g = cell.conv(y).chunk(4, 1)
    c2 = torch.sigmoid(a_f) * c.mean(0, keepdim=True) + torch.sigmoid(a_i) * torch.tanh(a_g)
    torch.testing.assert_close(out, (torch.sigmoid(a_o) * torch.tanh(c2)).detach())


def test_slot_mode_smaller_and_larger_batches():
    torch.manual_seed(0)
    cell = BConvCell(2, 3, state_size=(4, 4), state_mode="slot")
    cell(torch.randn(4, 2, 4, 4))
    full = cell.state.clone()
    assert full.shape == (4, 3, 4, 4)
    # a smaller batch uses the first slots and leaves the others
    x_small = torch.randn(2, 2, 4, 4)
    reference = BConvCell(2, 3, state_size=(4, 4), state_mode="slot")
    reference.load_state_dict(cell.state_dict())
    out = cell(x_small)
    a_i, a_f, a_o, a_g = cell.conv(x_small).chunk(4, 1)
    c = torch.sigmoid(a_f) * full[:2] + torch.sigmoid(a_i) * torch.tanh(a_g)
    torch.testing.assert_close(out, (torch.sigmoid(a_o) * torch.tanh(c)).detach())
    torch.testing.assert_close(cell.state[2:], full[2:])
    # a larger batch starts its extra slots fresh (from zero)
    x_big = torch.randn(6, 2, 4, 4)
    before = cell.state.clone()
    cell(x_big)
    a_i, a_f, a_o, a_g = cell.conv(x_big).chunk(4, 1)
    prev = torch.cat([before, torch.zeros(2, 3, 4, 4)])
    torch.testing.assert_close(cell.state, (torch.sigmoid(a_f) * prev + torch.sigmoid(a_i) * torch.tanh(a_g)).detach())


def test_eval_state_is_frozen_and_batch_independent():
    torch.manual_seed(0)
    cell = BConvCell(2, 3, state_size=(4, 4), momentum=0.5)
    for _ in range(3):
        cell(torch.randn(4, 2, 4, 4))
    cell.eval()
    state, running = cell.state.clone(), cell.running_state.clone()
    a, b = torch.randn(1, 2, 4, 4), torch.randn(5, 2, 4, 4)
    alone = cell(a)
    mixed = cell(torch.cat([b[:2], a, b[2:]]))
    torch.testing.assert_close(mixed[2:3], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(cell.state, state)
    torch.testing.assert_close(cell.running_state, running)
    assert int(cell.num_batches_tracked) == 3


def test_running_and_zero_eval_states_differ_as_specified():
    torch.manual_seed(0)
    cell = BConvCell(2, 3, state_size=(4, 4), momentum=None)
    means = []
    for _ in range(3):
        x = torch.randn(4, 2, 4, 4)
        cell(x)
        means.append(cell.state.clone())  # dataset mode: the state is the batch mean of C_t
    torch.testing.assert_close(cell.running_state, torch.stack(means).mean(0))  # cumulative average
    cell.eval()
    x = torch.randn(2, 2, 4, 4)
    a_i, a_f, a_o, a_g = cell.conv(x).chunk(4, 1)
    running_out = cell(x)
    expected = torch.sigmoid(a_o) * torch.tanh(torch.sigmoid(a_f) * cell.running_state
                                               + torch.sigmoid(a_i) * torch.tanh(a_g))
    torch.testing.assert_close(running_out, expected.detach())
    cell.configure(eval_state="zero")
    expected_zero = torch.sigmoid(a_o) * torch.tanh(torch.sigmoid(a_i) * torch.tanh(a_g))
    torch.testing.assert_close(cell(x), expected_zero.detach())


def test_running_state_momentum():
    torch.manual_seed(0)
    cell = BConvCell(2, 3, state_size=(4, 4), momentum=0.25)
    cell(torch.randn(4, 2, 4, 4))
    first = cell.state.clone()
    torch.testing.assert_close(cell.running_state, 0.25 * first)


def test_buffers_saved_restored_and_moved():
    torch.manual_seed(0)
    cell = BConvCell(2, 3, state_size=(4, 4))
    cell(torch.randn(4, 2, 4, 4))
    sd = cell.state_dict()
    assert {"running_state", "num_batches_tracked", "_extra_state"} <= set(sd)
    other = BConvCell(2, 3, state_size=(4, 4))
    other.load_state_dict(sd)
    torch.testing.assert_close(other.running_state, cell.running_state)
    torch.testing.assert_close(other.state, cell.state)
    other.to(torch.float64)
    assert other.running_state.dtype == torch.float64 and other.state.dtype == torch.float64
    cell.reset_state()
    fresh = BConvCell(2, 3, state_size=(4, 4))
    fresh.load_state_dict(cell.state_dict())
    assert fresh.state is None


def test_bf16_autocast_keeps_state_in_fp32():
    cell = BConvCell(2, 3, state_size=(4, 4))
    x = torch.randn(2, 2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cell(x)
    assert out.dtype == torch.bfloat16
    assert cell.state.dtype == torch.float32 and cell.running_state.dtype == torch.float32
    assert torch.isfinite(out.float()).all()


def test_bad_input_and_options_give_clear_errors():
    cell = BConvCell(2, 3, state_size=(4, 4))
    with pytest.raises(ValueError, match="input size"):
        cell(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="state_mode"):
        BConvCell(2, 3, state_size=(4, 4), state_mode="global")
    with pytest.raises(ValueError, match="eval_state"):
        cell.configure(eval_state="mean")
    with pytest.raises(ValueError, match="momentum"):
        cell.configure(momentum=1.5)


def test_fused_cell_gradient_matches_autograd_reference():
    from ptl_torchreid.models.bconv import _CellUpdate

    torch.manual_seed(0)
    gates = torch.randn(3, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    prev = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    torch.autograd.gradcheck(lambda g: _CellUpdate.apply(g, prev)[0], (gates,))
    a_i, a_f, a_o, a_g = gates.chunk(4, 1)
    cell = torch.sigmoid(a_f) * prev + torch.sigmoid(a_i) * torch.tanh(a_g)
    reference = torch.sigmoid(a_o) * torch.tanh(cell)
    out, fused_cell = _CellUpdate.apply(gates, prev)
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(fused_cell, cell.detach())
    assert not fused_cell.requires_grad


def test_reset_running_state_starts_a_new_average():
    torch.manual_seed(0)
    cell = BConvCell(2, 3, state_size=(4, 4), momentum=None)
    for _ in range(3):
        cell(torch.randn(4, 2, 4, 4))
    assert int(cell.num_batches_tracked) == 3
    cell.reset_running_state()
    assert int(cell.num_batches_tracked) == 0 and not cell.running_state.any()
    cell(torch.randn(4, 2, 4, 4))
    # a cumulative average over one batch after the reset is that batch's mean state (the carried state is kept)
    torch.testing.assert_close(cell.running_state, cell.state)


def test_option_errors_say_which_option_failed():
    with pytest.raises(InvalidOption) as e:
        check_state_options("dataset", "running", 1.5)
    assert (e.value.option, e.value.value, e.value.choices) == ("momentum", 1.5, None)
    assert "(0, 1]" in e.value.requirement and "momentum=1.5 is not valid" in str(e.value)
    with pytest.raises(InvalidOption) as e:
        BConvCell(2, 3, state_size=(4, 4), eval_state="mean")
    assert (e.value.option, e.value.choices) == ("eval_state", EVAL_STATES)
    assert isinstance(e.value, ValueError)
