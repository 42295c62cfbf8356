"""Real-model families (timm, torchvision, open_clip) and pretrained-folder priors, offline.

Every model is a tiny random-init one of the real class, built through the real code paths; the
paper configs are parsed, not run (no weights here).
"""
import contextlib
import io
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

import featinv
from featinv.encoders import Encoder, list_layers
from featinv.specs import build_encoder
from featinv.hub import WeightsNotFoundError

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted((ROOT / "configs" / "paper").glob("*.yaml"))

TINY_CLIP = dict(embed_dim=16,
                 vision_cfg={"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                 text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})


def build(spec: str, seed: int = 0, **kw) -> Encoder:
    torch.manual_seed(seed)
    return build_encoder(spec, **kw)


def input_grad(enc: Encoder, shape=(2, 3, 40, 40)) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and d(cosine to a random target)/d(image); .sum() would give a ViT zero gradient."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g).requires_grad_(True)
    f = enc(x)
    target = torch.randn(f.shape, generator=g)
    torch.nn.functional.cosine_similarity(f, target).sum().backward()
    return f, x.grad


def assert_grad_flows(grad: torch.Tensor) -> None:
    assert grad is not None and torch.isfinite(grad).all()
    assert grad.flatten(1).norm(dim=1).min() > 0  # every sample gets a gradient


# -- spec syntax -----------------------------------------------------------------------------------
def test_spec_options_parse():
    from featinv.specs import Spec, parse_spec

    assert parse_spec("timm:resnet50@global_pool?pool=avg&quantize=true") == Spec(
        "timm", "resnet50", "global_pool", {"pool": "avg", "quantize": True})
    assert parse_spec("timm:test_vit?pretrained=false&interpolation=bicubic") == Spec(
        "timm", "test_vit", None, {"pretrained": False, "interpolation": "bicubic"})
    assert parse_spec("clip:RN50/openai").options == {} and parse_spec("clip:RN50/openai").name == "RN50/openai"
    assert str(parse_spec("zoo:digits-cnn@penultimate?quantize=true")) == "zoo:digits-cnn@penultimate?quantize=True"
    with pytest.raises(TypeError, match="pool"):  # typo in an option: suggestion, no silent ignore
        build_encoder("timm:test_resnet?pretrained=false&pol=cls")
    with pytest.raises(ValueError, match="already a vector"):  # pool only for token/spatial layers
        build_encoder("timm:test_vit?pretrained=false&pool=cls")
    with pytest.raises(KeyError, match="resnet50"):
        build_encoder("timm:resnt50")
    with pytest.raises(KeyError, match="IMAGENET1K_V1"):
        build_encoder("torchvision:resnet50/IMAGENET1K_V9")


# -- timm ----------------------------------------------------------------------------------------------
def test_timm_resnet_default_is_pre_logits():
    default = build("timm:test_resnet", pretrained=False)
    named = build("timm:test_resnet@global_pool?pretrained=false")
    assert default.name == "timm:test_resnet@pre_logits" and named.name == "timm:test_resnet@global_pool"
    assert default.input_size == (160, 160) and default.in_chans == 3
    f, grad = input_grad(default)
    assert f.shape == (2, default.model.num_features) == (2, 96)
    assert_grad_flows(grad)
    x = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(default(x), named(x))  # default layer == the classifier's input
    spatial = build("timm:test_resnet@layer3", pretrained=False)
    assert spatial(x).ndim == 2 and spatial(x).shape[1] > 96  # flattened feature map


def test_timm_vit_default_fc_norm_and_cls_pool():
    default = build("timm:test_vit", pretrained=False)
    named = build("timm:test_vit@fc_norm", pretrained=False)
    f, grad = input_grad(default)
    assert f.shape == (2, 64)
    assert_grad_flows(grad)
    x = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(default(x), named(x))
        cls = build("timm:test_vit@norm?pool=cls&pretrained=false")(x)
        tokens = build("timm:test_vit@norm", pretrained=False)(x)
    assert cls.shape == (2, 64) and tokens.shape[1] > 64  # pool=cls takes token 0, else all tokens
    torch.testing.assert_close(cls, tokens[:, :64])


def test_timm_checkpoint_path(tmp_path):
    import timm

    torch.manual_seed(3)
    ref = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "w.pth"
    torch.save(ref.state_dict(), path)
    enc = build(f"timm:test_resnet?checkpoint_path={path}", seed=0)  # implies pretrained=False
    loaded = enc.model.state_dict()
    assert len(loaded) > 10
    for k, v in loaded.items():  # every tensor but the removed classifier comes from the file
        torch.testing.assert_close(v, ref.state_dict()[k])
    with pytest.raises(WeightsNotFoundError, match="missing.pth"):
        build_encoder("timm:test_resnet", checkpoint_path=str(tmp_path / "missing.pth"))


# -- torchvision ---------------------------------------------------------------------------------
def test_torchvision_resnet18_layers():
    avg = build("torchvision:resnet18@avgpool")
    default = build("torchvision:resnet18")
    l3 = build("torchvision:resnet18@layer3")
    assert avg.name == "torchvision:resnet18@avgpool" and default.name == "torchvision:resnet18@pre_logits"
    assert avg.input_size == (224, 224)
    f, grad = input_grad(avg, (2, 3, 64, 64))
    assert f.shape == (2, 512)
    assert_grad_flows(grad)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(default(x), avg(x))  # pre-logits of a ResNet is avgpool
        assert l3(x).shape == (2, 256 * 14 * 14)  # layer3 at 224 px, flattened
    assert "layer3" in list_layers(l3.model)


def test_torchvision_vit_encoder_ln_defaults_to_cls():
    kw = dict(model_kwargs={"image_size": 32})  # the real vit_b_16 class at 32 px
    ln = build("torchvision:vit_b_16@encoder.ln", **kw)
    assert ln.pool == "cls" and ln.input_size == (32, 32)
    f, grad = input_grad(ln)
    assert f.shape == (2, 768)
    assert_grad_flows(grad)
    with torch.no_grad():
        x = torch.rand(1, 3, 32, 32)
        torch.testing.assert_close(build("torchvision:vit_b_16", **kw)(x), ln(x))  # = the head's input


def test_torchvision_weights_preprocessing():
    """Input size / mean / std / resize mode come from the weights (checked without building the models)."""
    from torchvision.models import ResNet50_Weights, ViT_H_14_Weights

    from featinv.models import _tv_preprocessing

    size, mean, std, interp = _tv_preprocessing(ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1, None)
    assert size == (518, 518) and interp == "bicubic"  # the paper's ViT-H/14 setting
    assert mean == pytest.approx((0.485, 0.456, 0.406)) and std == pytest.approx((0.229, 0.224, 0.225))
    assert _tv_preprocessing(ResNet50_Weights.IMAGENET1K_V1, None)[0] == (224, 224)


# -- CLIP (open_clip) -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip():
    return build("clip:ViT-B-32", model_kwargs=TINY_CLIP)


def test_clip_image_and_text(tiny_clip):
    from featinv.models import ClipEncoder

    enc = tiny_clip
    assert isinstance(enc, ClipEncoder) and enc.name == "clip:ViT-B-32@embedding"
    assert enc.input_size == (32, 32)
    torch.testing.assert_close(enc.mean.flatten(), torch.tensor([0.48145466, 0.4578275, 0.40821073]))
    f, grad = input_grad(enc)
    assert f.shape == (2, 16)
    assert_grad_flows(grad)
    with torch.no_grad():
        t = enc.encode_text(["a cat", "a dog"])
        torch.testing.assert_close(f.detach(), enc.clip.encode_image(enc.preprocess(torch.rand(2, 3, 40, 40,
                                   generator=torch.Generator().manual_seed(0)))))
    assert t.shape == (2, 16) and torch.isfinite(t).all()
    assert not torch.allclose(t[0], t[1])
    assert not torch.allclose(t.norm(dim=1), torch.ones(2))  # raw embeddings, as the paper matches

    unit = build("clip:ViT-B-32?normalize=true", model_kwargs=TINY_CLIP)
    with torch.no_grad():
        torch.testing.assert_close(unit.encode_text(["a cat"]).norm(dim=1), torch.ones(1))
        torch.testing.assert_close(unit(torch.rand(1, 3, 32, 32)).norm(dim=1), torch.ones(1))


def test_text_targets_through_module(tiny_clip):
    from featinv.data import TextTargets
    from featinv.module import InversionModule

    module = InversionModule(prior=tiny_pixel_prior(), encoder=tiny_clip,
                             methods=[{"preset": "fast", "steps": 2, "recurrence": 1, "early_steps": 0}],
                             progress=False)
    ds = TextTargets(["a cat", "a dog"])
    batch = default_collate([ds[i] for i in range(len(ds))])
    target = module.targets(batch)
    assert target.shape == (2, 16)
    torch.testing.assert_close(target, tiny_clip.encode_text(["a cat", "a dog"]))


# -- priors from pretrained folders ------------------------------------------------------------------
def tiny_pixel_prior():
    from featinv.priors import PixelPrior

    unet, sched = tiny_unet2d()
    return PixelPrior(unet, sched)


def tiny_unet2d():
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    return unet, DDPMScheduler(num_train_timesteps=100, clip_sample=False)


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A Stable-Diffusion-shaped folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/) of tiny models."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=2,
                                cross_attention_dim=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        layers_per_block=1, norm_num_groups=4, sample_size=16,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    # A CLIP BPE tokenizer without downloads: a character-level vocabulary, no merges.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=8, intermediate_size=16,
                                        num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=8))
    sched = DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    for sub, obj in dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=sched).items():
        obj.save_pretrained(root / sub)
    return root


