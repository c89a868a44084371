"""The sharded training stream (training/stream_worker.py) against a real Redis, and kill -9 of a torchrun rank.

* the service's closer writes each example to the shard key of its user (crc32 of the id), in order;
* one process consumes every shard; 2 torchrun ranks (gloo) on 2 shards train every entry exactly once and
  acknowledge everything, rank 0 alone exporting;
* a rank killed with kill -9 mid-run, on files and on the stream, and the same command run again: every example
  trained exactly once (the same examples count and chained digest of ids as a run never interrupted), nothing
  left pending.

The expected digests are computed here from the batches an uninterrupted run trains: with every entry written
before the run, rank r's rows of step k are the k-th `batch_size` entries of its key (training/stream_worker.py),
and on files the global batches are consecutive lines (training/distributed.py). The uninterrupted runs check
that formula; the killed-and-restarted runs must match it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import redis

from cli.main import main as cli_main
from service.impressions import ImpressionLog
from service.observability import Metrics
from tests.helpers import small_config_text
from training.stream_worker import owned, run_stream
from training.trainer import read_checkpoint
from watchnext.config import ConfigError, load_config
from watchnext.errors import WatchnextError
from watchnext.repository import ModelRepository

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
BS = 32  # batch_size per rank


def write_config(path: Path, **sections) -> Path:
    trainer = {"batch_size": BS, "threads": 1, "checkpoint_interval_s": 1000.0, "export_interval_s": 1000.0,
               **sections.pop("trainer", {})}
    path.write_text(small_config_text(trainer=trainer, **sections))
    return path


def user_of(line: bytes) -> str:
    return json.loads(line)["user"]["user_id"]


def fill(r: redis.Redis, config, lines: list[bytes], first: int = 1, only: dict[int, int] | None = None) -> list[list[int]]:
    """XADD each line (line number n = first, first + 1, ...) to its user's shard key with the id `n-0`; `only`:
    at most only[shard] lines per shard (the rest are not written). Returns each shard's line numbers written."""
    keys = config.stream.keys()
    per: list[list[int]] = [[] for _ in keys]
    pipe = r.pipeline(transaction=False)
    for n, line in enumerate(lines, start=first):
        s = config.stream.shard_of(user_of(line))
        if only is not None and len(per[s]) >= only[s]:
            continue
        per[s].append(n)
        pipe.xadd(keys[s], {"example": line}, id=f"{n}-0")
    pipe.execute()
    return per


def chain(batches: list[np.ndarray]) -> str:
    """The trainer's exactly-once digest over global batches of int64 id rows (training/trainer.py)."""
    d = ""
    for rows in batches:
        d = hashlib.blake2b(d.encode() + np.ascontiguousarray(rows, dtype=np.int64).tobytes(), digest_size=16).hexdigest()
    return d


def rank_batches(per_key: list[list[int]], bs: int) -> list[np.ndarray]:
    """One key per rank, every entry present: step k holds rank 0's k-th bs entries (shard, ms, seq), then rank 1's, ..."""
    steps = max(-(-len(p) // bs) for p in per_key)
    out = []
    for k in range(steps):
        rows = [(s, n, 0) for s, p in enumerate(per_key) for n in p[k * bs:(k + 1) * bs]]
        out.append(np.array(rows, dtype=np.int64).reshape(-1, 3))
    return out


def pending(r: redis.Redis, config) -> list[int]:
    return [int(r.xpending(k, config.stream.group)["pending"]) for k in config.stream.keys()]


def torchrun(args: list[str], env: dict, out: Path) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "watchnext", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    with open(out, "w") as fh:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=fh, stderr=subprocess.STDOUT)


def finish(p: subprocess.Popen, out: Path, timeout: float = 120) -> str:
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        pytest.fail(f"torchrun did not end within {timeout:.0f} s:\n{out.read_text()[-3000:]}")
    return out.read_text()


def rank_pid(agent: int, rank: int, deadline: float) -> int:
    """The pid of torchrun's worker of rank `rank` (a child of the agent with RANK=rank in its environment)."""
    while time.monotonic() < deadline:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (d / "environ").read_bytes().split(b"\0") if ppid == agent else []
            except (OSError, IndexError, ValueError):
                continue
            if f"RANK={rank}".encode() in env:
                return int(d.name)
        time.sleep(0.01)
    pytest.fail(f"no worker of rank {rank} under torchrun {agent}")


def poll(cond, deadline: float, what: str, proc: subprocess.Popen | None = None, out: Path | None = None):
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"torchrun ended (status {proc.returncode}) before {what}:\n"
                        + (out.read_text()[-3000:] if out else ""))
        time.sleep(0.005)
    pytest.fail(f"timed out waiting for {what}")


