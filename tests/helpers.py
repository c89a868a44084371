"""Helpers shared by the tests (import as tests.helpers)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from watchnext.config import default_config_path
from watchnext.simulate import WorldSpec, write_history


def small_config_text(**sections) -> str:
    """The shipped config, shrunk so training takes seconds; `sections` override keys per table."""
    data = tomllib.loads(default_config_path().read_text())
    for f in data["features"]:
        if "buckets" in f:
            f["buckets"] = min(f["buckets"], 5_000)
        if "dim" in f:
            f["dim"] = min(f["dim"], 8)
    data["model"].update({"experts": 3, "expert_layers": [32, 16], "tower_layers": [8], "interaction_dim": 4, "interaction_heads": 2})
    data["trainer"].update({"batch_size": 256, "report_every_examples": 2_000, "eval_window": 5_000})
    for table, values in sections.items():
        data.setdefault(table, {}).update(values)
    return dumps_toml(data)


def dumps_toml(data: dict) -> str:
    """Enough TOML for configs: scalars, lists, inline tables, arrays of tables."""

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        raise TypeError(type(v))

    out = []
    for k, v in data.items():
        if isinstance(v, dict):
            out.append(f"[{k}]")
            out += [f"{kk} = {val(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                out.append(f"[[{k}]]")
                out += [f"{kk} = {val(vv)}" for kk, vv in item.items()]
        else:
            out.insert(0, f"{k} = {val(v)}")
    return "\n".join(out) + "\n"


SMALL_WORLD = WorldSpec(users=300, videos=400, channels=40, tags=50)


def write_small_history(path: Path, n: int, seed: int = 0) -> Path:
    with open(path, "w") as fh:
        write_history(fh, n, seed, WorldSpec(**vars(SMALL_WORLD)))
    return path
