"""Prune a trained ReID model with COP.

With a config file this is the ``prune`` command of the CLI: prune ``model.load_weights``, fine-tune with the
engine on the config's data, evaluate, save (see ``python -m ptl_torchreid prune --help``)::

    PYTHONPATH=. python tools/prune.py --config-file configs/osnet_x0_25_synthetic_source_to_target.yaml \
        --flops-reduction 0.5 --preset faster \
        model.load_weights log/osnet_x0_25_synthetic_source/model/model-best.pth.tar

Without one it only prunes a checkpoint (no data needed) and saves it::

    PYTHONPATH=. python tools/prune.py --arch resnet50 --weights log/resnet50/model.pth.tar \
        --flops-reduction 0.5 --preset faster --out log/resnet50_cop50.pth
    PYTHONPATH=. python tools/prune.py --weights log/resnet50_cop50.pth --params-reduction 0.3 --out smaller.pth

Both print parameters, FLOPs (torch.utils.flop_counter) and measured latency before and after (and Rank-1/mAP
with a config). Saved files reload without the pruning run: ``ptl_torchreid.compress.load_pruned_model(path)``,
as ``model.load_weights`` of any command, or through torchreid with ``register_pruned_model(path)`` (e.g. for
``torchreid.utils.FeatureExtractor``).
"""
import argparse
import sys

import ptl_torchreid  # noqa: F401  (before torch: the package sets OpenMP waiting, see _openmp.py)

# isort: split
import torch

from ptl_torchreid.cli import main as cli_main
from ptl_torchreid.cli_prune import add_cop_arguments, prune_options
from ptl_torchreid.compress import (
    compare_latency,
    count_flops,
    count_params,
    is_pruned_checkpoint,
    load_pruned_model,
    prune_cop,
    save_pruned_model,
)
from ptl_torchreid.config import ConfigError
from ptl_torchreid.models import PTLNet, build_model, load_pretrained_weights
from ptl_torchreid.utils.checkpoint import CheckpointError, extract_state_dict, load_checkpoint


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", help="model name (torchreid or ptl_*); not needed for an already pruned checkpoint")
    p.add_argument("--weights", help="trained checkpoint to prune (torchreid format, or a pruned checkpoint)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="identities of the classifier (default: read from the checkpoint, else 1)")
    p.add_argument("--loss", default="softmax", choices=("softmax", "triplet"))
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    add_cop_arguments(p, target_required=True)
    p.add_argument("--latency-batch", type=int, default=32, help="batch size of the latency measurement (0: skip)")
    p.add_argument("--latency-rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for the latency measurement")
    p.add_argument("--trust", action="store_true",
                   help="allow full unpickling of a checkpoint that weights-only loading rejects (trusted files)")
    p.add_argument("--show-layers", action="store_true", help="print channels kept per layer group")
    p.add_argument("--out", help="where to save the pruned model")
    return p


def load_model(args):
    """(model, arch) from the arguments: a pruned checkpoint reloads as is; otherwise build + load weights."""
    if args.weights:
        checkpoint = load_checkpoint(args.weights, trust=args.trust)
        if is_pruned_checkpoint(checkpoint):
            arch = checkpoint["pruning"]["arch"]
            if args.arch and args.arch != arch:
                raise ConfigError(f"--arch {args.arch} does not match the pruned checkpoint's {arch}")
            return load_pruned_model(checkpoint), arch
    if not args.arch:
        raise ConfigError("--arch is required unless --weights is a pruned checkpoint")
    state = extract_state_dict(checkpoint) if args.weights else {}
    num_classes = args.num_classes
    if num_classes is None and "classifier.weight" in state:
        num_classes = int(state["classifier.weight"].shape[0])
    kwargs = {}
    if args.arch.startswith("ptl_"):  # the PTL head's shape (mode, head, stages) is the checkpoint's
        kwargs = dict(input_size=(args.height, args.width), **(PTLNet.saved_options(state) or {}))
    model = build_model(args.arch, num_classes=num_classes or 1, loss=args.loss, pretrained=False, **kwargs)
    if args.weights:
        load_pretrained_weights(model, checkpoint)  # the file read above
    return model, args.arch


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--config-file" or a.startswith("--config-file=") for a in argv):
        return cli_main(["prune"] + argv)
    args = build_parser().parse_args(argv)
    size = (args.height, args.width)
    try:
        options = prune_options(args)  # checked before the model is loaded
        model, arch = load_model(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:  # the message names the option or file
        print(f"prune.py: error: {e}", file=sys.stderr)
        return 2
    model.eval()
    try:
        pruned, report = prune_cop(model, input_size=size, return_report=True, **options)
    except ValueError as e:  # a module name the model lacks, an unreachable target, an unsupported layer
        print(f"prune.py: error: {e}", file=sys.stderr)
        return 2
    print(report)
    if args.show_layers:
        print(report.layer_table())
    for note in report.notes:
        print("note: " + note)

    rows = [("params", count_params(model), count_params(pruned), "{:,d}"),
            ("FLOPs", count_flops(model, size), count_flops(pruned, size), "{:,d}")]
    if args.latency_batch > 0:
        lat = compare_latency({"before": model, "after": pruned}, size, args.latency_batch,
                              rounds=args.latency_rounds, num_threads=args.threads)
        rows.append((f"latency (s, batch {args.latency_batch}, {args.threads or torch.get_num_threads()} threads)",
                     lat["before"]["median"], lat["after"]["median"], "{:.3f}"))
    print(f"\n{'':<36s} {'before':>16s} {'after':>16s} {'ratio':>8s}")
    for name, before, after, fmt in rows:
        print(f"{name:<36s} {fmt.format(before):>16s} {fmt.format(after):>16s} "
              f"{before / after if after else float('inf'):>7.2f}x")
    if args.out:
        save_pruned_model(pruned, args.out, arch=arch, report=report)
        print(f"\nsaved {args.out} (reload: ptl_torchreid.compress.load_pruned_model)")
    return pruned


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
