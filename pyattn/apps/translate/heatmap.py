"""Attention heatmaps (PNG): which source tokens each output token attended to."""

from __future__ import annotations

from pathlib import Path

import torch

from .romanize import romanize


def save_heatmap(attn: torch.Tensor, src: list[str], tgt: list[str], path: Path, font: str | None) -> None:
    """One attention map: rows = output tokens (+ eos), columns = source tokens (+ eos)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [*src, "</s>"]
    ys = [t if t != " " else "␣" for t in tgt] + ["</s>"]  # show spaces as ␣
    if font is None:
        ys = [romanize(t) for t in ys]
        xs = [romanize(t) for t in xs]
    fig, ax = plt.subplots(figsize=(1 + 0.45 * len(xs), 1 + 0.4 * len(ys)))
    ax.imshow(attn[: len(ys), : len(xs)].float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    kw = {"fontfamily": font} if font else {}
    ax.set_xticks(range(len(xs)), xs, rotation=60, **kw)
    ax.set_yticks(range(len(ys)), ys, **kw)
    ax.set_xlabel("source")
    ax.set_ylabel("output" + ("" if font else " (romanised: no Hangul font)"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
