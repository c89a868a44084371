"""One error base class (watchnext.errors.WatchnextError) and the command line's one handler: a user error is one
line naming the field and exit status 2; anything else is a bug: its traceback, a line saying so, exit status 70."""

from __future__ import annotations

import json
import sys

import pytest

import cli.main
from cli.main import EX_SOFTWARE, EX_USER, CliError, main, version_number
from service.errors import BadRequest, Conflict, NotFound, PayloadTooLarge, ServiceError, Unauthorized, Unavailable
from service.settings import SettingsError
from service.triton import TritonError, import_tritonclient
from simulation.traffic import TrafficError, check_url
from watchnext.config import ConfigError, parse_config
from watchnext.encoding import Problems
from watchnext.entities import load_file
from watchnext.errors import WatchnextError
from watchnext.examples import DataError, clean_example
from watchnext.experiments import Experiment, ExperimentError
from watchnext.redis_embed import RedisStartError
from watchnext.repository import ModelRepository, RepositoryError

# ---------------------------------------------------------------- the classes


def test_every_user_facing_error_is_a_watchnext_error():
    for cls in (ConfigError, DataError, RepositoryError, ExperimentError, TrafficError, CliError, ServiceError,
                TritonError, SettingsError, RedisStartError):
        assert issubclass(cls, WatchnextError), cls
    e = WatchnextError("candidates[3].video_age_days", "must be a finite number")
    assert (e.field, e.reason, str(e)) == ("candidates[3].video_age_days", "must be a finite number",
                                           "candidates[3].video_age_days: must be a finite number")
    assert str(WatchnextError("", "the reason alone")) == "the reason alone"


def _raised(fn, *args, **kwargs) -> WatchnextError:
    with pytest.raises(WatchnextError) as e:
        fn(*args, **kwargs)
    return e.value


def test_errors_carry_field_and_reason_apart(small_config, tmp_path, monkeypatch):
    e = _raised(parse_config, {"features": [{"name": "u", "source": "user", "kind": "nope", "buckets": 3}],
                               "tasks": [{"name": "click", "kind": "binary", "group": "engagement"}]}, "x.toml")
    assert isinstance(e, ConfigError) and e.field == "x.toml: features[0] (u).kind"
    assert e.reason.startswith("expected one of categorical")

    e = _raised(clean_example, {"ts": 1.0, "position": "first"}, small_config)
    assert isinstance(e, DataError) and isinstance(e, ValueError)  # the line-by-line parser catches it as one
    assert (e.field, e.reason) == ("position", "expected an integer, got 'first'")
    e = _raised(clean_example, {"ts": 1.0, "candidate": {"video_views": "many"}}, small_config)
    assert (e.field, e.reason) == ("candidate.video_views", "expected a number, got str 'many'")

    bad = tmp_path / "entities.jsonl"
    bad.write_text('{"source": "candidate", "id": "v1", "features": {"video_views": 3}}\n'
                   '{"source": "candidate", "id": "v2", "features": {"video_embedding": [1, 2]}}\n')
    e = _raised(load_file, None, small_config, bad)
    assert isinstance(e, DataError)
    assert (e.field, e.reason) == (f"{bad}:2: candidate.video_embedding", "expected 16 numbers")

    repo = ModelRepository(tmp_path / "models", "ranker")
    (repo.dir / "1").mkdir(parents=True)
    (repo.dir / "1" / "metadata.json").write_text("{not json")
    e = _raised(repo.metadata, 1)
    assert isinstance(e, RepositoryError) and e.field == str(repo.dir / "1" / "metadata.json")
    assert e.reason.startswith("not valid JSON")
    e = _raised(repo.metadata, 9)
    assert e.field == "" and e.reason.startswith("model 'ranker' has no version 9")

    e = _raised(Experiment.from_dict, {"name": "x", "arms": [{"name": "a", "share": 1.0}]})
    assert isinstance(e, ExperimentError) and e.field == "arms"
    # score weights of an arm: the request's field, not the config file's (no "field: reason" string parsed back)
    e = _raised(Experiment.from_dict, {"name": "x", "arms": [{"name": "a", "share": 0.5},
                                                             {"name": "b", "share": 0.5, "weights": {"joy": 1}}]},
                small_config)
    assert (e.field, e.reason.split(" (")[0]) == ("arms[1].weights.joy", "not a task")

    e = _raised(check_url, "http://example.com:8000")
    assert isinstance(e, TrafficError) and e.field == "--url" and "not a loopback address" in e.reason

    e = _raised(version_number, "two")
    assert isinstance(e, CliError) and (e.field, e.reason) == ("VERSION", "expected a version number such as 3 "
                                                                          "(or v3), got 'two'")

    monkeypatch.setitem(sys.modules, "tritonclient", None)
    monkeypatch.setitem(sys.modules, "tritonclient.http", None)
    e = _raised(import_tritonclient)
    assert isinstance(e, TritonError) and e.field == "" and "pip install 'watchnext[triton]'" in e.reason


