"""The README of a shipped zoo model: one template for every model, filled with the model's own text.

Each model gives a `CardText` (its prose, as str.format templates) and the values those name; the
sections every card shares (sampler, wall time, the evaluation table, the guidance sweep, use,
reproduce) live once, here. Fields every card has: `name`, `t` (the training record), `s` / `fl` /
`sampler` (the results' samples, floors and sampler), `wall_min`, `accuracy_pct`, `sweep`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

CARD = """# {name}

{intro}

## Architecture

{architecture}

{sections}## Sampler (defaults of the zoo model)

- `DDIMScheduler` (in `scheduler/`, timestep_spacing "trailing", eta 0), **{sampler[default_steps]} steps**,
  classifier-free guidance scale **{sampler[guidance_scale]:g}** (one batched {denoiser} call per step)
- Training noise schedule: DDPM, {t[num_train_timesteps]} steps, {t[beta_schedule]} betas{betas}

## Training

{training}
- Wall time: {wall_min:.1f} min of training + {t[latent_encode_s]:.0f} s encoding the latents,
  on {t[hardware]}, {t[threads]} thread(s)

## Evaluation (training-time figures; see diffquant.eval for the full harness)

{evaluation}

| metric | value |
| --- | --- |
| {accuracy} of samples (fmnist-classifier) | **{accuracy_pct:.1f}%** |
| FID, 1000 samples vs test | **{s[fid]:.2f}** |
| floor: 10k real train images vs test | {fl[real_train_10k_vs_test]:.2f} |
| floor: 1000 real train images vs test (same n as the samples) | {fl[real_train_1k_vs_test]:.2f} |
| floor: VAE reconstructions of the test set vs test | {fl[vae_recon_test_vs_test]:.2f} |
| time to generate the 1000 samples ({t[threads]} {threads}) | {s[generate_s]:.0f} s |

{sweep_intro}

| guidance | {accuracy} | FID |
| --- | --- | --- |
{sweep}

`samples.png`: rows are the 10 classes in label order, 8 samples each (the first of the 1000 above).

## Use

```python
{use}
```

## Reproduce

```
{t[command]}
```
"""


@dataclass(frozen=True)
class CardText:
    """One model's prose, each a str.format template over the card's fields (module docstring).

    sections: whole sections between Architecture and Sampler, each ending in a blank line ("" for
    none). denoiser: the module named in "one batched ... call per step". betas: what follows
    "<schedule> betas". accuracy: the accuracy metric's name; threads: the word after the thread count
    in the timing row.
    """

    intro: str
    architecture: str
    training: str
    evaluation: str
    sweep_intro: str
    use: str
    sections: str = ""
    denoiser: str = "denoiser"
    betas: str = ""
    accuracy: str = "class accuracy"
    threads: str = "thread(s)"


def render_card(text: CardText, name: str, training: dict, results: dict, **values: Any) -> str:
    """The README: `text` filled with the common fields of `training` / `results` and `values`."""
    s = results["samples"]
    sweep = "\n".join(
        f"| {row['guidance']:g} | {row['class_accuracy'] * 100:.1f}% | {row['fid']:.2f} |" for row in results["sweep"]
    )
    common = {"name": name, "t": training, "s": s, "fl": results["floors"], "sampler": results["sampler"],
              "wall_min": training["wall_time_s"] / 60, "accuracy_pct": s["class_accuracy"] * 100, "sweep": sweep}
    values = {**common, **values}
    parts = {f.name: getattr(text, f.name).format(**values) for f in fields(text)}
    return CARD.format(**values, **parts)
