"""The settings of `lds extract`, `lds solve` and `lds solve-dataset` are spelled once, in their params
dataclasses (pipeline/settings.py), whose click options and config/schema.yaml sections are derived. Checked
here: the defaults METHOD.md and the paper prescribe (pinned below), that config/schema.yaml is what the
dataclasses say, that config/config.yaml writes every key out with its default but for the deliberate
differences, and that the Snakefile passes every config value on to the command line."""

from __future__ import annotations

import subprocess
from dataclasses import fields
from pathlib import Path

import click
import pytest
import yaml

from pipeline.extract.stage import ExtractParams
from pipeline.settings import entries
from pipeline.solve.params import DatasetSolverParams, GraphOptions, SolverParams, resolve_accumulate
from stages.extract import extract
from stages.schema import derived_schema
from stages.solve import solve
from stages.solve_dataset import solve_dataset
from workflow_runs import dry_run, printed_commands

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())["properties"]
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
COMMANDS = {"solve": solve, "extract": extract, "solve_dataset": solve_dataset}
PARAMS = {"solve": SolverParams, "extract": ExtractParams, "solve_dataset": DatasetSolverParams}

# METHOD.md sections 2-3 (per-image runs), pinned here.
METHOD_SOLVER = {"channels": 15, "lr": 1e-3, "steps": 1000, "buffer": 5, "refresh": 0.25, "weight_eig": 2.0, "weight_ortho": 2.0}
METHOD_SD_PASSES = 20  # gradients accumulated over 20 passes per step (Stable Diffusion)
METHOD_MAX_TIMESTEP = 250  # per image: timesteps uniform in [0, 250]
# METHOD.md dataset mode: the paper's / reference code's values (docs/solver.md: Dataset-level solver)
METHOD_DATASET = {"channels": 100, "resolution": 32, "batch_size": 40, "iterations": 5, "lr": 1e-2, "weight_decay": 0.0, "ema": 0.99,
                  "intra": 50, "inter": 50, "threshold": 0.1}

# Config keys the workflow reads itself rather than passing on (rules/common.smk WORKFLOW_KEYS); `solve.graph`
# lists the per-image runs, each of which gets one `lds solve --graph`.
WORKFLOW_ONLY = {"solve": {"level", "graph"}, "extract": {"keep", "weights"}, "solve_dataset": set()}
# Where config.yaml deliberately departs from the defaults, and why; any other difference fails.
DELIBERATE = {
    ("solve", "solver"): ("exact", "the demo's choice: seconds per image on a CPU; adam, the paper's optimisation, stays the default"),
    ("extract", "dtype"): ("int8", "half of float16's bytes for whole datasets (X within 0.9999); by hand, float16 stays the default"),
    ("extract", "precision"): ("bfloat16", "a third of the forward's time with AMX or a GPU (X within 0.9999); by hand, float32 stays the default"),
}


def options(command: click.Command) -> dict[str, click.Option]:
    """The command's options by config key: `--max-timestep` -> max_timestep."""
    return {param.opts[0].lstrip("-").replace("-", "_"): param for param in command.params if isinstance(param, click.Option)}


def defaults(command: click.Command) -> dict:
    """Each option's default by config key, as the command sees it (parsed with only the required options)."""
    required = [arg for param in command.params if param.required for arg in (param.opts[0], "x")]
    parsed = command.make_context(command.name, required).params
    return {key: parsed[option.name] for key, option in options(command).items()}


def schema_default(section: str, key: str):
    return SCHEMA[section]["properties"][key].get("default", "<no default>")


@pytest.mark.parametrize("section", list(PARAMS))
def test_the_schema_sections_are_what_the_params_say(section):
    """config/schema.yaml is up to date (`python -m stages.schema --update`), and its section holds the
    params' config settings and the workflow's own keys, nothing else."""
    assert SCHEMA[section] == derived_schema()["properties"][section]
    settings = {entry.name for entry in entries(PARAMS[section]) if entry.spec.config}
    assert set(SCHEMA[section]["properties"]) == settings | WORKFLOW_ONLY[section]


