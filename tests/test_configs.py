"""Every YAML in configs/ parses with the CLI, and every method it names builds."""
from pathlib import Path

import pytest
import yaml

from featinv.cli import main
from featinv.methods import make_method

CONFIGS = sorted(str(p) for p in Path(__file__).resolve().parents[1].glob("configs/**/*.yaml")
                 if p.parent.name != "sweeps" and not p.name.startswith("hierarchy_"))  # sweeps, DiffEx hierarchies


def test_there_are_configs():
    assert any(c.endswith("quickstart.yaml") for c in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: Path(p).relative_to(Path(p).parents[1]).as_posix())
def test_config_parses_and_methods_build(path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "-c", path, "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model, data = (printed[k].get("init_args", printed[k]) for k in ("model", "data"))
    assert printed["model"]["class_path"].startswith("featinv.") and data
    if printed["model"]["class_path"] == "featinv.module.InversionModule":
        assert model["encoder"] and data["datasets"]
    raw = yaml.safe_load(Path(path).read_text())["model"]
    if not printed["model"]["class_path"].endswith("InversionModule"):
        return  # an explainer's ``methods`` name its own arms (depict, oracle, ...), not inversion methods
    for spec in raw.get("methods") or raw.get("init_args", {}).get("methods") or ["fast"]:
        method = make_method(spec)
        assert method.name == (spec if isinstance(spec, str) else spec.get("name", spec["preset"]))
        for k, v in ({} if isinstance(spec, str) else spec).items():  # every YAML value reaches the method
            if k not in ("preset", "name"):
                got = getattr(method, k)
                assert (list(got) if isinstance(got, tuple) else got) == v, (k, got, v)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: Path(p).relative_to(Path(p).parents[1]).as_posix())
def test_encoder_spec_options_reach_the_builder(path, monkeypatch):
    """The encoder's ``?key=value`` options arrive, typed, at its family's builder (real weights are
    not available offline, so the builder is replaced by a recorder)."""
    from featinv.specs import ENCODERS, build_encoder, parse_spec

    model = yaml.safe_load(Path(path).read_text())["model"]
    model = model.get("init_args", model)
    if "encoder" not in model:
        pytest.skip("an explainer config without an encoder (its classifiers are data items)")
    spec = model["encoder"]
    parsed = parse_spec(spec)
    ENCODERS.builder(parsed.family)  # import the family's module
    seen = {}

    def record(name, layer=None, **kw):
        seen.update(name=name, layer=layer, **kw)

    monkeypatch.setitem(ENCODERS.families, parsed.family, record)
    build_encoder(spec)
    assert seen == {"name": parsed.name, "layer": parsed.layer, **parsed.options}
    if "quantize=true" in spec:
        assert seen["quantize"] is True


SWEEPS = sorted(str(p) for p in Path(__file__).resolve().parents[1].glob("configs/sweeps/*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: Path(p).stem)
def test_every_sweep_value_gives_a_valid_config(path, capsys):
    import json

    sweep = yaml.safe_load(Path(path).read_text())
    cmd = sweep["command"]
    assert cmd[:3] == ["featinv", "predict", "-c"] and cmd[-1] == "${args}" and sweep["program"] == "featinv"
    values = sweep["parameters"]["model.methods"]["values"]
    assert len(values) >= 3
    for value in values:
        with pytest.raises(SystemExit) as e:
            main([*cmd[1:-1], f"--model.methods={value}", "--print_config"])
        assert e.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["init_args"]["methods"] == json.loads(value)
        assert printed["data"]["init_args"]["datasets"][0]["init_args"]["split"] == "val"
        assert [make_method(m).name for m in json.loads(value)]


def test_cli_usage_and_methods(capsys):
    with pytest.raises(SystemExit, match="usage"):
        main(["fit"])
    main(["methods"])
    assert {"shirahama2025", "fast", "unguided", "dps", "mpgd"} <= set(capsys.readouterr().out.split())
