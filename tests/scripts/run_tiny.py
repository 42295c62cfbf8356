"""Run a tiny inversion job (tiny random models, feature targets) for the reliability tests.

    python run_tiny.py OUT [--devices N] [--batch-size B] [--kill-after K] [--n 10]

--kill-after K hard-kills the process (os._exit) right after the K-th batch has been written.
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from conftest import TinyCNN, tiny_unet_and_scheduler  # noqa: E402
from featinv.callbacks import RunLogger, PredictionWriter  # noqa: E402
from featinv.data import FeatureTargets, TargetDataModule  # noqa: E402
from featinv.encoders import Encoder  # noqa: E402
from featinv.module import InversionModule  # noqa: E402
from featinv.priors import PixelPrior  # noqa: E402


class KillAfter(L.Callback):
    def __init__(self, k):
        self.k, self.n = k, 0

    def on_predict_batch_end(self, *args, **kwargs):
        self.n += 1
        if self.n == self.k:
            os._exit(3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--kill-after", type=int, default=0)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--wandb", action="store_true", help="log to an offline W&B run under OUT/wandb")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(1)
    model = TinyCNN()
    model(torch.zeros(1, 1, 8, 8))
    enc = Encoder(model, "penultimate", input_size=8, in_chans=1, name="tiny-cnn")
    feats = os.path.join(a.out, "targets.pt")
    if not os.path.exists(feats):
        os.makedirs(a.out, exist_ok=True)
        torch.manual_seed(7)
        torch.save({"features": enc(torch.rand(a.n, 1, 8, 8)).detach(), "labels": torch.arange(a.n)}, feats)
    module = InversionModule(prior=PixelPrior(*tiny_unet_and_scheduler()), encoder=enc, progress=False,
                             methods=[{"preset": "fast", "steps": 4, "recurrence": 1, "early_steps": 0},
                                      {"preset": "unguided", "steps": 4}])
    callbacks = [PredictionWriter(os.path.join(a.out, "out")), RunLogger()]
    # the writer comes first: a kill after batch K leaves K batches written
    callbacks += [KillAfter(a.kill_after)] if a.kill_after else []
    logger = False
    if a.wandb:
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(save_dir=a.out, project="featinv-test", mode="offline")
    trainer = L.Trainer(accelerator="cpu", devices=a.devices, strategy="ddp" if a.devices > 1 else "auto",
                        inference_mode=False, logger=logger, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=callbacks, default_root_dir=a.out)
    trainer.predict(module, datamodule=TargetDataModule([FeatureTargets(feats, name="f")], batch_size=a.batch_size),
                    return_predictions=False)
    if a.wandb and trainer.is_global_zero:
        print("WANDB_DIR", os.path.dirname(logger.experiment.dir))
        import wandb

        wandb.finish()  # flush the summary before the process (and its DDP workers) exits


if __name__ == "__main__":
    main()
