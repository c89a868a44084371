"""Reading examples: fast and slow paths agree; bad input is skipped and counted, or stops, by line."""

import json
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from tests.helpers import dumps_toml, small_config_text, with_labels
from watchnext.config import load_config
from watchnext.examples import Chunk, DataError, Decoder, ExampleFiles, Position

BAD = {
    3: ("raw", "{not json"),
    5: ("candidate", {"video_age_days": "old"}),
    7: ("raw_nan", None),
    9: ("candidate", {"video_embedding": [0.1, 0.2]}),
    11: ("ts", -1e6),
    13: ("labels", {"click": 2}),
}
REASONS = {
    3: "not valid JSON",
    5: "candidate.video_age_days: expected a number, got str 'old'",
    7: "candidate.video_views: must be a finite number",
    9: "candidate.video_embedding: expected 16 numbers",
    11: "ts: goes backwards",
    13: "labels.click: a binary label must be 0 or 1",
}


def make_bad_file(history_file, path, n=40):
    lines = history_file.read_text().splitlines()[:n]
    out = []
    for i, line in enumerate(lines, start=1):
        if i in BAD:
            kind, change = BAD[i]
            ex = json.loads(line)
            if kind == "raw":
                line = change
            elif kind == "raw_nan":
                ex["candidate"]["video_views"] = 1.0
                line = json.dumps(ex).replace('"video_views": 1.0', '"video_views": NaN')
            elif kind == "ts":
                ex["ts"] += change
                line = json.dumps(ex)
            else:
                ex[kind].update(change)
                line = json.dumps(ex)
        if i == 15:
            out.append("")  # a blank line is not an example, and not an error
        if i == 17:
            ex = json.loads(line)
            ex["user"]["user_id"] = 17  # integer ids are ids too
            line = json.dumps(ex)
        out.append(line)
    path.write_text("\n".join(out) + "\n")
    return path


def read_all(path, config, policy="skip", block_bytes=1 << 20, start=None):
    dec = Decoder(config, on_bad_line=policy)
    chunks = [c for c, _ in ExampleFiles([path], dec, start, block_bytes=block_bytes)]
    return chunks, dec


def test_bad_lines_are_skipped_and_counted_with_line_numbers(history_file, small_config, tmp_path):
    path = make_bad_file(history_file, tmp_path / "bad.jsonl")
    chunks, dec = read_all(path, small_config)
    n = sum(len(c) for c in chunks)
    assert n == 40 - len(BAD)
    assert dec.bad.count == len(BAD)
    for (line, reason), got in zip(sorted(REASONS.items()), dec.bad.first, strict=True):
        assert got.startswith(f"{path}:{line + (1 if line > 15 else 0)}: ")
        assert reason in got
    lines = np.concatenate([c.line for c in chunks])
    assert 3 not in lines and 1 in lines and 2 in lines


def test_stop_policy_names_file_and_line(history_file, small_config, tmp_path):
    path = make_bad_file(history_file, tmp_path / "bad.jsonl")
    with pytest.raises(DataError) as e:
        read_all(path, small_config, policy="stop")
    assert str(e.value).startswith(f"{path}:3: not valid JSON")


def test_slow_path_encodes_good_lines_like_the_fast_path(history_file, small_config, tmp_path):
    path = make_bad_file(history_file, tmp_path / "bad.jsonl")
    slow, _ = read_all(path, small_config)
    good = [json.loads(line) for line in history_file.read_text().splitlines()[:40]]
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(json.dumps(g) for i, g in enumerate(good, 1) if i not in BAD and i != 17) + "\n")
    fast, dec = read_all(clean, small_config)
    assert dec.bad.count == 0
    s, f = slow[0], fast[0]
    keep = s.line != 18  # line 17 (18 after the blank line) changed its user id on purpose
    for name in f.inputs:
        np.testing.assert_array_equal(s.inputs[name][keep], f.inputs[name], err_msg=name)
    np.testing.assert_array_equal(s.labels.values[keep], f.labels.values)
    np.testing.assert_array_equal(s.labels.mask[keep], f.labels.mask)


