"""PNG plots where a person would rather look than read (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]


def plot_training(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """loss.png (loss, validation NLL where measured, and the DIP terms) and lambda_heatmap.png
    (mean λ per layer over steps)."""
    rows = read_metrics(metrics_path)
    if not rows:
        return []
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(steps, [r["loss"] for r in rows], label="loss")
    ax[0].plot(steps, [r["nll"] for r in rows], label="NLL", linestyle="--")
    val = [r for r in rows if "val_nll" in r]
    if val:  # train.eval_every: held-out answer NLL, DIP on its mean path
        ax[0].plot([r["step"] for r in val], [r["val_nll"] for r in val], label="validation NLL", marker="o")
    ax[0].set_xlabel("step"), ax[0].set_ylabel("nats/token"), ax[0].legend(), ax[0].set_title("training loss")
    ax[1].plot(steps, [r["prior"] for r in rows], label="prior α·mean λ − β·mean ln λ")
    ax[1].plot(steps, [r["var_penalty"] for r in rows], label="trajectory variance")
    ax[1].set_xlabel("step"), ax[1].legend(fontsize=8), ax[1].set_title("DIP terms")
    fig.tight_layout()
    paths.append(out / "loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    layers = sorted({k for r in rows for k in r.get("lambda", {})}, key=_layer_key)
    if layers:
        import numpy as np

        grid = np.array([[r.get("lambda", {}).get(l, {}).get("mean", np.nan) for r in rows] for l in layers])
        fig, ax = plt.subplots(figsize=(10, 0.4 * len(layers) + 1.5))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=[steps[0], steps[-1], len(layers) - 0.5, -0.5])
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("step"), ax.set_title("mean λ per projection")
        fig.colorbar(im, ax=ax, label="λ")
        fig.tight_layout()
        paths.append(out / "lambda_heatmap.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _layer_key(name: str):
    head = name.split(".")[0]
    return (int(head) if head.isdigit() else 10**6, name)
