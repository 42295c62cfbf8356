"""At which noise level does the shapes prior decide an object's shape, and can it draw the shape there?

    HF_HUB_OFFLINE=1 python benchmarks/shapes_prior_sdedit.py [--n 256] [--cfg 1.5] \
        [--folder committed=featinv/zoo/weights/shapes-sd --folder NAME=DIR ...]

SDEdit (Meng et al. 2022) on ``--n`` validation renders: encode each with the prior's VAE, noise the latent to
the DDIM step that leaves a fraction ``frac`` of the ``--steps`` steps (frac 1: pure noise, i.e. generation
from the caption), and denoise with classifier-free guidance from

* the render's own caption: is the shape still read as the render's (the VAE reconstruction is the ceiling)?
* the caption with the shape word swapped (square -> circle -> triangle -> star -> square): is the new shape
  drawn, or the old one kept?

The reader (never part of the prior) reads the shapes. Each image has its own noise seed (``SEED_BASE`` +
row index), the same for every folder, level and caption. Writes ``benchmarks/results/shapes_prior_sdedit.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import commit  # noqa: E402

from featinv.zoo.shapes import reader as R  # noqa: E402
from featinv.zoo.shapes import sd as S  # noqa: E402
from featinv.zoo.shapes import world as W  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SEED_BASE = 90_000  # per-image noise seed = SEED_BASE + row index (disjoint from the other prior benchmarks')
FRACS = (0.2, 0.4, 0.6, 0.8, 1.0)


@torch.no_grad()
def sdedit(unet, sched, z0: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor, unc: torch.Tensor, start: int,
           cfg_scale: float) -> torch.Tensor:
    """Denoise z0 noised to ``sched.timesteps[start]`` (DDIM, eta 0, CFG) back to a clean latent; ``sched`` has
    its timesteps set. At the zero-terminal-SNR step t = T the noised latent is the noise itself."""
    ts = sched.timesteps[start:]
    a = sched.alphas_cumprod[ts[0]]
    z = a.sqrt() * z0 + (1 - a).sqrt() * noise
    for t in ts:
        tt = t.expand(len(z))
        e_u, e_c = unet(torch.cat([z, z]), torch.cat([tt, tt]), encoder_hidden_states=torch.cat([unc, cond])).sample.chunk(2)
        z = sched.step(e_u + cfg_scale * (e_c - e_u), t, z).prev_sample
    return z


def swap_shape(rows):
    out = rows.copy()
    out["shape"] = (out["shape"] + 1) % len(W.SHAPES)
    return out


def evaluate(folder: Path, rows, x: torch.Tensor, reader, cfg_scale: float, steps: int) -> dict:
    from diffusers import DDIMScheduler

    pipe = S.load_pipeline(folder)
    vae, sc = pipe.vae, pipe.vae.config.scaling_factor
    decode = lambda z: (vae.decode(z / sc).sample / 2 + 0.5).clamp(0, 1)  # noqa: E731
    shape_acc = lambda img, r: R.factor_accuracy(reader, img, r)["shape"]  # noqa: E731
    with torch.no_grad():
        z0 = vae.encode(x * 2 - 1).latent_dist.mean * sc
        res = {"vae_reconstruction": shape_acc(decode(z0), rows)}
    sched = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    noise = torch.stack([torch.randn(z0.shape[1:], generator=torch.Generator().manual_seed(SEED_BASE + i))
                         for i in range(len(z0))])
    swapped = swap_shape(rows)
    unc = S.encode_captions(pipe.text_encoder, pipe.tokenizer, [""]).expand(len(z0), -1, -1)
    own = S.encode_captions(pipe.text_encoder, pipe.tokenizer, W.captions(rows))
    other = S.encode_captions(pipe.text_encoder, pipe.tokenizer, W.captions(swapped))
    res["levels"] = []
    for frac in FRACS:
        start = int(round((1 - frac) * steps))
        a = decode(sdedit(pipe.unet, sched, z0, noise, own, unc, start, cfg_scale))
        b = decode(sdedit(pipe.unet, sched, z0, noise, other, unc, start, cfg_scale))
        res["levels"].append(dict(frac=frac, t=int(sched.timesteps[start]), own_caption_kept=shape_acc(a, rows),
                                  swapped_caption_followed=shape_acc(b, swapped),
                                  swapped_caption_kept_old=shape_acc(b, rows)))
        print(folder, res["levels"][-1], flush=True)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256, help="validation renders")
    ap.add_argument("--cfg", type=float, default=1.5, help="CFG scale (1.5: shapes_prior.py's choice on val)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--folder", action="append", default=None, metavar="NAME=DIR",
                    help="an SD folder to test (repeatable); default: the committed shapes-sd")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    specs = args.folder or [f"committed={S.sd_dir('shapes-sd')}"]
    bad = [f for f in specs if "=" not in f]
    if bad:
        ap.error(f"--folder {bad[0]!r}: expected NAME=DIR")
    folders = dict(f.split("=", 1) for f in specs)
    for name, d in folders.items():
        if not (Path(d) / "model_index.json").is_file():
            ap.error(f"--folder {name}={d}: not an SD folder (no model_index.json)")
    if not (1 <= args.n <= 4000 and args.steps >= 5):
        ap.error("--n in 1..4000 and --steps >= 5 are needed")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    x, rows = W.load_split("single", "val", args.n)
    reader = R.load_reader(S.WEIGHTS_DIR)
    res = {name: evaluate(Path(d), rows, x, reader, args.cfg, args.steps) for name, d in folders.items()}
    cmd = "HF_HUB_OFFLINE=1 python benchmarks/shapes_prior_sdedit.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    stamp = dict(commit=commit(), command=cmd.strip(), n=args.n, cfg_scale=args.cfg, ddim_steps=args.steps,
                 folders=folders, machine=f"{platform.machine()} CPU, torch threads={torch.get_num_threads()}",
                 torch=torch.__version__, wall_seconds=round(time.time() - t0, 1),
                 load_average_at_end=os.getloadavg()[0])
    write({"stamp": stamp, "results": res}, args.results)
    return res


def write(out: dict, results: Path) -> None:
    st, res = out["stamp"], out["results"]
    results.mkdir(parents=True, exist_ok=True)
    lines = ["# Shapes prior: where is shape decided? (SDEdit of validation renders)\n",
             f"Commit `{st['commit']}`; command: `{st['command']}`  ",
             f"Machine: {st['machine']} (1-min load average at the end {st['load_average_at_end']:.1f}); torch "
             f"{st['torch']}; {st['n']} validation renders, one noise seed each ({SEED_BASE} + row index); DDIM "
             f"{st['ddim_steps']} steps, CFG {st['cfg_scale']}; wall {st['wall_seconds']:.0f} s. Each render's latent is "
             "noised to the step that leaves the fraction *frac* of the steps (1.0: pure noise, generation from the "
             "caption) and denoised with its own caption, or with the shape word swapped (square → circle → triangle "
             "→ star → square). The reader reads the shape.\n"]
    for name, r in res.items():
        lines += [f"## {name} (`{st['folders'][name]}`)\n", f"VAE reconstruction, shape read: {r['vae_reconstruction']:.3f}\n",
                  "| frac | start t | own caption: shape kept | swapped word: new shape drawn | swapped word: old shape kept |",
                  "|---|---|---|---|---|"]
        lines += [f"| {lv['frac']} | {lv['t']} | {lv['own_caption_kept']:.3f} | {lv['swapped_caption_followed']:.3f} | "
                  f"{lv['swapped_caption_kept_old']:.3f} |" for lv in r["levels"]]
        lines.append("")
    (results / "shapes_prior_sdedit.md").write_text("\n".join(lines))
    (results / "shapes_prior_sdedit.json").write_text(json.dumps(out, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
