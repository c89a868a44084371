"""Examples carry the exploration's propensity and original rank; a bad one is a bad line naming FILE:LINE."""

import json

import numpy as np
import pytest

from watchnext.examples import DataError, Decoder, ExampleFiles


def _lines(history_file, n=12):
    return [json.loads(x) for x in history_file.read_text().splitlines()[:n]]


def _read(config, path, on_bad_line="skip"):
    dec = Decoder(config, on_bad_line=on_bad_line)
    chunks = [c for c, _ in ExampleFiles([path], dec, block_bytes=1 << 20)]
    return chunks, dec


@pytest.mark.parametrize("slow", [False, True])
def test_propensity_and_rank_are_carried(small_config, history_file, tmp_path, slow):
    exs = _lines(history_file)
    for i, ex in enumerate(exs):
        if i % 3 == 0:
            ex["propensity"] = 0.5
            ex["explore"] = {"rank": i % 4}
        elif i % 3 == 1:
            ex["propensity"] = 1  # an integer is a number
            ex["explore"] = {"rank": 0}
    if slow:  # a line Arrow refuses sends the block down the line-by-line path
        exs[-1]["ts"] = "late"
    p = tmp_path / "ex.jsonl"
    p.write_text("\n".join(json.dumps(e) for e in exs) + "\n")
    chunks, dec = _read(small_config, p)
    prop = np.concatenate([c.propensity for c in chunks])
    rank = np.concatenate([c.explore_rank for c in chunks])
    n = len(exs) - (1 if slow else 0)
    assert dec.bad.count == (1 if slow else 0)
    want_p = np.array([0.5, 1.0, 1.0] * 4)[:n]
    want_r = np.array([(i % 4) if i % 3 == 0 else (0 if i % 3 == 1 else -1) for i in range(12)])[:n]
    np.testing.assert_array_equal(prop, want_p)
    np.testing.assert_array_equal(rank, want_r)
    # take and concat keep the new fields row for row
    c = chunks[0]
    np.testing.assert_array_equal(c.take(np.array([3, 0])).explore_rank, [want_r[3], want_r[0]])


BAD = [
    ({"propensity": 0}, "propensity: must be in (0, 1]"),
    ({"propensity": 1.5}, "propensity: must be in (0, 1]"),
    ({"propensity": -0.2}, "propensity: must be in (0, 1]"),
    ({"propensity": "half"}, "propensity: expected a number, got str 'half'"),
    ({"propensity": True}, "propensity: expected a number, got True"),
    ({"explore": {"rank": -1}}, "explore.rank: must be >= 0"),
    ({"explore": {"rank": 1.5}}, "explore.rank: expected an integer, got 1.5"),
    ({"explore": {"rank": "2"}}, "explore.rank: expected an integer, got '2'"),
    ({"explore": 3}, "explore: expected an object, got int"),
    ({"explore": {}}, "explore.rank: is required when explore is given"),
    ({"explore": {"rank": 2**70}}, "explore.rank: must be >= 0, got"),
]


@pytest.mark.parametrize("change,reason", BAD, ids=[r for _, r in BAD])
def test_bad_propensity_or_rank_is_a_bad_line(small_config, history_file, tmp_path, change, reason):
    exs = _lines(history_file, 6)
    exs[3].update(change)
    p = tmp_path / "ex.jsonl"
    p.write_text("\n".join(json.dumps(e) for e in exs) + "\n")
    chunks, dec = _read(small_config, p)
    assert sum(len(c) for c in chunks) == 5
    assert dec.bad.count == 1
    assert dec.bad.first[0].startswith(f"{p}:4: "), dec.bad.first
    assert reason in dec.bad.first[0], dec.bad.first
    with pytest.raises(DataError, match=rf"^{p}:4: .*{reason.split(':')[0]}"):
        _read(small_config, p, on_bad_line="stop")


def test_nan_propensity_is_a_bad_line(small_config, history_file, tmp_path):
    exs = _lines(history_file, 4)
    lines = [json.dumps(e) for e in exs]
    lines[1] = lines[1][:-1] + ', "propensity": NaN}'
    p = tmp_path / "ex.jsonl"
    p.write_text("\n".join(lines) + "\n")
    chunks, dec = _read(small_config, p)
    assert sum(len(c) for c in chunks) == 3
    assert dec.bad.first == [f"{p}:2: propensity: must be a finite number"]
