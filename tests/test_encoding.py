import numpy as np
import pyarrow as pa
import pytest

from watchnext.encoding import (
    F32_MAX,
    Encoder,
    Problems,
    _list_rows,
    bucket_rows,
    fnv1a,
    fnv1a_strings,
    hash_ids,
    hashed_rows,
    section_type,
    string_buffers,
)


def test_fnv1a_known_values_and_vectorised_agrees():
    # reference values of 64-bit FNV-1a: the same on every machine and process
    assert fnv1a("") == 0xCBF29CE484222325
    assert fnv1a("a") == 0xAF63DC4C8601EC8C
    words = ["", "a", "u17", "v9", "ünïcode", "a-much-longer-identifier-0123456789"] * 3
    got = fnv1a_strings(pa.array(words))
    assert got.tolist() == [fnv1a(w) for w in words]
    # a sliced array (non-zero offset) hashes its own rows
    assert fnv1a_strings(pa.array(words).slice(2, 3)).tolist() == [fnv1a(w) for w in words[2:5]]
    # 64-bit offsets read alike (string arrays are read as they are, others cast to large_string)
    assert fnv1a_strings(pa.array(words, pa.large_string()).slice(1, 7)).tolist() == [fnv1a(w) for w in words[1:8]]
    # all empty, one string, and random lengths (the shortest-prefix and ragged steps both run)
    assert fnv1a_strings(pa.array(["", ""])).tolist() == [fnv1a("")] * 2
    assert fnv1a_strings(pa.array(["only"])).tolist() == [fnv1a("only")]
    rng = np.random.default_rng(7)
    alphabet = np.array(list("abcxyz019-_é"))
    rand = ["".join(rng.choice(alphabet, size=int(k))) for k in rng.integers(0, 30, size=300)]
    assert fnv1a_strings(pa.array(rand)).tolist() == [fnv1a(w) for w in rand]
    assert fnv1a_strings(pa.array(rand).slice(17, 100)).tolist() == [fnv1a(w) for w in rand[17:117]]


def test_hash_ids_finds_a_repeated_string_in_every_layout_and_hashes_each_id():
    rng = np.random.default_rng(13)
    alphabet = np.array(list("abcxyz019-_é"))
    words = sorted({"".join(rng.choice(alphabet, size=int(k))) for k in rng.integers(1, 20, size=600)})

    def repeats(arr):
        rows, repeated = hash_ids(*string_buffers(arr), 1000)
        assert rows.tolist() == bucket_rows(fnv1a_strings(arr), 1000).tolist()
        return repeated

    distinct = pa.array(words)
    assert not repeats(distinct) and not repeats(pa.array(words, pa.large_string()).slice(7, 300))
    for i, j in ((0, 1), (0, len(words) - 1), (250, 17)):  # the repeat first, last, and out of order
        again = list(words)
        again[j] = words[i]
        assert repeats(pa.array(again)), (i, j)
    # a slice sees its own rows only: the repeat outside it does not count
    again = [*words, words[5]]
    assert repeats(pa.array(again)) and not repeats(pa.array(again).slice(6, len(words) - 6))
    assert repeats(pa.array(["", ""])) and not repeats(pa.array([""]))
    assert not repeats(pa.array([], pa.string()))


def test_rows_reserve_zero_for_missing():
    rows = hashed_rows(pa.array(["x", None, "y", "x"]), 7)
    assert rows[1] == 0
    assert rows[0] == rows[3] and 1 <= rows[0] <= 7
    assert rows[0] == 1 + fnv1a("x") % 7


def test_hashed_rows_are_the_buckets_of_the_hashes_in_every_layout():
    rng = np.random.default_rng(11)
    alphabet = np.array(list("abcxyz019-_é"))
    words = ["".join(rng.choice(alphabet, size=int(k))) for k in rng.integers(0, 20, size=500)]
    with_nulls = [None if i % 7 == 3 else w for i, w in enumerate(words)]
    for arr in (pa.array(words), pa.array(words).slice(13, 400), pa.array(words, pa.large_string()).slice(5, 50),
                pa.array(with_nulls), pa.array(with_nulls, pa.large_string()).slice(3, 200)):
        want = bucket_rows(fnv1a_strings(arr), 1000)
        want[np.asarray(arr.is_null())] = 0
        assert hashed_rows(arr, 1000).tolist() == want.tolist()
        # the caller's null flags, when it has them, give the same rows
        assert hashed_rows(arr, 1000, np.asarray(arr.is_null())).tolist() == want.tolist()
    assert hashed_rows(pa.array(["", ""]), 5).tolist() == [1 + fnv1a("") % 5] * 2  # no bytes at all
    assert hashed_rows(pa.array([None, None], pa.string()), 5).tolist() == [0, 0]
    assert hashed_rows(pa.array([], pa.string()), 5).tolist() == []
    assert hashed_rows(pa.array([12, None]), 9).tolist() == [1 + fnv1a("12") % 9, 0]  # read as their text