# ---------------------------------------------------------------- config and routing


def test_shards_config_and_ownership(tmp_path: Path) -> None:
    c = load_config(write_config(tmp_path / "one.toml", stream={"key": "t"}))
    assert c.stream.shards == 1 and c.stream.keys() == ["t"] and c.stream.shard_of("u1") == 0  # the default: as before
    c = load_config(write_config(tmp_path / "four.toml", stream={"key": "t", "shards": 4}))
    assert c.stream.keys() == ["t:0", "t:1", "t:2", "t:3"]
    assert [c.stream.shard_of(u) for u in ("u1", "u2", "u3", "")] == [zlib.crc32(u.encode()) % 4 for u in ("u1", "u2", "u3", "")]
    for bad, why in ((0, "must be > 0, got 0"), (-2, "must be > 0, got -2"), ("2", "expected int, got str '2'"),
                     (True, "expected int, got bool True"), (5000, "must be at most 1024, got 5000")):
        with pytest.raises(ConfigError) as e:
            load_config(write_config(tmp_path / "bad.toml", stream={"shards": bad}))
        assert str(e.value) == f"{tmp_path / 'bad.toml'}: stream.shards: {why}"
    # rank r of N owns the keys i with i % N == r; fewer keys than ranks is refused, naming the key and the fix
    assert owned(c.stream.keys(), 1, 2) == [(1, "t:1"), (3, "t:3")]
    assert owned(c.stream.keys(), 2, 3) == [(2, "t:2")]
    with pytest.raises(WatchnextError) as e:
        owned(["t"], 0, 2)
    assert e.value.field == "stream.shards" and "set [stream] shards to 2 or a multiple of it" in e.value.reason


def test_cli_refuses_fewer_shards_than_ranks(tmp_path: Path, monkeypatch, capsys) -> None:
    cfg = write_config(tmp_path / "c.toml")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: refused before any process group or Redis
    assert cli_main(["train", "--stream", "--config", str(cfg), "--checkpoint", str(tmp_path / "ck.pt"),
                     "--models", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["watchnext: stream.shards: 1 stream key for 2 ranks: every rank needs a shard of its own; set "
                   "[stream] shards to 2 or a multiple of it (the service must use the same value), or start fewer ranks"]


def test_closer_writes_each_example_to_its_users_shard_in_order(redis_url: str, tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "c.toml", stream={"key": "t", "shards": 3}))
    log = ImpressionLog(config, redis_url, Metrics())
    t0 = time.time()
    served = []  # (user, request_id) in the order served
    for i in range(60):
        user = f"u{(i * 7) % 11}"
        served.append((user, f"r{i}"))
        log.add({"ts": t0 + i, "request_id": f"r{i}", "user": {"user_id": user}, "query": {"query_video_id": "q"},
                 "context": {"device": "tv"}, "experiment": None, "arm": "control", "model_version": "1",
                 "items": [(f"v{j}", {"video_id": f"v{j}"}, j) for j in range(2)]})
    assert log.flush() == 60
    assert log.close_due(now=t0 + 10_000) == 120
    r = redis.Redis.from_url(redis_url)
    assert r.exists("t") == 0  # sharded: nothing on the one key
    on = {}
    for s, key in enumerate(config.stream.keys()):
        exs = [json.loads(f[b"example"]) for _, f in r.xrange(key)]
        for e in exs:
            assert zlib.crc32(e["user"]["user_id"].encode()) % 3 == s  # the key of its user's hash
        on[key] = [(e["user"]["user_id"], e["request_id"], e["position"]) for e in exs]
    assert sum(len(v) for v in on.values()) == 120 and all(on.values())  # every shard got users
    for key, got in on.items():  # each key holds its users' examples in the order they were served
        mine = [(u, rid, pos) for u, rid in served if f"t:{zlib.crc32(u.encode()) % 3}" == key for pos in (0, 1)]
        assert got == mine
    log.client.close()


# ---------------------------------------------------------------- one process, every shard


def test_one_process_consumes_every_shard_once(redis_url: str, history_file: Path, tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "c.toml", stream={"key": "t", "shards": 3},
                                      trainer={"checkpoint_every_examples": 500}))
    r = redis.Redis.from_url(redis_url)
    lines = history_file.read_bytes().splitlines()[:1000]
    per = fill(r, config, lines)
    assert [len(p) for p in per] == [260, 220, 520]
    r.xadd("t:1", {"other": b"x"}, id="2000-0")  # no `example` field: skipped, counted, acknowledged
    repo = ModelRepository(tmp_path / "models", config.model.name)
    res = run_stream(config, r, repo, tmp_path / "ck.pt", consumer="w", idle_exit_s=0.3, log=lambda m: None)
    assert (res.examples, res.trained_now, res.bad, res.versions) == (1000, 1000, 1, [1])
    # the keys are merged by entry id: batches of BS consecutive lines, whichever shard each is on
    shard = {n: s for s, p in enumerate(per) for n in p}
    batches = [np.array([(shard[n], n, 0) for n in range(k, min(k + BS, 1001))]) for k in range(1, 1001, BS)]
    st = read_checkpoint(tmp_path / "ck.pt")["state"]
    assert (st["examples"], st["digest"]) == (1000, chain(batches))
    assert st["source"]["last_ids"] == {f"t:{s}": f"{p[-1]}-0" for s, p in enumerate(per)}
    assert pending(r, config) == [0, 0, 0]
    # run again: nothing is delivered twice, nothing trained
    res = run_stream(config, r, repo, tmp_path / "ck.pt", consumer="w", idle_exit_s=0.3, log=lambda m: None)
    assert (res.examples, res.trained_now, res.versions) == (1000, 0, [])


