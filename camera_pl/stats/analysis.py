"""The paper's central observation, measured: how unequal micro-expert contributions are.

From :class:`MicroExpertStats` this writes, per MoE layer, the sorted CAMERA-score curve,
the share of total energy held by the top 10/20/40% of micro-experts and the per-expert
routing frequency, as PNG plots plus a Markdown summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from camera_pl.stats.container import MicroExpertStats


def energy_shares(stats: MicroExpertStats, fractions: Sequence[float] = (0.1, 0.2, 0.4),
                  reduce_ratio: float = 0.9) -> dict[int, dict[float, float]]:
    """Per layer, the fraction of total CAMERA score held by the top ``f`` of micro-experts."""
    out = {}
    for index, s in stats.scores("camera", reduce_ratio=reduce_ratio).items():
        flat = s.routed.flatten() if s.shared is None else torch.cat([s.routed.flatten(), s.shared])
        ordered = flat.double().sort(descending=True).values
        total = float(ordered.sum()) or 1.0
        out[index] = {f: float(ordered[: max(1, int(round(f * ordered.numel())))].sum()) / total for f in fractions}
    return out


def routing_frequency(stats: MicroExpertStats) -> dict[int, torch.Tensor]:
    """Per layer, each expert's share of routed (token, slot) pairs."""
    return {i: s["count"] / s["count"].sum().clamp_min(1) for i, s in stats.layers.items()}


def write_report(stats: MicroExpertStats, out_dir: str | Path, fractions: Sequence[float] = (0.1, 0.2, 0.4),
                 reduce_ratio: float = 0.9) -> Path:
    """Write ``analysis.md`` and, with matplotlib, ``scores.png`` and ``routing.png`` to ``out_dir``; returns the
    Markdown path."""
    from camera_pl.plots import MISSING, pyplot

    plt = pyplot()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = stats.scores("camera", reduce_ratio=reduce_ratio)
    shares = energy_shares(stats, fractions, reduce_ratio)
    freq = routing_frequency(stats)

    if plt is not None:
        _plot_scores(plt, scores, freq, out_dir)

    header = "| layer | " + " | ".join(f"top {int(f * 100)}% energy" for f in fractions) + " | max / min expert frequency |"
    lines = [f"# Micro-expert analysis ({stats.signature['model_class']}, {stats.tokens} tokens, r={reduce_ratio})", "",
             header, "|" + "---|" * (len(fractions) + 2)]
    for index in shares:
        f = freq[index]
        ratio = float(f.max() / f.min()) if float(f.min()) > 0 else float("inf")
        lines.append(f"| {index} | " + " | ".join(f"{100 * shares[index][x]:.1f}%" for x in fractions) + f" | {ratio:.1f} |")
    lines += ["", "![CAMERA scores](scores.png)", "", "![routing](routing.png)", ""] if plt is not None else \
        ["", f"(No figures: {MISSING}.)", ""]
    path = out_dir / "analysis.md"
    path.write_text("\n".join(lines))
    return path


def _plot_scores(plt, scores: dict, freq: dict[int, torch.Tensor], out_dir: Path) -> None:
    """``scores.png`` (cumulative CAMERA energy over sorted micro-experts) and ``routing.png`` (expert frequencies)."""

    def save_plot(fig, ax, xlabel: str, ylabel: str, name: str) -> None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for index, s in scores.items():
        flat = s.routed.flatten() if s.shared is None else torch.cat([s.routed.flatten(), s.shared])
        ordered = flat.double().sort(descending=True).values.cpu()
        ax.plot(torch.linspace(0, 1, len(ordered)), (ordered / ordered.sum().clamp_min(1e-30)).cumsum(0), label=f"layer {index}")
    save_plot(fig, ax, "fraction of micro-experts (sorted by CAMERA score)", "cumulative share of energy", "scores.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for index, f in freq.items():
        ax.plot(sorted(f.tolist(), reverse=True), marker=".", label=f"layer {index}")
    save_plot(fig, ax, "expert (sorted)", "routing frequency", "routing.png")
