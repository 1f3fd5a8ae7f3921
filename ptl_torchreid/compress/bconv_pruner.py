"""The BConv-Cell's layer pruner: a dense layer whose output channel c owns rows c, C + c, 2C + c and 3C + c of the
gate convolution (the i, f, o and g gates) and channel c of the running and carried states."""
import torch

from ..models.bconv import BConvCell
from .pruners import ConvPruner, LayerPruner, register_layer_pruner, resize_tensor, select_channels

__all__ = ["BConvCellPruner"]

_GATES = 4


class BConvCellPruner(LayerPruner):
    """Prunes a :class:`~ptl_torchreid.models.BConvCell` as one layer (its gate convolution is not looked at on
    its own): input channels are columns of the gate convolution, output channels its four gate rows each."""

    kind = "cell"

    def prune(self, module, keep_in, keep_out):
        c = module.out_channels
        rows = torch.cat([keep_out + k * c for k in range(_GATES)])
        select_channels(module.conv, "weight", 0, rows)
        select_channels(module.conv, "weight", 1, keep_in)
        select_channels(module.conv, "bias", 0, rows)
        select_channels(module, "running_state", 1, keep_out)
        if module.state is not None:
            select_channels(module, "state", 1, keep_out)
        module.in_channels, module.out_channels = len(keep_in), len(keep_out)
        module.conv.in_channels, module.conv.out_channels = module.in_channels, _GATES * module.out_channels

    def channel_config(self, module):
        return dict(in_channels=int(module.in_channels), out_channels=int(module.out_channels))

    def apply_channel_config(self, module, config):
        # The gate convolution has its own entry in the configuration; here only the cell's state follows.
        module.in_channels, module.out_channels = config["in_channels"], config["out_channels"]
        resize_tensor(module, "running_state", (1, module.out_channels) + tuple(module.state_size))
        module.reset_state()

    def kernel(self, module):
        return super().kernel(module.conv)

    def cost(self, module):
        conv_cost = ConvPruner().cost(module.conv)
        return lambda cin, cout: conv_cost(cin, _GATES * cout)


register_layer_pruner(BConvCell, BConvCellPruner())
