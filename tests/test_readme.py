"""The docs document every setting: each config key the parser accepts (docs/configuration.md), each environment
variable the code reads (docs/operations.md), each command with each of its flags (docs/configuration.md). The lists
are derived from the code, so a new key, variable or flag fails here, naming what the docs do not mention, until it
is documented (and a documented one the code dropped fails too). The README and the docs link only to files in the
repository, and the README stays short."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

import watchnext.config as config_module
from cli.main import build_parser
from service.settings import Settings
from watchnext.config import load_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {"configuration": (ROOT / "docs" / "configuration.md").read_text(),
        "operations": (ROOT / "docs" / "operations.md").read_text()}
CODE = re.compile(r"`([^`]+)`")
OUTSIDE_CODE_PIPE = re.compile(r"\|(?=(?:[^`]*`[^`]*`)*[^`]*$)")  # a cell border: a | not inside `code`


def section(title: str, doc: str = "configuration") -> str:
    """The text under a heading of docs/<doc>.md, up to the next heading of the same or a higher level."""
    level = len(title) - len(title.lstrip("#"))
    text = DOCS[doc]
    m = re.search(rf"^{re.escape(title)}\s*$", text, re.M)
    assert m, f"docs/{doc}.md has no {title!r} heading"
    rest = text[m.end():]
    nxt = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: nxt.start() if nxt else len(rest)]


def table_rows(text: str, header_starts: str) -> list[list[str]]:
    """The cells of each body row of the markdown table whose header row starts with `header_starts`."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"| {header_starts}")), None)
    assert start is not None, f"no table with header {header_starts!r}"
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in OUTSIDE_CODE_PIPE.split(line.strip().strip("|"))])
    return rows


def codes(cell: str) -> list[str]:
    return CODE.findall(cell)


# ---------------------------------------------------------------- the config file


def config_keys_the_parser_reads(monkeypatch) -> dict[str, set[str]]:
    """Every key the config parser looks up, per section (`[item]`, `[[features]]`, ...), recorded while it parses
    the shipped file (which has every feature kind): the keys a user can write."""
    seen: dict[str, set[str]] = {}
    done = config_module._Section.done

    def recording(self) -> None:
        where = self.where.split("[")[0].split(" ")[0]  # "features[3] (hour)" -> "features"
        seen.setdefault(where, set()).update(self.used)
        done(self)

    monkeypatch.setattr(config_module._Section, "done", recording)
    config = load_config()
    kinds = {f.kind for f in config.features}
    assert kinds == set(config_module.FEATURE_KINDS), f"the shipped config lacks a feature kind: has {sorted(kinds)}"
    top = seen.pop("")
    out = {}
    for name, keys in seen.items():
        value = dataclasses.fields(config)  # features and tasks are arrays of tables, the rest tables
        array = any(f.name == name and f.type.startswith("tuple") for f in value)
        out[f"[[{name}]]" if array else f"[{name}]"] = keys
    assert {s.strip("[]") for s in out} == top, (sorted(out), sorted(top))
    return out


def documented_config_keys() -> dict[str, set[str]]:
    doc: dict[str, set[str]] = {}
    current = None
    for cells in table_rows(section("# Configuration"), "section | key"):
        if cells[0]:
            current = cells[0].strip("`")
        assert current, f"a row before any section: {cells}"
        doc.setdefault(current, set()).update(codes(cells[1]))
    return doc


def test_every_config_key_is_in_the_configuration_table(monkeypatch):
    code = config_keys_the_parser_reads(monkeypatch)
    doc = documented_config_keys()
    missing = [f"{sec} {k}" for sec, keys in sorted(code.items()) for k in sorted(keys - doc.get(sec, set()))]
    assert not missing, f"config keys the README's Configuration table does not document: {missing}"
    stale = [f"{sec} {k}" for sec, keys in sorted(doc.items()) for k in sorted(keys - code.get(sec, set()))]
    assert not stale, f"the Configuration table documents keys the config parser does not read: {stale}"
    assert len(code) == 9 and sum(map(len, code.values())) > 50  # the recording saw every section


# ---------------------------------------------------------------- the environment


ENV_READ = re.compile(r"""(?:environ|env)(?:\.get\(|\[)\s*["']([A-Z][A-Z0-9_]*)["']""")
ENV_NAMED = re.compile(r"\b(WATCHNEXT_[A-Z0-9_]+|REDIS_URL)\b")


def env_vars_the_code_reads() -> set[str]:
    """The service's variables, from the Settings model (each field names its own), and every other variable the
    code reads with os.environ / env .get or [...], or mentions (WATCHNEXT_* names and REDIS_URL)."""
    names: set[str] = set(Settings.variables().values())
    for pkg in ("watchnext", "service", "training", "analysis", "simulation", "cli"):
        for p in sorted((ROOT / pkg).rglob("*.py")):
            text = p.read_text()
            names |= set(ENV_READ.findall(text)) | set(ENV_NAMED.findall(text))
    return names


def test_every_environment_variable_is_in_the_settings_section():
    names = env_vars_the_code_reads()
    assert {"WATCHNEXT_CONFIG", "WATCHNEXT_MODELS", "REDIS_URL", "WATCHNEXT_ADMIN_TOKEN", "WATCHNEXT_URL"} <= names
    documented = set(codes(section("## Settings", "operations")))
    missing = sorted(names - documented)
    assert not missing, f"environment variables the README's Settings section does not mention: {missing}"


