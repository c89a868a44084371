import dataclasses
import tomllib

import pytest

from tests.helpers import dumps_toml, small_config_text
from watchnext.config import ConfigError, load_config, parse_config


def test_shipped_config_describes_the_video_use_case():
    c = load_config()
    sources = {f.source for f in c.features}
    kinds = {f.kind for f in c.features}
    assert sources == {"user", "query", "context", "candidate"}
    assert kinds == {"categorical", "categorical_list", "numeric", "vector"}
    tasks = {t.name: t for t in c.tasks}
    assert {t.group for t in c.tasks} == {"engagement", "satisfaction"}
    assert tasks["like"].given == "click" and tasks["watch_time"].given == "click"
    assert tasks["click"].default == 0.0 and tasks["like"].default is None
    assert c.item_id == "video_id"
    assert c.bias.features == ("position", "device")


def test_config_from_environment(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(small_config_text(model={"name": "other"}))
    assert load_config(env={"WATCHNEXT_CONFIG": str(p)}).model.name == "other"


def _with(tmp_path, **sections):
    p = tmp_path / "bad.toml"
    p.write_text(small_config_text(**sections))
    return p


@pytest.mark.parametrize(
    "sections, needle",
    [
        ({"model": {"arch": "transformer"}}, "model.arch: expected one of mmoe, shared_bottom, got 'transformer'"),
        ({"model": {"experts": 0}}, "model.experts: must be > 0, got 0"),
        ({"model": {"expert_layers": [64, -1]}}, "model.expert_layers: expected a list of positive integers"),
        ({"trainer": {"batch_size": "big"}}, "trainer.batch_size: expected int, got str 'big'"),
        ({"trainer": {"bacth_size": 3}}, "trainer: unknown key 'bacth_size'"),
        ({"score": {"weights": {"clicks": 1.0}}}, "score.weights.clicks: not a task"),
        ({"bias": {"features": ["position", "hour"]}}, "bias.features: 'hour' must be 'position' or a categorical feature"),
        ({"bias": {"dropout": 1.5}}, "bias.dropout: must be in [0, 1), got 1.5"),
        ({"item": {"id": "video_views"}}, "item.id: 'video_views' is a numeric feature; an item id must be categorical"),
        ({"item": {"id": "hour"}}, "item.id: 'hour' is not a candidate feature"),
    ],
)
def test_bad_values_name_file_key_and_reason(tmp_path, sections, needle):
    p = _with(tmp_path, **sections)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(str(p) + ": ")
    assert needle in str(e.value)


def test_bad_feature_and_task_entries(tmp_path):
    base = {
        "features": [{"name": "u", "source": "user", "kind": "categorical", "buckets": 10}],
        "tasks": [{"name": "click", "kind": "binary", "group": "engagement"}],
    }
    parse_config(base)  # the minimal config is fine
    bad_kind = {**base, "features": [{"name": "u", "source": "user", "kind": "numbr"}]}
    with pytest.raises(ConfigError, match=r"features\[0\] \(u\)\.kind: expected one of categorical"):
        parse_config(bad_kind, "x.toml")
    no_buckets = {**base, "features": [{"name": "u", "source": "user", "kind": "categorical"}]}
    with pytest.raises(ConfigError, match=r"features\[0\] \(u\)\.buckets: is required"):
        parse_config(no_buckets)
    given_regression = {**base, "tasks": base["tasks"] + [{"name": "w", "kind": "regression", "group": "engagement", "given": "nope"}]}
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.given: given='nope' must name another binary task"):
        parse_config(given_regression)
    twice = {**base, "features": base["features"] * 2}
    with pytest.raises(ConfigError, match=r"features\[1\]\.name: 'u' appears twice"):
        parse_config(twice)
    binary_transform = {**base, "tasks": [{"name": "c", "kind": "binary", "group": "engagement", "transform": "log1p"}]}
    with pytest.raises(ConfigError, match="a binary task takes no transform"):
        parse_config(binary_transform)


def test_not_toml_and_missing_file(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("[model\narch = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.toml")


def test_hash_follows_the_model_interface_only(tmp_path):
    a = load_config(_with(tmp_path, score={"weights": {"click": 5.0}}, trainer={"batch_size": 64}))
    b = load_config(_with(tmp_path, score={"weights": {"click": 1.0}}))
    assert a.hash == b.hash  # weights and trainer settings can change without retraining
    c = load_config(_with(tmp_path, model={"experts": 5}))
    assert c.hash != a.hash


def test_dumps_toml_round_trips():
    import tomllib

    d = {"a": {"x": [1, 2], "y": "s", "z": True, "w": {"k": 1.5}}, "f": [{"n": "q"}, {"n": "r"}]}
    assert tomllib.loads(dumps_toml(d)) == d


def test_shared_tables():
    base = {
        "features": [
            {"name": "v", "source": "candidate", "kind": "categorical", "buckets": 10, "dim": 4},
            {"name": "recent", "source": "user", "kind": "categorical_list", "table": "v"},
        ],
        "tasks": [{"name": "click", "kind": "binary", "group": "engagement"}],
    }
    c = parse_config(base)
    recent = c.feature("recent")
    assert (recent.buckets, recent.dim, recent.table) == (10, 4, "v")
    wrong_dim = {**base, "features": [base["features"][0], {**base["features"][1], "dim": 8}]}
    with pytest.raises(ConfigError, match=r"recent\)\.table: shares 'v', whose dim is 4, not 8"):
        parse_config(wrong_dim)
    no_owner = {**base, "features": [base["features"][0], {**base["features"][1], "table": "nope"}]}
    with pytest.raises(ConfigError, match="'nope' must be a categorical feature with a table of its own"):
        parse_config(no_owner)


RANGE_BASE = {
    "features": [{"name": "u", "source": "user", "kind": "categorical", "buckets": 10}],
    "tasks": [{"name": "click", "kind": "binary", "group": "engagement"}],
}


def _task(**kw):
    return {**RANGE_BASE, "tasks": RANGE_BASE["tasks"] + [{"name": "w", "kind": "regression", "group": "engagement", **kw}]}


def test_label_ranges_and_their_defaults():
    shipped = {t.name: t.range for t in load_config().tasks}
    assert shipped == {"click": (0.0, 1.0), "watch_time": (0.0, 1e7), "dismiss": (0.0, 1.0), "like": (0.0, 1.0),
                       "rating": (1.0, 5.0)}
    assert parse_config(_task()).tasks[1].range == (-1e7, 1e7)  # regression without a transform
    assert parse_config(_task(range=[-2, 3.5])).tasks[1].range == (-2.0, 3.5)
    assert parse_config(_task(range=[0, 3e38])).tasks[1].range == (0.0, 3e38)  # inside float32
    binary = {**RANGE_BASE, "tasks": [{**RANGE_BASE["tasks"][0], "range": [0, 1]}]}
    assert parse_config(binary).tasks[0].range == (0.0, 1.0)


def test_label_range_does_not_change_the_hashes():
    a, b = parse_config(_task()), parse_config(_task(range=[1, 5]))
    assert a.hash == b.hash and a.checkpoint_hash == b.checkpoint_hash  # it shapes no parameter
    assert b.tasks[1].range == (1.0, 5.0)


@pytest.mark.parametrize("task, needle", [
    ({"range": 5}, r"tasks\[1\] \(w\)\.range: expected list, got int 5"),
    ({"range": [1]}, r"tasks\[1\] \(w\)\.range: expected \[lo, hi\], two numbers, got \[1\]"),
    ({"range": [1, "5"]}, r"tasks\[1\] \(w\)\.range: expected \[lo, hi\], two numbers"),
    ({"range": [0, True]}, r"tasks\[1\] \(w\)\.range: expected \[lo, hi\], two numbers"),
    ({"range": [5, 1]}, r"tasks\[1\] \(w\)\.range: lo must be < hi, got \[5, 1\]"),
    ({"range": [0, 1e39]}, r"tasks\[1\] \(w\)\.range: bounds must be finite numbers within float32"),
    ({"range": [float("-inf"), 0]}, r"tasks\[1\] \(w\)\.range: bounds must be finite numbers within float32"),
    ({"range": [-1, 10], "transform": "log1p"}, r"tasks\[1\] \(w\)\.range: transform log1p needs lo > -1, got -1"),
    ({"range": [1, 5], "default": 0.0}, r"tasks\[1\] \(w\)\.default: must lie in the task's range \[1, 5\], got 0"),
])
def test_bad_label_ranges_name_the_key(task, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        parse_config(_task(**task), "x.toml")
    assert str(e.value).startswith("x.toml: ")


def test_a_binary_task_has_only_the_range_0_1():
    binary = {**RANGE_BASE, "tasks": [{**RANGE_BASE["tasks"][0], "range": [0, 2]}]}
    with pytest.raises(ConfigError, match=r"tasks\[0\] \(click\)\.range: a binary task's labels are 0 or 1: its range "
                                          r"can only be \[0, 1\], got \[0, 2\]"):
        parse_config(binary)


def test_checkpoint_hash_covers_the_shallow_tower(tmp_path):
    a = load_config(_with(tmp_path, bias={"dim": 8}))
    b = load_config(_with(tmp_path, bias={"dim": 16}))
    assert a.hash == b.hash  # the exported graph is the same: serving may keep its versions
    assert a.checkpoint_hash != b.checkpoint_hash  # the trainer's parameters are not
    c = load_config(_with(tmp_path, model={"experts": 5}))
    assert c.hash != a.hash and c.checkpoint_hash != a.checkpoint_hash


@pytest.mark.parametrize("bias, needle", [
    ({"observation_dropout": 1.0}, "bias.observation_dropout: must be in [0, 1), got 1.0"),
    ({"observation_dropout": "half"}, "bias.observation_dropout: expected float, got str 'half'"),
    ({"gradient_reversal": -0.5}, "bias.gradient_reversal: must be >= 0, got -0.5"),
    ({"mode": "input"}, "bias.mode: expected one of tower, feature, got 'input'"),
    ({"mode": "feature", "features": ["device"]}, "bias.mode: mode 'feature' feeds the position to the model"),
    ({"features": [], "gradient_reversal": 1.0}, "bias.gradient_reversal: acts on the shallow tower, which has no input"),
    ({"mode": "feature", "features": ["position"], "observation_dropout": 0.2},
     "bias.observation_dropout: acts on the shallow tower, which has no input"),
    ({"cross": ["position"]}, "bias.cross: needs two or more different features, got ['position']"),
    ({"cross": ["position", "position"]}, "bias.cross: needs two or more different features"),
    ({"cross": ["position", "hour"]}, "bias.cross: 'hour' is not an input of the shallow tower (['position', 'device'])"),
    ({"cross": ["position", 3]}, "bias.cross: expected a list of feature names, got ['position', 3]"),
    ({"mode": "feature", "cross": ["position", "device"]}, "bias.cross: 'position' is not an input of the shallow tower"),
    ({"features": ["position", "device", "user_country"], "cross": ["position", "device", "user_country"],
      "max_position": 1000}, "bias.cross: the joint table would have 4,377,738 rows (more than 1,000,000)"),
    ({"features": ["position", "position"]}, "bias.features: names a feature twice"),
    ({"crossed": ["position", "device"]}, "bias: unknown key 'crossed'"),
])
def test_bad_bias_keys_are_named(tmp_path, bias, needle):
    p = _with(tmp_path, bias=bias)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(str(p) + ": ")
    assert needle in str(e.value)


def test_bias_keys_parse_and_round_trip(tmp_path):
    from watchnext.config import config_from_dict

    c = load_config(_with(tmp_path, bias={"cross": ["position", "device"], "observation_dropout": 0.2,
                                          "gradient_reversal": 0.5, "mode": "tower"}))
    b = c.bias
    assert (b.cross, b.observation_dropout, b.gradient_reversal, b.mode) == (("position", "device"), 0.2, 0.5, "tower")
    assert config_from_dict(c.to_dict()) == dataclasses.replace(c, path="<checkpoint>")
    f = load_config(_with(tmp_path, bias={"mode": "feature"}))
    assert f.bias.tower_features == ("device",) and f.bias.features == ("position", "device")
    shipped = load_config()
    assert shipped.bias.mode == "tower" and shipped.bias.cross == () and shipped.bias.observation_dropout == 0.0
    assert shipped.bias.gradient_reversal == 0.0


def test_task_bias_flags_default_and_validate():
    c = load_config()
    assert {t.name: t.bias for t in c.tasks} == {"click": True, "watch_time": False, "dismiss": True, "like": False,
                                                 "rating": False}  # binary without `given`
    on = _task(bias=True)
    with pytest.raises(ConfigError, match=r"tasks\[1\] \(w\)\.bias: only a binary task takes the shallow tower's logit"):
        parse_config(on)
    with pytest.raises(ConfigError, match=r"tasks\[0\] \(click\)\.bias: expected bool, got str 'yes'"):
        parse_config({**RANGE_BASE, "tasks": [{**RANGE_BASE["tasks"][0], "bias": "yes"}]})
    like = {**RANGE_BASE, "tasks": RANGE_BASE["tasks"] + [{"name": "like", "kind": "binary", "group": "satisfaction",
                                                            "given": "click", "bias": True}]}
    assert [t.bias for t in parse_config(like).tasks] == [True, True]  # a `given` task may opt in


def test_checkpoint_hash_covers_the_bias_keys_that_shape_parameters(tmp_path):
    base = load_config(_with(tmp_path))
    same = [{"observation_dropout": 0.3}, {"dropout": 0.2}]  # shape nothing: a checkpoint may resume under them
    for bias in same:
        c = load_config(_with(tmp_path, bias=bias))
        assert (c.hash, c.checkpoint_hash) == (base.hash, base.checkpoint_hash), bias
    a, b = (load_config(_with(tmp_path, bias={"gradient_reversal": g})) for g in (0.5, 2.0))
    assert a.checkpoint_hash == b.checkpoint_hash  # the strength shapes nothing ...
    assert a.checkpoint_hash != base.checkpoint_hash  # ... the adversary it brings does
    for bias in [{"cross": ["position", "device"]}, {"mode": "feature"}]:
        c = load_config(_with(tmp_path, bias=bias))
        assert c.hash == base.hash and c.checkpoint_hash != base.checkpoint_hash, bias  # serving keeps its versions
    raw = tomllib.loads(small_config_text())
    raw["tasks"][3]["bias"] = True  # like takes the bias logit
    like = parse_config(raw)
    assert like.hash == base.hash and like.checkpoint_hash != base.checkpoint_hash