def test_encode_candidates(small_config):
    enc = Encoder(small_config)
    cands = [
        {"video_id": "v1", "video_tags": ["a", "b", "c", "d", "e", "f", "g"], "video_age_days": 3.0,
         "video_embedding": [0.5] * 16},
        {"video_id": None, "video_tags": [], "video_duration_s": -0.5},
        {"video_age_days": None, "video_embedding": [1.0, 2.0]},
        {"video_views": float("nan"), "video_embedding": [float("inf")] * 16},
        {"video_views": 1e300, "video_embedding": [1e39] + [0.0] * 15},
    ]
    arr = pa.array(cands, type=section_type(small_config, "candidate"))
    out = enc.empty_inputs(5)
    problems = Problems(5)
    enc.encode_section("candidate", arr, 5, out, problems)
    tags_len = small_config.feature("video_tags").max_len
    assert out["video_tags"].shape == (5, tags_len)
    assert (out["video_tags"][0] > 0).all()  # first max_len kept
    assert (out["video_tags"][1] == 0).all()
    col = {f.name: i for i, f in enumerate(small_config.features_of("numeric"))}
    assert out["numeric"][0, col["video_age_days"]] == pytest.approx(np.log1p(3.0))
    assert out["numeric_mask"][0, col["video_age_days"]] == 1
    assert out["numeric_mask"][2, col["video_age_days"]] == 0  # missing: masked, default value
    assert out["numeric"][2, col["video_age_days"]] == 0.0
    assert np.allclose(out["video_embedding"][0], 0.5)
    assert np.allclose(out["video_embedding"][2], 0.0)  # wrong length: not placed
    bad = problems.bad
    assert bad.tolist() == [False, False, True, True, True]
    assert "candidate.video_views: outside the float32 range" in problems.reasons(4)
    assert "candidate.video_embedding: must hold finite float32 numbers" in problems.reasons(4)
    assert np.isfinite(out["numeric"]).all() and np.isfinite(out["video_embedding"]).all()
    assert "candidate.video_embedding: expected 16 numbers" in problems.reasons(2)
    assert "candidate.video_views: must be a finite number" in problems.reasons(3)
    assert "candidate.video_embedding: must hold finite float32 numbers" in problems.reasons(3)
    assert "candidate.video_duration_s: must be > -1 for transform log1p" not in problems.reasons(1)


def test_input_specs_order_and_shapes(small_config):
    specs = Encoder(small_config).input_specs()
    names = [s[0] for s in specs]
    assert names[: len(small_config.features_of("categorical"))] == [f.name for f in small_config.features_of("categorical")]
    assert ("numeric", "float32", (4,)) in specs
    out = Encoder(small_config).empty_inputs(3)
    for name, dtype, shape in specs:
        assert out[name].shape == (3, *shape) and out[name].dtype == np.dtype(dtype)


def _lists(list_type: pa.DataType) -> list[pa.Array]:
    """A list column with a null row whose offsets span values (Arrow allows it; the values are not the row's),
    an empty row and a long one, as it is and sliced."""
    values = pa.array(["a", "b", None, "d", "e", "f", "g", "h", "i", "j", "k", "l", "m"], list_type.value_type)
    col = pa.ListArray.from_arrays(pa.array([0, 2, 4, 5, 5, 13], pa.int32()), values,
                                   mask=pa.array([False, True, False, False, False])).cast(list_type)
    return [col, col.slice(1, 3), col.slice(2), pa.array([[]], list_type), pa.array([None], list_type),
            pa.array([], list_type)]


