"""Evaluation results ``{target: {'mAP': x, 'cmc': {rank: y}, 'mINP': z}}`` as a Markdown table."""

__all__ = ["format_results_table"]


def format_results_table(results):
    """A Markdown table: one row per target, mAP (mINP when computed) and the Rank-k columns."""
    if not results:
        return "(no results)"
    ranks = sorted({r for res in results.values() for r in res["cmc"]})
    minp = any("mINP" in res for res in results.values())
    header = ["target", "mAP"] + ["mINP"] * minp + [f"Rank-{r}" for r in ranks]
    rows = []
    for name, res in results.items():
        cmc = res["cmc"]
        rows.append(
            [name, f"{res['mAP']:.1%}"]
            + [f"{res.get('mINP', float('nan')):.1%}"] * minp
            + [f"{cmc[r]:.1%}" if r in cmc else "-" for r in ranks]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])
