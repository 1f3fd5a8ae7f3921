"""Default configuration: torchreid's ``scripts/default_config.py`` keys, extended by :func:`add_ptl_config`.

Key names follow torchreid's own, so a torchreid YAML config (image-reid) merges unchanged. ``add_ptl_config``
adds what this package brings on top, as a plugin config does:

- ``ptl``: everything PTL-specific (ignored for plain torchreid models, so a baseline and its PTL twin can
  share one config and differ only in ``model.name``);
- ``data.synthetic``: size and seed of the embedded synthetic datasets; ``data.skip_corrupt``;
- ``model.load_weights_mode`` / ``model.trust_checkpoint``: how ``model.load_weights`` is read;
- ``train.amp`` / ``train.amp_dtype`` / ``train.channels_last`` / ``train.progress_bar``;
- ``train.cpu_threads`` ('auto' or a number): torch's CPU threads, see ``ptl_torchreid/utils/cpu_threads.py``;
- ``train.resume`` (a checkpoint or ``'auto'``; ``model.resume`` is torchreid's name for it),
  ``train.checkpoint_every_n_iters``, ``train.keep_last``: see docs/RELIABILITY.md;
- ``test.rerank_k1`` ... ``test.max_distmat_gb``: the evaluator's test-time options.
"""
from yacs.config import CfgNode as CN

__all__ = ["torchreid_default_config", "add_ptl_config", "get_default_config"]


def torchreid_default_config():
    """The keys of torchreid's ``scripts/default_config.py`` that image re-identification uses."""
    cfg = CN()

    cfg.model = CN()
    cfg.model.name = "resnet50"
    cfg.model.pretrained = True  # ImageNet weights for the backbone (torchreid downloads them if absent)
    cfg.model.load_weights = ""  # initial weights for fine-tuning or testing (a checkpoint path)
    cfg.model.resume = ""  # torchreid's key for train.resume (either may be set)

    cfg.data = CN()
    cfg.data.type = "image"
    cfg.data.root = "reid-data"
    cfg.data.sources = ["market1501"]
    cfg.data.targets = ["market1501"]
    cfg.data.workers = 4
    cfg.data.split_id = 0
    cfg.data.height = 256
    cfg.data.width = 128
    cfg.data.combineall = False
    cfg.data.transforms = ["random_flip"]
    cfg.data.k_tfm = 1
    cfg.data.norm_mean = [0.485, 0.456, 0.406]
    cfg.data.norm_std = [0.229, 0.224, 0.225]
    cfg.data.save_dir = "log"
    cfg.data.load_train_targets = False

    cfg.market1501 = CN()
    cfg.market1501.use_500k_distractors = False
    cfg.cuhk03 = CN()
    cfg.cuhk03.labeled_images = False
    cfg.cuhk03.classic_split = False
    cfg.cuhk03.use_metric_cuhk03 = False

    cfg.sampler = CN()
    cfg.sampler.train_sampler = "RandomSampler"
    cfg.sampler.train_sampler_t = "RandomSampler"
    cfg.sampler.num_instances = 4
    cfg.sampler.num_cams = 1
    cfg.sampler.num_datasets = 1

    cfg.train = CN()
    cfg.train.optim = "adam"
    cfg.train.lr = 0.0003
    cfg.train.weight_decay = 5e-4
    cfg.train.max_epoch = 60
    cfg.train.start_epoch = 0
    cfg.train.batch_size = 32  # per process: under torchrun the global batch is this x the number of processes
    cfg.train.fixbase_epoch = 0
    cfg.train.open_layers = ["classifier"]
    cfg.train.staged_lr = False
    cfg.train.new_layers = ["classifier"]
    cfg.train.base_lr_mult = 0.1
    cfg.train.lr_scheduler = "single_step"
    cfg.train.stepsize = [20]
    cfg.train.gamma = 0.1
    cfg.train.print_freq = 20
    cfg.train.seed = 1

    cfg.sgd = CN()
    cfg.sgd.momentum = 0.9
    cfg.sgd.dampening = 0.0
    cfg.sgd.nesterov = False
    cfg.rmsprop = CN()
    cfg.rmsprop.alpha = 0.99
    cfg.adam = CN()
    cfg.adam.beta1 = 0.9
    cfg.adam.beta2 = 0.999

    cfg.loss = CN()
    cfg.loss.name = "softmax"
    cfg.loss.softmax = CN()
    cfg.loss.softmax.label_smooth = True
    cfg.loss.triplet = CN()
    cfg.loss.triplet.margin = 0.3
    cfg.loss.triplet.weight_t = 1.0
    cfg.loss.triplet.weight_x = 0.0

    cfg.test = CN()
    cfg.test.batch_size = 100
    cfg.test.dist_metric = "euclidean"
    cfg.test.normalize_feature = False
    cfg.test.ranks = [1, 5, 10, 20]
    cfg.test.evaluate = False
    cfg.test.eval_freq = -1
    cfg.test.start_eval = 0
    cfg.test.rerank = False
    cfg.test.visrank = False
    cfg.test.visrank_topk = 10

    # torchreid's scripts set use_gpu to torch.cuda.is_available() after building the defaults; 'auto' does that
    # when the config is used, True or False force it.
    cfg.use_gpu = "auto"
    return cfg


