"""Experiment (val only): does fine-tuning only the VAE *decoder* of ``zoo:shapes-sd`` lift its shape ceiling?
(It did; the training stage ``shapes-vae-dec`` now makes shapes-sd's decoder this way: this script decided it.)

    HF_HUB_OFFLINE=1 python benchmarks/shapes_vae_decoder.py [--steps 2400] [--lr 3e-4] [--object-weight 10]

The VAE reconstructs small stars as squares (shape read 0.93 on test reconstructions, target >= 0.97). Its
encoder, ``quant_conv`` and scaling factor stay fixed, so the latents the UNets were trained on are
unchanged; the decoder (and ``post_quant_conv``) is trained with the VAE's own loss, the third phase the VAE
stage configured and never ran: object-weighted (MSE + L1), object weight ``--object-weight`` x the
small-object boost clamp(64 px / area, 1, 4), on the same 30k single + 10k multi train renders, warmup +
cosine, AdamW, batch 64, data order seed 100. Measured on validation only (this is a decision, not a report):
the reader on 1,024 val reconstructions (posterior mean) and on the 256 val captions of shapes_prior.py generated
by ``shapes-sd`` (DDIM 25, its seeds) decoded by the stored and by the fine-tuned decoder (float16, as stored).
Writes ``benchmarks/results/shapes_vae_decoder.{md,json}``; the weights stay in ``--out`` (not committed).
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
from shapes_prior import seeds, single_acc  # noqa: E402

from featinv.zoo.shapes import reader as R  # noqa: E402
from featinv.zoo.shapes import sd as S  # noqa: E402
from featinv.zoo.shapes import train_sd  # noqa: E402
from featinv.zoo.shapes import world as W  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--object-weight", type=float, default=10.0)
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/shapes_vae_decoder"), help="where the decoder is saved")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    reader = R.load_reader(S.WEIGHTS_DIR)
    pipe = S.load_pipeline(S.sd_dir("shapes-sd"))
    xv, rv = W.load_split("single", "val", 1024)
    _, rc = W.load_split("single", "val", 256)
    from diffusers import AutoencoderKL

    def scores(vae) -> dict:
        """Reader accuracies of val reconstructions and of val captions generated with ``vae`` as the decoder
        (same seeds: the latents are the same, only the decoding differs)."""
        pipe.vae = vae
        out = dict(reconstruction=single_acc(train_sd.reconstruct(vae, xv), rv, reader))
        for c in args.cfg:
            img = S.generate(pipe, W.captions(rc), seeds=seeds("val", len(rc), 0), cfg_scale=c, steps=25)
            out[f"generated_cfg{c:g}"] = single_acc(img, rc, reader)
        return out

    base = S.sd_dir("shapes-multi-sd") / "vae"  # the shapes-vae stage's VAE (shapes-sd's is now this fine-tune)
    res = dict(stored=scores(AutoencoderKL.from_pretrained(str(base), local_files_only=True).float().eval()))
    print("stored decoder:", res["stored"], flush=True)
    vae = AutoencoderKL.from_pretrained(str(base), local_files_only=True).float()
    enc_before = [p.detach().clone() for p in [*vae.encoder.parameters(), *vae.quant_conv.parameters()]]
    final_loss = train_sd.finetune_vae_decoder(vae, steps=args.steps, lr=args.lr, object_weight=args.object_weight,
                                               batch=64, seed=100, n_single=30000, n_multi=10000)["final_loss"]
    assert all(torch.equal(a, b) for a, b in zip(enc_before, [*vae.encoder.parameters(), *vae.quant_conv.parameters()]))
    half = S.half_copy(vae)
    half.save_pretrained(str(args.out), safe_serialization=True)
    res["finetuned"] = scores(AutoencoderKL.from_pretrained(str(args.out), local_files_only=True).float().eval())
    print("fine-tuned decoder:", res["finetuned"], flush=True)
    res.update(steps=args.steps, lr=args.lr, object_weight=args.object_weight, final_loss=round(final_loss, 5),
               commit=commit(), command="python " + shlex.join(sys.argv), threads=args.threads,
               machine=f"{platform.machine()}, {os.cpu_count()} cores", torch=torch.__version__,
               wall_seconds=round(time.time() - t_start, 1))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "shapes_vae_decoder.json").write_text(json.dumps(res, indent=1))
    rows = [("reconstructions of 1,024 val renders", "reconstruction")] + \
        [(f"256 val captions generated by shapes-sd, CFG {c:g}", f"generated_cfg{c:g}") for c in args.cfg]
    lines = ["# Decoder-only fine-tune of the shapes VAE (validation only; not committed)\n",
             f"Commit `{res['commit']}`; command `{res['command']}`; {res['machine']}, torch threads {args.threads}, "
             f"torch {res['torch']}; wall {res['wall_seconds'] / 60:.1f} min. Decoder + post_quant_conv trained "
             f"{args.steps} steps (lr {args.lr}, object weight {args.object_weight} x small-object boost, batch 64, "
             "data-order seed 100); encoder, quant_conv and scaling factor unchanged (asserted). "
             "See the module docstring of `benchmarks/shapes_vae_decoder.py`.\n",
             "| images | shape read, stored decoder | shape read, fine-tuned decoder | other factors (both) |",
             "|---|---|---|---|"]
    for label, key in rows:
        a, b = res["stored"][key], res["finetuned"][key]
        others = min(min(a[f] for f in W.FACTORS if f != "shape"), min(b[f] for f in W.FACTORS if f != "shape"))
        lines.append(f"| {label} | {a['shape']:.3f} | {b['shape']:.3f} | >= {others:.3f} |")
    (args.results / "shapes_vae_decoder.md").write_text("\n".join(lines) + "\n")
    return res


if __name__ == "__main__":
    main()
