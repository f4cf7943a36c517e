"""An evaluation's outputs: its JSON (non-finite numbers as null), the console summary and the
FP-vs-target sample grid; figures are written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from diffquant import atomic
from diffquant.atomic import atomic_file
from diffquant.eval.evaluation import Evaluation


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON to a temporary file beside `path`, then rename (readers never see a partial file).

    Non-finite floats (NaN from a model whose images blew up) are written as null: JSON has no NaN,
    and one broken recipe must not lose a whole report.
    """
    return atomic.write_json_atomic(path, _finite_or_null(obj), allow_nan=False)


def _finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_null(v) for v in obj]
    return obj


SUMMARY_KEYS: tuple[tuple[str, str], ...] = (
    ("fid", "{:.3f}"), ("fp_fid", "{:.3f}"), ("class_accuracy", "{:.4f}"), ("fp_class_accuracy", "{:.4f}"),
    ("psnr_vs_fp", "{:.2f} dB"), ("ssim_vs_fp", "{:.4f}"), ("feature_distance_vs_fp", "{:.4f}"),
    ("eps_sqnr_db", "{:.2f} dB"), ("wall_time_s", "{:.1f} s"), ("fp_wall_time_s", "{:.1f} s"),
    ("weight_bytes", "{:,}"),
)


def _format(value: Any, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def format_result(result: dict[str, Any]) -> str:
    attention = f"; attention {result['attention_quantized']}" if result.get("attention_quantized") else ""
    head = (f"{result['model']} {result['recipe']} ({result['bits']}{attention}): {result['samples']} samples, "
            f"{result['steps']} steps, seed {result['seed']}")
    lines = [head] + [f"  {key:<24}{_format(result[key], fmt)}" for key, fmt in SUMMARY_KEYS]
    lines.append(f"  FID: {result['fid_method']}")
    return "\n".join(lines)


def save_grid(path: str | Path, evaluation: Evaluation) -> Path:
    """PNG grid: FP row over the target's row, the first sample of each class per column, labelled."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    columns = _first_of_each_class(evaluation.labels)
    names = evaluation.target.reference.extra.get("class_names")
    result = evaluation.result
    rows = (("FP", evaluation.fp_images), (f"{result['recipe']}\n{result['bits']}", evaluation.images))
    fig, axes = plt.subplots(2, len(columns), figsize=(0.9 * len(columns) + 0.6, 2.3), squeeze=False)
    for r, (row_label, images) in enumerate(rows):
        for c, (label, index) in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(_to_display(images[index]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(names[label] if names else f"class {label}", fontsize=6)
            if c == 0:
                ax.set_ylabel(row_label, fontsize=7)
    fig.suptitle(f"{result['model']}: FP vs {result['recipe']} (seed {result['seed']}, {result['steps']} steps)",
                 fontsize=8)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def save_figure(fig: Any, path: Path, dpi: int = 100) -> Path:
    """A matplotlib figure saved atomically (and closed)."""
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return path


def _first_of_each_class(labels: torch.Tensor) -> list[tuple[int, int]]:
    """(class, index of its first sample), by class."""
    first: dict[int, int] = {}
    for index, label in enumerate(labels.tolist()):
        first.setdefault(label, index)
    return sorted(first.items())


def _to_display(image: torch.Tensor) -> Any:
    """[C, H, W] in [-1, 1] -> an HxW or HxWxC array in [0, 1] for imshow."""
    x = ((image.float() + 1) / 2).clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
