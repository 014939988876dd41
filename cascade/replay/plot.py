"""The replay plot: quality against LLM-call fraction and against cost, Pareto front marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cascade.replay.engine import PointResult


def write_plot(
    path: str | Path, points: Sequence[PointResult], metric: str, title: str, recommended: int | None = None,
    llm_quality: float | None = None,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ylabel = "accuracy (gold)" if metric == "accuracy" else "agreement with the LLM"
    ys = [(p.accuracy if metric == "accuracy" else p.agreement_with_llm) for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, xs, xlabel in (
        (axes[0], [p.llm_call_fraction for p in points], "fraction of events sent to the LLM"),
        (axes[1], [p.cost_per_event for p in points], "cost per event (config cost units)"),
    ):
        valid = [(x, y, p, i) for i, (x, y, p) in enumerate(zip(xs, ys, points)) if y is not None]
        ax.scatter([v[0] for v in valid], [v[1] for v in valid], color="0.6", s=22, label="setting", zorder=2)
        front = sorted((v for v in valid if v[2].pareto), key=lambda v: v[0])
        if front:
            ax.plot([v[0] for v in front], [v[1] for v in front], "-o", color="tab:blue", ms=5,
                    label="Pareto front", zorder=3)
        for x, y, p, i in valid:
            ax.annotate(p.label, (x, y), textcoords="offset points", xytext=(4, -9), fontsize=6, color="0.35")
            if i == recommended:
                ax.scatter([x], [y], marker="*", s=220, color="tab:red", label="recommended", zorder=4)
        if llm_quality is not None:
            ax.axhline(llm_quality, color="tab:green", ls="--", lw=1, label="LLM alone")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