def test_positions_resume_exactly(history_file, small_config):
    all_chunks, _ = read_all(history_file, small_config, block_bytes=64 << 10)
    full = np.concatenate([c.line for c in all_chunks])
    assert len(full) == 6000 and len(all_chunks) > 3
    # stop after row 50 and start again from the position recorded there
    first = all_chunks[0]
    cut = first.take(slice(0, 50))
    rest, _ = read_all(history_file, small_config, block_bytes=64 << 10, start=cut.end())
    again = np.concatenate([c.line for c in rest])
    np.testing.assert_array_equal(again, full[50:])
    assert cut.end() == Position(0, int(first.end_offset[49]), 51)


def test_missing_labels_stay_missing(history_file, small_config):
    chunks, _ = read_all(history_file, small_config)
    c = chunks[0]
    lines = history_file.read_text().splitlines()
    like = small_config.task_index("like")
    for row in range(50):
        ex = json.loads(lines[c.line[row] - 1])
        known = ex["labels"].get("like") is not None
        assert c.labels.mask[row, like] == known


def test_cli_stops_with_file_and_line(history_file, tmp_path):
    cfg = tmp_path / "stop.toml"
    cfg.write_text(small_config_text(trainer={"on_bad_line": "stop"}))
    path = make_bad_file(history_file, tmp_path / "bad.jsonl")
    res = subprocess.run(
        [sys.executable, "-m", "watchnext", "train", "--data", str(path), "--config", str(cfg),
         "--checkpoint", str(tmp_path / "ck.pt"), "--models", str(tmp_path / "models")],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 2
    assert f"{path}:3: not valid JSON" in res.stderr
    assert "Traceback" not in res.stderr


OUT_OF_RANGE = {  # line -> labels: each refused by the task's range (rating [1, 5] in the shipped config)
    4: ({"click": 1, "rating": 1e20}, "labels.rating: must be in the task's range [1, 5]"),
    8: ({"click": 1, "watch_time": -0.5}, "labels.watch_time: must be in the task's range [0, 1e+07]"),
    12: ({"click": 1, "watch_time": 1e39}, "labels.watch_time: must be in the task's range [0, 1e+07]"),
    16: ({"click": 1, "rating": -100}, "labels.rating: must be in the task's range [1, 5]"),
    20: ({"like": 0.5}, "labels.like: a binary label must be 0 or 1"),
}
AT_BOUNDS = {24: {"click": 1, "rating": 1}, 28: {"click": 1, "rating": 5, "watch_time": 1e7}}


def make_range_file(history_file, path, n=40, changes=None):
    changes = changes or {**{k: v[0] for k, v in OUT_OF_RANGE.items()}, **AT_BOUNDS}
    return with_labels(history_file, path, changes, n)


def test_labels_outside_their_range_are_bad_lines(history_file, small_config, tmp_path):
    path = make_range_file(history_file, tmp_path / "range.jsonl")
    chunks, dec = read_all(path, small_config)
    assert dec.bad.count == len(OUT_OF_RANGE)
    for (line, (_, reason)), got in zip(sorted(OUT_OF_RANGE.items()), dec.bad.first, strict=True):
        assert got == f"{path}:{line}: {reason}"
    c = Chunk.concat(chunks)
    assert len(c) == 40 - len(OUT_OF_RANGE) and not set(OUT_OF_RANGE) & set(c.line.tolist())
    rating, watch = small_config.task_index("rating"), small_config.task_index("watch_time")
    row24, row28 = int(np.flatnonzero(c.line == 24)[0]), int(np.flatnonzero(c.line == 28)[0])
    assert c.labels.values[row24, rating] == 1 and c.labels.values[row28, rating] == 5  # the bounds are inside
    assert c.labels.values[row28, watch] == 1e7 and c.labels.mask[row28, watch] == 1
    assert np.isfinite(c.labels.values).all()


def test_a_range_from_the_config_is_used_by_the_reader(history_file, tmp_path):
    data = tomllib.loads(small_config_text())
    next(t for t in data["tasks"] if t["name"] == "watch_time")["range"] = [0, 3600]
    cfg = tmp_path / "c.toml"
    cfg.write_text(dumps_toml(data))
    path = make_range_file(history_file, tmp_path / "r.jsonl", changes={2: {"click": 1, "watch_time": 3601},
                                                                        3: {"click": 1, "watch_time": 3600}})
    chunks, dec = read_all(path, load_config(cfg))
    assert dec.bad.first == [f"{path}:2: labels.watch_time: must be in the task's range [0, 3600]"]
    assert sum(len(c) for c in chunks) == 39
