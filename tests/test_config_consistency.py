"""The settings of `lds solve` and `lds extract` agree wherever they are spelled: the params dataclasses,
the click options, config/schema.yaml, config/config.yaml and METHOD.md's values (pinned below); and the
Snakefile passes every config value on to the command line."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from pipeline.solver_params import GraphOptions, SolverParams, resolve_accumulate
from stages.extract import extract
from stages.solve import solve

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())["properties"]
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
COMMANDS = {"solve": solve, "extract": extract}

# METHOD.md sections 2-3 (per-image runs), pinned here.
METHOD_SOLVER = {"channels": 15, "lr": 1e-3, "steps": 1000, "buffer": 5, "refresh": 0.25, "weight_eig": 2.0, "weight_ortho": 2.0}
METHOD_SD_PASSES = 20  # gradients accumulated over 20 passes per step (Stable Diffusion)
METHOD_MAX_TIMESTEP = 250  # per image: timesteps uniform in [0, 250]

# Options that are no configuration (the job's own files, a progress bar) and config keys the workflow
# reads itself rather than passing on.
# `lds extract --arrays` is derived by the workflow from the config's readers (solve.graph, baselines, zeroshot).
NOT_IN_CONFIG = {"solve": {"input", "store", "manifest", "progress"}, "extract": {"input", "model", "store", "manifest", "arrays"}}
WORKFLOW_ONLY = {"solve": {"level"}, "extract": {"keep"}}
# Where config.yaml deliberately departs from the defaults, and why; any other difference fails.
DELIBERATE = {
    ("solve", "solver"): ("exact", "the demo's choice: seconds per image on a CPU; adam, the paper's optimisation, stays the default"),
    ("extract", "dtype"): ("int8", "half of float16's bytes for whole datasets (X within 0.9999); by hand, float16 stays the default"),
}
# Where the config spells an option differently from the CLI, and why.
RESHAPED = {
    ("extract", "weights"): "the config names weights per model (model -> path); the CLI takes one path for its one --model",
    ("solve", "graph"): "the config lists graph kinds, each its own run (default [kq, vv]); the CLI solves one --graph",
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


@pytest.mark.parametrize("section", ["solve", "extract"])
def test_the_config_schema_and_the_command_name_the_same_options(section):
    schema_keys = set(SCHEMA[section]["properties"])
    assert set(CONFIG[section]) == schema_keys  # config.yaml writes every option out, with its comment
    assert schema_keys - WORKFLOW_ONLY[section] == set(options(COMMANDS[section])) - NOT_IN_CONFIG[section]


@pytest.mark.parametrize("section", ["solve", "extract"])
def test_schema_defaults_types_and_choices_match_the_commands(section):
    command_defaults = defaults(COMMANDS[section])
    for key, option in options(COMMANDS[section]).items():
        if key in NOT_IN_CONFIG[section] or (section, key) in RESHAPED:
            continue
        spec = SCHEMA[section]["properties"][key]
        assert spec.get("default", "<no default>") == command_defaults[key], f"{section}.{key}: schema vs `lds {section} {option.opts[0]}`"
        if isinstance(option.type, click.Choice):
            assert set(spec["enum"]) == set(option.type.choices), f"{section}.{key}: choices"
        if isinstance(option.type, (click.IntRange, click.FloatRange)):
            minimum = spec.get("exclusiveMinimum" if option.type.min_open else "minimum")
            assert (minimum, spec.get("maximum")) == (option.type.min, option.type.max), f"{section}.{key}: range"
            assert ("integer" if isinstance(option.type, click.IntRange) else "number") in spec["type"], f"{section}.{key}: type"


@pytest.mark.parametrize("section", ["solve", "extract"])
def test_config_values_are_the_defaults_except_the_deliberate_differences(section):
    for key, value in CONFIG[section].items():
        if (section, key) in DELIBERATE:
            assert value == DELIBERATE[section, key][0] != schema_default(section, key), f"{section}.{key}"
        else:
            assert value == schema_default(section, key), f"config.yaml {section}.{key} differs from the default"


def test_solver_params_defaults_match_the_solve_options():
    solve_defaults = defaults(solve)
    params, graphs = SolverParams(), GraphOptions()
    fields = {name for name in SolverParams.__dataclass_fields__ if name != "graphs"}
    assert fields <= set(solve_defaults)  # every solver setting reachable from the command line (and the config)
    for name in fields:
        assert getattr(params, name) == solve_defaults[name], name
    assert (graphs.kind, graphs.variant) == (solve_defaults["graph"], solve_defaults["variant"])
    assert graphs.layers == graphs.heads == () and solve_defaults["layers"] is solve_defaults["heads"] is None


def test_defaults_are_the_methods_values():
    params = SolverParams()
    assert {key: getattr(params, key) for key in METHOD_SOLVER} == METHOD_SOLVER
    assert {key: defaults(solve)[key] for key in METHOD_SOLVER} == METHOD_SOLVER
    assert {key: schema_default("solve", key) for key in METHOD_SOLVER} == METHOD_SOLVER
    pool = defaults(extract)["timesteps"]
    assert pool > params.buffer  # refreshes always find a timestep that is not buffered
    assert resolve_accumulate(params.accumulate, pool) == METHOD_SD_PASSES and resolve_accumulate(params.accumulate, 1) == 1
    assert defaults(extract)["max_timestep"] == METHOD_MAX_TIMESTEP


# ------------------------------------------------------------------------------------- the Snakefile


WORKFLOW_CONFIG = {
    "datasets": {"shapes": {"spec": "synthetic-shapes:2", "images_per_shard": 2}},
    "models": ["tiny-vit"],
    "solve": {"solver": "adam", "graph": "vv", "variant": "laplacian", "layers": [0, -1], "heads": [1, 2], "channels": 7,
              "parameterisation": "free", "init": "exact", "steps": 9, "lr": 0.002, "weight_eig": 1.5, "weight_ortho": 0.5,
              "accumulate": 3, "buffer": 4, "refresh": 0.5, "seed": 3, "level": "image", "device": "cpu"},
    "extract": {"seed": 2, "dtype": "float32", "timesteps": 6, "max_timestep": 300, "max_resolution": 32,
                "concat_heads": True, "upsample_to": 12, "device": "cpu", "weights": {"tiny-vit": "my weights.pth"}},
}


def dry_run(workdir: Path, config: dict) -> subprocess.CompletedProcess:
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--cores", "1", "--dry-run", "-p"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def printed_command(log: str, stage: str) -> list[str]:
    """The arguments after `-m stages STAGE` of the first such command the dry-run printed, up to the
    redirection of its output to the job's log (checked)."""
    marker = f" -m stages {stage} "
    line = next(line for line in log.splitlines() if marker in line)
    args = shlex.split(line[line.index(marker) + len(marker):])
    redirect = args.index(">")
    assert args[redirect + 1].startswith("results/logs/") and args[redirect + 2:] == ["2>&1"], args[redirect:]
    return args[:redirect]


