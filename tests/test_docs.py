"""README.md and docs/*.md: the README's size, every relative link and anchor, and every documented command.

Commands are checked, not run: each `lds ...` command of a code block or inline code span must name an
existing subcommand chain (which `lds CHAIN --help` shows, through click's CliRunner) and only options that
command has (values of Choice options among its choices); the options after `lds bench NAME --` must be the
benchmark script's. Each `snakemake ...` command must parse with Snakemake's own argument parser, name only
rules the workflow has, and set (`--config key=value`) only keys of config/schema.yaml.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_LIMIT = 15_000

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def split_markdown(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, code-block lines) of a markdown text; fences themselves belong to neither."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return prose, code


def paragraphs(prose: list[str]) -> list[str]:
    """Prose lines joined into paragraphs (blank lines and headings apart): inline code may span lines."""
    out, current = [], []
    for line in prose:
        if not line.strip() or HEADING.match(line):
            if current:
                out.append("\n".join(current))
                current = []
            if line.strip():
                out.append(line)
        else:
            current.append(line)
    return out + (["\n".join(current)] if current else [])


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_markdown(path.read_text())
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    prose, _ = split_markdown(path.read_text())
    targets = []
    for paragraph in paragraphs(prose):
        paragraph = INLINE.sub("", paragraph)  # a link inside inline code is not a link
        targets += LINK.findall(paragraph)
    return targets


def code_texts(path: Path) -> list[str]:
    """Every code-block line and every inline code span of a page (table cells' \\| unescaped)."""
    prose, code = split_markdown(path.read_text())
    spans = [span.replace("\n", " ") for paragraph in paragraphs(prose) for span in INLINE.findall(paragraph)]
    return [text.replace("\\|", "|").strip() for text in code + spans]


def commands(program: str) -> list[tuple[str, str]]:
    """(page, command) for every documented command line of `program`."""
    found = []
    start = re.compile(rf"^(?:\$\s+)?{program}(\s|$)")
    for page in PAGES:
        for text in code_texts(page):
            if start.match(text):
                found.append((rel(page), re.sub(r"^\$\s+", "", text)))
    return found


def tokens(command: str) -> list[str]:
    """The command's words, comments dropped, documentation markup ([optional], a | b, ...) removed."""
    words = shlex.split(command, comments=True)
    out = []
    for word in words:
        word = word.strip("[]()")
        if word in ("", "|", "...", "\u2026"):
            continue
        out.append(word)
    return out


def placeholder(word: str) -> bool:
    """NAME, FILE, K, <stage>, a|B ...: a word the reader replaces."""
    return word.startswith("<") or any(ch.isupper() for ch in word) or word.endswith("...")


# --------------------------------------------------------------------------- README size and links


def test_readme_size():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT} (move detail to docs/)"


def test_docs_pages_exist_and_link_back():
    expected = {"stages", "solver", "datasets", "metrics", "store", "scaling", "models", "development"}
    pages = {path.stem for path in PAGES[1:]}
    assert expected <= pages, f"missing docs pages: {sorted(expected - pages)}"
    readme_links = {target.split("#")[0] for target in links(README)}
    for path in PAGES[1:]:
        assert f"docs/{path.name}" in readme_links, f"README.md does not link docs/{path.name}"
        assert any(t.split("#")[0] == "../README.md" for t in links(path)), f"{rel(path)} does not link back to ../README.md"


def all_links():
    return [(rel(page), target) for page in PAGES for target in links(page)]


def test_relative_links_resolve():
    problems = []
    for page_name, target in all_links():
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        page = REPO / page_name
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            problems.append(f"{page_name}: {target}: {path_part} does not exist")
            continue
        if anchor:
            if dest.suffix != ".md":
                problems.append(f"{page_name}: {target}: an anchor into a file that is not markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{page_name}: {target}: no heading #{anchor} in {rel(dest)}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_repository_paths_in_code_exist():
    """Files of the checkout named in inline code (tests/..., benchmarks/..., pipeline/...) exist."""
    pattern = re.compile(r"^(?:tests|benchmarks|pipeline|stages|profiles|config|docs)/[\w./-]+\.(?:py|yaml|md|png)$")
    missing = []
    for page in PAGES:
        for text in code_texts(page):
            for word in text.split():
                word = word.strip("`,;:()")
                if not pattern.match(word) or re.search(r"[<*]|[A-Z]{3,}", word):  # bench_NAME.py, <image>.png
                    continue
                if not (REPO / word).exists():
                    missing.append(f"{rel(page)}: {word}")
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)


# --------------------------------------------------------------------------- lds commands


@pytest.fixture(scope="module")
def lds_group():
    """The click group behind the `lds` script of pyproject.toml (stages.cli:main calls stages.cli.cli)."""
    import importlib
    import tomllib

    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["lds"]
    module = importlib.import_module(target.split(":")[0])
    assert callable(getattr(module, target.split(":")[1])), f"pyproject.toml's lds script {target} is not there"
    group = module.cli
    assert isinstance(group, click.Group)
    return group


