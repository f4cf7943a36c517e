"""Outlier statistics of the zoo's outlier variants beside their base models, and the variants' model cards:
`python benchmarks/quality/outliers.py [--samples N]`.

For every quantizable layer's input, over the model's own sampler (all steps): per-channel max |X| and the
ratio max channel / median channel, per layer and per role, before and after the variant's outlier profile
(`diffquant outliers MODEL` prints the same for one model). Writes benchmarks/quality/outliers-<variant>.json
and src/diffquant/zoo/weights/<variant>/README.md, and prints the tables.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffquant.atomic import write_json_atomic
from diffquant.zoo.outlier_report import format_report, outlier_report
from diffquant.zoo.variant_cards import write_card
from diffquant.zoo.variants import VARIANTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="calibration samples (default 64)")
    args = parser.parse_args()
    for variant in VARIANTS:
        torch.manual_seed(0)
        report = outlier_report(variant.name, samples=args.samples)
        write_json_atomic(Path(__file__).parent / f"outliers-{variant.name}.json", report.to_dict(), indent=2)
        print(f"wrote {write_card(variant, report)}")
        print(format_report(report), end="\n\n")


if __name__ == "__main__":
    main()
