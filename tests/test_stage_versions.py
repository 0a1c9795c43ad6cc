"""Stage versions (issue 16.6): a stage whose code changed has a new version, by the record of each stage's
version and code hash in stages/stage_code.json (`python -m stages.versions --update` refreshes it)."""

import json
import shutil

from stages.versions import REPO, RECORD, STAGE_VERSIONS, current, normalised, problems


def test_every_stage_whose_code_changed_has_a_new_version():
    found = problems(json.loads(RECORD.read_text()), current())
    assert not found, "\n".join(found)


def test_comments_docstrings_and_layout_do_not_count_but_code_does():
    code = "def f(x):\n    return x + 1\n"
    dressed = '"""A module."""\n\n# a comment\ndef f(x):  # why\n    """Add one."""\n\n    return (x +\n            1)\n'
    assert normalised(code) == normalised(dressed) != normalised(code.replace("1", "2"))


def test_a_change_fails_for_each_stage_running_the_code_until_bumped_and_recorded(tmp_path, monkeypatch):
    for package in ("pipeline", "stages"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    recorded = current(tmp_path)
    shared = tmp_path / "pipeline" / "solve" / "stage.py"  # lds solve and lds baseline both import it
    shared.write_text(shared.read_text() + "\nSOMETHING_NEW = 1\n")

    changed = problems(recorded, current(tmp_path))
    assert [line.split(":")[0] for line in changed] == ["stage baseline", "stage solve"]
    assert f"bump STAGE_VERSIONS['solve'] (now {STAGE_VERSIONS['solve']}) in stages/versions.py, then run `python -m stages.versions --update`" in changed[1]

    for stage in ("baseline", "solve"):
        monkeypatch.setitem(STAGE_VERSIONS, stage, STAGE_VERSIONS[stage] + 1)
    bumped = problems(recorded, current(tmp_path))
    assert len(bumped) == 2 and all("out of date" in line and "--update" in line for line in bumped)
    refreshed = current(tmp_path)  # what --update writes
    assert problems(refreshed, current(tmp_path)) == []
