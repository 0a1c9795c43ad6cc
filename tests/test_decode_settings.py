"""The settings of `lds decode`, `lds cluster`, `lds baseline` and `lds zeroshot` agree wherever they are
spelled: the params dataclasses (the source), their click options, config/schema.yaml, config/config.yaml and
METHOD.md's values (pinned below); and the Snakefile passes the config's values on to the commands."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import yaml

from pipeline.decode.dataset_kmeans import ClusterParams
from pipeline.decode.instances import ProposalParams
from pipeline.decode.kmeans import AUTO_KS
from pipeline.decode.regions import DecodeParams
from pipeline.decode.zeroshot import PROMPT_TEMPLATES, ZeroshotParams
from pipeline.settings import entries
from pipeline.solve.baselines import DEFAULT_EIGENVECTORS, BaselineParams
from stages.baseline import baseline
from stages.cluster import cluster
from stages.decode import decode
from stages.options import params_from
from stages.zeroshot import zeroshot
from workflow_runs import dry_run, printed_commands

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())["properties"]
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
COMMANDS = {"decode": (decode, DecodeParams), "cluster": (cluster, ClusterParams), "baseline": (baseline, BaselineParams), "zeroshot": (zeroshot, ZeroshotParams)}
SECTIONS = {"decode": DecodeParams, "baseline_options": BaselineParams, "zeroshot": ZeroshotParams}
# the sections' keys the workflow reads itself (not settings of the params class)
WORKFLOW_KEYS = {"decode": {"dataset_clusters", "figures_per_shard"}, "baseline_options": {"masks"}, "zeroshot": {"enabled", "clip", "weights"}}
# where config.yaml deliberately departs from the defaults, and why
DELIBERATE = {("decode", "instances"): (True, "the demo draws object proposals on its figures and scores them")}


def parsed(command: click.Command, args: list[str] = ()) -> dict:
    """The command's keyword arguments for ``args`` (plus its required options)."""
    required = [arg for param in command.params if param.required and param.opts[0] not in args for arg in (param.opts[0], "x")]
    return command.make_context(command.name, [*required, *args]).params


def test_defaults_are_the_methods_values():
    # METHOD.md section 5: dataset-level K = 27; auto K 2..10; proposals for K = 2..10 covering 1%..90%,
    # NMS at IoU 0.7, at most 100, scores below 0 dropped; zero-shot: cosine similarity, below 0.7
    # background, prompts averaged over templates; baselines: m = 15 eigenvectors (TokenCut m = 8)
    assert ClusterParams().clusters == 27 and AUTO_KS == tuple(range(2, 11))
    proposals = ProposalParams()
    assert (proposals.ks, proposals.min_area, proposals.max_area, proposals.nms_iou, proposals.max_proposals, proposals.min_score) == (
        tuple(range(2, 11)), 0.01, 0.9, 0.7, 100, 0.0)
    assert (ZeroshotParams().threshold, ZeroshotParams().score) == (0.7, "cosine") and len(PROMPT_TEMPLATES) > 1
    assert DEFAULT_EIGENVECTORS == {"tokencut": 8, "maskcut": 15}
    assert BaselineParams(method="maskcut").resolved().eigenvectors == 15 and BaselineParams().resolved().eigenvectors == 8
    # beyond the paper, on by default (docs/quality.md): the extended proposals, ranked after the paper's
    assert DecodeParams().extended_proposals and DecodeParams().proposals() == ProposalParams(extended=True)


@pytest.mark.parametrize("stage", list(COMMANDS))
def test_each_command_has_an_option_per_setting_with_its_default(stage):
    command, params_class = COMMANDS[stage]
    names = {entry.name for entry in entries(params_class) if entry.spec.cli}
    assert names <= {param.name for param in command.params}
    assert params_from(params_class, parsed(command)) == params_class()  # the command's defaults are the dataclass's


@pytest.mark.parametrize("section", list(SECTIONS))
def test_the_schema_sections_are_the_settings_and_the_workflows_keys(section):
    params_class = SECTIONS[section]
    settings = {entry.name: entry for entry in entries(params_class) if entry.spec.config}
    keys = SCHEMA[section]["properties"]
    assert set(keys) == set(settings) | WORKFLOW_KEYS[section]
    for name, entry in settings.items():
        default = list(entry.default) or None if isinstance(entry.default, tuple) else entry.default
        assert keys[name]["default"] == default, f"{section}.{name}"
    assert set(CONFIG[section]) == set(keys)  # config.yaml writes every key out, with its comment


