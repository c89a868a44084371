"""The native gather (watchnext/_native.c) against the Arrow path: the same arrays, problems and counts."""

import numpy as np
import pyarrow as pa
import pytest

from watchnext.encoding import NATIVE, Encoder, Problems, _native, section_type

native = pytest.mark.skipif(not NATIVE, reason="watchnext._native was not built (pip install -e . with a C compiler)")

ALPHABET = np.array(list("abcxyz019-_é✓"))


def test_the_native_module_is_built():
    """`make test` installs with a C compiler, so the module must be there; without it the service is slower."""
    assert NATIVE, "watchnext._native was not built: `pip install -e .` needs a C compiler"


def random_rows(config, rng: np.random.Generator, n: int) -> list[dict]:
    """Candidates with every kind of value the gather takes, and a few it has to check."""
    rows = []
    for i in range(n):
        row: dict = {}
        for f in config.features:
            if f.source != "candidate":
                continue
            r = rng.random()
            if r < 0.1:
                continue  # absent
            if r < 0.15:
                row[f.name] = None
                continue
            if f.kind == "categorical":
                row[f.name] = "".join(rng.choice(ALPHABET, size=int(rng.integers(0, 12)))) + f"#{i}"
            elif f.kind == "categorical_list":
                row[f.name] = ["".join(rng.choice(ALPHABET, size=int(rng.integers(0, 6))))
                               for _ in range(int(rng.integers(0, f.max_len + 4)))]
            elif f.kind == "numeric":
                v = [float(rng.normal() * 10), int(rng.integers(-5, 10**9)), -1.0, -0.5, 0, 1e300, float("nan"),
                     float("inf"), 2**53][int(rng.choice(9, p=[.5, .2, .05, .05, .05, .05, .04, .03, .03]))]
                row[f.name] = v
            else:
                vec = [float(x) for x in rng.normal(size=f.size)]
                if rng.random() < 0.05:
                    vec[int(rng.integers(f.size))] = [float("nan"), 1e39, -float("inf")][int(rng.integers(3))]
                if rng.random() < 0.1:
                    vec[0] = int(rng.integers(-3, 3))
                row[f.name] = vec
        if rng.random() < 0.1:
            row["colour"] = "red"  # unknown
        rows.append(row)
    return rows


def both(enc: Encoder, source: str, rows: list[dict]):
    n = len(rows)
    a, pa_ = enc.empty_inputs(n), Problems(n)
    enc.encode_section(source, pa.array(rows, type=section_type(enc.config, source)), n, a, pa_)
    g = enc.gather(source, rows)
    assert g is not None
    b, pb = enc.empty_inputs(n), Problems(n)
    enc.encode_gathered(source, g, b, pb)
    return (a, pa_), (b, pb), g


@native
def test_gathered_encoding_equals_the_arrow_path(small_config):
    enc = Encoder(small_config)
    rng = np.random.default_rng(11)
    known = {f.name for f in small_config.features if f.source == "candidate"}
    for n in (0, 1, 7, 300):
        rows = random_rows(small_config, rng, n)
        (a, pa_), (b, pb), g = both(enc, "candidate", rows)
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        assert pa_.bad.tolist() == pb.bad.tolist()
        assert [pa_.reasons(i) for i in range(n)] == [pb.reasons(i) for i in range(n)]
        assert g.unknown == sum(len(r.keys() - known) for r in rows)
        lacking = [any(r.get(f) is None for f in known - {"video_id"}) for r in rows]
        assert g.missing(skip="video_id").tolist() == lacking
    assert pb.bad.any() and not pb.bad.all()  # the checks ran on both sides


@native
def test_shared_sections_too(small_config):
    enc = Encoder(small_config)
    user = {"user_id": "u1", "user_country": "FR", "user_recent_videos": ["v1", "v2"] * 20}
    for source, row in (("user", user), ("user", {}), ("query", {"query_video_id": "v3"}), ("context", {"hour": 23})):
        (a, _), (b, _), _ = both(enc, source, [row])
        assert all(np.array_equal(a[k], b[k]) for k in a)


@native
@pytest.mark.parametrize("row", [
    {"video_id": 3},  # an integer id: the checking path reads it as a string
    {"video_id": ["a"]},
    {"video_age_days": "3"},
    {"video_age_days": True},  # bool is an int in Python, not a number here
    {"video_age_days": 2**53 + 1},  # a double cannot hold it exactly: Arrow refuses it
    {"video_age_days": [1.0]},
    {"video_tags": "a"},
    {"video_tags": ["a", None]},
    {"video_tags": ["a", 1]},
    {"video_embedding": [0.0] * 3},
    {"video_embedding": [0.0] * 15 + [None]},
    {"video_embedding": (0.0,) * 16},
    {"video_id": "\ud800"},  # a lone surrogate is not UTF-8
])
def test_anything_else_is_left_to_the_arrow_path(small_config, row):
    enc = Encoder(small_config)
    assert enc.gather("candidate", [{"video_id": "ok"}, row]) is None
    assert enc.gather("candidate", [{"video_id": "ok"}, None]) is None  # not an object


@native
def test_gather_refuses_buffers_of_the_wrong_size():
    with pytest.raises(ValueError, match="present buffer holds 1 bytes, expected 2"):
        _native.gather([{}, {}], (("x", 2, 1, np.zeros(1, np.uint8), np.zeros(2), None),))
    with pytest.raises(ValueError, match="kind 9"):
        _native.gather([{}], (("x", 9, 1, np.zeros(1, np.uint8), np.zeros(1), None),))
