"""The scaling plot: time per W1 meta-step against tasks and against inner steps."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from .paths import BATCHED, FUNC, FUNC_AUTOGRAD, HIGHER, LEGACY

STYLE = {
    HIGHER: dict(color="tab:red", marker="o"),
    LEGACY: dict(color="tab:orange", marker="s"),
    BATCHED: dict(color="tab:blue", marker="^"),
    FUNC: dict(color="tab:green", marker="v", linestyle="--"),
    FUNC_AUTOGRAD: dict(color="tab:olive", marker="D", linestyle=":"),
}


def scaling(sweeps: Sequence[dict], path: str, title: str) -> Optional[str]:
    """Draw one log-log panel per sweep (from ``benchmarks.scaling.sweep``) into ``path``.

    Returns:
        ``path``, or None when matplotlib (the package's ``examples`` extra) is missing.
    """
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(6 * len(sweeps), 4.5), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps):
        for name, medians in sweep["median_ms"].items():
            ax.plot(sweep["values"], medians, label=name, **STYLE.get(name, {}))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sweep["values"], [str(v) for v in sweep["values"]])
        ax.minorticks_off()
        ax.set_xlabel("tasks T" if sweep["axis"] == "tasks" else "inner steps")
        ax.set_ylabel("ms per meta-step (median)")
        fixed = "steps" if sweep["axis"] == "tasks" else "tasks"
        ax.set_title(f"W1 sinusoid MAML, {fixed} = {sweep[fixed]}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
