"""The native gather (watchnext/_native.c) against the Arrow path: the same arrays, problems and counts."""

import json

import numpy as np
import orjson
import pyarrow as pa
import pytest

from watchnext.encoding import NATIVE, Encoder, Problems, _native, has_repeats, section_type

native = pytest.mark.skipif(not NATIVE, reason="watchnext._native was not built (pip install -e . with a C compiler)")

ALPHABET = np.array(list("abcxyz019-_é✓"))


def test_the_native_module_is_built():
    """`make test` installs with a C compiler, so the module must be there; without it the service is slower."""
    assert NATIVE, "watchnext._native was not built: `pip install -e .` needs a C compiler"


def random_rows(config, rng: np.random.Generator, n: int, source: str = "candidate") -> list[dict]:
    """Rows of a section with every kind of value the gather takes, and a few it has to check."""
    rows = []
    for i in range(n):
        row: dict = {}
        for f in config.features:
            if f.source != source:
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
def test_native_encode_equals_the_numpy_path(small_config):
    """`Encoder.encode_native` (C, one call, shared sections broadcast) gives the numpy path's bits, or None
    exactly when that path finds a problem (which it then names)."""
    enc = Encoder(small_config)
    rng = np.random.default_rng(5)
    kinds = {f.kind for f in small_config.features if f.source != "candidate"}
    assert kinds == {"categorical", "categorical_list", "numeric", "vector"}  # every kind is broadcast somewhere
    transforms = {f.transform for f in enc.numeric}
    assert transforms == {"none", "log1p"}
    compared = refused = refused_shared = 0
    for n in (0, 1, 2, 7, 300, 300, 300, *rng.integers(0, 40, 40).tolist()):
        cands = random_rows(small_config, rng, n)
        shared = {s: random_rows(small_config, rng, 1, s)[0] for s in ("user", "query", "context")}
        if rng.random() < 0.3:
            shared["query"] = None  # a section the request leaves out
        reference, problems = enc.empty_inputs(n), Problems(n)
        enc.encode_section("candidate", pa.array(cands, type=section_type(small_config, "candidate")), n, reference,
                           problems)
        bad_shared = False
        for s, row in shared.items():
            if row is not None:
                enc.encode_section(s, pa.array([row] * n, type=section_type(small_config, s)), n, reference, problems)
                one = Problems(1)  # as the service checks them: one row, whatever n is
                enc.encode_section(s, pa.array([row], type=section_type(small_config, s)), 1, enc.empty_inputs(1), one)
                bad_shared |= bool(one.bad.any())
        if bad_shared:  # nothing to compare: refused, at any n
            sections = {s: enc.gather(s, [row]) for s, row in shared.items() if row is not None}
            for m in (0, n):
                sections["candidate"] = enc.gather("candidate", cands[:m])
                assert enc.encode_native(sections, m) is None
            refused_shared += 1
            continue
        bad = problems.bad
        sections = {"candidate": enc.gather("candidate", cands)}
        sections.update({s: enc.gather(s, [row]) for s, row in shared.items() if row is not None})
        got = enc.encode_native(sections, n)
        if bad.any():
            assert got is None
            refused += 1
            keep = np.flatnonzero(~bad)  # the rows without a problem, again: now it encodes them
            sections["candidate"] = enc.gather("candidate", [cands[i] for i in keep])
            got = enc.encode_native(sections, len(keep))
            reference = {k: v[keep] for k, v in reference.items()}
        assert got is not None and got.keys() == reference.keys()
        for k in got:
            assert got[k].dtype == reference[k].dtype and got[k].shape == reference[k].shape, k
            assert np.array_equal(got[k], reference[k]), k
        compared += 1
    assert refused >= 3 and refused_shared >= 3 and compared >= 20, (refused, refused_shared, compared)