# ---------------------------------------------------------------- torchrun, 2 ranks


def stream_args(cfg: Path, d: Path, idle_exit: float, *extra: str) -> list[str]:
    return ["--stream", "--config", str(cfg), "--checkpoint", str(d / "ck.pt"), "--models", str(d / "models"),
            "--consumer", "w", "--idle-exit", str(idle_exit), *extra]


def test_two_ranks_on_two_shards_train_every_entry_once(redis_url: str, history_file: Path, tmp_path: Path) -> None:
    config = load_config(cfg := write_config(tmp_path / "c.toml", stream={"key": "t", "shards": WORLD}))
    r = redis.Redis.from_url(redis_url)
    per = fill(r, config, history_file.read_bytes().splitlines()[:1500])
    assert [len(p) for p in per] == [1090, 410]  # rank 1 runs out first: it takes part with no rows
    p = torchrun(stream_args(cfg, tmp_path, 1.0), {"REDIS_URL": redis_url}, tmp_path / "out.txt")
    out = finish(p, tmp_path / "out.txt")
    assert p.returncode == 0, out[-3000:]
    summaries = [json.loads(ln) for ln in out.splitlines() if ln.startswith('{"examples"')]
    assert summaries == [{"examples": 1500, "trained_this_run": 1500, "versions": [1], "bad_entries": 0,
                          "skipped_batches": 0, "checkpoint": str(tmp_path / "ck.pt")}]  # rank 0's alone
    st = read_checkpoint(tmp_path / "ck.pt")["state"]
    assert (st["examples"], st["digest"]) == (1500, chain(rank_batches(per, BS)))
    assert st["source"]["last_ids"] == {"t:0": f"{per[0][-1]}-0", "t:1": f"{per[1][-1]}-0"}
    assert pending(r, config) == [0, 0]  # everything acknowledged
    groups = {k: {c["name"].decode(): c["pending"] for c in r.xinfo_consumers(k, "trainer")} for k in config.stream.keys()}
    assert groups == {"t:0": {"w-rank0": 0}, "t:1": {"w-rank1": 0}}  # rank r consumed key r
    assert ModelRepository(tmp_path / "models", config.model.name).versions() == [1]  # exported by rank 0 only


