"""Ablation of QuEST (METHODS.md §3, issue 22) on one zoo model:
`python benchmarks/quality/quest_ablation.py [--model fmnist-sd] [--samples 1000]`.

Rows (benchmarks/quality/ablation.py: recipes in quest-ablation/recipes/, evaluated into quest-ablation/),
each quest-w4a4 with one change to its quest stage: without L_TLA (tla 0), without L_CMA (cma 0), every
quantized layer fine-tuned instead of the selected ones (layers: all), both groups from the first round
(progressive: false). The scoreboard's quest-w4a4, w4a4-static, quest-w4a8 and edadm-w4a8 rows on the same
model are shown beside them: quest-w4a8's stages before its fine-tuning are edadm-w4a8's, so edadm-w4a8 is
quest-w4a8 without the fine-tuning. Each row trains (~30 min on 2 cores); the UNet is the default model
since a DiT's selected layers are all of its quantized layers (no quantized time-embedding layer).
"""

from __future__ import annotations

from pathlib import Path

from ablation import Rows, main

from diffquant.recipes import get_preset

OUT = Path(__file__).parent / "quest-ablation"
GROUP = "quest-w4a4 with"


def variant(**quest) -> dict:
    """quest-w4a4's fields with `quest` changed in its quest stage."""
    fields = get_preset("quest-w4a4").to_dict()
    fields["stages"] = [{**s, **quest} if s["type"] == "quest" else s for s in fields["stages"]]
    return {k: v for k, v in fields.items() if k not in ("name", "description", "version")}


ROWS: Rows = {
    "abl-quest-start": (GROUP, "its fine-tuning off (1 round at learning rates 1e-12): the PTQ start with the INT8 ends",
                        variant(rounds=1, lr_weight=1e-12, lr_act=1e-12)),
    "abl-quest-no-tla": (GROUP, "no L_TLA (tla 0)", variant(tla=0.0)),
    "abl-quest-no-cma": (GROUP, "no L_CMA (cma 0)", variant(cma=0.0)),
    "abl-quest-all-layers": (GROUP, "every quantized layer fine-tuned (layers: all)", variant(layers="all")),
    "abl-quest-flat": (GROUP, "not progressive (both groups from the first round)", variant(progressive=False)),
    "abl-quest-lr10": (GROUP, "10x the authors' learning rates (weights 1e-4, step sizes 1e-3)",
                       variant(lr_weight=1e-4, lr_act=1e-3)),
}
NOTE = ("CPU, date and samples per row: results.json; quantize s: the stages' wall time (block reconstruction "
        "and fine-tuning), stretched by the other jobs beside it; quantize CPU s: the process's CPU time in them, "
        "all threads (a 1-thread row's CPU time is about what the stages take alone on one core); trained share: "
        "the denoiser's parameters QuEST fine-tuned, codes changed: the share of their weight codes the "
        "fine-tuning moved off the block reconstruction's. The scoreboard rows (benchmarks/quality/results.json) "
        "are the full method and its round-to-nearest baseline.")


if __name__ == "__main__":
    main("quest_ablation", "issue-22 ablation", __doc__, OUT, ROWS, {}, NOTE, model="fmnist-sd", samples=1000,
         scoreboard={"quest-w4a4": "the preset (all of the above on)", "w4a4-static": "round-to-nearest baseline",
                     "quest-w4a8": "the W4A8 preset",
                     "edadm-w4a8": "EDA-DM at W4A8: the W4A8 preset without its fine-tuning, the baseline it must beat"})
