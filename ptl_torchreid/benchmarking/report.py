"""Statistics, tables and plots for the benchmark scripts: mean ± std and paired per-seed differences, Markdown
tables, PNG plots with matplotlib's Agg backend."""
import math
import os
import os.path as osp
import statistics

import matplotlib
from matplotlib.ticker import MaxNLocator
from scipy import stats

__all__ = ["mean_std", "fmt_mean_std", "fmt_ratio", "paired", "fmt_paired", "markdown_table", "pyplot",
           "save_figure", "plot_cmc", "plot_training", "plot_ablation"]


def mean_std(values):
    """Mean and sample standard deviation (0.0 for a single value); (nan, nan) for none."""
    values = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values)


def fmt_mean_std(values, scale=100.0, digits=1):
    """``'45.3 ± 1.2'`` (values scaled, e.g. fractions to percent); a single value has no spread."""
    m, s = mean_std(values)
    if math.isnan(m):
        return "-"
    if len([v for v in values if v is not None]) == 1:
        return f"{m * scale:.{digits}f}"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def paired(values, reference):
    """Per-seed differences (points) with mean, sample std and a 95% t-interval; None for fewer than 2 seeds."""
    diffs = [100 * (a - b) for a, b in zip(values, reference)]
    if len(diffs) < 2:
        return None
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return {"diffs": diffs, "mean": mean, "std": sd, "ci": (mean - half, mean + half)}


def fmt_paired(p):
    if p is None:
        return "-"
    return f"{p['mean']:+.1f} [{p['ci'][0]:+.1f}, {p['ci'][1]:+.1f}]"


def fmt_ratio(num, den, digits=2):
    if num is None or den is None or not den or math.isnan(num) or math.isnan(den):
        return "-"
    return f"{num / den:.{digits}f}x"


def markdown_table(header, rows):
    """A GitHub Markdown table with padded columns (readable as plain text too)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only; works without a display)."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # imported here: the backend must be chosen first

    return plt


_STYLES = ["C0", "C3", "C2", "C1", "C4", "C5", "C6", "C7"]


def save_figure(fig, path):
    """Write ``fig`` to ``path`` (folders made as needed), close it, and return ``path``."""
    d = osp.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_cmc(curves, path, title=""):
    """``curves``: label -> list over seeds of CMC arrays (Rank-1 first, as fractions). Mean with a +-1 std band."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (label, runs) in enumerate(curves.items()):
        n = min(len(c) for c in runs)
        ranks = list(range(1, n + 1))
        stats = [mean_std([c[k] for c in runs]) for k in range(n)]
        mean = [100 * m for m, _ in stats]
        std = [100 * s for _, s in stats]
        color = _STYLES[i % len(_STYLES)]
        ax.plot(ranks, mean, marker="o", markersize=3, color=color,
                label=f"{label} (Rank-1 {mean[0]:.1f}%, n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(ranks, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=color, alpha=0.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_title(title or "CMC (mean over seeds, band: ±1 std)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_training(runs, path, title=""):
    """``runs``: label -> list over seeds of ``{'epochs': [{'epoch', loss keys...}], 'evals': [{'epoch', 'mAP'}]}``.

    Left: each loss term per epoch (mean over seeds); right: mAP at each evaluation (mean, ±1 std band).
    """
    plt = pyplot()
    fig, (ax_l, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    dashes = ["-", "--", ":", "-."]
    for i, (label, seeds) in enumerate(runs.items()):
        color = _STYLES[i % len(_STYLES)]
        keys = sorted({k for s in seeds for e in s["epochs"] for k in e if k.startswith("loss")})
        for j, key in enumerate(keys):
            epochs = sorted({e["epoch"] for s in seeds for e in s["epochs"]})
            ys = []
            for ep in epochs:
                vals = [e[key] for s in seeds for e in s["epochs"] if e["epoch"] == ep and key in e]
                ys.append(mean_std(vals)[0])
            ax_l.plot(epochs, ys, dashes[j % len(dashes)], marker=".", color=color, label=f"{label} {key}")
        epochs = sorted({e["epoch"] for s in seeds for e in s["evals"]})
        if epochs:
            stats = [mean_std([e["mAP"] for s in seeds for e in s["evals"] if e["epoch"] == ep]) for ep in epochs]
            mean = [100 * m for m, _ in stats]
            std = [100 * s for _, s in stats]
            ax_m.plot(epochs, mean, marker="o", color=color, label=label)
            if len(seeds) > 1:
                ax_m.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                  color=color, alpha=0.15)
    for ax in (ax_l, ax_m):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("training loss (epoch mean)")
    ax_l.set_title("training loss")
    ax_l.grid(alpha=0.3)
    ax_l.legend(fontsize=7)
    ax_m.set_xlabel("epoch")
    ax_m.set_ylabel("mAP (%)")
    ax_m.set_title("mAP per evaluation")
    ax_m.grid(alpha=0.3)
    ax_m.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_ablation(rows, path, title=""):
    """``rows``: list of (label, list of per-seed mAP fractions); horizontal bars with ±1 std and the seeds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.4))
    labels = [r[0] for r in rows][::-1]
    for y, (label, values) in enumerate(rows[::-1]):
        m, s = mean_std(values)
        ax.barh(y, 100 * m, xerr=100 * s if len(values) > 1 else None, color="C0" if y < len(rows) - 1 else "C7",
                alpha=0.7, capsize=3)
        ax.plot([100 * v for v in values], [y] * len(values), "k.", markersize=4)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("mAP (%)  (bar: mean, whisker: ±1 std, dots: seeds)")
    ax.set_title(title or "PTL ablation")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
