"""``featinv``: LightningCLI over InversionModule + TargetDataModule.

    featinv predict -c configs/quickstart.yaml           # run a config
    featinv predict -c configs/quickstart.yaml --print_config
    featinv methods                                      # list method presets
    featinv layers zoo:digits-cnn                        # list an encoder's layer names
    featinv report outputs/a outputs/b --out report      # compare results directories (Markdown + CSV)

Top-level options: ``--output_dir`` (results.jsonl, samples/, grids/, wandb/; ``--trainer.
default_root_dir`` is an alias), ``--resume auto|new_run`` (a directory written by another
configuration is refused, or continued in a new ``run-<n>`` sub-directory), ``--skip_corrupt``,
``--wandb.*`` (mode offline|online|disabled, project, name, group, tags) and ``--debug`` (full
tracebacks; also ``FEATINV_DEBUG=1``). Errors print one line naming the option or file.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("WANDB_SILENT", "true")

import lightning as L  # noqa: E402
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402

from featinv import results as R  # noqa: E402
from featinv.callbacks import PredictionWriter, RunLogger  # noqa: E402
from featinv.harness import AnalysisModule  # noqa: E402

__all__ = ["FeatinvCLI", "WandbSettings", "main"]

_DIR_ENV = "FEATINV_OUTPUT_DIR"  # the resolved output directory, handed to DDP worker processes


@dataclass
class WandbSettings:
    """Weights & Biases run settings (offline by default: sync later with `wandb sync`)."""

    mode: str = "offline"  # offline | online (falls back to offline without credentials) | disabled
    project: str = "featinv"
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 30.0  # seconds to wait for the server before falling back to offline

    def __post_init__(self):
        if self.mode not in ("online", "offline", "disabled"):
            raise ValueError(f"wandb.mode must be online, offline or disabled, got {self.mode!r}")


class KeepConfigs(SaveConfigCallback):
    """Saves config.yaml; if a different one is there (a resumed run with other settings), keeps it
    and writes config.<n>.yaml, so every invocation that wrote records stays on disk. Also puts the
    config and the git commit into the logger's run config."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        log_dir = Path(trainer.log_dir)
        text = self.parser.dump(self.config, skip_none=False)
        name, n = "config.yaml", 1
        while (log_dir / name).exists() and (log_dir / name).read_text() != text:
            n += 1
            name = f"config.{n}.yaml"
        self.config_filename = name
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for lg in trainer.loggers:
            lg.log_hyperparams({"config_file": self.config_filename, "git_commit": git_commit(),
                                "model": dict(pl_module.hparams), "identity": pl_module.identity()})


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class FeatinvCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("trainer_defaults", {"inference_mode": False, "enable_checkpointing": False,
                                               "enable_model_summary": False, "devices": 1})
        kwargs.setdefault("save_config_callback", KeepConfigs)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        # Any featinv AnalysisModule (inversion by default; explainers under featinv.explain) and any
        # LightningDataModule (TargetDataModule by default): `model: {class_path: ..., init_args: ...}`.
        super().__init__(AnalysisModule, L.LightningDataModule, *args, subclass_mode_model=True,
                         subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--output_dir", type=str | None, default=None,
                            help="where results.jsonl, samples/, grids/ and the W&B run go (default outputs/featinv)")
        parser.add_argument("--resume", type=str, default="auto",
                            help="auto: continue a directory written by the same configuration, refuse another; "
                                 "new_run: write another configuration's results into <output_dir>/run-<n>")
        parser.add_argument("--skip_corrupt", type=bool, default=False,
                            help="skip (and report) corrupt lines of an existing results.jsonl instead of refusing")
        parser.add_class_arguments(WandbSettings, "wandb")
        parser.set_defaults({"model": {"class_path": "featinv.module.InversionModule"},
                             "data": {"class_path": "featinv.data.TargetDataModule"}})
        parser.link_arguments("seed_everything", "model.init_args.seed")

    def output_dir(self) -> str:
        out = self._get(self.config_init, "output_dir")
        root = self._get(self.config_init, "trainer", default={}).get("default_root_dir")
        if out and root and os.path.abspath(out) != os.path.abspath(root):
            raise ValueError(f"--output_dir {out} and --trainer.default_root_dir {root} differ: give one "
                             "(trainer.default_root_dir is an alias of output_dir)")
        return out or root or "outputs/featinv"

    def instantiate_trainer(self, **kwargs):
        resume = self._get(self.config_init, "resume")
        if resume not in ("auto", "new_run"):
            raise ValueError(f"--resume must be auto or new_run, got {resume!r}")
        out = os.environ.get(_DIR_ENV) if os.environ.get("LOCAL_RANK", "0") != "0" else None
        if out is None:  # the launching process resolves the directory once; DDP workers inherit it
            out = str(R.check_run(Path(self.output_dir()), self.model.identity(), self.model.method_configs(),
                                  new_run=resume == "new_run"))
            os.environ[_DIR_ENV] = out
        self.resolved_output_dir = out
        wb: WandbSettings = self._get(self.config_init, "wandb")
        cfg = {**self._get(self.config_init, "trainer", default={}), **kwargs, "default_root_dir": out}
        if cfg.get("logger") in (None, True):
            cfg["logger"] = make_wandb_logger(out, wb) if wb.mode != "disabled" else False
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        extra += [PredictionWriter(out, skip_corrupt=self._get(self.config_init, "skip_corrupt")),
                  RunLogger(out)]
        return self._instantiate_trainer(cfg, extra)

    def after_predict(self) -> None:
        if not self.trainer.is_global_zero:
            return
        out = self.resolved_output_dir
        print(f"\nfeatinv: results  -> {os.path.join(out, R.RESULTS)}\n"
              f"         images   -> {os.path.join(out, R.SAMPLES)}/ , grids -> {os.path.join(out, R.GRIDS)}/")
        for lg in self.trainer.loggers:
            run_dir = getattr(getattr(lg, "experiment", None), "dir", None)
            if run_dir:
                run_dir = os.path.dirname(run_dir)
                print(f"         {type(lg).__name__} run -> {run_dir}")
                if "offline-run" in run_dir:
                    print(f"         upload it with: wandb sync {run_dir}")
        if any(isinstance(lg, WandbLogger) for lg in self.trainer.loggers):
            import wandb

            wandb.finish()  # flush summary and history before the process exits
        records = R.read_dir(Path(out))
        extra = sorted({k for r in records for k in r if k.startswith("eval/")})
        extra += list(getattr(self.model, "summary_fields", ()))  # an explainer's own headline numbers
        print("\n" + R.summary_table(records, extra=extra))