@pytest.mark.parametrize("list_type", [pa.list_(pa.string()), pa.large_list(pa.large_string()),
                                       pa.list_(pa.large_string()), pa.large_list(pa.string())])
def test_list_rows_agree_with_a_row_by_row_reference(list_type):
    """The compiled loop against FNV-1a row by row: a null row and a null string give 0, the first max_len are
    kept, the rest is 0-padding; sliced arrays read their own rows."""
    for col in _lists(list_type):
        for max_len in (1, 3, 8):
            want = [[0] * max_len if r is None else
                    [0 if v is None else 1 + fnv1a(v) % 97 for v in r[:max_len]] + [0] * (max_len - len(r[:max_len]))
                    for r in col.to_pylist()]
            assert _list_rows(col, 97, max_len).tolist() == want
    assert _list_rows(_lists(list_type)[0], 97, 3)[1].tolist() == [0, 0, 0]  # null, though its offsets span "b"-"d"


@pytest.mark.parametrize("list_type", [pa.list_(pa.float64()), pa.large_list(pa.float32())])
def test_vectors_agree_with_a_row_by_row_reference(small_config, list_type):
    """Each row of a vector column: taken (as float32), refused for its length, refused for a number that is not a
    finite float32 (a null number too), or absent (a null row, whatever its offsets span)."""
    enc, size = Encoder(small_config), small_config.feature("video_embedding").size
    rng = np.random.default_rng(5)
    rows: list = []
    for k in range(60):
        r = rng.normal(size=size).tolist()
        kind = k % 6
        if kind == 1:
            r = r[: int(rng.integers(0, size))]
        elif kind == 2:
            r[int(rng.integers(0, size))] = [float("nan"), float("inf"), -1e39, None][k % 4]
        elif kind == 3:
            r = None
        elif kind == 4:
            r = r + [0.0]
        rows.append(r)
    full = pa.array(rows, list_type)
    for col in (full, full.slice(7, 30)):
        problems = Problems(len(col))
        got = enc.encode_columns("candidate", pa.StructArray.from_arrays([col], ["video_embedding"]), len(col),
                                 problems)
        for i, r in enumerate(col.to_pylist()):
            reasons = problems.reasons(i)
            v, present = got.values["video_embedding"][i], got.present["video_embedding"][i]
            if r is None:
                assert not present and not reasons and not v.any()
            elif len(r) != size:
                assert not present and reasons == [f"candidate.video_embedding: expected {size} numbers"]
            elif not all(x is not None and np.isfinite(x) and abs(x) <= F32_MAX for x in r):
                assert not present and reasons == ["candidate.video_embedding: must hold finite float32 numbers"]
                assert not v.any()
            else:
                assert present and not reasons and v.tolist() == np.array(r, np.float32).tolist()


def test_numeric_checks_and_transform_agree_with_a_value_by_value_reference(small_config):
    """log1p's domain ends at -1 (refused), NaN and inf are not finite, 1e39 is past float32; the rest is
    transformed in float64 and then stored as float32; an absent value takes the feature's default."""
    enc = Encoder(small_config)
    vals = [3.0, -0.5, -1.0, -1.5, float("nan"), float("inf"), -float("inf"), 1e39, 3.4e38, 0.0, None, 1e-12]
    arr = pa.StructArray.from_arrays([pa.array(vals, pa.float64()), pa.array(vals, pa.float64())],
                                     ["video_age_days", "video_views"])  # log1p, and (in this config) log1p too
    problems = Problems(len(vals))
    got = enc.encode_columns("candidate", arr, len(vals), problems)
    f = small_config.feature("video_age_days")
    default = enc.numeric_default[enc.numeric_col[f.name]]
    for i, x in enumerate(vals):
        ok = x is not None and np.isfinite(x) and abs(x) <= F32_MAX and x > -1
        assert got.present[f.name][i] == ok
        assert got.values[f.name][i] == (np.float32(np.log1p(x)) if ok else default)
        assert bool(problems.reasons(i)) == (x is not None and not ok)
    assert problems.reasons(2) == ["candidate.video_age_days: must be > -1 for transform log1p",
                                   "candidate.video_views: must be > -1 for transform log1p"]
    assert problems.reasons(7)[0] == "candidate.video_age_days: outside the float32 range"
    assert problems.reasons(4)[0] == "candidate.video_age_days: must be a finite number"
