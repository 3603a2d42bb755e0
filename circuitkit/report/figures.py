"""Matplotlib figures for reports, returned as PNG bytes (Agg backend: no display needed)."""
from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def heatmap(values: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
            cbar_label: str = "", center_zero: bool = True) -> bytes:
    """A labelled heat map (rows × columns), diverging around zero by default."""
    v = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(col_labels) + 2), max(2.5, 0.35 * len(row_labels) + 1.2)))
    lim = np.nanmax(np.abs(v)) if center_zero and np.isfinite(v).any() else None
    im = ax.imshow(v, cmap="RdBu_r" if center_zero else "viridis", aspect="auto",
                   vmin=-lim if lim else None, vmax=lim if lim else None)
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels), fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=cbar_label, shrink=0.8)
    return _png(fig)


def line_plot(xs: Sequence[float], series: dict[str, Sequence[float]], title: str, xlabel: str, ylabel: str,
              hline: float | None = None, logx: bool = False) -> bytes:
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    if logx:
        ax.set_xscale("log")
    for name, ys in series.items():
        ax.plot(xs[: len(ys)], ys, marker="o", ms=3, label=name)
    if hline is not None:
        ax.axhline(hline, color="grey", ls="--", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _png(fig)