def test_kill_9_of_a_rank_mid_run_on_the_stream(redis_url: str, history_file: Path, tmp_path: Path) -> None:
    # the first run has 6 batches of each key to train; it checkpoints after 4 global steps (256 examples), trains
    # 2 more, and then waits (idle-exit 120 s): killed there, 64 entries per key are read, trained, not in a
    # checkpoint, not acknowledged. The rest of the stream is written after the kill.
    config = load_config(cfg := write_config(tmp_path / "c.toml", stream={"key": "t", "shards": WORLD},
                                             trainer={"checkpoint_every_examples": 4 * WORLD * BS}))
    r = redis.Redis.from_url(redis_url)
    lines = history_file.read_bytes().splitlines()[:1500]
    head = fill(r, config, lines, only={0: 6 * BS, 1: 6 * BS})
    env = {"REDIS_URL": redis_url}
    ckpt = tmp_path / "ck.pt"
    p = torchrun(stream_args(cfg, tmp_path, 120.0, "--no-export"), env, tmp_path / "run1.txt")
    deadline = time.monotonic() + 90
    # per key, pending goes 32, 64, 96, 128, then 0 at the checkpoint's acknowledgement, then 32, 64: once the
    # checkpoint exists, [64, 64] is both ranks past it, with their last 2 batches read
    poll(lambda: ckpt.exists() and pending(r, config) == [2 * BS, 2 * BS], deadline,
         "the first checkpoint and 2 steps after it", p, tmp_path / "run1.txt")
    os.kill(rank_pid(p.pid, 1, deadline), signal.SIGKILL)
    out = finish(p, tmp_path / "run1.txt")
    assert p.returncode != 0  # torchrun stopped rank 0 too
    assert "lost another rank" in out or "SIGTERM" in out or "Signal 15" in out, out[-3000:]
    st = read_checkpoint(ckpt)["state"]
    assert st["examples"] == 4 * WORLD * BS
    assert st["source"]["last_ids"] == {"t:0": f"{head[0][4 * BS - 1]}-0", "t:1": f"{head[1][4 * BS - 1]}-0"}
    assert pending(r, config) == [2 * BS, 2 * BS]  # trained after the checkpoint: delivered again, trained again
    # the rest of the stream arrives; the same command runs to the end
    written = set(head[0] + head[1])
    pipe = r.pipeline(transaction=False)
    for n, line in enumerate(lines, start=1):
        if n not in written:
            pipe.xadd(config.stream.keys()[config.stream.shard_of(user_of(line))], {"example": line}, id=f"{n}-0")
    pipe.execute()
    per = [[n for n, ln in enumerate(lines, start=1) if config.stream.shard_of(user_of(ln)) == s] for s in range(WORLD)]
    p = torchrun(stream_args(cfg, tmp_path, 1.0, "--no-export"), env, tmp_path / "run2.txt")
    out = finish(p, tmp_path / "run2.txt")
    assert p.returncode == 0, out[-3000:]
    summary = json.loads(next(ln for ln in out.splitlines() if ln.startswith('{"examples"')))
    assert (summary["examples"], summary["trained_this_run"]) == (1500, 1500 - 4 * WORLD * BS)
    st = read_checkpoint(ckpt)["state"]
    # every entry trained once, in the batches of a run never interrupted
    assert (st["examples"], st["digest"]) == (1500, chain(rank_batches(per, BS)))
    assert pending(r, config) == [0, 0]


def test_kill_9_of_a_rank_mid_run_on_files(history_file: Path, tmp_path: Path) -> None:
    # 3,000 lines in global batches of 64: a checkpoint every 2 steps; rank 0 (the writer) is killed once the first
    # exists, with 45 steps to go (the poll answers within milliseconds; a step takes longer than that)
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"".join(history_file.read_bytes().splitlines(keepends=True)[:3000]))
    cfg = write_config(tmp_path / "c.toml", trainer={"checkpoint_every_examples": 2 * WORLD * BS})
    ckpt = tmp_path / "ck.pt"
    args = ["--data", str(data), "--config", str(cfg), "--checkpoint", str(ckpt), "--no-export"]
    p = torchrun(args, {}, tmp_path / "run1.txt")
    deadline = time.monotonic() + 90
    poll(ckpt.exists, deadline, "the first checkpoint", p, tmp_path / "run1.txt")
    os.kill(rank_pid(p.pid, 0, deadline), signal.SIGKILL)
    out = finish(p, tmp_path / "run1.txt")
    assert p.returncode != 0, out[-3000:]
    mid = read_checkpoint(ckpt)["state"]["examples"]
    assert 0 < mid < 3000 and mid % (WORLD * BS) == 0
    p = torchrun(args, {}, tmp_path / "run2.txt")
    out = finish(p, tmp_path / "run2.txt")
    assert p.returncode == 0, out[-3000:]
    st = read_checkpoint(ckpt)["state"]
    batches = [np.array([(0, n) for n in range(k, min(k + WORLD * BS, 3001))]) for k in range(1, 3001, WORLD * BS)]
    assert (st["examples"], st["digest"]) == (3000, chain(batches))  # each line once, in the uninterrupted batches
    assert st["source"]["position"]["line"] == 3001