def check_lds(group: click.Group, command: str) -> list[str]:
    """What is wrong with one documented `lds ...` command (empty: nothing)."""
    try:
        words = tokens(command)[1:]
    except ValueError as error:  # unbalanced quotes
        return [f"does not split into words: {error}"]
    chain, current = [], group
    while isinstance(current, click.Group) and words and not words[0].startswith("-"):
        name = words.pop(0)
        if placeholder(name):
            return []  # `lds <stage> --help`: a stand-in for every subcommand
        sub = current.get_command(click.Context(current), name)
        if sub is None:
            return [f"no command `lds {' '.join(chain + [name])}`"]
        chain.append(name)
        current = sub
    result = CliRunner().invoke(group, [*chain, "--help"], prog_name="lds")
    if result.exit_code != 0:
        return [f"`lds {' '.join(chain)} --help` exits with {result.exit_code}: {result.output[-300:]}"]
    options = {}
    for param in current.params:
        if isinstance(param, click.Option):
            for name in (*param.opts, *param.secondary_opts):
                options[name] = param
    if chain == ["bench"]:
        return check_bench(words)
    problems = []
    while words:
        word = words.pop(0)
        if word == "--":
            break
        if not word.startswith("-") or re.fullmatch(r"-\d[\d.,]*", word):
            continue  # an argument
        name, eq, value = word.partition("=")
        if name == "--help":
            continue
        param = options.get(name)
        if param is None:
            problems.append(f"`lds {' '.join(chain)}` has no option {name}")
            continue
        if param.is_flag or param.count:
            continue
        if not eq:
            if not words or words[0].startswith("--"):
                continue  # an option named without its value (prose shorthand)
            value = words.pop(0)
        if isinstance(param.type, click.Choice):
            for choice in value.split("|"):
                if not placeholder(choice) and choice not in param.type.choices:
                    problems.append(f"`lds {' '.join(chain)} {name}` does not take {choice!r} (choices: {', '.join(param.type.choices)})")
    return problems


def check_bench(words: list[str]) -> list[str]:
    """`lds bench NAME [-- ARGS]`: NAME is a benchmark script, ARGS's options are its."""
    if not words or placeholder(words[0]):
        return []
    script = REPO / "benchmarks" / f"bench_{words[0]}.py"
    if not script.is_file():
        return [f"`lds bench {words[0]}`: no {rel(script)}"]
    source = script.read_text()
    rest = words[1:]
    if rest and rest[0] == "--":
        rest = rest[1:]
    return [f"`lds bench {words[0]}`: {rel(script)} has no option {word}" for word in rest
            if word.startswith("--") and word != "--help" and f'"{word.split("=")[0]}"' not in source]


def test_lds_commands_are_documented():
    assert len(commands("lds")) > 50, "the commands were not found: has the markup of the pages changed?"


def test_lds_commands_parse(lds_group):
    problems = []
    for page, command in commands("lds"):
        problems += [f"{page}: {command}\n    {problem}" for problem in check_lds(lds_group, command)]
    assert not problems, "documented lds commands that do not fit the CLI:\n" + "\n".join(problems)


def known_options(group: click.Group) -> set[str]:
    """Every option of every lds command, of the benchmark scripts and stages/versions.py, and of Snakemake."""
    from snakemake.cli import get_argument_parser

    names: set[str] = set()

    def walk(command):
        for param in command.params:
            if isinstance(param, click.Option):
                names.update((*param.opts, *param.secondary_opts))
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(group)
    for script in [*(REPO / "benchmarks").glob("*.py"), REPO / "stages" / "versions.py"]:
        names.update(re.findall(r'"(--[\w-]+)"', script.read_text()))
    for action in get_argument_parser()._actions:
        names.update(action.option_strings)
    return names


SBATCH_OPTIONS = {"--cpus-per-task", "--mem", "--time", "--partition", "--gpus", "--export"}  # scaling.md: SLURM


def test_options_named_in_prose_exist(lds_group):
    """An option in inline code or an option table (`--weight-eig`, `--centre/--no-centre`) is some command's."""
    names = known_options(lds_group) | SBATCH_OPTIONS
    missing = set()
    for page in PAGES:
        for text in code_texts(page):
            if re.match(r"^(lds|snakemake)(\s|$)", text):
                continue  # whole commands: test_lds_commands_parse, test_snakemake_commands_parse
            if re.match(r"^(pip|dask|python|make|export|source)(\s|$)", text):
                continue  # other programs' options
            missing |= {(rel(page), word) for word in re.findall(r"(?<![\w-])--[a-z][\w-]*", text) if word not in names}
    assert not missing, "options no command has:\n" + "\n".join(f"{page}: {word}" for page, word in sorted(missing))