@pytest.mark.parametrize("section", list(SECTIONS))
def test_config_values_are_the_defaults_except_the_deliberate_differences(section):
    for key, value in CONFIG[section].items():
        default = SCHEMA[section]["properties"][key]["default"]
        if (section, key) in DELIBERATE:
            assert value == DELIBERATE[section, key][0] != default, f"{section}.{key}"
        else:
            assert str(value) == str(default) if key == "layer" else value == default, f"config.yaml {section}.{key}"


def test_clusters_are_an_integer_of_at_least_two_or_auto():
    for command in (decode, cluster):
        assert parsed(command, ["--clusters", "auto"])["clusters"] == "auto"
        assert parsed(command, ["--clusters", "2"])["clusters"] == 2
        with pytest.raises(click.BadParameter):
            parsed(command, ["--clusters", "1"])
    assert parsed(zeroshot, ["--classes", "cat, dog,"])["classes"] == ("cat", "dog")


# ------------------------------------------------------------------------------------- the Snakefile

WORKFLOW_CONFIG = {
    "datasets": {"shapes": {"spec": "synthetic-shapes:4", "images_per_shard": 2}},
    "models": ["tiny-vit"],
    "solve": {"solver": "exact", "graph": "kq"},
    "decode": {"clusters": "auto", "seed": 4, "instances": True, "extended_proposals": False, "dataset_clusters": 5},
    "baselines": ["tokencut", "maskcut"],
    "baseline_options": {"affinity": "features", "layer": "block01", "masks": 2, "eigenvectors": 7, "tau": 0.3},
    "zeroshot": {"enabled": True, "classes": ["red", "light blue"], "threshold": 0.25, "score": "probability", "clip": {"tiny-vit": "my/clip"}},
}


def dry_run_commands(workdir: Path, config: dict) -> dict[str, list[list[str]]]:
    """The arguments of every `lds` command a dry run of the workflow prints, by stage (up to the
    redirection of its output to the job's log)."""
    run = dry_run(workdir, config)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    return printed_commands(run.stdout)


def settings_of(stage: str, args: list[str]):
    command, params_class = COMMANDS[stage]
    return params_from(params_class, command.make_context(stage, list(args)).params)  # click consumes the list it parses


def test_the_workflow_passes_the_config_to_decode_cluster_baseline_and_zeroshot(tmp_path):
    commands = dry_run_commands(tmp_path / "on", WORKFLOW_CONFIG)
    assert {settings_of("decode", args) for args in commands["decode"]} == {DecodeParams("auto", 4, True, False)}  # the paper's proposals only
    assert {settings_of("cluster", args) for args in commands["cluster"]} == {ClusterParams(clusters=5, seed=4)}
    options = dict(affinity="features", layer="block01", eigenvectors=7, tau=0.3)
    assert {settings_of("baseline", args) for args in commands["baseline"]} == {
        BaselineParams("tokencut", **options), BaselineParams("maskcut", masks=2, **options)}  # masks: MaskCut's N only
    assert {settings_of("zeroshot", args) for args in commands["zeroshot"]} == {ZeroshotParams(("red", "light blue"), 0.25, "probability")}
    assert all(args[args.index("--clip") + 1] == "my/clip" for args in commands["zeroshot"])
    # the defaults: proposals off, and the extended ones when on; no cluster, baseline or zero-shot jobs
    plain = dry_run_commands(tmp_path / "off", {key: WORKFLOW_CONFIG[key] for key in ("datasets", "models", "solve")})
    assert {settings_of("decode", args) for args in plain["decode"]} == {DecodeParams()}
    assert set(plain) & {"cluster", "baseline", "zeroshot"} == set()
    extended = dry_run_commands(tmp_path / "extended", {**WORKFLOW_CONFIG, "decode": {"instances": True}, "baselines": [], "zeroshot": {}})
    assert {settings_of("decode", args) for args in extended["decode"]} == {DecodeParams(instances=True, extended_proposals=True)}
