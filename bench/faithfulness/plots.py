"""PNG plots of the mean MoRF and LeRF curves, one figure per model."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_model(name: str, report: dict[str, Any], out_dir: Path) -> Path:
    """Two panels (MoRF, LeRF): mean target logit against the fraction of features removed."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for method, row in report["methods"].items():
        style = {"lw": 2.2} if method.startswith("engine-default") else {"lw": 1.2}
        if method == "random":
            style = {"lw": 1.2, "ls": "--", "color": "grey"}
        for ax, key in zip(axes, ("morf_curve", "lerf_curve"), strict=True):
            curve = row[key]
            xs = [i / (len(curve) - 1) for i in range(len(curve))]
            ax.plot(xs, curve, label=f"{method} ({row['abpc']:.3g})", **style)
    axes[0].set_title("MoRF: most relevant removed first")
    axes[1].set_title("LeRF: least relevant removed first")
    for ax in axes:
        ax.set_xlabel("fraction of features removed")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("target logit (mean over samples)")
    axes[1].legend(title="method (ABPC)", fontsize=8, loc="best")
    title = f"{name}: {report['samples']} samples, removed -> {report['baseline']}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = out_dir / f"faithfulness-{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