@native
def test_native_encode_refuses_each_failed_check(small_config):
    enc = Encoder(small_config)
    good = {"video_id": "v1", "video_age_days": 1.0, "video_embedding": [0.5] * 16}
    assert enc.encode_native({"candidate": enc.gather("candidate", [good] * 3)}, 3) is not None
    for change in ({"video_age_days": -1.0}, {"video_age_days": 1e39}, {"video_embedding": [0.5] * 15 + [1e39]}):
        g = enc.gather("candidate", [good, {**good, **change}, good])
        assert enc.encode_native({"candidate": g}, 3) is None, change
    g = enc.gather("context", [{"hour": -1e39}])  # in a broadcast section too, with or without rows to write
    for n in (3, 0):
        assert enc.encode_native({"candidate": enc.gather("candidate", [good] * n), "context": g}, n) is None, n
    g = enc.gather("user", [{"user_embedding": [1e39] * 16}])
    assert enc.encode_native({"user": g}, 0) is None
    assert enc.encode_native({"user": enc.gather("user", [{"user_embedding": [1.0] * 16}])}, 0) is not None
    with pytest.raises(ValueError, match="column 0 is not valid"):
        _native.encode(((0, 5, None, None, None, 7, 1, 0, 0, 0.0, np.zeros(2, np.int64)),), 2, None, None)
    with pytest.raises(ValueError, match="out buffer"):
        _native.encode(((0, 0, None, None, None, 7, 1, 0, 0, 0.0, np.zeros(3, np.int64)),), 2, None, None)
    with pytest.raises(ValueError, match="column 0 is not valid"):  # a width whose buffer size would overflow
        _native.encode(((1, 0, None, None, None, 7, 2**20, 0, 0, 0.0, np.zeros(0, np.int64)),), 2**44, None, None)


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
    with pytest.raises(ValueError, match="present buffer holds 1 bytes .*, expected 2"):
        _native.gather([{}, {}], (("x", 2, 1, np.zeros(1, np.uint8), np.zeros(2), None),))
    with pytest.raises(ValueError, match="kind 9"):
        _native.gather([{}], (("x", 9, 1, np.zeros(1, np.uint8), np.zeros(1), None),))
    # found in review: a width whose byte count overflows, an unaligned buffer, a str subclass as the key
    with pytest.raises(ValueError, match="width 2305843009213693952"):
        _native.gather([{"x": ["a"]}], (("x", 1, 2**61, np.zeros(1, np.uint8), np.zeros(0, np.uint64),
                                         np.zeros(1, np.int64)),))
    unaligned = np.frombuffer(bytearray(17), np.uint8)[1:].view(np.float64)
    with pytest.raises(ValueError, match="unaligned"):
        _native.gather([{}, {}], (("x", 2, 1, np.zeros(2, np.uint8), unaligned, None),))

    class Key(str):
        pass

    with pytest.raises(ValueError, match="kind 2"):
        _native.gather([{}], ((Key("x"), 2, 1, np.zeros(1, np.uint8), np.zeros(1), None),))
    with pytest.raises(ValueError, match="0..255"):
        _native.count_byte(b"{", 0x17B)
    assert _native.has_repeats(memoryview(bytearray(17))[1:])  # two zero values, read at any alignment


@native
def test_gather_survives_a_row_that_changes_the_list():
    """A key whose __eq__ empties the list mid-lookup (review, under ASan): no crash, the row is reported."""
    rows: list = []

    class Clearing(str):
        __hash__ = str.__hash__

        def __eq__(self, other):
            rows.clear()
            return str.__eq__(self, other)

    rows += [{Clearing("x"): 1.0}, {"x": 2.0}]
    status, row, _ = _native.gather(rows, (("x", 2, 1, np.zeros(2, np.uint8), np.zeros(2), None),))
    assert (status, row) == (1, 1)  # NOT_OBJECT: the second row is gone


# ------------------------------------------------------------------ scan: from the body's bytes


def orjson_then_gather(enc: Encoder, body: bytes):
    """What the scan stands in for: orjson.loads, then gather on the candidates (None where either refuses)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict or type(obj.get("candidates")) is not list:
        return None
    return enc.gather("candidate", obj["candidates"])


def assert_same(a, b) -> None:
    assert a.n == b.n and a.unknown == b.unknown
    for name in a.present:
        assert np.array_equal(a.present[name], b.present[name]), name
        p = a.present[name]
        assert np.array_equal(a.values[name][p].view(np.uint64), b.values[name][p].view(np.uint64)), name
        if name in a.counts:
            assert np.array_equal(a.counts[name], b.counts[name]), name


@native
def test_scan_reads_numbers_as_orjson_does(small_config):
    """Bit for bit, across magnitudes, random bit patterns and long or odd decimal strings."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(20_000) * 10.0 ** rng.integers(-300, 300, 20_000)
    bits = rng.integers(0, 2**63, 20_000, dtype=np.uint64).view(np.float64)
    strs = [repr(float(v)).encode() for v in np.concatenate([x, bits[np.isfinite(bits)]])]
    for _ in range(20_000):
        s = "".join(rng.choice(list("0123456789"), int(rng.integers(1, 25)))).lstrip("0") or "0"
        s += "." + "".join(rng.choice(list("0123456789"), int(rng.integers(1, 25))))
        if rng.random() < 0.5:
            s += "e" + str(int(rng.integers(-340, 310)))
        strs.append(("-" if rng.random() < 0.3 else "").encode() + s.encode())
    strs += [b"0", b"-0", b"-0.0", b"0e5", b"1e22", b"1e23", b"9007199254740992", b"-9007199254740992",
             b"4.9e-324", b"2.2250738585072014e-308", b"1.7976931348623157e308", b"0.1e-400", b"1E+5", b"1e-5"]
    strs = [s for s in strs if _finite_json_number(s)]  # the others: below
    assert len(strs) > 50_000
    body = b'{"candidates":[' + b",".join(b'{"video_age_days":' + s + b"}" for s in strs) + b"]}"
    enc = Encoder(small_config)
    got = enc.scan("candidate", body, "candidates", len(strs))
    assert got is not None
    want = np.array([float(orjson.loads(s)) for s in strs])
    assert np.array_equal(got[0].values["video_age_days"].view(np.uint64), want.view(np.uint64))
    # what orjson refuses or gives as a big integer (the gather takes neither): the scan leaves to orjson
    for s in (b"1e400", b"-1e400", b"01", b"1.", b".5", b"-", b"1e", b"+1", b"9007199254740993", b"NaN", b"true"):
        assert enc.scan("candidate", b'{"candidates":[{"video_age_days":' + s + b"}]}", "candidates", 9) is None, s


