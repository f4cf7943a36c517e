"""Evaluation harness: a (quantized) zoo model against its full-precision reference.

    import diffquant.eval
    result = diffquant.eval.evaluate("runs/fmnist-dit-w4a8", samples=1000)   # or a zoo name
    result["fid"], result["psnr_vs_fp"], result["eps_sqnr_db_per_step"]

`metrics` holds the pure metric functions, `stats` the shipped real-data feature statistics,
`runner` the protocol (`evaluation` its settings and result, `targets` what is evaluated,
`fp_cache` the cached FP images, `output` its JSON, summary and grid), `report` the benchmark table over every zoo model and preset recipe.
The command line is `diffquant eval` / `diffquant report` / `diffquant eval-stats`.
"""

from diffquant.eval import metrics
from diffquant.eval.evaluation import EvalSettings, EvalTarget
from diffquant.eval.runner import Judge, evaluate
from diffquant.eval.targets import resolve_target

__all__ = ["EvalSettings", "EvalTarget", "Judge", "evaluate", "metrics", "resolve_target"]