@pytest.mark.parametrize("section", list(PARAMS))
def test_config_yaml_writes_out_every_key_with_its_default_except_the_deliberate_differences(section):
    assert set(CONFIG[section]) == set(SCHEMA[section]["properties"])  # with its comment
    for key, value in CONFIG[section].items():
        if (section, key) in DELIBERATE:
            assert value == DELIBERATE[section, key][0] != schema_default(section, key), f"{section}.{key}"
        else:
            assert value == schema_default(section, key), f"config.yaml {section}.{key} differs from the default"


@pytest.mark.parametrize("section", list(PARAMS))
def test_every_setting_is_an_option_of_its_command_with_the_params_default(section):
    """The options come from the params (stages/options.py): each setting's default is the command's, so a
    command run with no options builds the params' defaults."""
    command_defaults = defaults(COMMANDS[section])
    for entry in entries(PARAMS[section]):
        if not entry.spec.cli:
            continue
        key = (entry.spec.option or entry.name).lstrip("-").replace("-", "_")
        assert command_defaults[key] == (None if entry.default == () else entry.default), f"{section}.{entry.name}"
    non_settings = [field.name for field in fields(PARAMS[section]) if "spec" not in field.metadata]
    assert non_settings == (["search", "weight_decay", "weight_eig", "weight_ortho"] if section == "solve_dataset" else [])


def test_graph_options_default_to_the_solve_defaults():
    params = SolverParams()
    assert params.graphs == GraphOptions() == GraphOptions("kq", "random-walk", (), ())
    assert (params.kind, params.variant) == (defaults(solve)["graph"], defaults(solve)["variant"]) == ("kq", "random-walk")


def test_defaults_are_the_methods_values():
    params = SolverParams()
    assert {key: getattr(params, key) for key in METHOD_SOLVER} == METHOD_SOLVER
    assert {key: defaults(solve)[key] for key in METHOD_SOLVER} == METHOD_SOLVER
    assert {key: schema_default("solve", key) for key in METHOD_SOLVER} == METHOD_SOLVER
    assert {key: CONFIG["solve"][key] for key in METHOD_SOLVER} == METHOD_SOLVER
    pool = ExtractParams().timesteps
    assert pool == defaults(extract)["timesteps"] > params.buffer  # refreshes always find a timestep that is not buffered
    assert resolve_accumulate(params.accumulate, pool) == METHOD_SD_PASSES and resolve_accumulate(params.accumulate, 1) == 1
    assert ExtractParams().max_timestep == defaults(extract)["max_timestep"] == METHOD_MAX_TIMESTEP
    dataset = DatasetSolverParams()
    assert {key: getattr(dataset, key) for key in METHOD_DATASET} == METHOD_DATASET
    assert {key: CONFIG["solve_dataset"][key] for key in METHOD_DATASET if key in CONFIG["solve_dataset"]} == {
        key: value for key, value in METHOD_DATASET.items() if key in CONFIG["solve_dataset"]}


def test_the_solve_artifact_params_are_the_solver_its_graphs_and_for_adam_its_settings():
    exact = SolverParams(solver="exact", kind="vv", layers=("0",), heads=(1,), channels=4, steps=9)
    assert exact.artifact_params() == {"solver": "exact", "channels": 4,
                                       "graphs": {"kind": "vv", "variant": "random-walk", "layers": ("0",), "heads": (1,)}}
    adam = SolverParams(accumulate=3, device="cpu").artifact_params()
    assert set(adam) == {"solver", "channels", "graphs", "steps", "lr", "weight_eig", "weight_ortho", "seed", "parameterisation",
                         "init", "accumulate", "buffer", "refresh"}  # not the device
    assert adam["accumulate"] == 3
    # lds solve-dataset's artifact: these, then the layers it resolved; neither --layers as given nor the device
    assert list(DatasetSolverParams(layers="0", device="cpu").solver_settings()) == [
        "graph", "search", "channels", "resolution", "batch_size", "iterations", "epochs", "partitions", "lr", "weight_decay", "ema",
        "intra", "inter", "threshold", "weight_eig", "weight_ortho", "seed"]