def _finite_json_number(s: bytes) -> bool:
    try:
        return np.isfinite(orjson.loads(s))
    except orjson.JSONDecodeError:  # past the double range
        return False


@native
def test_scan_equals_orjson_and_gather(small_config):
    """Random rows written with and without spaces: the same columns, counts and spans."""
    enc = Encoder(small_config)
    rng = np.random.default_rng(3)
    for n in (0, 1, 50, 400):
        rows = [{k: v for k, v in r.items() if not _non_finite(v)} for r in random_rows(small_config, rng, n)]
        for body in (orjson.dumps({"user": {"user_id": "u"}, "candidates": rows, "top_k": 5}),
                     json.dumps({"candidates": rows, "context": {"hour": 3}}, indent=1, ensure_ascii=False).encode()):
            got = enc.scan("candidate", body, "candidates", 2000)
            want = orjson_then_gather(enc, body)
            if want is None:  # a big integer or an integer id somewhere: the scan must leave it too
                assert got is None
                continue
            assert got is not None
            g, spans, array = got
            assert_same(g, want)
            assert orjson.loads(body[array]) == orjson.loads(body)["candidates"]
            assert [orjson.loads(body[a:b]) for a, b in spans.tolist()] == orjson.loads(body)["candidates"]
    assert enc.scan("candidate", orjson.dumps({"candidates": [{"video_id": "a"}] * 3}), "candidates", 2) is None


