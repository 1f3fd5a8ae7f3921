"""BConv-Cell: the Batch-related Convolutional Cell of Progressive Transfer Learning (Yu et al., IJCAI 2019).

One convolution produces four gates (input, forget, output, cell) from the current input only:

    i, f, o = sigmoid(a_i), sigmoid(a_f), sigmoid(a_o);  g = tanh(a_g)
    C_t = f * C_{t-1} + i * g          (C_{t-1} detached: no gradient into earlier mini-batches)
    H_t = o * tanh(C_t)

The latent state C is carried from one mini-batch to the next, so it accumulates dataset-level information.
On top of the reference behaviour this cell adds:

* ``state_mode='slot'``: the reference per-sample-slot state of shape [B, C, H, W]. A smaller batch uses the first
  B slots (the others are kept); a larger batch starts the extra slots from zero.
* ``state_mode='dataset'``: one state [1, C, H, W] shared by the whole batch; after each step it becomes the batch
  mean of C_t.
* Deterministic, batch-independent inference: in eval mode the state is frozen and not updated. With
  ``eval_state='running'`` it is ``running_state``, a running average of the batch-mean training state kept as a
  buffer (saved in ``state_dict``, moved by ``.to()``, like BatchNorm's ``running_mean``); with
  ``eval_state='zero'`` it is zero (the reference's test-time behaviour).
* The state arithmetic runs in float32 even under autocast, so accumulating over many batches stays stable.

The gate arithmetic is one autograd function (:class:`_CellUpdate`) that keeps only the activated gates for
backward (4 maps per cell instead of autograd's 5) and recomputes ``C_t``/``tanh(C_t)`` there with the same
operations, so outputs, states and gradients are bit-identical to the plain formula; it lowers PTL's peak
training memory. In eval mode, where nothing is saved for backward, the cell runs the same formula in plain
operations (:func:`cell_output`), so exporters and tracers see ordinary tensor operations.
"""
import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from .options import InvalidOption, check_choice

STATE_MODES = ("dataset", "slot")
EVAL_STATES = ("running", "zero")
# When training zeroes the carried state (reset_state): at every epoch start, never, or every N steps.
RESET_POLICIES = ("epoch", "never", "iter")


_UNCHANGED = object()


def _check_momentum(momentum):
    valid = momentum is None or (isinstance(momentum, (int, float)) and not isinstance(momentum, bool)
                                 and 0.0 < momentum <= 1.0)
    if not valid:
        raise InvalidOption("momentum", momentum, "use a value in (0, 1], or None for a cumulative average")


def check_state_options(state_mode, eval_state, momentum):
    """Validate cell options without building a cell (used by configs); raises
    :class:`~ptl_torchreid.models.options.InvalidOption`."""
    check_choice("state_mode", state_mode, STATE_MODES)
    check_choice("eval_state", eval_state, EVAL_STATES)
    _check_momentum(momentum)


def check_reset_options(reset_policy, reset_every_n_iters=0):
    """Validate when training zeroes the carried state (the engine and the config call this); raises
    :class:`~ptl_torchreid.models.options.InvalidOption`."""
    check_choice("reset_policy", reset_policy, RESET_POLICIES)
    if reset_every_n_iters < 0 or (reset_policy == "iter" and reset_every_n_iters < 1):
        raise InvalidOption("reset_every_n_iters", reset_every_n_iters,
                            "must be >= 1 when reset_policy is 'iter' (>= 0 otherwise)")


def conv_output_size(size, stride, kernel_size=3, padding=1):
    """Spatial size produced by the cell's convolution for an input of ``size`` (an int)."""
    return (size + 2 * padding - kernel_size) // stride + 1