def as_config(value):
    """A parsed option value as the config spells it: comma lists as lists of ints or names, paths as text."""
    if isinstance(value, str) and "," in value:
        return [int(part) if part.lstrip("-").isdigit() else part for part in value.split(",")]
    return str(value) if isinstance(value, Path) else value


def test_the_workflow_passes_every_config_value_to_solve_and_extract(tmp_path):
    run = dry_run(tmp_path, WORKFLOW_CONFIG)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    for section, command in COMMANDS.items():
        args = printed_command(run.stdout, section)
        parsed = command.make_context(section, args).params
        by_key = {key: parsed[option.name] for key, option in options(command).items()}
        expected = {key: value for key, value in WORKFLOW_CONFIG[section].items() if key not in WORKFLOW_ONLY[section]}
        expected.pop("weights", None)
        assert {key: as_config(by_key[key]) for key in expected} == expected, section
    assert "--accumulate 3" in run.stdout and "--layers 0,-1" in run.stdout
    assert printed_command(run.stdout, "extract")[4:6] == ["--weights", "my weights.pth"]


def test_the_workflow_refuses_weights_for_a_model_it_does_not_run(tmp_path):
    config = {**WORKFLOW_CONFIG, "extract": {"weights": {"dino-vits16": "dino.pth"}}}
    run = dry_run(tmp_path, config)
    assert run.returncode != 0 and "config extract.weights names dino-vits16, not among `models`" in run.stdout + run.stderr
