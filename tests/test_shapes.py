"""The shapes world: renderer, captions, splits, tokenizer, the SD folders, readers, probes, guidance."""
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from featinv.zoo.shapes import world as W  # noqa: E402

WEIGHTS = W.__file__.rsplit("/", 2)[0] + "/weights"
META = json.loads(open(f"{WEIGHTS}/meta.json").read())


def _row(**kw):
    r = np.zeros(1, W.SINGLE_DTYPE)
    for k, v in kw.items():
        r[k] = W.FACTORS[k].index(v) if isinstance(v, str) else v
    return r


# -- renderer --------------------------------------------------------------------------------------
def test_render_is_deterministic_and_in_range():
    rows = W.sample_rows(300, seed=5)
    assert np.array_equal(rows, W.sample_rows(300, seed=5))
    assert not np.array_equal(rows, W.sample_rows(300, seed=6))
    a, b = W.render(rows), W.render(rows.copy())
    assert a.shape == (300, 3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and torch.isfinite(a).all()
    m = W.render(W.sample_rows(300, seed=5, mode="multi"))
    assert m.shape == (300, 3, 32, 32) and torch.isfinite(m).all()
    # first n rows do not depend on how many are drawn (blocks of BLOCK rows)
    assert np.array_equal(W.sample_rows(W.BLOCK + 5, seed=1)[:10], W.sample_rows(10, seed=1))


@pytest.mark.parametrize("shape,area", [
    ("circle", lambda r: math.pi * r * r), ("square", lambda r: (1.7 * r) ** 2),
    ("triangle", lambda r: 3 * math.sqrt(3) / 4 * (1.4 * r) ** 2),
    ("star", lambda r: 5 * 1.3 * r * 0.55 * 1.3 * r * math.sin(math.pi / 5))])
def test_mask_area_matches_the_drawn_object(shape, area):
    for size, r in zip(W.SIZES, W.SIZE_SCALE):
        row = _row(shape=shape, size=size, position="center", color="red", background="gray", angle=0.3)
        m = W.masks(row)
        assert abs(float(m["object"].sum()) - area(r)) / area(r) < 0.03, (shape, size)
        assert torch.allclose(m["object"] + m["background"], torch.ones(1, 32, 32))
        img = W.render(row)[0]
        bg, fg = torch.tensor(W.BACKGROUND_RGB["gray"]), torch.tensor(W.COLOR_RGB["red"])
        expect = bg.view(3, 1, 1) * (1 - m["object"]) + fg.view(3, 1, 1) * m["object"]
        assert torch.allclose(img, expect[0] if expect.ndim == 4 else expect, atol=1e-6)


def test_position_and_size_move_the_mask():
    def centroid(row):
        m = W.masks(row)["object"][0]
        yy, xx = torch.meshgrid(torch.arange(32.) + 0.5, torch.arange(32.) + 0.5, indexing="ij")
        return float((m * xx).sum() / m.sum()), float((m * yy).sum() / m.sum())

    for k, pos in enumerate(W.POSITIONS):
        cx, cy = centroid(_row(shape="circle", position=pos, dx=0.5, dy=-0.25))
        assert abs(cx - W.CELL_CENTERS[k % 3] - 0.5) < 0.05 and abs(cy - W.CELL_CENTERS[k // 3] + 0.25) < 0.05
    areas = [float(W.masks(_row(shape="square", size=s))["object"].sum()) for s in W.SIZES]
    assert areas[0] < areas[1] < areas[2]


def test_oracle_edit_of_colour_changes_only_object_pixels():
    rows = W.sample_rows(64, seed=3)
    new = W.edit(rows, "color", (rows["color"] + 1) % len(W.COLORS))
    assert np.array_equal(new["shape"], rows["shape"]) and np.array_equal(new["angle"], rows["angle"])
    diff = (W.render(new) - W.render(rows)).abs().amax(1)
    obj = W.masks(rows)["object"]
    assert (diff[obj == 0] == 0).all()  # background untouched
    assert (diff[obj > 0.05] > 0).all()  # every object pixel changed
    bg = W.edit(rows, "background", "white")
    assert (W.labels(bg)["background"] == 2).all()
    assert torch.equal(W.masks(bg)["object"], obj)  # the object stays where it was


def test_multi_mode_masks_presence_and_permutation():
    rows = W.sample_rows(400, seed=2, mode="multi")
    pres = W.labels(rows)["presence"]
    assert pres.sum(1).max() <= W.MULTI_MAX and (pres.sum(1) == 0).any() and (pres.sum(1) == 3).any()
    m = W.masks(rows)
    assert m["concepts"].shape == (400, 6, 32, 32)
    assert m["concepts"].sum(1).max() <= 1 + 1e-6  # objects never overlap
    covered = m["concepts"].sum((2, 3)) > 1
    assert torch.equal(covered, pres)  # a concept has pixels iff it is present
    # oracle permutation: flip one concept; the other objects keep their exact pixels
    new_p = rows["present"].copy()
    new_p[:, 2] = ~new_p[:, 2]
    perm = W.permute(rows, new_p)
    mp = W.masks(perm)["concepts"]
    assert torch.equal(mp[:, [0, 1, 3, 4, 5]], m["concepts"][:, [0, 1, 3, 4, 5]])
    assert torch.equal(mp[:, 2].sum((1, 2)) > 1, torch.from_numpy(new_p[:, 2]))
    assert (mp.sum(1) <= 1 + 1e-6).all()


def test_captions_follow_the_grammar():
    row = _row(shape="triangle", color="red", size="small", position="top left", background="gray")
    assert W.caption(row[0]) == "a small red triangle at the top left on a gray background"
    row = _row(shape="circle", color="orange", size="large", position="center", background="dark blue")
    assert W.caption(row[0]) == "a large orange circle in the center on a dark blue background"
    assert W.caption(row[0], ["color", "shape"]) == "a orange circle"
    assert W.caption(row[0], ["color"]) == "a orange shape"
    m = np.zeros(1, W.MULTI_DTYPE)
    assert W.caption(m[0]) == "no objects"
    m["present"][0, [0, 5]] = True
    assert W.caption(m[0]) == "1 red circle, 1 blue rectangle"
    for f, fam in W.HIERARCHY.items():  # the hierarchy covers every value exactly once
        assert sorted(v for vs in fam.values() for v in vs) == sorted(W.FACTORS[f])


def test_splits_are_disjoint_and_cached():
    rows = {s: W.load_split("single", s, 512)[1] for s in W.SPLITS}
    seeds = {W.split_seed("single", s) for s in W.SPLITS} | {W.split_seed("multi", s) for s in W.SPLITS}
    assert len(seeds) == 6
    keys = {s: {(r["dx"], r["dy"], r["angle"]) for r in rows[s]} for s in W.SPLITS}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    x1, r1 = W.load_split("single", "test", 64)
    x2, r2 = W.load_split("single", "test", 64)
    assert torch.equal(x1, x2) and np.array_equal(r1, r2)
    x1.zero_()  # callers get copies
    assert W.load_split("single", "test", 64)[0].max() > 0
    assert torch.equal(W.load_split("single", "test", 16)[0], x2[:16])
    with pytest.raises(ValueError):
        W.load_split("single", "holdout", 8)


# -- tokenizer -------------------------------------------------------------------------------------
def test_every_grammar_word_is_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from featinv.zoo.shapes import text as T

    words = T.grammar_words()
    assert {"triangle", "rectangle", "purple", "background", ",", "1", "shape"} <= set(words)
    T.save_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert T.split_words(tok) == {}
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tok.decode(ids) == w
    cap = "a small red triangle at the top left on a dark blue background"
    ids = tok(cap).input_ids
    assert len(ids) == len(cap.split()) + 2 and tok.decode(ids, skip_special_tokens=True) == cap
    assert tok.model_max_length == T.MAX_LENGTH >= max(len(tok(c).input_ids) for c in T.caption_corpus())
    assert len(tok("a zebra", add_special_tokens=False).input_ids) > 2  # unknown words: byte-level pieces


# -- the SD folders -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["shapes-sd", "shapes-multi-sd"])
def test_sd_folder_loads_through_featinv_latent_and_zoo(name):
    import featinv
    from featinv.priors import LatentPrior
    from featinv.zoo.shapes import shapes_sd_dir

    folder = shapes_sd_dir(name)
    index = json.loads((folder / "model_index.json").read_text())
    for part, cls in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL"), ("text_encoder", "CLIPTextModel"),
                      ("tokenizer", "CLIPTokenizer"), ("scheduler", "DDPMScheduler")):
        assert index[part][1] == cls and (folder / part).is_dir()
    prior = LatentPrior.from_pretrained(folder, local_files_only=True)
    assert prior.latent_shape == (4, 8, 8) and prior.num_train_timesteps == 1000
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = prior.eps(z, 500)
        img = prior.decode(z * 0.1)
    assert eps.shape == z.shape and torch.isfinite(eps).all() and img.shape == (2, 3, 32, 32)
    spec = featinv.build_prior(f"latent:{folder}")
    assert spec.latent_shape == (4, 8, 8) and spec.cfg_scale == 1.0
    with torch.no_grad():  # the zoo spec is the same model: same eps
        assert torch.allclose(featinv.build_prior(f"zoo:{name}").eps(z, 500), eps, atol=1e-5)
    # cross-attention down to 2x2 (LEDITS++ aggregates attention at latent_res / 4)
    unet = prior.unet
    assert all(hasattr(b, "attentions") for b in unet.down_blocks) and len(unet.down_blocks) == 3


def test_stable_diffusion_pipeline_generates_and_tokenizer_is_the_grammars():
    from featinv.zoo.shapes import sd as S
    from featinv.zoo.shapes import text as T

    pipe = S.load_pipeline("shapes-sd")
    assert T.split_words(pipe.tokenizer) == {}
    # a rebuilt BPE has the same tokens; the committed tokenizer (the one the text encoder was trained
    # with) is the reference, never a rebuild (folders trained before canonical_vocab have hash-ordered ids)
    assert set(pipe.tokenizer.get_vocab()) == set(T.build_tokenizer().get_vocab())
    assert pipe.unet.dtype == torch.float32  # stored as float16, loaded as float32
    g = torch.Generator().manual_seed(0)
    out = pipe(["a large red circle in the center on a white background", ""], height=32, width=32,
               num_inference_steps=2, guidance_scale=3.0, generator=g, output_type="pt").images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_generate_with_eta_stays_finite_at_zero_terminal_snr():
    """DDIM with eta = 1 on the zero-terminal-SNR prior: the library's first step takes the root of a rounding
    negative (NaN latents, black images); ``sd.ddim_scheduler`` clamps the variance to its exact bound. The
    stochastic samples must draw what the captions ask (colour, background) like the deterministic ones."""
    from featinv.zoo.shapes import sd as S
    from featinv.zoo.shapes.reader import load_reader, read_factors

    pipe = S.load_pipeline("shapes-sd")
    _, rows = W.load_split("single", "val", 8)
    x = S.generate(pipe, W.captions(rows), seeds=range(8), cfg_scale=2.0, steps=25, eta=1.0)
    assert torch.isfinite(x).all()
    got = read_factors(x, load_reader())[0]
    for f in ("color", "background"):
        assert (got[f].numpy() == rows[f]).mean() >= 0.75, f
    sched = S.ddim_scheduler(pipe.scheduler.config)
    sched.set_timesteps(25)
    t, prev = sched.timesteps[0], sched.timesteps[0] - 40
    assert float(sched.alphas_cumprod[t]) < 1e-6  # the first step is at (near) zero SNR
    assert 1 - sched.alphas_cumprod[prev] - sched._get_variance(t, prev) > 0


def test_generate_draws_noise_of_the_unets_latent_shape(tmp_path):
    """``sd.generate`` with a 16x16-latent folder (a VAE that halves 32 px): the noise must be 4x16x16, not the
    8x8 of the committed folders, or the images come out 16 px."""
    from diffusers import StableDiffusionPipeline

    from featinv.zoo.shapes import sd as S
    from _tiny_sd import build_tiny_sd

    folder = build_tiny_sd(tmp_path / "sd16", latent_size=16)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    x = S.generate(pipe, ["a small red circle at the top left on a gray background", ""], seeds=[0, 1], steps=2)
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()
    again = S.generate(pipe, ["a small red circle at the top left on a gray background"], seeds=[0], steps=2)
    torch.testing.assert_close(again[0], x[0])  # one generator per image: batch companions do not matter


def test_generate_takes_another_scheduler_and_guidance_rescale_and_refuses_what_it_cannot_do():
    """``sd.generate``'s sampler options (benchmarks/shapes_prior_sampler.py): a diffusers multistep scheduler
    is used (not silently DDIM) and reset per batch (a reused instance gives the same images again); guidance
    rescale changes guided samples and leaves CFG 1 alone; eta with another scheduler and a rescale outside
    [0, 1] are refused."""
    from diffusers import DPMSolverMultistepScheduler

    from featinv.zoo.shapes import sd as S

    pipe = S.load_pipeline("shapes-sd")
    caps = ["a small red circle at the top left on a gray background", "a large blue star at the bottom on a white background"]
    ddim = S.generate(pipe, caps, seeds=[0, 1], cfg_scale=3.0, steps=6)
    dpm = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    a = S.generate(pipe, caps, seeds=[0, 1], cfg_scale=3.0, steps=6, scheduler=dpm, batch=1)
    b = S.generate(pipe, caps, seeds=[0, 1], cfg_scale=3.0, steps=6, scheduler=dpm)
    assert torch.isfinite(a).all() and (a - ddim).abs().max() > 1e-3
    torch.testing.assert_close(a, b)  # per-batch reset: the multistep history never leaks between batches
    resc = S.generate(pipe, caps, seeds=[0, 1], cfg_scale=3.0, steps=6, guidance_rescale=0.7)
    assert (resc - ddim).abs().max() > 1e-3
    plain = S.generate(pipe, caps[:1], seeds=[0], cfg_scale=1.0, steps=6)
    torch.testing.assert_close(S.generate(pipe, caps[:1], seeds=[0], cfg_scale=1.0, steps=6, guidance_rescale=0.7), plain)
    with pytest.raises(ValueError, match="needs the DDIM sampler"):
        S.generate(pipe, caps, seeds=[0, 1], steps=6, eta=1.0, scheduler=dpm)
    with pytest.raises(ValueError, match="outside"):
        S.generate(pipe, caps, seeds=[0, 1], steps=6, guidance_rescale=1.5)


def test_shape_word_benchmark_tells_a_prior_that_follows_the_word_from_one_that_follows_the_seed():
    """benchmarks/shapes_prior_shape.py's measures: reads and images that follow the word, or the seed."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "shapes_prior_shape.py"
    spec = importlib.util.spec_from_file_location("shapes_prior_shape", path)
    B = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(B)
    rows, words, seeds = 6, 4, 3
    by_word = torch.arange(words).view(1, words, 1).expand(rows, words, seeds)
    by_seed = (torch.arange(seeds) % words).view(1, 1, seeds).expand(rows, words, seeds)
    assert B.read_agreement(by_word) == (0.0, 0.0)  # every word read as itself
    same, other = B.read_agreement(by_seed)
    assert same == 1.0 and other == 0.0  # the seed alone decides: one seed, one shape
    g = torch.Generator().manual_seed(0)
    word_img, seed_img = torch.rand(words, 3, 4, 4, generator=g), torch.rand(seeds, 3, 4, 4, generator=g)
    d_word, d_seed = B.pair_distances(word_img[None, :, None].expand(rows, words, seeds, 3, 4, 4))
    assert d_word > 0.1 and d_seed == 0.0
    d_word, d_seed = B.pair_distances(seed_img[None, None].expand(rows, words, seeds, 3, 4, 4))
    assert d_word == 0.0 and d_seed > 0.1


def test_sdedit_benchmark_denoises_from_the_level_it_noised_to():
    """benchmarks/shapes_prior_sdedit.py: with a UNet that knows the noise exactly (its x0 estimate is exact only
    if the latent was noised to the timestep the UNet is told), SDEdit returns the clean latent from every start
    step; the shape swap cycles every shape to another one."""
    import importlib.util

    from diffusers import DDIMScheduler

    from featinv.zoo.shapes import sd as S
    from featinv.zoo.shapes import train as ST

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "shapes_prior_sdedit.py"
    spec = importlib.util.spec_from_file_location("shapes_prior_sdedit", path)
    B = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(B)
    base = S.build_scheduler(**ST.CONFIG["shapes-unet"]["scheduler"])
    sched = DDIMScheduler.from_config(base.config, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(25)
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    acp = sched.alphas_cumprod

    d, cfg = 0.3, 1.5

    def guided(v, h):  # conditional (h = 1) and unconditional (h = 0) outputs whose CFG combination is exactly v
        is_cond = h.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return v + d * (1 - is_cond / cfg)

    class NoiseOracle:  # v from the true noise: x0-hat = (z - sqrt(1 - a) eps) / sqrt(a)
        def __call__(self, z, t, encoder_hidden_states):
            a = acp[t].view(-1, 1, 1, 1)
            eps = torch.cat([noise, noise])
            x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
            return type("Out", (), {"sample": guided(a.sqrt() * eps - (1 - a).sqrt() * x0, encoder_hidden_states)})()

    class LatentOracle:  # v from the true latent (defined at a = 0 too)
        def __call__(self, z, t, encoder_hidden_states):
            a = acp[t].view(-1, 1, 1, 1)
            x0 = torch.cat([z0, z0])
            eps = (z - a.sqrt() * x0) / (1 - a).sqrt()
            return type("Out", (), {"sample": guided(a.sqrt() * eps - (1 - a).sqrt() * x0, encoder_hidden_states)})()

    cond, unc = torch.ones(3, 2, 8), torch.zeros(3, 2, 8)
    end = acp[0].sqrt() * z0 + (1 - acp[0]).sqrt() * noise  # DDIM's last step lands on a_0 (set_alpha_to_one=False)
    for start in (5, 10, 20, 24):
        out = B.sdedit(NoiseOracle(), sched, z0, noise, cond, unc, start, cfg_scale=cfg)
        torch.testing.assert_close(out, end, atol=1e-4, rtol=1e-4)
    assert (B.sdedit(NoiseOracle(), sched, z0, noise, unc, cond, 10, cfg) - end).abs().max() > 0.1  # CFG the wrong way
    # start 0 is t = T, where a = 0: the latent is the noise itself, and the path keeps that noise to the end
    torch.testing.assert_close(B.sdedit(LatentOracle(), sched, z0, noise, cond, unc, 0, cfg), end, atol=1e-4, rtol=1e-4)
    _, rows = W.load_split("single", "val", 16)
    swapped = B.swap_shape(rows)
    assert (swapped["shape"] != rows["shape"]).all() and (swapped["color"] == rows["color"]).all()


def test_tokenizer_rebuilds_with_the_same_ids():
    """BpeTrainer numbers some tokens in a random hash order (4 builds in one process gave 3 different
    vocabularies); canonical_vocab makes every build, and so every retraining, identical."""
    from featinv.zoo.shapes import text as T

    builds = [T.build_tokenizer() for _ in range(4)]
    vocab = builds[0].get_vocab()
    assert all(b.get_vocab() == vocab for b in builds[1:])
    assert vocab[T.BOS] == 0 and vocab[T.EOS] == 1 and T.split_words(builds[0]) == {}
    caption = "a small red triangle at the top left on a gray background"
    assert builds[0].tokenize(caption) == builds[-1].tokenize(caption) == \
        [w + "</w>" for w in caption.split()]
    # the committed tokenizers came from three separate processes (hash-ordered ids); renumbered, each
    # is exactly this build: same tokens, same merges
    for folder in ("shapes-sd/tokenizer", "shapes-multi-sd/tokenizer", "shapes-clip"):
        model = json.loads(open(f"{WEIGHTS}/{folder}/tokenizer.json").read())["model"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
        assert T.canonical_vocab(model["vocab"], merges) == vocab, folder


def _is_stored_schedule(recorded: dict, name: str) -> bool:
    """A training record's scheduler equals the one stored in the committed ``name`` folder (every key it names)."""
    from featinv.zoo.shapes import sd as S

    stored = json.loads((S.sd_dir(name) / "scheduler" / "scheduler_config.json").read_text())
    return bool(recorded) and all(stored.get(k) == v for k, v in recorded.items())


def test_the_multi_object_prior_keeps_the_shapes_vae_stage_vae():
    """shapes-vae-dec fine-tunes shapes-sd's decoder only and reads shapes-vae's VAE from shapes-multi-sd, which it
    leaves alone: the two committed VAEs share encoder, quant_conv and scaling factor, and differ in the decoder
    (a symlink between the two files once gave DEPICT's generator the fine-tuned decoder unnoticed)."""
    from safetensors.torch import load_file

    from featinv.zoo.shapes import sd as S

    folders = [S.sd_dir(n) / "vae" for n in ("shapes-sd", "shapes-multi-sd")]
    assert not any((f / "diffusion_pytorch_model.safetensors").is_symlink() for f in folders)
    single, multi = (load_file(str(f / "diffusion_pytorch_model.safetensors")) for f in folders)
    assert single.keys() == multi.keys()
    kept = [k for k in single if k.startswith(("encoder.", "quant_conv."))]
    tuned = [k for k in single if k.startswith(("decoder.", "post_quant_conv."))]
    assert kept and all(torch.equal(single[k], multi[k]) for k in kept)
    assert sum(not torch.equal(single[k], multi[k]) for k in tuned) > len(tuned) // 2
    configs = [json.loads((f / "config.json").read_text())["scaling_factor"] for f in folders]
    assert configs[0] == configs[1] == META["shapes-vae"]["scaling_factor"]


def test_committed_weights_were_trained_with_the_configured_stages():
    """`python -m featinv.zoo.train --what shapes` must be the command that made the committed weights: every
    stage's recorded hyper-parameters equal its CONFIG (the VAE configured a third phase it never ran)."""
    from featinv.zoo.shapes import train as ST

    for stage in ST.FINETUNE_STAGES:  # one record per call, data-order seeds consecutive
        name = ST.META_NAME[stage]
        calls, cfg = META[name]["finetune"], ST.CONFIG[stage]
        assert [c["call"] for c in calls] == list(range(1, cfg["calls"] + 1)), stage
        assert [c["seed"] for c in calls] == [cfg["seed_offset"] + k for k in range(cfg["calls"])], stage
        assert all(c["hyperparameters"] == cfg and c["init_from"] == name for c in calls), stage
        assert all(_is_stored_schedule(c["scheduler"], name) for c in calls)  # a continuation keeps its schedule
    assert not set(ST.OPT_IN_STAGES) & set(META)  # opt-in stages' weights are not committed
    for stage, cfg in ST.CONFIG.items():
        if stage in ST.OPT_IN_STAGES:
            continue
        entry = META[ST.META_NAME.get(stage, stage)]
        hp = entry["hyperparameters"] if stage not in ST.FINETUNE_STAGES else entry["finetune"][-1]["hyperparameters"]
        for key, value in cfg.items():
            if key == "phases":
                ran = entry["phases"]
                assert len(ran) == len(value), (stage, len(ran), len(value))
                for rec, (steps, lr, object_weight, boost) in zip(ran, value):
                    assert (rec["steps"], rec["lr"], rec["object_weight"], rec["small_object_boost"]) == \
                        (steps, lr, object_weight, boost), (stage, rec["phase"])
            else:
                assert hp.get(key) == value, (stage, key, hp.get(key), value)


def test_training_stages_expand_in_order():
    from featinv.zoo.shapes import train as ST

    full = ST.expand(["shapes"])
    assert full[:6] == ["shapes-reader", "shapes-detector", "shapes-vae", "shapes-vae-dec", "shapes-unet",
                        "shapes-unet-ft"]
    assert full == [s for s in ST.STAGES if s not in ST.OPT_IN_STAGES] and ST.expand(["shapes-unet-ft"]) == ["shapes-unet-ft"]
    assert "shapes-pixel" not in full and ST.expand(["shapes-pixel"]) == ["shapes-pixel"]
    assert ST.expand(["shapes", "shapes-pixel"]) == list(ST.STAGES)
    assert ST.expand(["shapes-color", "shapes-reader"]) == ["shapes-reader", "shapes-color"]
    with pytest.raises(ValueError, match="unknown shapes stage"):
        ST.expand(["shapes-nope"])


def test_training_cli_refuses_a_device_it_cannot_train_on(monkeypatch, capsys):
    """``--device`` moves only the shapes UNet stages: a CUDA device that is not there, an unsupported one,
    or a device with no UNet stage selected is refused in one line before anything trains; the runner passes
    the device to the UNet stages alone."""
    from featinv.zoo import train as Z
    from featinv.zoo.shapes import train as ST
    from featinv.zoo.shapes import train_sd

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, msg in ((["--what", "shapes-unet", "--device", "cuda"], "no CUDA device is available"),
                      (["--what", "shapes-unet", "--device", "mps"], "only cpu and cuda"),
                      (["--what", "shapes-unet", "--device", "gpu0"], "not a device; use cpu, cuda or cuda:N"),
                      (["--what", "prior", "--device", "cuda:1"], "none is selected")):
        with pytest.raises(SystemExit):
            Z.parse_args(argv)
        assert msg in capsys.readouterr().err, argv
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert Z.parse_args(["--what", "shapes-multi-unet,shapes-color", "--device", "cuda"]).device == "cuda"
    assert Z.parse_args(["--what", "shapes-unet", "--device", "cuda:0"]).device == "cuda:0"
    with pytest.raises(SystemExit):
        Z.parse_args(["--what", "shapes-unet", "--device", "cuda:1"])
    assert "has 1 CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        Z.parse_args(["--what", "shapes-color", "--device", "cuda"])
    assert Z.parse_args(["--what", "shapes-color"]).device == "cpu"

    seen = {}

    def fake_train_unet(name, mode, out, **kw):
        seen[name] = kw["device"]
        return Path(out) / name, {}

    monkeypatch.setattr(train_sd, "train_unet", fake_train_unet)
    monkeypatch.setattr(ST, "update_meta", lambda *a, **k: None)
    monkeypatch.setitem(ST.RUNNERS, "shapes-color", lambda out, seed, c: seen.setdefault("color", "called") and {})
    res = ST.run(["shapes-unet", "shapes-color"], Path("/nonexistent"), scale=0.001, device="cuda")
    assert seen == {"shapes-sd": "cuda", "color": "called"} and res["shapes-unet"]["device"] == "cuda"


def test_decoder_finetune_trains_the_decoder_and_keeps_every_latent(tmp_path):
    """shapes-vae-dec: the decoder changes, the encoder, quant_conv and scaling factor do not, so the latent of
    every image (what the UNets were trained on) is the same; the stage refuses a folder without shapes-vae's VAE."""
    from diffusers import AutoencoderKL

    from featinv.zoo.shapes import sd as S
    from featinv.zoo.shapes import train as ST
    from featinv.zoo.shapes import train_sd

    vae = AutoencoderKL.from_pretrained(str(S.sd_dir("shapes-multi-sd") / "vae"), local_files_only=True).float()
    x, _ = W.load_split("single", "test", 4)
    with torch.no_grad():
        z0 = vae.encode(x * 2 - 1).latent_dist.mean
    dec0 = [p.detach().clone() for p in vae.decoder.parameters()]
    info = train_sd.finetune_vae_decoder(vae, steps=2, lr=1e-3, object_weight=10.0, batch=4, seed=0, n_single=8,
                                         n_multi=4, log=lambda *a: None)
    with torch.no_grad():
        assert torch.equal(vae.encode(x * 2 - 1).latent_dist.mean, z0)
    assert any(not torch.equal(a, b) for a, b in zip(dec0, vae.decoder.parameters()))
    assert info["steps"] == 2 and np.isfinite(info["final_loss"]) and info["trained"] == "decoder + post_quant_conv"
    with pytest.raises(FileNotFoundError, match="run the shapes-vae stage into"):
        ST.train_vae_decoder_stage(tmp_path, 0, ST.CONFIG["shapes-vae-dec"])


def test_unet_stage_without_its_vae_says_where_to_get_it(tmp_path):
    from featinv.zoo.shapes import train_sd

    with pytest.raises(FileNotFoundError, match="run the shapes-vae stage into"):
        train_sd.train_unet("shapes-sd", "single", tmp_path, seed=0, steps=1, batch=2, lr=1e-3, n_train=8,
                            ema_decay=0.9)
    (tmp_path / "shapes-sd" / "vae").mkdir(parents=True)  # a continuation needs the whole folder
    with pytest.raises(FileNotFoundError, match="cp -r featinv/zoo/weights"):
        train_sd.train_unet("shapes-sd", "single", tmp_path, seed=0, steps=1, batch=2, lr=1e-3, n_train=8,
                            ema_decay=0.9, init_from=tmp_path / "shapes-sd")


@pytest.mark.slow
@pytest.mark.parametrize("stage,name,loss", [("shapes-unet-ft", "shapes-sd", "MSE of the v_prediction"),
                                             ("shapes-multi-unet-ft", "shapes-multi-sd", "Min-SNR-5.0 weighted")])
def test_unet_finetune_stage_continues_the_committed_prior_and_keeps_its_record(tmp_path, monkeypatch, stage, name,
                                                                                loss):
    """A ``-ft`` stage starts from the stored UNet (not a fresh one: its first probe equals the stored model's),
    trains with that prior's own loss and appends one record per call to meta.json's entry of that prior, each
    call continuing the last with the next data-order seed."""
    import shutil

    from featinv.zoo.shapes import sd as S
    from featinv.zoo.shapes import train as ST
    from featinv.zoo.shapes import train_sd

    shutil.copytree(S.sd_dir(name), tmp_path / name, symlinks=False)
    (tmp_path / "meta.json").write_text(json.dumps({name: {"steps": 1, "fidelity": {"x": 1}}}))
    pipe = S.load_pipeline(name)
    before = train_sd.conditioning_probe(pipe.unet, pipe.text_encoder, pipe.tokenizer, sched=pipe.scheduler) \
        if name == "shapes-sd" else None
    off = ST.CONFIG[stage]["seed_offset"]
    monkeypatch.setitem(ST.CONFIG, stage, dict(ST.CONFIG[stage], calls=1))
    ST.run([stage], tmp_path, seed=0, scale=0.002)
    meta = json.loads((tmp_path / "meta.json").read_text())[name]
    assert meta["steps"] == 1 and meta["fidelity_before_finetune"] == {"x": 1} and "fidelity" not in meta
    assert len(meta["finetune"]) == 1
    ft = meta["finetune"][0]
    assert ft["init_from"] == name and ft["loss"].startswith(loss) and ft["steps"] == 8
    assert "object coverage" not in ft["loss"] and ft["hyperparameters"]["snr_gamma"] == ST.CONFIG[stage]["snr_gamma"]
    assert _is_stored_schedule(ft["scheduler"], name)  # a continuation keeps its stored schedule
    after = S.load_pipeline(tmp_path / name)
    changed = [not torch.equal(a, b) for a, b in zip(after.unet.parameters(), pipe.unet.parameters())]
    assert any(changed)
    if before is not None:
        assert set(ft["conditioning_probe"]) == {"eps_t500", "x0_t800"}
        assert set(ft["conditioning_probe"]["x0_t800"]) == {"position", "shape", "color", "size", "background"}
        # a continuation, not a restart: 8 small steps leave the probe close to the stored model's
        assert abs(ft["conditioning_probe"]["eps_t500"]["color"] - before["color"]) < 0.1 * before["color"]
    monkeypatch.setitem(ST.CONFIG, stage, dict(ST.CONFIG[stage], calls=2))
    ST.run([stage], tmp_path, seed=1, scale=0.002)  # two more calls continue the first
    meta = json.loads((tmp_path / "meta.json").read_text())[name]
    assert [(f["call"], f["seed"]) for f in meta["finetune"]] == [(1, off), (2, off + 1), (3, off + 2)]
    assert meta["fidelity_before_finetune"] == {"x": 1}
    meta["fidelity"] = {"x": 2}  # measured between calls: the next call keeps the fidelity before the first one
    (tmp_path / "meta.json").write_text(json.dumps({name: meta}))
    ST.run([stage], tmp_path, seed=3, scale=0.002)
    meta = json.loads((tmp_path / "meta.json").read_text())[name]
    assert len(meta["finetune"]) == 5 and meta["fidelity_before_finetune"] == {"x": 1} and "fidelity" not in meta


def test_unet_loss_weights_are_min_snr_in_x0_terms_for_either_target():
    from featinv.zoo.shapes.train_sd import loss_weights

    snr = torch.tensor([0.0, 0.01, 1.0, 5.0, 100.0])
    # as a weight on the x0 error (epsilon-MSE = snr x0-MSE, v-MSE = (snr + 1) x0-MSE) both give min(snr, 5)
    torch.testing.assert_close(loss_weights(snr, "v_prediction", 5.0) * (snr + 1), snr.clamp(max=5.0))
    torch.testing.assert_close(loss_weights(snr[1:], "epsilon", 5.0) * snr[1:], snr[1:].clamp(max=5.0))
    # plain MSE of the target: v then weights x0 by snr + 1 (~1 at high noise, where the layout is decided)
    assert torch.equal(loss_weights(snr, "v_prediction", None), torch.ones(5))
    with pytest.raises(KeyError):
        loss_weights(snr, "sample", 5.0)


@pytest.mark.slow
def test_unet_stage_trains_a_zero_terminal_snr_v_prediction_sd_folder(tmp_path):
    """``shapes-unet`` from scratch (tiny scale): the saved folder's scheduler is the stage's (v prediction,
    zero terminal SNR, trailing), diffusers' pipeline samples finite images from it, meta records it."""
    import shutil

    from featinv.zoo.shapes import sd as S
    from featinv.zoo.shapes import train as ST

    (tmp_path / "shapes-sd").mkdir()
    shutil.copytree(S.sd_dir("shapes-sd") / "vae", tmp_path / "shapes-sd" / "vae")
    (tmp_path / "meta.json").write_text("{}")
    ST.run(["shapes-unet"], tmp_path, seed=0, scale=0.002, device="cpu")
    pipe = S.load_pipeline(tmp_path / "shapes-sd")
    cfg = pipe.scheduler.config
    assert (cfg.prediction_type, cfg.rescale_betas_zero_snr, cfg.timestep_spacing) == ("v_prediction", True, "trailing")
    assert float(pipe.scheduler.alphas_cumprod[-1]) == 0.0
    meta = json.loads((tmp_path / "meta.json").read_text())["shapes-sd"]
    assert meta["device"] == "cpu"
    assert meta["scheduler"]["prediction_type"] == "v_prediction" and meta["loss"].startswith("MSE of the v_prediction")
    assert set(meta["conditioning_probe"]) == {"eps_t500", "x0_t800"}
    x = S.generate(pipe, ["a small red circle at the top left on a gray background"], seeds=[0], steps=4)
    assert x.shape == (1, 3, 32, 32) and torch.isfinite(x).all()


def test_pixel_prior_without_weights_is_refused_naming_the_training_command(tmp_path):
    import featinv

    with pytest.raises(FileNotFoundError, match="--what shapes-pixel"):
        featinv.build_prior(f"zoo:shapes-pixel?path={tmp_path}")


@pytest.mark.slow
def test_pixel_stage_trains_a_text_conditioned_pixel_prior_that_loads_as_a_zoo_prior(tmp_path):
    """``shapes-pixel`` (tiny scale): a folder without a VAE whose UNet samples 32x32x3 pixels, loaded by the
    ``zoo:shapes-pixel?path=...`` spec as a text-conditioned ``PixelPrior`` and by ``sd.load_pipeline`` for
    ``sd.generate``; zero terminal SNR v prediction on cosine betas, as the stage config says."""
    from featinv.priors import PixelPrior
    from featinv.specs import build_prior
    from featinv.zoo.shapes import sd as S
    from featinv.zoo.shapes import train as ST

    (tmp_path / "meta.json").write_text("{}")
    ST.run(["shapes-pixel"], tmp_path, seed=0, scale=0.002, device="cpu")
    assert not (tmp_path / "shapes-pixel" / "vae").exists()
    prior = build_prior(f"zoo:shapes-pixel?path={tmp_path}&prompt=a red circle&cfg_scale=2")
    assert isinstance(prior, PixelPrior) and prior.conditional and prior.latent_shape == (3, 32, 32)
    assert prior.prediction_type == "v_prediction" and prior.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    assert float(prior.alphas_cumprod[-1]) < 1e-6 and prior.cfg_scale == 2.0
    assert not torch.equal(prior.cond, prior.encode_prompt([""]))  # the prompt reached the conditioning
    meta = json.loads((tmp_path / "meta.json").read_text())["shapes-pixel"]
    assert meta["unet_config"]["in_channels"] == 3 and meta["unet_params"] == sum(p.numel() for p in prior.unet.parameters())
    assert "pixel space" in meta["architecture"] and set(meta["test_eps_mse_by_timestep"]) == {"50", "250", "500", "750", "950"}
    pipe = S.load_pipeline(tmp_path / "shapes-pixel")
    assert pipe.vae is None
    x = S.generate(pipe, ["a small red circle at the top left on a gray background"], seeds=[0], steps=4)
    assert x.shape == (1, 3, 32, 32) and torch.isfinite(x).all()


@pytest.mark.slow
def test_ledits_pp_inverts_and_edits_at_32px():
    from diffusers import LEditsPPPipelineStableDiffusion

    from featinv.zoo.shapes import shapes_sd_dir

    pipe = LEditsPPPipelineStableDiffusion.from_pretrained(str(shapes_sd_dir()), safety_checker=None,
                                                           requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    x, rows = W.load_split("single", "test", 1)
    pipe.invert(image=x * 2 - 1, source_prompt=W.caption(rows[0]), num_inversion_steps=10, skip=0.1,
                generator=torch.Generator().manual_seed(0), height=32, width=32)
    out = pipe(editing_prompt=["red"], edit_guidance_scale=5.0, edit_threshold=0.75, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


# -- readers, encoders, probes ------------------------------------------------------------------------
def test_reader_and_detector_accuracy_match_meta():
    from featinv.zoo.shapes import reader as R

    x, rows = W.load_split("single", "test", 256)
    acc = R.factor_accuracy(R.load_reader(), x, rows)
    for f in W.FACTORS:
        assert acc[f] >= 0.98 and abs(acc[f] - META["shapes-reader"]["test_accuracy"][f]) <= 0.02, (f, acc)
    xm, rm = W.load_split("multi", "test", 256)
    pacc = R.presence_accuracy(R.load_detector(), xm, rm)
    for c in W.CONCEPTS:
        assert abs(pacc[c] - META["shapes-detector"]["test_accuracy"][c]) <= 0.02, (c, pacc)
    values, conf = R.read_factors(x[:8])
    assert set(values) == set(W.FACTORS) and ((conf[f] > 0) & (conf[f] <= 1)).all()


def test_every_shapes_encoder_builds_with_default_and_spatial_layers():
    import featinv
    from featinv.zoo.shapes import names

    x = W.load_split("single", "test", 4)[0]
    for name in names()["encoders"]:
        enc = featinv.build_encoder(f"zoo:{name}")
        with torch.no_grad():
            f = enc(x)
        assert f.ndim == 2 and f.shape[0] == 4 and torch.isfinite(f).all(), name
    conv = featinv.build_encoder("zoo:shapes-shape@conv3")
    assert conv(x).shape == (4, 64 * 8 * 8)
    clip = featinv.build_encoder("zoo:shapes-clip")
    assert clip.encode_text("a red circle").shape == (1, clip.dim)
    assert featinv.build_encoder("zoo:shapes-clip@layer1")(x).shape == (4, 64 * 8 * 8)  # meta.json spatial_layers


def test_clip_hard_negatives_swap_one_factor_and_train_with_rendered_negatives(tmp_path):
    """NegCLIP-style hard negatives of ``clip.train_clip``: each copy differs from its row in exactly one captioned
    factor (every factor gets swapped, nuisances kept, so a rendered negative is the same scene with one factor
    changed); a short training with text and image negatives runs, saves a model that reloads through the clip:
    family, and records them in its loss."""
    import featinv
    from featinv.zoo.shapes import clip as C

    _, rows = W.load_split("single", "train", 200)
    neg = C._hard_negatives(rows, 3, np.random.default_rng(0))
    src = np.repeat(rows, 3)
    changed = np.stack([neg[f] != src[f] for f in W.FACTORS], 1)
    assert (changed.sum(1) == 1).all() and changed.any(0).all()
    assert all((neg[k] == src[k]).all() for k in ("dx", "dy", "angle"))
    info = C.train_clip(tmp_path, seed=0, n=64, steps=3, batch=16, lr=1e-3, n_test=32, hard_negatives=2,
                        negative_images=True, vision="resnet")
    assert "2 one-factor-swapped hard negative" in info["loss"] and "rendered" in info["loss"]
    assert "ModifiedResNet" in info["architecture"]
    assert set(info["test_zero_shot_accuracy"]) == {*W.FACTORS, "full_caption_top1"}
    enc = featinv.build_encoder(f"clip:local-dir:{tmp_path / 'shapes-clip'}")
    assert torch.isfinite(enc(W.load_split("single", "test", 2)[0])).all()
    with pytest.raises(ValueError, match="hard_negatives >= 1"):
        C.train_clip(tmp_path, seed=0, n=64, steps=1, batch=16, lr=1e-3, n_test=8, negative_images=True)
    with pytest.raises(ValueError, match="not one of"):
        C.train_clip(tmp_path, seed=0, n=64, steps=1, batch=16, lr=1e-3, n_test=8, vision="vgg")
    # a fine-tune starts from the saved weights (lr 0: it keeps them, noise or not); refusals in one line
    from safetensors.torch import load_file

    ft = C.train_clip(tmp_path / "ft", seed=1, n=64, steps=1, batch=16, lr=0.0, n_test=8, hard_negatives=1,
                      noise_std=0.3, init=tmp_path / "shapes-clip")
    assert ft["noise_std"] == 0.3 and ft["init"] == str(tmp_path / "shapes-clip")
    a, b = (load_file(str(d / "shapes-clip" / "open_clip_model.safetensors")) for d in (tmp_path, tmp_path / "ft"))
    assert all(torch.equal(a[k], b[k]) for k in a if "num_batches_tracked" not in k and "running" not in k)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        C.train_clip(tmp_path / "ft", seed=0, n=64, steps=1, batch=16, lr=1e-3, n_test=8, noise_std=1.5)
    with pytest.raises(ValueError, match="rebuilds"):
        C.train_clip(tmp_path, seed=0, n=64, steps=1, batch=16, lr=1e-3, n_test=8, init=tmp_path / "shapes-clip")


def test_clip_text_targets_pick_the_right_colour():
    import featinv

    clip = featinv.build_encoder("zoo:shapes-clip?normalize=true")
    x, rows = W.load_split("single", "test", 256)
    prompts = [f"a {c} shape" for c in W.COLORS]
    with torch.no_grad():
        pred = (clip(x) @ clip.encode_text(prompts).T).argmax(1)
    acc = float((pred == W.labels(rows)["color"]).float().mean())
    assert acc >= META["shapes-clip"]["test_zero_shot_accuracy"]["color"] - 0.05 and acc > 0.5


def test_probe_accuracies_match_meta():
    from featinv.zoo.shapes import load_encoder
    from featinv.zoo.shapes.probes import features, probe

    xtr, rtr = W.load_split("single", "train", 1500)
    xva, rva = W.load_split("single", "val", 256)
    xte, rte = W.load_split("single", "test", 256)
    lab = {s: {k: v.numpy() for k, v in W.labels(r).items()} for s, r in (("tr", rtr), ("va", rva), ("te", rte))}
    for name in ("shapes-shape", "shapes-invariant"):
        enc = load_encoder(name)
        ftr, fva, fte = features(enc, xtr), features(enc, xva), features(enc, xte)
        for f in ("shape", "color", "position"):
            got = probe(ftr, lab["tr"][f], fva, lab["va"][f], fte, lab["te"][f])["test_accuracy"]
            want = META["shapes-probes"]["probes"][name][f]["test_accuracy"]
            assert abs(got - want) <= 0.1, (name, f, got, want)


def test_designed_encoders_learnt_their_task_and_keep_what_they_are_built_for():
    """A collapsed encoder (a constant feature: shapes-shape once sat at chance, loss ln 4) fails here."""
    from featinv.zoo.shapes import fit, load_encoder
    from featinv.zoo.shapes.encoders import load_model

    x, rows = W.load_split("single", "test", 512)
    lab = W.labels(rows)
    for name in ("shapes-shape", "shapes-color", "shapes-invariant"):
        model = load_model(name)
        acc = fit.accuracies(model, x, {h: lab[h] for h in model.heads})
        assert min(acc.values()) >= 0.95, (name, acc)
        assert min(META[name]["test_accuracy"].values()) >= 0.95, name
        with torch.no_grad():
            f = load_encoder(name)(x)
        assert f.std(0).mean() > 1e-3, name  # the feature varies across scenes
    probes = META["shapes-probes"]["probes"]
    assert probes["shapes-shape"]["shape"]["kept"] and probes["shapes-color"]["color"]["kept"]
    assert all(probes["shapes-invariant"][k]["kept"] for k in ("shape", "color", "size", "background"))
    assert probes["shapes-shape"]["position"]["dropped"] and probes["shapes-invariant"]["position"]["dropped"]
    # shapes-shape is built to drop colour: its colour probe is far below its shape probe
    assert probes["shapes-shape"]["color"]["test_accuracy"] < probes["shapes-shape"]["shape"]["test_accuracy"] - 0.4


def test_target_classifiers_match_meta_and_biased_ones_show_their_bias():
    from featinv.zoo.shapes import load_target_classifier, targets

    for name in ("primary-red-circle", "mixed-0", "biased-shape-bg", "unbiased-shape"):
        model, m = load_target_classifier(name), targets.mode(name)
        x, rows = W.load_split(m, "test", 256)
        entry = META["shapes-targets"]["models"][name]
        y = targets.label_fn(name, entry.get("truth", {}).get("threshold"))(rows)
        with torch.no_grad():
            acc = float((model(x).argmax(1) == y).float().mean())
        assert abs(acc - entry["test_accuracy"]) <= 0.05, (name, acc, entry["test_accuracy"])
    b = META["shapes-targets"]["models"]["biased-shape-bg"]
    assert b["test_accuracy_bias_aligned"] > b["test_accuracy_bias_conflicting"]


def test_every_planted_bias_is_used_by_its_classifier_on_val_renders():
    """A planted bias is the seed systems' ground truth only if the classifier uses it: measured here on
    val renders (factors independent), not read from meta.json."""
    from featinv.zoo.shapes import load_target_classifier, targets

    x, rows = W.load_split("single", "val", 600)
    for name in targets.BIASED:
        with torch.no_grad():
            pred = load_target_classifier(name)(x).argmax(1).numpy()
        use = targets.bias_use(name, pred, rows)
        assert use["gap"] >= targets.MIN_BIAS_GAP and use["follows_bias"] >= 0.5, (name, use)
        assert abs(use["gap"] - META["shapes-targets"]["models"][name]["val_bias_use"]["gap"]) < 0.1, name
    for name in targets.UNBIASED:  # the unbiased counterparts read their label on the same renders
        with torch.no_grad():
            pred = load_target_classifier(name)(x).argmax(1).numpy()
        assert (pred == rows[targets.UNBIASED[name]]).mean() > 0.95, name


def test_bias_use_separates_a_classifier_that_follows_the_bias_from_one_that_reads_the_label():
    from featinv.zoo.shapes import targets

    rows = W.load_split("single", "val", 400)[1]
    label, bias, mapping, _ = targets.BIASED["biased-shape-bg"]
    reads_label = rows[label].astype(int)
    inverse = {b: a for a, b in enumerate(mapping)}
    follows = np.array([inverse[b] for b in rows[bias]])  # 4 shapes <-> 4 backgrounds: always defined
    honest, cheat = targets.bias_use("biased-shape-bg", reads_label, rows), targets.bias_use("biased-shape-bg", follows, rows)
    assert honest["gap"] == 0 and honest["follows_bias"] == 0 and honest["accuracy_bias_conflicting"] == 1
    assert cheat["gap"] == 1 and cheat["follows_bias"] == 1 and cheat["accuracy_bias_aligned"] == 1
    assert 0 < honest["n_conflicting"] < len(rows)
    with pytest.raises(ValueError, match="bias-conflicting"):
        aligned = rows.copy()
        aligned[bias] = np.asarray(mapping)[aligned[label].astype(int)]
        targets.bias_use("biased-shape-bg", reads_label, aligned)
    with pytest.raises(ValueError, match="bias-conflicting"):  # and none aligned: the gap would be NaN
        conflicting = rows.copy()
        conflicting[bias] = (np.asarray(mapping)[conflicting[label].astype(int)] + 1) % 4
        targets.bias_use("biased-shape-bg", reads_label, conflicting)


# -- guidance on the shapes prior ----------------------------------------------------------------------
def test_guided_inversion_on_the_shapes_prior_lowers_the_feature_distance():
    import featinv

    x = W.load_split("single", "test", 2)[0]
    kw = dict(prior="zoo:shapes-sd", encoder="zoo:shapes-invariant", seed=0)
    guided = featinv.invert(x, method="fast", steps=6, recurrence=1, early_steps=0, **kw)
    unguided = featinv.invert(x, method="unguided", steps=6, **kw)
    assert torch.isfinite(guided.images).all() and guided.images.shape == (2, 3, 32, 32)
    assert guided.final_l2.mean() < 0.7 * unguided.final_l2.mean(), (guided.final_l2, unguided.final_l2)
