"""Figures of the foundation (issue 3), measured in one run: `python benchmarks/foundation/figures.py`.

Writes benchmarks/foundation/results.json and README.md: format SQNRs on Gaussian weights, and for
every preset on a tiny random model of each diffusers family the output SQNR vs full precision, the
SmoothQuant transform's relative deviation with quantizers off, the bitwise reload check, and the
4-bit weight bytes ratio. Tiny random models have no real outliers: these check the machinery.
"""

from __future__ import annotations

import copy
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import diffquant  # noqa: E402
from diffquant.api import STATE_ATTR  # noqa: E402
from diffquant.checkpoint import load_quantized, save_quantized  # noqa: E402
from diffquant.formats import QuantSpec, quantize_blocks, sqnr_db  # noqa: E402
from diffquant.formats.ops import dequantize, unblock_view  # noqa: E402
from diffquant.info import checkpoint_info  # noqa: E402
from diffquant.recipes import list_presets  # noqa: E402
from tests.tiny_models import TINY_MODELS  # noqa: E402

OUT = Path(__file__).parent


def format_sqnr() -> dict[str, float]:
    weight = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(0))
    specs = {
        "int8 per-channel": QuantSpec(format="int8"),
        "int4 per-channel": QuantSpec(format="int4"),
        "int4 group-64": QuantSpec(format="int4", granularity="group", group_size=64),
        "int4 group-64 fp16 scales": QuantSpec(format="int4", granularity="group", group_size=64, scale_dtype="float16"),
    }
    rows = {}
    for name, spec in specs.items():
        codes, scale, zero = quantize_blocks(weight, spec)
        approx = unblock_view(dequantize(codes, scale, zero), weight.shape, spec.granularity)
        rows[name] = round(sqnr_db(weight, approx), 2)
    return rows


def family_rows(family: str, workdir: Path) -> list[dict]:
    tiny = TINY_MODELS[family]
    model, inputs = tiny.build(), tiny.inputs(2)

    def run(m):
        with torch.no_grad(), diffquant.sampling_step(0):
            return tiny.run(m, inputs)

    reference = run(model)
    rows = []
    for name in list_presets():
        q = diffquant.quantize(copy.deepcopy(model), name, calibration=run, progress=False)
        out = run(q)
        row = {"family": family, "recipe": name, "sqnr_db": round(sqnr_db(reference, out), 2)}
        if getattr(q, STATE_ATTR).recipe.stages:
            with diffquant.quantizers_disabled(q):
                deviation = (run(q) - reference).abs().max() / reference.abs().max()
            row["transform_max_rel_dev"] = float(deviation)
        folder = save_quantized(q, workdir / f"{family}-{name}")
        row["reload_bitwise"] = bool(torch.equal(run(load_quantized(folder)), out))
        info = checkpoint_info(folder)
        row["layer_bytes_vs_16bit"] = round(info["quantized_bytes"] / info["quantized_bytes_16bit"], 3)
        rows.append(row)
    return rows


def markdown(results: dict) -> str:
    lines = [
        "# Foundation figures",
        "",
        f"`python benchmarks/foundation/figures.py` — {results['date']}, {results['machine']}, torch {results['torch']}",
        "",
        "| weight format (1024x4096 Gaussian) | SQNR dB |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in results["formats"].items()],
        "",
        "Tiny random models (two blocks each): output SQNR vs full precision in dB, "
        "and bytes of the quantized layers (codes + scales + biases) vs 16-bit.",
        "",
    ]
    recipes = list(dict.fromkeys(r["recipe"] for r in results["families"]))
    lines += ["| family | " + " | ".join(recipes) + " |", "|---" * (len(recipes) + 1) + "|"]
    for family in dict.fromkeys(r["family"] for r in results["families"]):
        cells = {r["recipe"]: r for r in results["families"] if r["family"] == family}
        lines.append(f"| {family} | " + " | ".join(
            f"{cells[n]['sqnr_db']} ({cells[n]['layer_bytes_vs_16bit']})" for n in recipes) + " |")
    devs = [r["transform_max_rel_dev"] for r in results["families"] if "transform_max_rel_dev" in r]
    bitwise = all(r["reload_bitwise"] for r in results["families"])
    lines += ["", f"SmoothQuant transform, quantizers off: max relative deviation {max(devs):.2e} (bound 1e-4).",
              f"Save → load bitwise identical for every row: {bitwise}.", ""]
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        families = [row for f in TINY_MODELS for row in family_rows(f, Path(tmp))]
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}",
        "torch": torch.__version__,
        "formats": format_sqnr(),
        "families": families,
    }
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    (OUT / "README.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