def test_the_checker_catches_mistakes(lds_group):
    assert check_lds(lds_group, "lds decode --input solve.json --clusters K|auto [--instances --coco-results FILE]") == []
    assert check_lds(lds_group, "lds nonsense --input x")
    assert check_lds(lds_group, "lds solve --input extract.json --no-such-option 3")
    assert check_lds(lds_group, "lds solve --solver adam|lbfgs")
    assert check_lds(lds_group, "lds cache nonsense")
    assert check_lds(lds_group, "lds bench nonsense")
    assert check_lds(lds_group, "lds bench solver -- --no-such-option")


# --------------------------------------------------------------------------- configs and snakemake commands


def yaml_blocks(path: Path) -> list[str]:
    blocks, current, fenced = [], None, False
    for line in path.read_text().splitlines():
        match = FENCE.match(line)
        if match and not fenced:
            fenced, current = True, [] if line.strip().endswith("yaml") else None
        elif match:
            fenced = False
            if current is not None:
                blocks.append("\n".join(current))
        elif current is not None:
            current.append(line)
    return blocks


def test_yaml_configs_fit_the_schema():
    """Every ```yaml block is a config, or part of one: laid over config/config.yaml, the schema accepts it."""
    import jsonschema

    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    problems, found = [], 0
    for page in PAGES:
        for block in yaml_blocks(page):
            found += 1
            errors = list(jsonschema.Draft202012Validator(schema).iter_errors({**base, **yaml.safe_load(block)}))
            problems += [f"{rel(page)}: {'.'.join(map(str, error.path))}: {error.message}" for error in errors]
    assert found >= 3
    assert not problems, "documented configs the schema refuses:\n" + "\n".join(problems)


def rule_names() -> set[str]:
    names = set()
    for path in [REPO / "Snakefile", *sorted((REPO / "rules").rglob("*.smk")), *sorted((REPO / "rules").rglob("*.py"))]:
        if path.is_file():
            text = path.read_text()
            names |= set(re.findall(r"^\s*(?:rule|checkpoint)\s+(\w+)\s*:", text, re.M))
            names |= set(re.findall(r"^\s*use rule \w+ as (\w+)", text, re.M))
    return names


def schema_keys() -> dict:
    return yaml.safe_load((REPO / "config" / "schema.yaml").read_text())["properties"]


def check_snakemake(parser, command: str, rules: set[str], schema: dict) -> list[str]:
    try:
        words = ["2" if word == "N" else word for word in tokens(command)[1:]]  # --cores N
        args = parser.parse_args(words)
    except (ValueError, SystemExit):
        return [f"Snakemake's parser refuses {command!r}"]
    problems = []
    named = [rule for name in ("forcerun", "until", "omit_from", "set_threads") for rule in getattr(args, name, None) or ()]
    profiles = getattr(args, "profile", None) or []
    for profile in [profiles] if isinstance(profiles, (str, Path)) else profiles:
        if not placeholder(str(profile)) and not (REPO / str(profile)).is_dir():
            problems.append(f"no profile folder {profile}")
    for rule in named:
        if rule not in rules and not rule.startswith("solve_dataset_"):
            problems.append(f"no rule {rule!r} in the workflow")
    for item in getattr(args, "config", None) or []:
        key, _, value = item.partition("=")
        if key not in schema:
            problems.append(f"--config {item}: no key {key!r} in config/schema.yaml")
            continue
        parsed = yaml.safe_load(value) if value else None
        sub = schema[key].get("properties")
        if isinstance(parsed, dict) and sub is not None:
            problems += [f"--config {item}: no key {key}.{k} in config/schema.yaml" for k in parsed if k not in sub]
    return problems


def test_snakemake_commands_parse():
    from snakemake.cli import get_argument_parser

    parser = get_argument_parser()
    rules, schema = rule_names(), schema_keys()
    assert "extract" in rules and "release_extract" in rules
    found = commands("snakemake")
    assert len(found) >= 5
    problems = []
    for page, command in found:
        problems += [f"{page}: {command}\n    {problem}" for problem in check_snakemake(parser, command, rules, schema)]
    assert not problems, "documented snakemake commands that do not fit:\n" + "\n".join(problems)
    assert check_snakemake(parser, "snakemake --cores 2 --config nonsense=1", rules, schema)
    assert check_snakemake(parser, "snakemake --cores 2 --config 'solve={solver: exact, nonsense: 1}'", rules, schema)
    assert check_snakemake(parser, "snakemake --cores 2 --forcerun nonsense", rules, schema)
    assert check_snakemake(parser, "snakemake --cores 2 --set-threads nonsense=2", rules, schema)
    assert check_snakemake(parser, "snakemake --profile profiles/nonsense", rules, schema)
    assert check_snakemake(parser, "snakemake --no-such-option", rules, schema)
