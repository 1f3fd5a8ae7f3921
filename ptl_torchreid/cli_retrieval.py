"""The ``embed`` and ``search`` commands: features of images to a file, and top-k retrieval from saved features.

    ptl-torchreid embed --input /data/cam_frames --output gallery.npz model.name osnet_x0_25 \\
        model.load_weights log/model/model-best.pth.tar
    ptl-torchreid embed --input market1501:query --output query.npz --root reid-data ...
    ptl-torchreid search --query query.npz --gallery gallery.npz --topk 10 --out search/

``--input`` is a folder (every image under it, recursively), a list file (``path pid camid`` lines), a user
source (``folder:``, ``list:``, ``nocam:``, see ``ptl_torchreid.data.user``) or ``DATASET:SPLIT`` of a
registered dataset under ``data.root``. The ``.npz`` holds ``features`` (float32, one row per image), ``paths``,
``pids`` and ``camids`` (-1 where unknown); a ``.npy`` output holds the features and a ``.paths.txt`` beside it
the paths. ``search`` prints the top-k gallery images of every query as a table, writes it as CSV and draws one
visrank-style PNG per query (green: same identity, red: another, grey: unknown).
"""
import csv
import os
import os.path as osp

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ptl_torchreid import _torchreid
from ptl_torchreid.config import ConfigError, resolve_use_gpu, torchreid_image_datasets
from ptl_torchreid.data.check import IMAGE_EXTENSIONS
from ptl_torchreid.data.reader import read_image
from ptl_torchreid.data.user import is_user_source, parse_source, read_list_file, read_source
from ptl_torchreid.engine import build_model
from ptl_torchreid.metrics.knn import KNN_BACKENDS, faiss_available, knn_search
from ptl_torchreid.metrics.rerank import rerank

__all__ = ["add_embed_arguments", "add_search_arguments", "run_embed", "run_search", "list_images",
           "load_features", "save_features", "search_topk"]

torchreid = _torchreid.torchreid
SPLITS = ("train", "query", "gallery")


# ---------------------------------------------------------------------------------------------------------------
# embed
# ---------------------------------------------------------------------------------------------------------------
def add_embed_arguments(parser):
    parser.add_argument("--input", required=True,
                        help="folder of images, list file, folder:/list:/nocam: source, or DATASET:SPLIT")
    parser.add_argument("--output", required=True, help="features file (.npz with paths and labels, or .npy)")
    parser.add_argument("--split", choices=SPLITS, default=None,
                        help="the split of a folder:/list: source to embed (default: all three)")