def test_latent_prior_from_pretrained_end_to_end(tiny_sd_dir):
    from featinv.priors import LatentPrior

    prior = LatentPrior.from_pretrained(str(tiny_sd_dir), prompt="")
    assert prior.latent_shape == (4, 8, 8) and prior.cond.shape == (1, 16, 8)
    assert featinv.build_prior(f"latent:{tiny_sd_dir}").latent_shape == (4, 8, 8)  # the spec route
    enc = build("timm:test_resnet", pretrained=False)
    targets = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    r = featinv.invert(targets, prior=prior, encoder=enc, method="fast", steps=3, recurrence=1, early_steps=0)
    assert r.images.shape == (2, 3, 16, 16)
    assert torch.isfinite(r.images).all() and r.images.min() >= 0 and r.images.max() <= 1
    assert r.target.shape == r.final_features.shape == (2, 96)
    assert torch.isfinite(r.final_cos).all() and r.distances.shape[0] == 2


def test_zero_terminal_snr_v_prediction_prior_samples_finite_images(tiny_sd_dir, tmp_path):
    """Lin et al. 2024's schedule (rescale_betas_zero_snr, v prediction) ends at a_T = 0, where Tweedie's
    x0 = (z - sqrt(1-a) eps) / sqrt(a) is 0/0; the prior keeps a tiny a_T so x0-hat is -v there."""
    import json
    import shutil

    from featinv.priors import LatentPrior

    root = shutil.copytree(tiny_sd_dir, tmp_path / "zsnr")
    cfg = root / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "prediction_type": "v_prediction",
                               "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}))
    prior = LatentPrior.from_pretrained(str(root), prompt="")
    assert prior.prediction_type == "v_prediction" and 0 < float(prior.alphas_cumprod[-1]) < 1e-6
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), prior.num_train_timesteps - 1)
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = prior.eps(z, t)
    v = prior.unet(z, t, encoder_hidden_states=prior.cond.expand(2, -1, -1)).sample
    torch.testing.assert_close((z - (1 - a).sqrt() * eps) / a.sqrt(), -v, atol=2e-3, rtol=1e-2)  # Tweedie -> -v
    enc = build("timm:test_resnet", pretrained=False)
    targets = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    r = featinv.invert(targets, prior=prior, encoder=enc, method="fast", steps=3, recurrence=1, early_steps=0)
    assert torch.isfinite(r.images).all() and torch.isfinite(r.distances).all() and torch.isfinite(r.final_cos).all()


