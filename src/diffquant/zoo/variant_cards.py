"""Model cards of the zoo's outlier variants (they have no weights, so the card is all their folder holds):
what the profile did, the measured outlier statistics before and after it, and the published figures it
is drawn to match. Written by `python benchmarks/quality/outliers.py`."""

from __future__ import annotations

import math
from pathlib import Path

from diffquant.atomic import write_text_atomic
from diffquant.outliers import get_profile
from diffquant.outliers.statistics import PUBLISHED
from diffquant.zoo.outlier_report import OutlierReport, role_table
from diffquant.zoo.registry import WEIGHTS_ROOT
from diffquant.zoo.variants import Variant


def _draw_line(label: str, draw) -> str:
    lo, hi = round(math.log2(draw.low)), round(math.log2(draw.high))
    return (f"- {label}: 1 to ceil({draw.share:.1%} of the width) channels per site; factors 2^round(u), u uniform "
            f"in [log2 {draw.low:g}, log2 {draw.high:g}], so {2 ** lo}-{2 ** hi}x")


def render_card(variant: Variant, report: OutlierReport) -> str:
    profile = get_profile(variant.profile)
    changes = report.profile["changes"] if report.profile else []
    kinds: dict[str, int] = {}
    for change in changes:
        kinds[change["kind"]] = kinds.get(change["kind"], 0) + 1
    draws = [_draw_line("channel outliers", profile.outliers)] if profile.outliers else []
    draws += [_draw_line("weight tails (readers' columns)", profile.tails)] if profile.tails else []
    lines = [
        f"# {variant.name}",
        "",
        f"`{variant.base}` with the `{variant.profile}` outlier profile (seed {variant.seed}) applied when it is "
        f"loaded: {profile.description}. It has no weights of its own and generates the same FP images as "
        f"`{variant.base}` (tested: PSNR ≥ 60 dB between their samples, the same classes). Quantizing it is "
        "*realistic*: its layer inputs carry the channel outliers real diffusion models have.",
        "",
        "## What the profile changed",
        "",
        f"Scaling sites by kind: {', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))} "
        "(`diffquant.outliers.sites`; the channels and factors of each are in "
        f"`benchmarks/quality/outliers-{variant.name}.json` and in every quantized folder's `diffquant_zoo.json`).",
        "",
        *draws,
        "",
        f"## Input-channel outliers, measured ({report.settings['samples']} calibration samples, all steps)",
        "",
        *role_table(report),
        "",
        "## Published figures the profile is drawn to match",
        "",
        *[f"- {p.source} — {p.models}, {p.layers}: {p.figure}"
          f"{'' if p.verified else ' (read in figures or second-hand)'}. <{p.url}>" for p in PUBLISHED],
        "",
        "The diffusion papers show outlier magnitudes in figures rather than in their text; the 10-100x range "
        "follows SmoothQuant's ~100x and the SVDQuant paper's reading of FLUX / PixArt inputs. A few channels per "
        "layer, fixed across tokens, with activation and weight extremes in different channels (PTQ4DiT).",
        "",
        "## Use",
        "",
        "```bash",
        f"diffquant quantize {variant.name} --recipe svdquant-w4a4 --out runs/{variant.name}-svdq",
        f"diffquant eval runs/{variant.name}-svdq --samples 1000",
        f"diffquant outliers {variant.name}",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_card(variant: Variant, report: OutlierReport) -> Path:
    return write_text_atomic(WEIGHTS_ROOT / variant.name / "README.md", render_card(variant, report))
