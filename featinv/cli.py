"""``featinv``: LightningCLI over InversionModule + TargetDataModule.

    featinv predict -c configs/quickstart.yaml           # run a config
    featinv predict -c configs/quickstart.yaml --print_config
    featinv methods                                      # list method presets
    featinv layers zoo:digits-cnn                        # list an encoder's layer names

Top-level options: ``--output_dir`` (results.jsonl, samples/, grids/, wandb/) and ``--wandb.*``
(mode offline|online|disabled, project, name, group, tags). Set ``trainer.logger`` to use another
logger instead of W&B.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field

os.environ.setdefault("WANDB_SILENT", "true")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from featinv.callbacks import InversionLogger, PredictionWriter  # noqa: E402
from featinv.data import TargetDataModule  # noqa: E402
from featinv.module import InversionModule  # noqa: E402

__all__ = ["FeatinvCLI", "WandbSettings", "main"]


@dataclass
class WandbSettings:
    """Weights & Biases run settings (offline by default: sync later with `wandb sync`)."""

    mode: str = "offline"  # offline | online (falls back to offline without credentials) | disabled
    project: str = "featinv"
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


class FeatinvCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("trainer_defaults", {"inference_mode": False, "enable_checkpointing": False,
                                               "enable_model_summary": False, "devices": 1})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(InversionModule, TargetDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--output_dir", type=str, default="outputs/featinv",
                            help="where results.jsonl, samples/, grids/ and the W&B run go")
        parser.add_class_arguments(WandbSettings, "wandb")
        parser.link_arguments("output_dir", "trainer.default_root_dir")
        parser.link_arguments("seed_everything", "model.seed")

    def instantiate_trainer(self, **kwargs):
        out = self._get(self.config_init, "output_dir")
        wb: WandbSettings = self._get(self.config_init, "wandb")
        cfg = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if cfg.get("logger") in (None, True):
            cfg["logger"] = make_wandb_logger(out, wb) if wb.mode != "disabled" else False
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        extra += [PredictionWriter(out), InversionLogger()]
        return self._instantiate_trainer(cfg, extra)

    def after_predict(self) -> None:
        out = self._get(self.config_init, "output_dir")
        print(f"\nfeatinv: results  -> {os.path.join(out, 'results.jsonl')}\n"
              f"         images   -> {os.path.join(out, 'samples')}/ , grids -> {os.path.join(out, 'grids')}/")
        for lg in self.trainer.loggers:
            run_dir = getattr(getattr(lg, "experiment", None), "dir", None)
            if run_dir:
                print(f"         {type(lg).__name__} run -> {os.path.dirname(run_dir)}")
        _print_summary(os.path.join(out, "results.jsonl"))


def make_wandb_logger(output_dir: str, wb: WandbSettings):
    """A WandbLogger writing under output_dir; ``online`` without credentials falls back to offline."""
    from lightning.pytorch.loggers import WandbLogger

    os.makedirs(output_dir, exist_ok=True)
    if wb.mode not in ("online", "offline"):
        raise ValueError(f"wandb.mode must be online, offline or disabled, got {wb.mode!r}")
    if wb.mode == "online" and not _wandb_credentials():
        warnings.warn("featinv: wandb.mode=online but no W&B API key is configured (WANDB_API_KEY or "
                      "`wandb login`): logging offline instead; upload later with `wandb sync`.", stacklevel=2)
        wb = WandbSettings(**{**wb.__dict__, "mode": "offline"})
    # `mode` goes to wandb.init; WandbLogger(offline=True) would set WANDB_MODE process-wide.
    # init_timeout bounds the wait for an unreachable server; results are written locally regardless
    return WandbLogger(save_dir=output_dir, project=wb.project, name=wb.name, group=wb.group,
                       tags=list(wb.tags) or None, mode=wb.mode, settings={"init_timeout": 60})


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _print_summary(path: str) -> None:
    import json
    from collections import defaultdict

    if not os.path.exists(path):
        return
    agg, skipped = defaultdict(list), 0
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "skipped" in r:
                skipped += 1
                continue
            agg[(r["dataset"], r["method"])].append(r)
    print(f"\n{'dataset':<16}{'method':<16}{'n':>5}{'final_cos':>11}{'best_cos':>10}{'nfe':>7}{'s/img':>8}")
    for (d, m), rs in sorted(agg.items()):
        n = len(rs)
        print(f"{d:<16}{m:<16}{n:>5}{sum(r['final_cos'] for r in rs) / n:>11.4f}"
              f"{sum(r['best_cos'] for r in rs) / n:>10.4f}{rs[0]['nfe']:>7}{sum(r['seconds'] for r in rs) / n:>8.3f}")
    if skipped:
        print(f"{skipped} record(s) skipped (see 'skipped' in results.jsonl)")


def _layers(argv: list[str]) -> None:
    from featinv.encoders import build_encoder, list_layers

    if not argv:
        sys.exit("usage: featinv layers <encoder spec>, e.g. featinv layers zoo:digits-cnn")
    enc = build_encoder(argv[0])
    try:
        print("\n".join(list_layers(enc.model)))
    except BrokenPipeError:  # `featinv layers ... | head`
        sys.stderr.close()


USAGE = """usage: featinv predict -c CONFIG.yaml [--key value ...]   run inversions (--help for all options)
       featinv methods                                   list method presets
       featinv layers ENCODER_SPEC                       list an encoder's layer names"""


def main(args=None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "layers":
        return _layers(rest)
    if command == "methods":
        from featinv.guidance import list_methods

        print("\n".join(list_methods()))
        return None
    if command != "predict":
        sys.exit(USAGE)
    # Predictions are written by PredictionWriter as batches finish, never kept in memory.
    with warnings.catch_warnings():  # "args and sys.argv both given": we strip the subcommand on purpose
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = FeatinvCLI(args=rest, run=False)
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    cli.after_predict()
    return None


if __name__ == "__main__":
    main()