def cell_output(gates, prev):
    """``H_t`` from gates ordered (i, f, o, g) along dim 1 and ``C_{t-1}``, in plain differentiable operations:
    the same elementwise arithmetic, in the same order, as :class:`_CellUpdate`'s forward (used in eval mode)."""
    c = gates.shape[1] // 4
    i, f, o = torch.sigmoid(gates[:, :3 * c]).chunk(3, dim=1)
    g = torch.tanh(gates[:, 3 * c:])
    return o * torch.tanh(f * prev + i * g)


class _CellUpdate(torch.autograd.Function):
    """``(gates, C_{t-1}) -> (H_t, C_t)`` with gates ordered (i, f, o, g) along dim 1, all float32.

    Saves the activated gates (one [B, 4C, H, W] tensor) and ``C_{t-1}`` (detached, usually [1, C, H, W]);
    ``C_t`` is returned without gradient (it only feeds the carried state). The backward runs exactly the
    operations autograd would run on the plain formula, in the same order, hence identical gradients.
    """

    @staticmethod
    def forward(ctx, gates, prev):
        c = gates.shape[1] // 4
        act = torch.empty_like(gates)
        torch.sigmoid(gates[:, :3 * c], out=act[:, :3 * c])
        torch.tanh(gates[:, 3 * c:], out=act[:, 3 * c:])
        i, f, o, g = act.chunk(4, dim=1)
        cell = f * prev + i * g
        out = o * torch.tanh(cell)
        ctx.save_for_backward(act, prev)
        ctx.mark_non_differentiable(cell)
        return out, cell

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_cell):
        act, prev = ctx.saved_tensors
        i, f, o, g = act.chunk(4, dim=1)
        h = torch.tanh(f * prev + i * g)
        grad_o = grad_out * h
        grad_c = torch.ops.aten.tanh_backward(grad_out * o, h)
        del h
        c = i.shape[1]
        grad = torch.empty_like(act)
        torch.ops.aten.sigmoid_backward.grad_input(grad_c * g, i, grad_input=grad[:, :c])
        torch.ops.aten.sigmoid_backward.grad_input(grad_c * prev, f, grad_input=grad[:, c:2 * c])
        torch.ops.aten.sigmoid_backward.grad_input(grad_o, o, grad_input=grad[:, 2 * c:3 * c])
        torch.ops.aten.tanh_backward.grad_input(grad_c * i, g, grad_input=grad[:, 3 * c:])
        return grad, None