def add_ptl_config(cfg):
    """Add this package's keys to a torchreid-style config ``cfg`` (in place; returns it)."""
    # 'strict': every tensor must fit, else an error listing the mismatching keys; 'match': load what fits by
    # name and shape and print what was skipped (fine-tuning from another dataset: a new classifier size).
    cfg.model.load_weights_mode = "strict"
    cfg.model.trust_checkpoint = False  # allow full unpickling of load_weights/resume files (runs code!)

    # Unreadable training images: False -> stop with an error naming the file; True -> replace the sample by
    # another of the same identity, count it and report the count at the end of training.
    cfg.data.skip_corrupt = False
    # Embedded synthetic datasets (synthetic_reid / synthetic_source / synthetic_target), generated into
    # data.root on first use. -1 keeps the named dataset's own default (the transfer pair's two domains
    # differ in size and cameras); a value applies to every synthetic dataset of the run.
    cfg.data.synthetic = CN()
    cfg.data.synthetic.num_train_ids = -1
    cfg.data.synthetic.num_test_ids = -1
    cfg.data.synthetic.num_cameras = -1
    cfg.data.synthetic.images_per_id_per_camera = -1
    cfg.data.synthetic.seed = -1

    cfg.train.amp = False  # mixed precision: fp16 + GradScaler on CUDA, bf16 autocast on the CPU
    cfg.train.amp_dtype = "auto"  # 'auto' | 'fp16' | 'bf16'
    cfg.train.channels_last = False  # model and batches in channels_last memory format (faster AMP convolutions)
    cfg.train.progress_bar = True  # tqdm bars for training and feature extraction (on a terminal)
    cfg.train.resume = ""  # checkpoint to resume from, or 'auto': the latest one in data.save_dir (if any)
    cfg.train.checkpoint_every_n_iters = 0  # also checkpoint every N training steps (0: only after evaluations)
    cfg.train.keep_last = 0  # periodic checkpoints kept on disk, newest first (0: all); model-best is kept
    # torch's CPU threads: 'auto' (the free CPUs this process may use, shared by local DDP processes), N, or 0
    # (torch's own default); OMP_NUM_THREADS in the environment wins over 'auto' (see utils/cpu_threads.py)
    cfg.train.cpu_threads = "auto"

    # Test-time options (ptl_torchreid.engine.evaluator): sparse k-reciprocal re-ranking parameters,
    # alpha-query expansion, flip test, TPR@FPR with a ROC plot, and the memory above which ranking is chunked.
    cfg.test.rerank_k1 = 20
    cfg.test.rerank_k2 = 6
    cfg.test.rerank_lambda = 0.3
    cfg.test.aqe = False
    cfg.test.aqe_k = 5
    cfg.test.aqe_alpha = 3.0
    cfg.test.flip = False
    cfg.test.roc = False
    cfg.test.max_distmat_gb = 2.0

    # PTL-specific settings; ignored (with a note) for plain torchreid models.
    cfg.ptl = CN()
    cfg.ptl.state_mode = "dataset"  # 'dataset': one state shared by the batch; 'slot': per-sample slots
    cfg.ptl.eval_state = "running"  # state used in eval mode: 'running' average or 'zero'
    cfg.ptl.momentum = 0.1  # momentum of the running (eval) state, as in BatchNorm
    cfg.ptl.reset_policy = "epoch"  # when the carried state is zeroed: 'epoch' | 'never' | 'iter'
    cfg.ptl.reset_every_n_iters = 0  # period for reset_policy 'iter'
    cfg.ptl.freeze_backbone_epochs = 0  # train only cells + head for the first K epochs; -1: throughout
    cfg.ptl.lr_mult = 1.0  # learning-rate multiplier for the PTL parameters (cells, fusion, head)
    # How the side stream acts (see ptl_torchreid.models.PTLNet):
    cfg.ptl.mode = "rectify"  # 'rectify': it modulates backbone stages | 'branch': it joins the head
    cfg.ptl.head = "residual"  # branch head: 'residual' (keeps the pretrained embedding) | 'concat' (reference)
    cfg.ptl.rectify_stages = ["stage1", "stage2", "stage3", "last"]  # stages rectify mode modulates
    cfg.ptl.side_pool = "avg"  # pooling of the side stream in the branch head: 'avg' | 'max' (reference)
    cfg.ptl.cell_init = "fan_out"  # Kaiming mode of the side-stream convs: 'fan_out' | 'fan_in' (reference)
    cfg.ptl.cell_type = "bconv"  # 'bconv' cells | 'conv': stateless adapters of similar size (ablation)
    cfg.ptl.stage3_tap = "stage"  # where the side stream reads stage 3: 'stage' | 'first_block' (reference)
    return cfg


def get_default_config():
    """Default configuration (a yacs ``CfgNode``): torchreid's keys plus :func:`add_ptl_config`'s."""
    return add_ptl_config(torchreid_default_config())