def test_per_sample_conditioning_with_cfg_and_gradients(tiny_sd_dir):
    """eps(z, t, cond) takes one prompt embedding per sample, mixes CFG, and passes gradients to cond."""
    from featinv.priors import LatentPrior

    prior = LatentPrior.from_pretrained(str(tiny_sd_dir), cfg_scale=3.0)
    assert prior.text_encoder is not None and prior.text_encoder is prior._modules["text_encoder"]
    cond = prior.encode_prompt(["a b", "c"])
    assert cond.shape == (2, 16, 8) and not torch.allclose(cond[0], cond[1])
    torch.testing.assert_close(prior.encode_prompt([""]), prior.cond)  # the default is the empty prompt
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        both = prior.eps(z, 50, cond)
        one = prior.eps(z[1:], 50, cond[1:])
        u = prior.unet(z, torch.tensor([50, 50]), encoder_hidden_states=prior.uncond.expand(2, -1, -1)).sample
        c = prior.unet(z, torch.tensor([50, 50]), encoder_hidden_states=cond).sample
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=1e-4)  # per sample: row 1 alone = row 1 in batch
    torch.testing.assert_close(both, u + 3.0 * (c - u), atol=1e-5, rtol=1e-4)  # classifier-free guidance
    emb = cond.clone().requires_grad_(True)
    prior.eps(z, 50, emb).pow(2).sum().backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    r = featinv.invert(torch.rand(2, 3, 16, 16), prior=prior, encoder=build("timm:test_resnet", pretrained=False),
                       method="unguided", steps=2, cond=["a b", "c"])
    assert torch.isfinite(r.images).all()


