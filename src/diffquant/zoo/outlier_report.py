"""`diffquant outliers MODEL`: per layer, the largest input channel over the median one, before and after an
outlier profile, beside the published figures (diffquant.outliers.statistics.PUBLISHED).

MODEL is a zoo name (a variant such as fmnist-dit-outliers is shown beside its base model) or a diffusers
pipeline folder; `profile` adds a column for the model with that profile applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffquant.outliers import apply_profile, get_profile
from diffquant.outliers.statistics import PUBLISHED, LayerOutliers, as_dicts, by_role, layer_outliers
from diffquant.zoo import registry
from diffquant.zoo.variants import VARIANTS


@dataclass
class OutlierColumn:
    label: str
    layers: list[LayerOutliers]


@dataclass
class OutlierReport:
    model: str
    columns: list[OutlierColumn]
    profile: dict[str, Any] | None = None  # the record of the profile behind the last column
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "settings": self.settings, "profile": self.profile,
                "columns": [{"label": c.label, "roles": as_dicts(by_role(c.layers)), "layers": as_dicts(c.layers)}
                            for c in self.columns],
                "published": as_dicts(list(PUBLISHED))}


def _zoo_subject(name: str, samples: int, steps: int | None):
    model = registry.load(name)
    return model.denoiser, model.calibration(samples, steps, progress=False)


def _folder_subject(folder: str, samples: int, steps: int | None):
    from diffquant.calib.pipeline import pipeline_calibration
    from diffquant.integrations.diffusers_io import denoiser_of, is_pipeline_folder, load_pipeline_folder

    path = Path(folder)
    if not is_pipeline_folder(path):
        raise ValueError(f"{folder} is neither a zoo model name nor a diffusers pipeline folder (model_index.json): "
                         "the statistics need a sampler to run")
    pipe = load_pipeline_folder(path)
    return denoiser_of(pipe)[1], pipeline_calibration(pipe, samples, steps or 20, progress=False)


def outlier_report(model: str, profile: str | None = None, seed: int = 0, samples: int = 16,
                   steps: int | None = None) -> OutlierReport:
    if profile is not None:
        get_profile(profile)  # an unknown name fails before any sampling
    variant = next((v for v in VARIANTS if v.name == model), None)
    subject = _zoo_subject if registry.is_zoo_name(model) else _folder_subject
    base = variant.base if variant else model
    denoiser, calibration = subject(base, samples, steps)
    report = OutlierReport(model, [OutlierColumn(base, layer_outliers(denoiser, calibration))],
                           settings={"samples": samples, "steps": steps, "seed": seed})
    if variant is not None:
        profile, seed = variant.profile, variant.seed
    if profile is not None:
        record = apply_profile(denoiser, profile, seed)
        report.columns.append(OutlierColumn(f"{base} + {profile}", layer_outliers(denoiser, calibration)))
        report.profile = record.to_dict()
    return report


def role_table(report: OutlierReport) -> list[str]:
    summaries = [{s.role: s for s in by_role(c.layers)} for c in report.columns]
    header = "| role | layers | " + " | ".join(f"{c.label}: median / worst max÷median, max abs" for c in report.columns)
    lines = [header + " |", "|---|---|" + "---|" * len(report.columns)]
    for role, first in summaries[0].items():
        cells = [f"{s[role].median_ratio:.1f} / {s[role].max_ratio:.1f}, {s[role].max_abs:.1f}" for s in summaries]
        lines.append(f"| {role} | {first.layers} | " + " | ".join(cells) + " |")
    return lines


def _layer_rows(report: OutlierReport) -> list[str]:
    header = "| layer | role | channels | " + " | ".join(f"{c.label}: max÷median" for c in report.columns)
    lines = [header + " |", "|---|---|---|" + "---|" * len(report.columns)]
    for i, row in enumerate(report.columns[0].layers):
        cells = [f"{c.layers[i].max_over_median:.1f}" for c in report.columns]
        lines.append(f"| {row.layer} | {row.role} | {row.channels} | " + " | ".join(cells) + " |")
    return lines


def format_report(report: OutlierReport, per_layer: bool = False) -> str:
    """Markdown: the table (per role, or per layer), then the published figures."""
    lines = [f"Input-channel outliers of {report.model} (max |X| per channel over {report.settings['samples']} "
             "calibration samples, all steps; max÷median: the largest channel over the median channel)", ""]
    lines += _layer_rows(report) if per_layer else role_table(report)
    lines += ["", "Published (real models):"]
    lines += [f"- {p.source}, {p.models}, {p.layers}: {p.figure}{'' if p.verified else ' (figures / second-hand)'} "
              f"<{p.url}>" for p in PUBLISHED]
    return "\n".join(lines)