class BConvCell(nn.Module):
    """Batch-related convolutional cell.

    Args:
        in_channels, out_channels: channels of the input and of the output/state.
        state_size: (H, W) of the state, i.e. of the cell's output for the model's input resolution. It fixes the
            shape of ``running_state`` so that checkpoints load by name and shape like any other buffer.
        stride: stride of the gate convolution (kernel 3x3, padding 1).
        state_mode: ``'dataset'`` or ``'slot'`` (see module docstring).
        eval_state: ``'running'`` or ``'zero'``.
        momentum: weight of the newest batch in ``running_state``; ``None`` gives a cumulative average.
    """

    def __init__(self, in_channels, out_channels, state_size, stride=1, state_mode="dataset",
                 eval_state="running", momentum=0.1):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.state_size = tuple(int(s) for s in state_size)
        self.conv = nn.Conv2d(in_channels, 4 * out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.configure(state_mode=state_mode, eval_state=eval_state, momentum=momentum)
        self.register_buffer("running_state", torch.zeros(1, out_channels, *self.state_size))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        # The carried training state. A non-persistent buffer so that .to() moves it; it is saved through
        # get_extra_state() because its shape depends on the batch in slot mode.
        self.register_buffer("state", None, persistent=False)

    def configure(self, state_mode=None, eval_state=None, momentum=_UNCHANGED):
        """Change state mode, eval state or momentum (arguments left out stay as they are). Resets the carried
        state when the state mode changes, since the two modes keep states of different shapes."""
        if state_mode is not None:
            check_choice("state_mode", state_mode, STATE_MODES)
            if getattr(self, "state_mode", state_mode) != state_mode:
                self.reset_state()
            self.state_mode = state_mode
        if eval_state is not None:
            check_choice("eval_state", eval_state, EVAL_STATES)
            self.eval_state = eval_state
        if momentum is not _UNCHANGED:
            _check_momentum(momentum)
            self.momentum = momentum

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, stride={self.stride}, state_size={self.state_size}, "
                f"state_mode={self.state_mode}, eval_state={self.eval_state}, momentum={self.momentum}")

    # -- state management ---------------------------------------------------------------------------------------
    def reset_state(self):
        """Forget the carried state; the next training step starts from zeros."""
        self.state = None

    def reset_running_state(self):
        """Forget the running (eval) state and its step count, as BatchNorm's ``reset_running_stats``: the next
        training step starts a new average (with ``momentum=None``, a cumulative one)."""
        self.running_state.zero_()
        self.num_batches_tracked.zero_()

    def state_rms(self):
        """Root-mean-square magnitude of the carried state (0.0 when reset)."""
        if self.state is None:
            return 0.0
        return float(self.state.detach().float().pow(2).mean().sqrt())

    def get_extra_state(self):
        # Always a tensor, so checkpoints stay loadable with torch.load(weights_only=True).
        return self.state.detach().clone() if self.state is not None else torch.empty(0)

    def set_extra_state(self, state):
        if state is None or state.numel() == 0:
            self.state = None
        else:
            self.state = state.to(self.running_state.device)

    # -- forward ------------------------------------------------------------------------------------------------
    def _check_spatial(self, h, w):
        if (h, w) != self.state_size:
            raise ValueError(
                f"BConvCell state is {self.state_size[0]}x{self.state_size[1]} but this input gives {h}x{w}: the "
                "model was built for another input size. Build it with input_size matching data.height/data.width."
            )

    def _previous_state(self, batch_size, like):
        """C_{t-1} for a batch, detached, float32, broadcastable to [B, C, H, W]."""
        if not self.training:
            if self.eval_state == "zero":
                return like.new_zeros((1,) + like.shape[1:], dtype=torch.float32)
            return self.running_state.to(torch.float32)
        prev = self.state
        if prev is None:
            return like.new_zeros((1,) + like.shape[1:], dtype=torch.float32)
        prev = prev.detach().to(device=like.device, dtype=torch.float32)
        if self.state_mode == "slot":
            if prev.shape[0] >= batch_size:
                prev = prev[:batch_size]
            else:  # a larger batch starts its extra slots fresh
                pad = prev.new_zeros((batch_size - prev.shape[0],) + prev.shape[1:])
                prev = torch.cat([prev, pad], 0)
        return prev

    @torch.no_grad()
    def _update_state(self, cell):
        cell = cell.detach()
        batch_mean = cell.mean(0, keepdim=True)
        if self.state_mode == "dataset":
            self.state = batch_mean
        else:
            old = self.state
            if old is not None and old.shape[0] > cell.shape[0]:  # keep the slots this batch did not use
                cell = torch.cat([cell, old[cell.shape[0] :].to(cell)], 0)
            self.state = cell
        self.num_batches_tracked += 1
        weight = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_state.lerp_(batch_mean.to(self.running_state.dtype), weight)

    def forward(self, x):
        gates = self.conv(x)
        self._check_spatial(gates.shape[-2], gates.shape[-1])
        # State arithmetic in float32: under autocast the gates arrive in half precision.
        gates32 = gates.float()
        prev = self._previous_state(x.shape[0], gates32[:, : self.out_channels])
        if not self.training:
            # Plain operations: the custom autograd function is opaque to TorchScript tracing (a PythonOp that
            # OpenVINO's PyTorch frontend and torch.jit consumers reject); the values are the same bits.
            return cell_output(gates32, prev).to(gates.dtype)
        out, cell = _CellUpdate.apply(gates32, prev)
        self._update_state(cell)
        return out.to(gates.dtype)