def list_images(spec, cfg, split=None):
    """``[(path, pid, camid)]`` named by an ``--input`` value (pid/camid -1 where unknown)."""
    if osp.isfile(spec) and spec.endswith(".txt"):
        return [(p, pid, -1 if cam is None else cam) for p, pid, cam in read_list_file(spec)]
    if osp.isdir(spec) and not is_user_source_layout(spec):
        found = []
        for d, _, files in sorted(os.walk(spec)):
            found += [osp.join(d, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise ConfigError(f'--input "{spec}": no images ({", ".join(IMAGE_EXTENSIONS)}) under this folder')
        return [(p, -1, -1) for p in found]
    if is_user_source(spec):
        splits = read_source(parse_source(spec))
        return [x for s in ([split] if split else SPLITS) for x in splits[s]]
    name, _, which = spec.rpartition(":")
    registry = torchreid_image_datasets()
    if name not in registry or which not in SPLITS:
        raise ConfigError(
            f'--input "{spec}" is neither a folder, a list file nor DATASET:SPLIT with a dataset of {sorted(registry)} '
            f"and a split of {SPLITS}"
        )
    dataset = registry[name](root=cfg.data.root, transform=None, mode=which, verbose=False)
    return list(getattr(dataset, which))


def is_user_source_layout(path):
    """A folder in a dataset layout (Market-style splits or list files), rather than a plain folder of images."""
    try:
        parse_source("folder:" + path)
        return True
    except OSError:
        return False


class _Images(torch.utils.data.Dataset):
    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.transform(read_image(self.items[i][0]))


@torch.no_grad()
def embed_images(model, items, cfg, device, progress=True):
    """float32 features of ``items`` with the test transform of ``cfg`` (and the flip test with ``test.flip``)."""
    _, transform = torchreid.data.transforms.build_transforms(
        cfg.data.height, cfg.data.width, transforms=None, norm_mean=cfg.data.norm_mean, norm_std=cfg.data.norm_std
    )
    loader = DataLoader(_Images(items, transform), batch_size=cfg.test.batch_size, num_workers=cfg.data.workers)
    model.eval()
    feats = []
    for imgs in tqdm(loader, desc="embedding", disable=None if progress else True, dynamic_ncols=True):
        imgs = imgs.to(device)
        f = model(imgs).float()
        if cfg.test.flip:
            f = (f + model(imgs.flip(3)).float()) / 2
        feats.append(f.cpu())
    return torch.cat(feats).numpy() if feats else np.zeros((0, 0), np.float32)


def save_features(path, features, items):
    paths = np.array([p for p, _, _ in items])
    pids = np.array([int(pid) for _, pid, _ in items], dtype=np.int64)
    camids = np.array([int(c) for _, _, c in items], dtype=np.int64)
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    if path.endswith(".npy"):
        np.save(path, features)
        with open(path[:-4] + ".paths.txt", "w") as f:
            f.write("\n".join(paths) + "\n")
    else:
        np.savez(path, features=features, paths=paths, pids=pids, camids=camids)
    return path


def load_features(path):
    """``(features, paths, pids, camids)`` of a file written by :func:`save_features`."""
    if not osp.isfile(path):
        raise ConfigError(f'features file "{path}" does not exist (write it with: ptl-torchreid embed)')
    if path.endswith(".npy"):
        feats = np.load(path)
        sidecar = path[:-4] + ".paths.txt"
        paths = open(sidecar).read().split("\n")[: len(feats)] if osp.isfile(sidecar) else [""] * len(feats)
        unknown = np.full(len(feats), -1, dtype=np.int64)
        return feats, np.array(paths), unknown, unknown
    try:
        data = np.load(path, allow_pickle=False)
        return data["features"], data["paths"], data["pids"], data["camids"]
    except (KeyError, ValueError, OSError) as e:
        raise ConfigError(f'features file "{path}" is not one written by ptl-torchreid embed ({e})') from None


def run_embed(cfg, args):
    items = list_images(args.input, cfg, args.split)
    if not items:
        raise ConfigError(f'--input "{args.input}" holds no images')
    if cfg.model.load_weights and not osp.isfile(cfg.model.load_weights):
        raise ConfigError(f"model.load_weights = '{cfg.model.load_weights}': no such file")
    if not cfg.model.load_weights:
        print("Warning: embedding with a model without trained weights (set model.load_weights).")
    cfg.defrost()
    cfg.model.load_weights_mode = "match"  # only the embedding matters: the classifier size may differ
    model = build_model(cfg, 1)
    device = torch.device("cuda" if resolve_use_gpu(cfg) else "cpu")
    model.to(device)
    feats = embed_images(model, items, cfg, device, progress=cfg.train.progress_bar)
    save_features(args.output, feats, items)
    print(f'Wrote {len(feats)} features of size {feats.shape[1]} to "{args.output}"')
    return 0


# ---------------------------------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------------------------------
def add_search_arguments(parser):
    parser.add_argument("--query", required=True, help="query features (written by embed)")
    parser.add_argument("--gallery", required=True, help="gallery features (written by embed)")
    parser.add_argument("--topk", type=int, default=10, help="gallery images per query")
    parser.add_argument("--out", default="", help="folder for results.csv and the PNGs (default: data.save_dir/search)")
    parser.add_argument("--max-images", type=int, default=100, help="queries drawn as PNGs")
    parser.add_argument("--backend", choices=KNN_BACKENDS, default="auto",
                        help="exact nearest-neighbour search: faiss (flat index), torch (blocks + topk), or auto "
                             "(faiss when installed)")


def search_topk(qf, gf, k, metric="euclidean", normalize=False, rerank_options=None, memory_cap=1 << 30,
                backend="auto"):
    """``(indices, distances)`` of the ``k`` closest gallery entries of every query, closest first
    (``rerank_options``: keyword arguments of :func:`~ptl_torchreid.metrics.rerank`; otherwise an exact
    :func:`~ptl_torchreid.metrics.knn_search` with ``backend``)."""
    qf, gf = torch.as_tensor(qf).float(), torch.as_tensor(gf).float()
    if normalize:
        qf, gf = torch.nn.functional.normalize(qf, dim=1), torch.nn.functional.normalize(gf, dim=1)
    if rerank_options is None:
        return knn_search(qf, gf, k, metric, backend=backend, memory_cap=memory_cap)
    d = torch.from_numpy(rerank(qf, gf, metric=metric, **rerank_options))
    dist, idx = torch.topk(d, min(k, len(gf)), dim=1, largest=False)
    return idx.numpy(), dist.numpy()


def _tile(path, height, width, colour):
    img = cv2.imread(str(path)) if path and osp.isfile(str(path)) else None
    if img is None:
        img = np.full((height, width, 3), 127, np.uint8)
    img = cv2.resize(img, (width, height))
    return cv2.copyMakeBorder(img, 4, 4, 4, 4, cv2.BORDER_CONSTANT, value=colour)


def draw_ranking(path, query_path, gallery_paths, matches, height=128, width=64):
    """torchreid's visrank layout: the query, a gap, then the ranked gallery images with coloured borders."""
    colours = {True: (0, 200, 0), False: (0, 0, 255), None: (160, 160, 160)}
    tiles = [_tile(query_path, height, width, (0, 0, 0)), np.full((height + 8, 16, 3), 255, np.uint8)]
    tiles += [_tile(p, height, width, colours[m]) for p, m in zip(gallery_paths, matches)]
    cv2.imwrite(path, np.concatenate(tiles, axis=1))
    return path


def run_search(cfg, args):
    qf, q_paths, q_pids, _ = load_features(args.query)
    gf, g_paths, g_pids, _ = load_features(args.gallery)
    if qf.shape[1] != gf.shape[1]:
        raise ConfigError(
            f"--query has features of size {qf.shape[1]} but --gallery of size {gf.shape[1]}: embed both with the same "
            "model"
        )
    if args.topk < 1:
        raise ConfigError(f"--topk must be >= 1, got {args.topk}")
    if args.backend == "faiss" and not faiss_available():
        raise ConfigError('--backend faiss needs faiss: pip install "ptl_torchreid[retrieval]", or use --backend torch')
    options = None
    if cfg.test.rerank:
        options = dict(k1=cfg.test.rerank_k1, k2=cfg.test.rerank_k2, lambda_value=cfg.test.rerank_lambda)
    idx, dist = search_topk(
        qf,
        gf,
        args.topk,
        cfg.test.dist_metric,
        cfg.test.normalize_feature,
        options,
        memory_cap=int(cfg.test.max_distmat_gb * (1 << 30)),
        backend=args.backend,
    )
    out = args.out or osp.join(cfg.data.save_dir, "search")
    os.makedirs(out, exist_ok=True)
    rows = []
    for qi in range(len(qf)):
        for r, (gi, d) in enumerate(zip(idx[qi], dist[qi]), 1):
            known = q_pids[qi] >= 0 and g_pids[gi] >= 0
            rows.append(
                [
                    str(q_paths[qi]),
                    r,
                    str(g_paths[gi]),
                    f"{d:.4f}",
                    ("yes" if q_pids[qi] == g_pids[gi] else "no") if known else "?",
                ]
            )
    with open(osp.join(out, "results.csv"), "w", newline="") as f:
        csv.writer(f).writerows([["query", "rank", "gallery", "distance", "same id"]] + rows)
    header = "| query | rank | gallery | distance | same id |"
    print("\n".join([header, "|---|---|---|---|---|"] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]))
    for qi in tqdm(range(min(len(qf), args.max_images)), desc="drawing", disable=None, leave=False):
        matches = [bool(q_pids[qi] == g_pids[g]) if q_pids[qi] >= 0 and g_pids[g] >= 0 else None for g in idx[qi]]
        name = f"{qi:05d}_{osp.splitext(osp.basename(str(q_paths[qi])))[0] or 'query'}.png"
        draw_ranking(osp.join(out, name), q_paths[qi], [g_paths[g] for g in idx[qi]], matches)
    print(
        f'Top-{idx.shape[1]} of {len(qf)} queries written to "{out}" '
        f"(results.csv and {min(len(qf), args.max_images)} PNGs)"
    )
    return 0