@native
def test_scan_in_steps_equals_one_scan(small_config):
    """Paused after k objects and resumed (once, or every few objects): the same columns, counts, unknown keys,
    spans and array as one scan; while paused, the rows read so far are already the whole scan's."""
    enc = Encoder(small_config)
    rng = np.random.default_rng(4)
    checked = 0
    for n in (1, 50, 400):
        rows = [{k: v for k, v in r.items() if not _non_finite(v)} for r in random_rows(small_config, rng, n)]
        body = json.dumps({"user": {"user_id": "u"}, "candidates": rows, "top_k": 5}, indent=1, ensure_ascii=False).encode()
        whole = enc.scan("candidate", body, "candidates", 2000)
        if whole is None:  # a big integer somewhere: the scan leaves it to orjson, in steps too
            st = enc.scan_start("candidate", body, "candidates", 2000, 1)
            assert st is None or not st.more()  # it may pause before the value it cannot take
            continue
        for k, step in ((1, 0), (n // 2, 0), (n - 1, 0), (n, 0), (n + 5, 0), (7, 7), (1, 1)):
            st = enc.scan_start("candidate", body, "candidates", 2000, k)
            assert st is not None
            assert st.done == (k >= n or k < 1)
            if not st.done:
                assert st.n == k and st.start == whole[2].start
                for name in whole[0].present:
                    assert np.array_equal(st.rows(0, k).present[name], whole[0].present[name][:k]), name
            while step and not st.done:
                assert st.more(st.n + step)
            assert st.more() and st.done
            g, spans, array = st.result()
            assert_same(g, whole[0])
            assert np.array_equal(spans, whole[1]) and array == whole[2]
            checked += 1
    assert checked >= 14  # two bodies or more were scanned in steps, seven ways each
    st = enc.scan_start("candidate", b'{"candidates": [{"video_id": "a"}, {"video_id": "a"}, {}]}', "candidates", 9, 1)
    for resume_at, array_start, first_row in ((10**6, st.start, st.n), (st.pos, st.start, -1), (st.pos, st.start, 10**6),
                                              (st.pos, st.pos, st.n), (st.pos, -1, st.n), (-5, st.start, st.n)):
        with pytest.raises(ValueError, match="paused scan"):
            _native.scan(st.body, st.key, st.spec, st.spans[0], st.spans[1], -1, resume_at, array_start, first_row)
    # a damaged rest: the resumed scan gives nothing certain
    st = enc.scan_start("candidate", b'{"candidates": [{"video_id": "a"}, {"video_id": 1}]}', "candidates", 9, 1)
    assert st is not None and not st.done and not st.more()


def _non_finite(v) -> bool:
    vals = v if isinstance(v, list) else [v]
    return any(isinstance(x, float) and not np.isfinite(x) for x in vals)


@native
def test_scan_of_damaged_bodies_agrees_or_leaves_them_to_orjson(small_config):
    """Bytes deleted, inserted or changed at random: the scan either gives exactly what orjson + gather give,
    or gives nothing (the caller then parses with orjson, which refuses or accepts it as before)."""
    enc = Encoder(small_config)
    rng = np.random.default_rng(9)
    rows = [{k: v for k, v in r.items() if not _non_finite(v)} for r in random_rows(small_config, rng, 6)]
    base = orjson.dumps({"request_id": "r", "candidates": rows, "user": {"user_embedding": [0.5] * 4}})
    pieces = [b'"', b"\\", b",", b"{", b"}", b"[", b"]", b":", b"1", b"-", b"e", b".", b"null", b"true", b" ",
              b"\xc3", b"\xe9", b"\x00", b"\\u00e9", b'"video_id"']
    took = 0
    for _ in range(3000):
        b = bytearray(base)
        for _ in range(int(rng.integers(1, 3))):
            i = int(rng.integers(len(b)))
            op = rng.random()
            if op < 0.33:
                del b[i]
            elif op < 0.66:
                b[i:i] = pieces[int(rng.integers(len(pieces)))]
            else:
                b[i] = int(rng.integers(256))
        body = bytes(b)
        got = enc.scan("candidate", body, "candidates", 2000)
        if got is None:
            continue
        took += 1
        want = orjson_then_gather(enc, body[: got[2].start] + body[got[2]] + body[got[2].stop :])
        assert want is not None, body
        assert_same(got[0], want)
        try:
            whole = orjson.loads(body)
        except orjson.JSONDecodeError:  # the rest of the body is orjson's to refuse (RequestCodec does)
            continue
        assert_same(got[0], enc.gather("candidate", whole["candidates"]))
    assert 100 < took < 3000  # both outcomes were exercised


@native
def test_has_repeats_matches_unique():
    rng = np.random.default_rng(2)
    for n in (0, 1, 2, 7, 500, 2000):
        for t in range(50):
            v = rng.integers(0, 2**64, n, dtype=np.uint64)
            if n > 1 and t % 2:
                v[0] = v[int(rng.integers(1, n))]  # one repeat
            assert has_repeats(v) == (len(np.unique(v)) != n)
        # values alike in their low bits (what a plain modulo table would pile up)
        assert not has_repeats(np.arange(n, dtype=np.uint64) << np.uint64(40))


@native
@pytest.mark.parametrize("piece, taken", [
    (b'"colour": "\\ud83d\\ude00"', True),  # a surrogate pair: valid
    (b'"colour": "\\udc00"', False),  # lone surrogates: orjson refuses them, so must the scan
    (b'"colour": "\\ud83d"', False),
    (b'"colour": "\\ud83dx"', False),
    (b'"colour": ["\\ud83d\\u0041"]', False),
    (b'"video_tags": ["a", "b", "c", "d", "e", "f", "\\udc00"]', False),  # even past max_len
    (b'"colour": 1, "colour": 2', False),  # a repeated unknown key counts once in orjson's dict
    (b'"colour": 1, "mood": 2', True),
    (b'"video_age_days": 0.' + b"0" * 100000 + b"1e1000010", False),  # the exponent once saturated: read as 1.0
    (b'"colour": 0.' + b"0" * 300 + b"e400", False),  # orjson's limits on long numbers are its own
    (b'"video_age_days": 1e401', False),
])
def test_scan_takes_what_orjson_takes(small_config, piece, taken):
    """Found by fuzzing under ASan: a lone surrogate escape, which orjson refuses, and a repeated unknown key,
    which orjson's dict counts once. The scan must hand both on."""
    enc = Encoder(small_config)
    body = b'{"candidates": [{"video_id": "a", ' + piece + b"}]}"
    got = enc.scan("candidate", body, "candidates", 10)
    assert (got is not None) == taken
    if taken:
        assert_same(got[0], orjson_then_gather(enc, body))
        assert [orjson.loads(body[a:b]) for a, b in got[1].tolist()] == orjson.loads(body)["candidates"]
