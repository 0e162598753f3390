"""A picture of a semantic-ID report (`semantic_id_report.json` -> `semantic_id_report.png`): items per code at
each level, the sizes of collision groups, and what each level leaves unexplained. Needs matplotlib (the `plot`
extra)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def require_matplotlib() -> None:
    """Fail early, in one line, when the plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'genrec-sid[plot]' (or pip install matplotlib)") from None


def plot_report(report_path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the report beside it (or at `out`); returns the PNG's path. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    from genrec.core.safeio import atomic_open

    report_path = Path(report_path)
    rep = json.loads(report_path.read_text())
    out = Path(out) if out else report_path.with_suffix(".png")
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for lv in rep.get("levels", []):
        counts = np.sort(np.asarray(lv.get("items_per_code", []), np.int64))[::-1]
        if len(counts):
            ax[0].plot(np.arange(1, len(counts) + 1), counts, label=f"level {lv['level'] + 1}: {lv['used']} used, "
                                                                    f"perplexity {lv['perplexity']:.0f}")
    ax[0].set(title="items per code (codes sorted by size)", xlabel="code rank", ylabel="items", yscale="log")
    if ax[0].get_legend_handles_labels()[0]:  # a report without levels draws nothing to label
        ax[0].legend(fontsize=8)
    sizes = {int(k): v for k, v in rep.get("group_sizes", {}).items()}
    if sizes:
        s = np.array(sorted(sizes))
        ax[1].bar(s, [sizes[k] * k for k in s], width=0.8)
        if len(s) <= 12:
            ax[1].set_xticks(s)
    ax[1].set(title=f"collision groups (rate {rep.get('collision_rate', 0):.4f}, largest {rep.get('largest_group', 0)})",
              xlabel="items sharing one ID", ylabel="items", yscale="log")
    fit = rep.get("fit") or {}
    left = fit.get("residual_by_level") or []
    if left:
        ax[2].plot(np.arange(1, len(left) + 1), left, marker="o")
        ax[2].set_xticks(np.arange(1, len(left) + 1))
    ax[2].set(title=f"energy left after each level (recon MSE {fit.get('recon_mse', float('nan')):.3f})",
              xlabel="level", ylabel="share of the quantizer input", ylim=(0, 1))
    fig.suptitle(f"{rep.get('items', 0)} items, method {fit.get('method', '?')}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
    return out