def shown_default(value) -> str:
    """A default as the Settings table writes it: unset, 127.0.0.1, 8000, 0.05, 64."""
    return "unset" if value is None else format(value, "g") if isinstance(value, float) else str(value)


def test_every_service_setting_is_in_the_settings_table():
    """One row per setting (or one for several, `host`, `port`), naming exactly the field's variable and flag as the
    Settings model declares them, and starting its default cell with the field's default."""
    fields = Settings.model_fields
    variables, flags = Settings.variables(), Settings.flags()
    rows = table_rows(section("## Settings", "operations"), "setting")
    seen: list[str] = []
    for cells in rows:
        names = codes(cells[0].split(":")[0])  # the fields the row is about: `host`, `port`: where to listen
        if not names:  # limits, attribution window, ...: the config's
            continue
        stale = [n for n in names if n not in fields]
        assert not stale, f"the Settings table documents fields Settings does not have: {stale}"
        seen += names
        env = [c for c in codes(cells[1]) if not c.endswith("://")]
        assert env == [variables[n] for n in names if n in variables], (names, env)
        assert codes(cells[2]) == [flags[n] for n in names if n in flags], (names, codes(cells[2]))
        shown = cells[3].replace("`", "").removeprefix("./")
        parts = shown.split(", ", len(names) - 1) if len(names) > 1 else [shown]
        for n, part in zip(names, parts, strict=True):
            want = shown_default(fields[n].default)
            assert re.match(rf"{re.escape(want)}(?![\w.])", part), f"{n}: default {want}, the table says {cells[3]!r}"
    missing = sorted(set(fields) - set(seen))
    assert not missing, f"Settings fields the README's Settings table does not document: {missing}"
    assert len(seen) == len(set(seen)), f"a setting with two rows: {sorted(seen)}"


@pytest.mark.parametrize("path", ["watchnext serve", "watchnext up"])
def test_the_settings_flags_are_the_service_commands_flags(path):
    """Each flag Settings names is one of serve's and up's, under the name settings_of reads (its dest), passing
    its text on as given (no default, type or choices of its own: Settings converts, checks and defaults), and
    its help names the setting's variable."""
    actions = {o: a for a in dict(commands())[path]._actions for o in a.option_strings}
    variables = Settings.variables()
    for name, flag in Settings.flags().items():
        a = actions[flag]
        assert a.dest == flag[2:].replace("-", "_"), (flag, a.dest)
        assert a.default is None and a.type is None and a.choices is None, flag
        if name in variables:
            assert f"${variables[name]}" in a.help, (flag, a.help)


# ---------------------------------------------------------------- commands and flags


def commands(parser: argparse.ArgumentParser | None = None, path: tuple[str, ...] = ("watchnext",)):
    """(path, parser) of every command that runs something: the leaves of the subcommand tree."""
    parser = parser or build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path), parser
        return
    for action in subs:
        for name, sub in action.choices.items():
            yield from commands(sub, path + (name,))


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


def positionals(parser: argparse.ArgumentParser) -> int:
    return sum(1 for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction))


def documented_commands() -> dict[str, tuple[int, set[str]]]:
    """command path -> (positional arguments shown, flags listed), from the Commands table."""
    out = {}
    for cells in table_rows(section("## Commands"), "command | flags"):
        (usage,) = codes(cells[0])
        words = usage.split()
        path = " ".join(w for w in words if re.fullmatch(r"[a-z-]+", w))
        args = [w for w in words if not re.fullmatch(r"[a-z-]+", w)]
        assert all(re.fullmatch(r"\[?[A-Z]+\]?", a) for a in args), usage
        assert path not in out, f"{path} has two rows"
        out[path] = (len(args), {c.split(" ")[0] for c in codes(cells[1]) if c.startswith("--")})
    return out


@pytest.mark.parametrize("path", [p for p, _ in commands()])
def test_every_command_and_flag_is_in_the_commands_table(path):
    parser = dict(commands())[path]
    doc = documented_commands()
    assert path in doc, f"the README's Commands table has no row for `{path}`"
    shown, flags = doc[path]
    assert shown == positionals(parser), f"`{path}` takes {positionals(parser)} positional argument(s), shown {shown}"
    missing = sorted(long_options(parser) - flags)
    assert not missing, f"flags of `{path}` the README's Commands table does not list: {missing}"
    stale = sorted(flags - long_options(parser))
    assert not stale, f"the Commands table lists flags `{path}` does not take: {stale}"


def test_the_commands_table_lists_only_real_commands():
    real = {p for p, _ in commands()}
    assert len(real) >= 15
    stale = sorted(set(documented_commands()) - real)
    assert not stale, f"the README's Commands table has rows for commands that do not exist: {stale}"


def test_the_readme_is_short_and_every_link_stays_in_the_repository():
    assert README.count("\n") <= 250
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        assert "CONTRACT" not in text and "../shared" not in text, f"{path.name} points outside the repository"
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if target.startswith(("http://", "https://")):
                continue
            assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"