def test_pixel_prior_from_pretrained(tmp_path, tiny_clip):
    from featinv.priors import PixelPrior

    unet, sched = tiny_unet2d()
    unet.save_pretrained(tmp_path / "unet")
    sched.save_pretrained(tmp_path / "scheduler")
    prior = PixelPrior.from_pretrained(str(tmp_path))
    assert prior.latent_shape == (3, 8, 8)
    torch.testing.assert_close(prior.alphas_cumprod, sched.alphas_cumprod.float())
    z = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(prior.eps(z, 50), unet(z, torch.tensor([50, 50])).sample)
    # text targets inverted through the tiny CLIP image tower
    r = featinv.invert(tiny_clip.encode_text(["a cat"]).detach(), prior=prior, encoder=tiny_clip, method="fast",
                       steps=2, recurrence=1, early_steps=0)
    assert r.images.shape == (1, 3, 8, 8) and torch.isfinite(r.final_l2).all()


# -- offline: missing weights fail fast with a useful message ------------------------------------------
@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # huggingface_hub reads its env at import: patch the module constants it reads at call time too
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    return tmp_path


@pytest.mark.parametrize("build_fn, names", [
    (lambda: build_encoder("timm:resnet50"), ["resnet50"]),
    (lambda: featinv.build_prior("latent:CompVis/stable-diffusion-v1-4"), ["CompVis/stable-diffusion-v1-4"]),
    (lambda: build_encoder("torchvision:resnet50/IMAGENET1K_V1"), ["resnet50", "TORCH_HOME", "checkpoints"]),
    (lambda: build_encoder("clip:RN50/openai"), ["resnet50_clip.openai", "RN50"]),
], ids=["timm", "latent", "torchvision", "clip"])
def test_missing_weights_offline(empty_caches, build_fn, names):
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        build_fn()
    assert time.perf_counter() - start < 20
    msg = str(info.value)
    for n in names:
        assert n in msg
    assert "To provide them" in msg


# -- the paper's configs parse -------------------------------------------------------------------------
def test_paper_configs_exist():
    names = {p.stem for p in PAPER_CONFIGS}
    for setup in ("clip_rn50", "clip_rn50_text", "resnet50", "vit_h14"):
        assert {setup, f"{setup}_fast"} <= names


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_config_parses(path):
    from featinv.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        main(["predict", "-c", str(path), "--print_config"])
    assert info.value.code in (0, None)
    text = out.getvalue()
    assert "latent:CompVis/stable-diffusion-v1-4" in text
    assert ("clip:RN50/openai" in text or "torchvision:resnet50/IMAGENET1K_V1@avgpool" in text
            or "torchvision:vit_h_14/IMAGENET1K_SWAG_E2E_V1@encoder.ln" in text)
