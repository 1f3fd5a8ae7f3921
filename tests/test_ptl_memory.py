"""Memory-saving autograd paths of the BConv-Cell and the fuse blocks: bit-identical to the plain formulas
(outputs, carried states, gradients) and saving fewer tensors for backward."""
import contextlib
import copy

import pytest
import torch

from ptl_torchreid.models import build_model
from ptl_torchreid.models import ptl as ptl_module
from ptl_torchreid.models.bconv import BConvCell


def plain_cell_forward(self, x):
    """The cell's equations written with plain autograd operations (the reference)."""
    gates = self.conv(x)
    a_i, a_f, a_o, a_g = gates.float().chunk(4, dim=1)
    prev = self._previous_state(x.shape[0], a_i)
    cell = torch.sigmoid(a_f) * prev + torch.sigmoid(a_i) * torch.tanh(a_g)
    if self.training:
        self._update_state(cell)
    out = torch.sigmoid(a_o) * torch.tanh(cell)
    return out.to(gates.dtype)


def plain_fuse_forward(self, *inputs):
    return torch.nn.Sequential.forward(self, torch.cat(inputs, 1))


@contextlib.contextmanager
def plain_autograd():
    cell_fwd, fuse_fwd = BConvCell.forward, ptl_module.FuseBlock.forward
    BConvCell.forward, ptl_module.FuseBlock.forward = plain_cell_forward, plain_fuse_forward
    try:
        yield
    finally:
        BConvCell.forward, ptl_module.FuseBlock.forward = cell_fwd, fuse_fwd


def train_steps(model, batches, num_classes):
    """Outputs, parameter gradients and carried states over a few training steps (no optimizer)."""
    torch.manual_seed(123)
    record = []
    model.train()
    for x in batches:
        y = torch.randint(0, num_classes, (x.shape[0],))
        model.zero_grad(set_to_none=True)
        out = model(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        record.append((out.detach().clone(), [p.grad.clone() if p.grad is not None else None
                                              for p in model.parameters()],
                       [c.state.clone() for c in model.cells()]))
    return record


def assert_identical(a, b):
    for (out_a, grads_a, states_a), (out_b, grads_b, states_b) in zip(a, b):
        assert torch.equal(out_a, out_b)
        for ga, gb in zip(grads_a, grads_b):
            assert (ga is None) == (gb is None) and (ga is None or torch.equal(ga, gb))
        for sa, sb in zip(states_a, states_b):
            assert torch.equal(sa, sb)


@pytest.mark.parametrize("state_mode", ["dataset", "slot"])
def test_ptl_model_training_is_bit_identical_to_plain_autograd(state_mode):
    torch.manual_seed(0)
    model = build_model("ptl_osnet_x0_25", 5, input_size=(64, 32), state_mode=state_mode)
    reference = copy.deepcopy(model)
    # Batch sizes change, so slot mode uses fewer and then more slots than it holds.
    batches = [torch.randn(b, 3, 64, 32) for b in (4, 3, 4)]
    got = train_steps(model, batches, 5)
    with plain_autograd():
        want = train_steps(reference, batches, 5)
    assert_identical(got, want)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_frozen_backbone_gradients_are_identical():
    torch.manual_seed(0)
    model = build_model("ptl_osnet_x0_25", 5, input_size=(64, 32)).freeze_backbone(True)
    reference = copy.deepcopy(model)
    batches = [torch.randn(4, 3, 64, 32) for _ in range(2)]
    got = train_steps(model, batches, 5)
    with plain_autograd():
        want = train_steps(reference, batches, 5)
    assert_identical(got, want)
    assert all(p.grad is None for p in model.backbone_parameters())


@pytest.mark.parametrize("eval_state", ["running", "zero"])
def test_eval_outputs_are_identical(eval_state):
    torch.manual_seed(0)
    model = build_model("ptl_osnet_x0_25", 5, input_size=(64, 32), eval_state=eval_state)
    train_steps(model, [torch.randn(4, 3, 64, 32)], 5)
    x = torch.randn(3, 3, 64, 32)
    model.eval()
    with torch.no_grad():
        got = model(x)
        with plain_autograd():
            want = model(x)
    assert torch.equal(got, want)


def test_cell_under_bf16_autocast_matches_plain():
    torch.manual_seed(0)
    cell = BConvCell(3, 4, state_size=(8, 4))
    reference = copy.deepcopy(cell)
    x = torch.randn(2, 3, 8, 4, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cell(x)
        out_ref = plain_cell_forward(reference, x_ref)
    assert out.dtype == torch.bfloat16 and torch.equal(out, out_ref)
    out.float().sum().backward()
    out_ref.float().sum().backward()
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(cell.conv.weight.grad, reference.conv.weight.grad)
    assert torch.equal(cell.state, reference.state)


def test_fuse_block_under_autocast_takes_the_plain_path():
    fuse = ptl_module.FuseBlock(6, 4)
    a, b = torch.randn(2, 4, 5, 5), torch.randn(2, 2, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fuse(a, b)
        want = plain_fuse_forward(fuse, a, b)
    assert torch.equal(got, want)


def saved_bytes(fn):
    """Bytes of distinct storages autograd saves for backward while ``fn`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_cell_saves_four_maps_instead_of_five():
    torch.manual_seed(0)
    cell = BConvCell(8, 16, state_size=(16, 8))
    x = torch.randn(4, 8, 16, 8, requires_grad=True)
    one_map = 4 * 16 * 16 * 8 * 4  # [B, C, H, W] float32
    fixed = x.numel() * 4 + cell.conv.weight.numel() * 4  # the conv's saved input and weight
    cell(x)  # carried state now set
    ours = saved_bytes(lambda: cell(x)) - fixed
    with plain_autograd():
        plain = saved_bytes(lambda: cell(x)) - fixed
    state = 16 * 16 * 8 * 4  # the [1, C, H, W] previous state
    assert ours == 4 * one_map + state
    assert plain == 5 * one_map + state


def test_fuse_block_does_not_save_the_concatenation():
    torch.manual_seed(0)
    fuse = ptl_module.FuseBlock(24, 8)
    backbone_conv = torch.nn.Conv2d(16, 4, 1)  # like the backbone, which saves the tap map for its own backward
    a = torch.randn(4, 16, 8, 8, requires_grad=True)
    b = torch.randn(4, 8, 8, 8, requires_grad=True)

    def both():
        backbone_conv(a)
        fuse(a, b)

    ours = saved_bytes(both)
    with plain_autograd():
        plain = saved_bytes(both)
    # Plain autograd saves the concatenation [a, b]; ours saves b only, a being saved already.
    assert plain - ours == a.numel() * 4


def test_memory_saving_functions_are_used():
    """Guards against the model silently falling back to the plain formulas."""
    torch.manual_seed(0)
    model = build_model("ptl_osnet_x0_25", 5, input_size=(64, 32)).train()
    names = set()

    def walk(fn):
        if fn is None or fn in seen:
            return
        seen.add(fn)
        names.add(type(fn).__name__)
        for nxt, _ in fn.next_functions:
            walk(nxt)

    seen = set()
    walk(model(torch.randn(2, 3, 64, 32)).grad_fn)
    assert any("_CellUpdate" in n for n in names) and any("_ConcatConv1x1" in n for n in names)
