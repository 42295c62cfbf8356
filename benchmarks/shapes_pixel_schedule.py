"""Does the noise schedule decide whether the pixel-space shapes prior learns the position words?

    HF_HUB_OFFLINE=1 python benchmarks/shapes_pixel_schedule.py --pixel-dir DIR [--steps 1000] [--work W]

The committed study (docs/design.md, "The pixel-space fallback") trained ``shapes-pixel`` with cosine betas
(rescaled to zero terminal SNR) for 3,000 steps, and it never used the position words. This trains the same UNet,
data, captions and loss for ``--steps`` steps with ``shapes-sd``'s schedule instead (SD's scaled-linear betas
rescaled to zero terminal SNR, v prediction, trailing steps: a falls below 0.02 at t ~ 790 instead of ~ 905) and
compares it with the cosine prior in ``--pixel-dir`` by (1) ``train_sd.conditioning_probe`` in x0 space at
t = 800, 900, 950, 990 (relative change of x0-hat when one factor's words change) and (2) the reader's read-back
of 256 validation captions (``shapes_prior.py``'s val seeds, DDIM 25, CFG 1.5). A diagnostic, not a tuned
prior: the shorter run is the point (if it uses position words after a third of the steps, the schedule is why
the cosine run did not). Writes ``benchmarks/results/shapes_pixel_schedule.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import commit  # noqa: E402
from shapes_prior import seeds, single_acc  # noqa: E402

from featinv.zoo.shapes import reader as R  # noqa: E402
from featinv.zoo.shapes import sd as S  # noqa: E402
from featinv.zoo.shapes import train_sd  # noqa: E402
from featinv.zoo.shapes import world as W  # noqa: E402
from featinv.zoo.shapes.train import CONFIG  # noqa: E402

TIMESTEPS = (800, 900, 950, 990)
SD_SCHEDULE = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")


def measure(folder: Path, reader, n_val: int) -> dict:
    pipe = S.load_pipeline(folder)
    probe = {t: train_sd.conditioning_probe(pipe.unet, pipe.text_encoder, pipe.tokenizer, t=t, sched=pipe.scheduler,
                                            space="x0") for t in TIMESTEPS}
    _, rv = W.load_split("single", "val", n_val)
    img = S.generate(pipe, W.captions(rv), seeds=seeds("val", n_val, 0), cfg_scale=1.5, steps=25)
    return dict(probe=probe, val=single_acc(img, rv, reader),
                a_below_0_02_from_t=int((pipe.scheduler.alphas_cumprod < 0.02).nonzero()[0]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pixel-dir", type=Path, required=True, help="the cosine shapes-pixel folder (the stage's output)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--n-val", type=int, default=256)
    ap.add_argument("--work", type=Path, default=Path("outputs/shapes_pixel_schedule"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "shapes_pixel_schedule.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    c = CONFIG["shapes-pixel"]
    folder, info = train_sd.train_unet("shapes-pixel", "single", a.work, seed=c["seed_offset"], steps=a.steps,
                                       batch=c["batch"], lr=c["lr"], n_train=c["n"], ema_decay=c["ema_decay"],
                                       snr_gamma=c["snr_gamma"], scheduler=SD_SCHEDULE)
    reader = R.load_reader()
    res = {"cosine (the stage, 3,000 steps)": measure(a.pixel_dir, reader, a.n_val),
           f"shapes-sd's schedule ({a.steps} steps)": dict(measure(folder, reader, a.n_val),
                                                          train_wall_seconds=info["wall_seconds"])}
    cmd = "HF_HUB_OFFLINE=1 python benchmarks/shapes_pixel_schedule.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["# Pixel-space shapes prior: which noise schedule learns the position words\n",
             f"Commit `{commit()}`; command `{cmd}`; {platform.machine()}, torch threads {a.threads}; wall "
             f"{(time.time() - t0) / 60:.1f} min. Same UNet (`sd.PIXEL_UNET_CONFIG`), data, captions, loss, lr, batch "
             f"and seed ({c['seed_offset']}) as the `shapes-pixel` stage; only the schedule and the step count differ. "
             "Probe: relative change of x0-hat when one factor's words change (train_sd.conditioning_probe, 16 noise "
             f"draws); val: reader read-back of {a.n_val} validation captions, DDIM 25, CFG 1.5.\n",
             "| prior | a < 0.02 from t | " + " | ".join(f"position / shape / colour probe, t = {t}" for t in TIMESTEPS)
             + " | val " + " | val ".join(W.FACTORS) + " |", "|---" * (2 + len(TIMESTEPS) + len(W.FACTORS)) + "|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['a_below_0_02_from_t']} | " + " | ".join(
            f"{r['probe'][t]['position']} / {r['probe'][t]['shape']} / {r['probe'][t]['color']}" for t in TIMESTEPS)
            + " | " + " | ".join(str(r["val"][f]) for f in W.FACTORS) + " |")
    a.out.write_text("\n".join(lines) + "\n")
    a.out.with_suffix(".json").write_text(json.dumps({k: {**v, "probe": {str(t): p for t, p in v["probe"].items()}}
                                                      for k, v in res.items()}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