def make_wandb_logger(output_dir: str, wb: WandbSettings):
    """A WandbLogger under output_dir that continues the directory's W&B run (its id is kept in
    run.json); ``online`` without credentials, or with a server that cannot be reached, falls
    back to offline with a warning (local results are written either way)."""
    os.makedirs(output_dir, exist_ok=True)
    mode = wb.mode
    if mode == "online" and not _wandb_credentials():
        warnings.warn("featinv: wandb.mode=online but no W&B API key is configured (WANDB_API_KEY or "
                      "`wandb login`): logging offline instead; upload later with `wandb sync`.", stacklevel=2)
        mode = "offline"
    run_id = R.read_run(output_dir).get("wandb_id")
    if run_id is None:
        run_id = secrets.token_hex(4)
        if os.environ.get("LOCAL_RANK", "0") == "0":
            R.update_run(output_dir, wandb_id=run_id)
    return FallbackWandbLogger(save_dir=output_dir, project=wb.project, name=wb.name, group=wb.group,
                               tags=list(wb.tags) or None, mode=mode, id=run_id, resume="allow",
                               settings={"init_timeout": wb.init_timeout})


class FallbackWandbLogger(WandbLogger):
    """A WandbLogger whose ``experiment`` falls back to an offline run if wandb.init fails."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._wandb_init.pop("anonymous", None)  # deprecated in wandb: passing None still warns

    @property
    def experiment(self):
        try:
            return super().experiment
        except Exception as e:  # CommError, timeouts: the server refused or cannot be reached
            if self._wandb_init.get("mode") == "offline":
                raise
            warnings.warn(f"featinv: W&B online run failed ({type(e).__name__}: {str(e)[:120]}); logging "
                          "offline instead; upload later with `wandb sync`.", stacklevel=2)
            import wandb

            wandb.teardown()  # the failed online attempt still holds the run id in wandb's service
            self._wandb_init["mode"] = "offline"
            self._experiment = None
            return super().experiment


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _layers(argv: list[str]) -> None:
    from featinv.encoders import list_layers
    from featinv.specs import build_encoder

    if not argv:
        sys.exit("usage: featinv layers <encoder spec>, e.g. featinv layers zoo:digits-cnn")
    enc = build_encoder(argv[0])
    try:
        print("\n".join(list_layers(enc.model)))
    except BrokenPipeError:  # `featinv layers ... | head`
        sys.stderr.close()


def _report(argv: list[str]) -> None:
    import argparse

    from featinv.report import compare, load, to_csv, to_markdown

    ap = argparse.ArgumentParser(prog="featinv report", description="One comparison table (encoder x method: "
                                 "cosine, evaluator scores, retention, NFE, s/image) over results directories.")
    ap.add_argument("dirs", nargs="+", help="featinv output directories")
    ap.add_argument("--out", help="write OUT.md and OUT.csv (default: print Markdown only)")
    ap.add_argument("--wandb", action="store_true", help="also log the table to a W&B run (offline unless configured)")
    ap.add_argument("--project", default="featinv")
    a = ap.parse_args(argv)
    cols, rows = compare(load(a.dirs))
    md = to_markdown(cols, rows)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out + ".md").write_text(md)
        Path(a.out + ".csv").write_text(to_csv(cols, rows))
        print(f"featinv: report -> {a.out}.md, {a.out}.csv")
    print(md)
    if a.wandb:
        import wandb

        run = wandb.init(project=a.project, job_type="report", config={"dirs": a.dirs})
        run.log({"report": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})
        run.finish()


USAGE = """usage: featinv predict -c CONFIG.yaml [--key value ...]   run inversions (--help for all options)
       featinv methods                                   list method presets
       featinv layers ENCODER_SPEC                       list an encoder's layer names
       featinv report DIR [DIR ...] [--out PATH]          one comparison table over results directories
       add --debug (or FEATINV_DEBUG=1) to any command for full tracebacks"""


def _quiet_startup() -> None:
    """Silence start-up noise that featinv's own choices cause: Lightning's litlogger tip (featinv
    logs to W&B), its pytree deprecation warning, W&B's 'anonymous' warning (see FallbackWandbLogger)."""
    import logging

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def _sigterm(signum, frame):
    """SIGTERM (``timeout``, schedulers) stops a run as Ctrl-C does: promptly, results kept."""
    raise KeyboardInterrupt(f"signal {signum}")


def _predict(rest: list[str]) -> None:
    _quiet_startup()
    # Predictions are written by PredictionWriter as batches finish, never kept in memory.
    with warnings.catch_warnings():  # "args and sys.argv both given": we strip the subcommand on purpose
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = FeatinvCLI(args=rest, run=False)
    signal.signal(signal.SIGTERM, _sigterm)  # Lightning chains its own SIGTERM handler before this one
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    cli.after_predict()


def main(args=None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    debug = "--debug" in argv or os.environ.get("FEATINV_DEBUG", "0") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    try:
        if command == "layers":
            return _layers(rest)
        if command == "report":
            return _report(rest)
        if command == "methods":
            from featinv.methods import list_methods

            print("\n".join(list_methods()))
            return None
        if command != "predict":
            sys.exit(USAGE)
        _predict(rest)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # a user error (bad option, missing file, unknown name): one line, no traceback
        if debug:
            raise
        while e.__cause__ is not None:  # jsonargparse wraps a failed instantiation: the cause says why
            e = e.__cause__
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"featinv: error: {msg}\n(run again with --debug for the traceback)", file=sys.stderr)
        sys.exit(2)
    return None


if __name__ == "__main__":
    main()