# ------------------------------------------------------------------------------------- the Snakefile


WORKFLOW_CONFIG = {
    "datasets": {"shapes": {"spec": "synthetic-shapes:2", "images_per_shard": 2}},
    "models": ["tiny-vit"],
    "solve": {"solver": "adam", "graph": "vv", "variant": "laplacian", "layers": [0, -1], "heads": [1, 2], "channels": 7,
              "parameterisation": "free", "init": "exact", "steps": 9, "lr": 0.002, "weight_eig": 1.5, "weight_ortho": 0.5,
              "accumulate": 3, "buffer": 4, "refresh": 0.5, "seed": 3, "level": "image", "device": "cpu",
              "layer_diagnostics": False},
    "extract": {"seed": 2, "dtype": "float32", "timesteps": 6, "max_timestep": 300, "max_resolution": 32,
                "concat_heads": True, "upsample_to": 12, "device": "cpu", "weights": {"tiny-vit": "my weights.pth"}},
}
DATASET_CONFIG = {
    **WORKFLOW_CONFIG, "solve": {"level": "dataset", "device": "cpu"},
    "solve_dataset": {"graph": "kq", "channels": 7, "resolution": 16, "batch_size": 3, "iterations": 2, "epochs": 4, "partitions": 3,
                      "lr": 0.05, "ema": 0.9, "layers": "0,-1", "intra": 4, "inter": 6, "threshold": 0.2, "seed": 5},
}


def as_config(value):
    """A parsed option value as the config spells it: comma lists (tuples of the params, or text) as lists of
    ints or names, paths as text."""
    if isinstance(value, tuple):
        return [int(part) if str(part).lstrip("-").isdigit() else part for part in value]
    if isinstance(value, str) and "," in value:
        return [int(part) if part.lstrip("-").isdigit() else part for part in value.split(",")]
    return str(value) if isinstance(value, Path) else value


def passed_on(run: subprocess.CompletedProcess, section: str, config: dict) -> dict:
    """Every config value of ``section`` reached the printed `lds` command line (returned, parsed, by key)."""
    command = COMMANDS[section]
    args = printed_commands(run.stdout)[section.replace("_", "-")][0]
    parsed = command.make_context(section, args).params
    by_key = {key: parsed[option.name] for key, option in options(command).items()}
    expected = {key: value for key, value in config[section].items() if key not in WORKFLOW_ONLY[section]}
    if section == "solve_dataset":
        assert by_key["layers"] == expected.pop("layers")  # a comma-separated text in the config too
    assert {key: as_config(by_key[key]) for key in expected} == expected, section
    return by_key


def test_the_workflow_passes_every_config_value_to_solve_and_extract(tmp_path):
    run = dry_run(tmp_path, WORKFLOW_CONFIG)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    for section in ("solve", "extract"):
        passed_on(run, section, WORKFLOW_CONFIG)
    assert "--accumulate 3" in run.stdout and "--layers 0,-1" in run.stdout and "--graph vv" in run.stdout
    assert "--no-layer-diagnostics" in run.stdout  # a false whose default is true is passed on as --no-KEY
    assert printed_commands(run.stdout)["extract"][0][4:6] == ["--weights", "my weights.pth"]


def test_the_workflow_passes_every_config_value_to_solve_dataset(tmp_path):
    run = dry_run(tmp_path, DATASET_CONFIG)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert passed_on(run, "solve_dataset", DATASET_CONFIG)["device"] == "cpu"  # solve.device


def test_the_workflow_refuses_weights_for_a_model_it_does_not_run(tmp_path):
    config = {**WORKFLOW_CONFIG, "extract": {"weights": {"dino-vits16": "dino.pth"}}}
    run = dry_run(tmp_path, config)
    assert run.returncode != 0 and "config extract.weights names dino-vits16, not among `models`" in run.stdout + run.stderr
