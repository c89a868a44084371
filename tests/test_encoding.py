import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from watchnext.encoding import Encoder, Problems, fnv1a, fnv1a_strings, hashed_rows, list_lengths, section_type


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


def test_rows_reserve_zero_for_missing():
    rows = hashed_rows(pa.array(["x", None, "y", "x"]), 7)
    assert rows[1] == 0
    assert rows[0] == rows[3] and 1 <= rows[0] <= 7
    assert rows[0] == 1 + fnv1a("x") % 7


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


@pytest.mark.parametrize("list_type", [pa.list_(pa.string()), pa.large_list(pa.string())])
def test_list_lengths_read_from_the_offsets_agree_with_arrow_on_slices_and_null_rows(list_type):
    """0 for a null row, even one whose offsets span values (Arrow allows it; list_flatten leaves them out), and
    the right rows of a sliced array."""
    values = pa.array(["a", "b", "c", "d", "e", "f", "g"])
    col = pa.ListArray.from_arrays(pa.array([0, 2, 3, 5, 5, 7], pa.int32()), values,
                                   mask=pa.array([False, False, True, False, False]))  # row 2 is null over c, d
    col = col.cast(list_type)
    for arr in (col, col.slice(1, 3), col.slice(3), pa.array([[]], list_type), pa.array([None], list_type)):
        want = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
        assert list_lengths(arr).tolist() == want.tolist()
    assert list_lengths(col).tolist() == [2, 1, 0, 0, 2]
    assert list_lengths(col.slice(1, 3)).tolist() == [1, 0, 0]
