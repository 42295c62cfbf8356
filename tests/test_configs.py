"""Every YAML in configs/ parses with the CLI, and every method it names builds."""
from pathlib import Path

import pytest
import yaml

from featinv.cli import main
from featinv.methods import make_method

CONFIGS = sorted(str(p) for p in Path(__file__).resolve().parents[1].glob("configs/**/*.yaml"))


def test_there_are_configs():
    assert any(c.endswith("quickstart.yaml") for c in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: Path(p).relative_to(Path(p).parents[1]).as_posix())
def test_config_parses_and_methods_build(path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "-c", path, "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["encoder"] and printed["data"]["datasets"]
    for spec in yaml.safe_load(Path(path).read_text())["model"].get("methods") or ["fast"]:
        assert make_method(spec).name


def test_cli_usage_and_methods(capsys):
    with pytest.raises(SystemExit, match="usage"):
        main(["fit"])
    main(["methods"])
    assert {"shirahama2025", "fast", "unguided", "dps", "mpgd"} <= set(capsys.readouterr().out.split())
