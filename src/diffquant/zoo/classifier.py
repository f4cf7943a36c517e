"""Small CNN classifier for 32x32 Fashion-MNIST: the project's evaluation network.

``features(x)`` (the penultimate embedding) is the feature space for FID-style metrics and
``forward(x)`` gives class logits, e.g. to check that generated images are recognisable.

Train and ship new weights with ``python -m diffquant.zoo.classifier``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from diffquant.zoo.data import fashion_mnist_tensors
from diffquant.zoo.train_utils import (
    Checkpointer,
    atomic_dir,
    cosine_lr,
    count_params,
    cpu_name,
    default_checkpoint_dir,
    set_lr,
    step_generator,
    training_parser,
)

WEIGHTS_DIR = Path(__file__).parent / "weights" / "fmnist-classifier"
ARCHITECTURE = "FashionClassifier"


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    image_size: int = 32
    # One stage per entry; every stage after the first starts with a stride-2 conv (cheaper on CPU
    # than conv + max-pool, which dominated inference time). Full-resolution stage kept to one conv.
    channels: tuple[int, ...] = (32, 64, 128)
    convs_per_stage: tuple[int, ...] = (1, 1, 2)
    embed_dim: int = 256
    num_classes: int = 10
    dropout: float = 0.3

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        return cls(**kw)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)  # bias is redundant before BN
    return [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FashionClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or ClassifierConfig()
        if len(config.channels) != len(config.convs_per_stage):
            raise ValueError("channels and convs_per_stage must have the same length")
        layers: list[nn.Module] = []
        cin = config.in_channels
        for stage, (cout, n) in enumerate(zip(config.channels, config.convs_per_stage, strict=True)):
            for i in range(n):
                layers += _conv_bn_relu(cin, cout, stride=2 if stage > 0 and i == 0 else 1)
                cin = cout
        self.body = nn.Sequential(*layers)
        # Global average pooling keeps the head small and the embedding translation-tolerant.
        self.embed = nn.Sequential(
            nn.Linear(cin, config.embed_dim), nn.BatchNorm1d(config.embed_dim), nn.ReLU()
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.embed_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding [N, embed_dim] (non-negative, post-ReLU) for images in [-1, 1]."""
        h = self.body(x).mean(dim=(2, 3))
        return self.embed(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


# ----------------------------------------------------------------------------------------------
# Inference helpers


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Predicted class indices for float images [N, 1, 32, 32] in [-1, 1]."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        model(images[i : i + batch_size].to(device)).argmax(1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> float:
    return (predict(model, images, batch_size) == labels).float().mean().item()


def load_classifier(
    device: str | torch.device = "cpu", weights_dir: str | Path | None = None
) -> FashionClassifier:
    """Load the shipped (float16 on disk) weights as a float32 model in eval mode."""
    path = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    config = ClassifierConfig.from_dict(json.loads((path / "config.json").read_text()))
    model = FashionClassifier(config)
    state = load_file(str(path / "model.safetensors"))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    steps: int = 3500
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    warmup: int = 100
    label_smoothing: float = 0.1
    max_shift: int = 2  # pixels; the 2-pixel black border makes small shifts lossless
    seed: int = 0


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random horizontal flip and per-image integer shift (filled with background -1)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if max_shift <= 0:
        return x
    s = max_shift
    padded = F.pad(x, (s, s, s, s), value=-1.0)
    oy = torch.randint(0, 2 * s + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * s + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def _make_step(model, optimizer, images, labels, cfg: TrainConfig):
    def step_fn(step: int) -> dict[str, float]:
        gen = step_generator(cfg.seed, step)
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        x = augment(images[idx], gen, cfg.max_shift)
        set_lr(optimizer, cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup))
        model.train()
        loss = F.cross_entropy(model(x), labels[idx], label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    return step_fn


def save_weights(model: FashionClassifier, out_dir: str | Path, card: str, training: dict) -> None:
    """Atomically write float16 safetensors + config.json + README.md into out_dir."""
    state = {
        k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()
    }
    config = {"architecture": ARCHITECTURE, **asdict(model.config), "training": training}
    with atomic_dir(out_dir) as tmp:
        save_file(
            state, str(tmp / "model.safetensors"), metadata={"format": "pt", "architecture": ARCHITECTURE}
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(card)


def _model_card(model: FashionClassifier, training: dict) -> str:
    c = model.config
    stages = ", ".join(f"{n}x conv3x3({ch})" for ch, n in zip(c.channels, c.convs_per_stage, strict=True))
    return f"""# fmnist-classifier

Small CNN classifier for Fashion-MNIST padded to {c.image_size}x{c.image_size}x{c.in_channels}, inputs in [-1, 1]
(background -1). It is diffquant's evaluation network: `features(x)` returns the {c.embed_dim}-d penultimate
embedding used as the feature space for FID-style metrics; `forward(x)` returns {c.num_classes} logits.

## Architecture

- Stages: {stages}; each conv is followed by BatchNorm + ReLU; every stage after the first
  starts with a stride-2 conv (resolution {c.image_size} -> {c.image_size >> (len(c.channels) - 1)})
- Global average pool -> Linear({c.channels[-1]}, {c.embed_dim}) + BatchNorm1d + ReLU (= `features`)
  -> Dropout({c.dropout}) -> Linear({c.embed_dim}, {c.num_classes})
- Parameters: {count_params(model):,}
- Stored as float16 safetensors (`model.safetensors`); `diffquant.zoo.classifier.load_classifier()` loads it as float32.

## Training

- Data: Fashion-MNIST train split (60,000 images, Debian package `dataset-fashion-mnist`)
- Steps: {training["steps"]} x batch {training["batch_size"]} (AdamW, lr {training["lr"]} with warmup + cosine decay,
  weight decay {training["weight_decay"]}, label smoothing {training["label_smoothing"]}),
  augmentation: random horizontal flip, random shifts up to {training["max_shift"]} px; seed {training["seed"]}
- Wall time: {training["wall_time_s"] / 60:.1f} min on {training["hardware"]}, {training["threads"]} thread(s)

## Evaluation

- Test accuracy (10,000 images, weights rounded to float16): **{training["test_accuracy"] * 100:.2f}%**

## Reproduce

```
{training["command"]}
```
"""


def train_classifier(
    out_dir: str | Path = WEIGHTS_DIR,
    steps: int = 3500,
    batch_size: int = 128,
    seed: int = 0,
    resume: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 200,
    config: ClassifierConfig | None = None,
    command: str = "python -m diffquant.zoo.classifier",
) -> dict:
    """Train on the Fashion-MNIST train split, evaluate on test, write weights + card to out_dir."""
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seed=seed)
    torch.manual_seed(seed)
    model = FashionClassifier(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = Checkpointer(
        Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir("fmnist-classifier"),
        meta={"model": asdict(model.config), "train": asdict(cfg)},
    )
    images, labels = fashion_mnist_tensors("train")
    step_fn = _make_step(model, optimizer, images, labels, cfg)
    wall = ckpt.run(model, optimizer, step_fn, cfg.steps, resume, checkpoint_every, "classifier")
    # Evaluate what we ship: the float16-rounded weights.
    model.load_state_dict(
        {k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    )
    test_x, test_y = fashion_mnist_tensors("test")
    training = {
        **asdict(cfg),
        "wall_time_s": round(wall, 1),
        "threads": torch.get_num_threads(),
        "hardware": cpu_name(),
        "test_accuracy": round(accuracy(model, test_x, test_y), 4),
        "command": command,
    }
    save_weights(model, out_dir, _model_card(model, training), training)
    return training


def main(argv: list[str] | None = None) -> None:
    p = training_parser("Train the Fashion-MNIST evaluation classifier and ship its weights.", 3500, 128, WEIGHTS_DIR, "output weights folder", "fmnist-classifier", 1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = f"python -m diffquant.zoo.classifier --steps {args.steps} --batch-size {args.batch_size} --seed {args.seed}"
    t = time.perf_counter()
    result = train_classifier(
        args.out,
        args.steps,
        args.batch_size,
        args.seed,
        not args.no_resume,
        args.checkpoint_dir,
        command=command,
    )
    print(f"test accuracy {result['test_accuracy']:.4f}; wrote {args.out} ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
