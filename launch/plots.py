"""``returns.png``: the mean episode return against frames, learner steps on a second axis.

Runs on the driver at the end of a run (and on resume). It draws with matplotlib's
object API and the Agg canvas, never ``pyplot``, so it needs no display, touches no global
backend state, and is safe to call from any thread.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_returns"]


def _series(records: Sequence[dict[str, Any]], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        x, y = r.get(x_key), r.get(y_key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys


def plot_returns(
    records: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    title: str = "",
    target_return: float | None = None,
) -> Path:
    """Draw the return curve of a run's metrics records into a PNG.

    Args:
        records: ``metrics.jsonl`` records; uses ``frames``, ``return_mean`` and
            ``learner/steps`` (records missing a value are skipped for that curve).
        path: the PNG to write.
        title: plot title (the run name).
        target_return: drawn as a dashed line when given.

    Returns:
        ``path``. An empty record list still writes a plot saying "no episodes yet".
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    frames, returns = _series(records, "frames", "return_mean")
    if frames:
        ax.plot(frames, returns, color="tab:blue", linewidth=1.8, label="mean return (recent episodes)")
    else:
        ax.text(0.5, 0.5, "no episodes yet", ha="center", va="center", transform=ax.transAxes)
    if target_return is not None:
        ax.axhline(target_return, color="tab:green", linestyle="--", linewidth=1, label=f"target {target_return:g}")
    ax.set_xlabel("frames")
    ax.set_ylabel("return", color="tab:blue")
    ax.grid(True, alpha=0.3)

    step_frames, steps = _series(records, "frames", "learner/steps")
    if step_frames:
        ax2 = ax.twinx()
        ax2.plot(step_frames, steps, color="tab:orange", linewidth=1.2, alpha=0.8, label="learner steps")
        ax2.set_ylabel("learner steps", color="tab:orange")
        handles = ax.get_legend_handles_labels()
        handles2 = ax2.get_legend_handles_labels()
        ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="lower right", fontsize=8)
    elif frames:
        ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
