"""Settings declared once (pipeline/settings.py): the click options and the config schema derived from a
params dataclass say what the dataclass says."""

from __future__ import annotations

from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from pipeline.settings import schema_properties, setting
from stages.options import click_options, params_from


@dataclass(frozen=True)
class Example:
    channels: int = setting(15, minimum=2, help="eigenvectors")
    lr: float = setting(1e-3, exclusive_minimum=0)
    kind: str = setting("kq", choices=("kq", "vv"), option="--graph")
    layers: tuple[str, ...] = setting((), help="names or indices")
    size: int | None = setting(None, minimum=1)
    accumulate: int | str = setting("auto", minimum=1, schema={"oneOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}]})
    joined: bool = setting(False)
    device: str = setting("auto", config=False)
    workflow_only: str = setting("x", cli=False)
    not_a_setting: int = 0


def test_schema_properties_spell_type_bounds_choices_and_defaults():
    props = schema_properties(Example)
    assert list(props) == ["channels", "lr", "kind", "layers", "size", "accumulate", "joined", "workflow_only"]
    assert props["channels"] == {"type": "integer", "minimum": 2, "default": 15, "description": "eigenvectors"}
    assert props["lr"] == {"type": "number", "exclusiveMinimum": 0, "default": 1e-3}
    assert props["kind"] == {"enum": ["kq", "vv"], "default": "kq"}
    assert props["layers"]["type"] == ["array", "null"] and props["layers"]["default"] is None
    assert props["layers"]["items"] == {"type": "string"}
    assert props["size"] == {"type": ["integer", "null"], "minimum": 1, "default": None}
    assert props["accumulate"]["oneOf"][1] == {"const": "auto"} and props["accumulate"]["default"] == "auto"
    assert props["joined"] == {"type": "boolean", "default": False}


def run(args: list[str]) -> tuple[int, object]:
    seen = {}

    @click.command()
    @click_options(Example)
    def command(**settings):
        seen["params"] = params_from(Example, settings)

    result = CliRunner().invoke(command, args)
    return result.exit_code, seen.get("params")


def test_click_options_parse_into_the_params_object_with_its_defaults():
    code, params = run([])
    assert code == 0 and params == Example()
    code, params = run(["--channels", "4", "--graph", "vv", "--layers", "0,-1", "--accumulate", "20", "--joined", "--device", "cpu"])
    assert code == 0
    assert params == Example(channels=4, kind="vv", layers=("0", "-1"), accumulate=20, joined=True, device="cpu")


@pytest.mark.parametrize("args", [["--channels", "1"], ["--lr", "0"], ["--graph", "qk"], ["--accumulate", "0"], ["--workflow-only", "y"]])
def test_click_options_refuse_what_the_settings_refuse(args):
    assert run(args)[0] == 2