def test_service_errors_keep_their_status_and_body():
    for cls, status in ((ServiceError, 500), (BadRequest, 422), (PayloadTooLarge, 413), (Unauthorized, 401),
                        (NotFound, 404), (Conflict, 409), (Unavailable, 503)):
        e = cls("candidates[3].video_age_days", "must be a finite number")
        assert isinstance(e, WatchnextError) and e.status == status
        assert e.body() == {"error": {"field": "candidates[3].video_age_days", "reason": "must be a finite number"}}
    assert BadRequest("body", "not valid JSON", status=400).status == 400


def test_problems_keep_the_field_and_the_reason_of_each_check():
    p = Problems(3)
    p.add([False, True, True], "candidate.video_views", "must be a finite number")
    p.add([False, True, False], "candidate.video_embedding", "expected 16 numbers")
    assert p.first() == (1, "candidate.video_views", "must be a finite number")
    assert p.reasons(1) == ["candidate.video_views: must be a finite number",
                            "candidate.video_embedding: expected 16 numbers"]
    assert Problems(2).first() is None


# ---------------------------------------------------------------- the command line's handler


def _bad_config(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[[features]]\nname = "u"\nsource = "user"\nkind = "nope"\nbuckets = 3\n\n'
                 '[[tasks]]\nname = "click"\nkind = "binary"\ngroup = "engagement"\n')
    return p


def test_a_user_error_is_one_line_naming_the_field(tmp_path, capsys):
    p = _bad_config(tmp_path)
    assert main(["models", "list", "--config", str(p), "--models", str(tmp_path / "models")]) == EX_USER == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [err.strip()]  # one line
    assert err.startswith(f"watchnext: {p}: features[0] (u).kind: expected one of categorical")
    assert "Traceback" not in err and "bug" not in err


def test_a_user_error_without_a_field_is_its_reason(monkeypatch, capsys):
    def refuse(args):
        raise CliError("", "nothing to do here")

    monkeypatch.setattr(cli.main, "cmd_models_list", refuse)
    assert main(["models", "list"]) == 2
    assert capsys.readouterr().err == "watchnext: nothing to do here\n"


@pytest.mark.parametrize("exc", [ZeroDivisionError("division by zero"), RuntimeError("the state went bad"),
                                 ValueError("an internal check failed"), KeyError("missing")])
def test_an_unexpected_exception_is_reported_as_a_bug(monkeypatch, capsys, exc):
    """Even a ValueError: it once printed as bad input, now only a WatchnextError does."""

    def broken(args):
        raise exc

    monkeypatch.setattr(cli.main, "cmd_models_list", broken)
    assert main(["models", "list"]) == EX_SOFTWARE == 70
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert any(line.startswith(type(exc).__name__) for line in lines)  # the exception, in the traceback
    assert "in broken" in err  # where it was raised
    assert "bug in watchnext" in lines[-1] and "report it" in lines[-1]
    assert not any(line.startswith("watchnext: error") for line in lines)  # never printed as bad input


def test_an_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.main, "cmd_models_list", interrupted)
    assert main(["models", "list"]) == 130
    assert capsys.readouterr().err == "watchnext: interrupted\n"


def test_commands_refuse_bad_input_as_user_errors(tmp_path, capsys, small_config_path):
    """Input problems that were ValueErrors (caught as such by the old handler) are WatchnextErrors now."""
    bad = tmp_path / "events.jsonl"
    bad.write_text('{"ts": "noon"\n')
    assert main(["ab", "report", "x", "--events", str(bad), "--arms", "a=0.5,b=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"watchnext: {bad}: not a JSON-lines event log") and len(err.splitlines()) == 1
    assert main(["ab", "report", "x", "--events", str(bad), "--experiment", str(tmp_path / "none.json")]) == 2
    assert capsys.readouterr().err.startswith(f"watchnext: --experiment {tmp_path / 'none.json'}: cannot be read")
    exp = tmp_path / "exp.json"
    exp.write_text(json.dumps({"name": "x", "arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.6}]}))
    assert main(["ab", "report", "x", "--events", str(bad), "--experiment", str(exp)]) == 2
    assert capsys.readouterr().err.startswith(f"watchnext: --experiment {exp}: arms: shares must sum to 1")
    data = tmp_path / "h.jsonl"
    data.write_text("not json\n")
    assert main(["evaluate", "--config", str(small_config_path), "--models", str(tmp_path / "m"),
                 "--model", "x", "--data", str(data)]) == 2
    assert capsys.readouterr().err == "watchnext: --model: expected a version number (3 or v3), 'serving' or 'latest', got 'x'\n"
