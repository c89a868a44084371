"""The continuous worker on a real Redis stream: delivery, takeover, kill -9, exactly once."""

import json
import os
import signal
import subprocess
import sys
import time

import redis
import torch

from tests.helpers import small_config_text
from training.export import state_digest
from training.stream import StreamReader
from training.stream_worker import run_stream
from watchnext.config import load_config
from watchnext.repository import ModelRepository


def fill(r, key, history_file, n):
    """XADD the first n examples with explicit, reproducible ids 1-0, 2-0, ..."""
    lines = history_file.read_text().splitlines()[:n]
    pipe = r.pipeline(transaction=False)
    for i, line in enumerate(lines, start=1):
        pipe.xadd(key, {"example": line}, id=f"{i}-0")
    pipe.execute()


def test_reader_reads_like_a_specification(redis_url):
    r = redis.Redis.from_url(redis_url)
    for i in range(1, 6):
        r.xadd("s", {"example": f"e{i}"}, id=f"{i}-0")
    a = StreamReader(r, "s", "g", "worker-a", claim_idle_ms=50)
    got = a.read(3, block_ms=10)
    assert [i for i, _ in got] == [b"1-0", b"2-0", b"3-0"]
    assert r.xpending("s", "g")["pending"] == 3  # delivered, not acknowledged
    # worker-a restarts under the same name: its own pending entries come first
    a2 = StreamReader(r, "s", "g", "worker-a", claim_idle_ms=50)
    assert [i for i, _ in a2.read(10, block_ms=10)] == [b"1-0", b"2-0", b"3-0"]
    a2.ack([b"1-0"])
    assert r.xpending("s", "g")["pending"] == 2
    # worker-a dies; worker-b takes its pending entries over once they are idle, then reads new ones
    b = StreamReader(r, "s", "g", "worker-b", claim_idle_ms=50)
    seen = []
    deadline = time.monotonic() + 5
    while len(seen) < 4 and time.monotonic() < deadline:
        seen += [i for i, _ in b.read(10, block_ms=10)]
    assert seen == [b"2-0", b"3-0", b"4-0", b"5-0"]  # in id order, nothing lost
    b.ack(seen)
    assert r.xpending("s", "g")["pending"] == 0


def test_own_pending_entries_are_delivered_once_after_a_restart(redis_url):
    """A restarted worker reads its own pending entries in pieces: each once (reading them from id 0 again and
    again handed the same entries back, and a batch filled over several reads trained them twice)."""
    r = redis.Redis.from_url(redis_url)
    for i in range(1, 8):
        r.xadd("s", {"example": f"e{i}"}, id=f"{i}-0")
    a = StreamReader(r, "s", "g", "worker-a", claim_idle_ms=50)
    assert len(a.read(5, block_ms=10)) == 5  # delivered, never acknowledged: the worker dies
    a2 = StreamReader(r, "s", "g", "worker-a", claim_idle_ms=50)
    got = [[i for i, _ in a2.read(2, block_ms=10)] for _ in range(5)]
    assert got == [[b"1-0", b"2-0"], [b"3-0", b"4-0"], [b"5-0"], [b"6-0", b"7-0"], []]
    assert a2.phase == "new" and a2.dry


def test_stream_training_exports_and_acknowledges(redis_url, history_file, tmp_path):
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(small_config_text(stream={"key": "t:train"}, trainer={"export_every_examples": 1000}))
    config = load_config(cfg_path)
    r = redis.Redis.from_url(redis_url)
    fill(r, "t:train", history_file, 2100)
    r.xadd("t:train", {"example": b'{"ts": "soon"}'}, id="3000-0")  # a bad entry: skipped, counted
    r.xadd("t:train", {"other": b"x"}, id="3001-0")
    repo = ModelRepository(tmp_path / "models", config.model.name)
    res = run_stream(config, r, repo, tmp_path / "ck.pt", consumer="w", promote=True, idle_exit_s=0.5,
                     log=lambda m: None)
    assert res.examples == 2100 and res.bad == 2
    assert res.versions == [1, 2, 3]  # 1,000 and 2,000 examples, then the rest when idle
    assert repo.promoted() == 3
    meta = repo.metadata(3)
    assert meta["parent"] == 2 and meta["watermark"]["source"]["last_id"] == "3000-0"
    assert r.xpending("t:train", config.stream.group)["pending"] == 0


def worker(cfg, tmp, consumer, env, stdout=subprocess.PIPE):
    return subprocess.Popen(
        [sys.executable, "-m", "watchnext", "train", "--stream", "--config", str(cfg), "--checkpoint", str(tmp / "ck.pt"),
         "--models", str(tmp / "models"), "--consumer", consumer, "--idle-exit", "1.5", "--no-export"],
        env=env, stdout=stdout, stderr=subprocess.DEVNULL,
    )


def test_killed_worker_is_taken_over_and_every_entry_trains_once(redis_url, history_file, tmp_path):
    env = {**os.environ, "REDIS_URL": redis_url}
    r = redis.Redis.from_url(redis_url)
    results = {}
    for run in ("ref", "killed"):
        d = tmp_path / run
        d.mkdir()
        cfg = d / "c.toml"
        cfg.write_text(small_config_text(stream={"key": f"k:{run}", "claim_idle_ms": 300},
                                         trainer={"checkpoint_every_examples": 512, "checkpoint_interval_s": 1000.0}))
        fill(r, f"k:{run}", history_file, 6000)
        if run == "killed":
            ckpt = d / "ck.pt"
            p = worker(cfg, d, "first", env, stdout=subprocess.DEVNULL)
            while p.poll() is None and not ckpt.exists():
                time.sleep(0.005)
            time.sleep(0.1)
            # killed while it holds entries read but not in a checkpoint (not acknowledged): stopped first, so
            # that what is pending cannot change between the look and the kill (between a checkpoint's
            # acknowledgements and the next read it holds none: stopped there, it goes on a little)
            for _ in range(200):
                assert p.poll() is None, "the worker finished before it could be killed"
                os.kill(p.pid, signal.SIGSTOP)
                time.sleep(0.01)  # an acknowledgement already sent reaches Redis before the look
                if r.xpending(f"k:{run}", "trainer")["pending"] > 0:
                    break
                os.kill(p.pid, signal.SIGCONT)
                time.sleep(0.002)
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            mid = torch.load(ckpt, weights_only=False)["state"]["examples"]
            assert 0 < mid < 6000
            pending = r.xpending(f"k:{run}", "trainer")
            assert pending["pending"] > 0  # read but not in a checkpoint: not acknowledged
        p = worker(cfg, d, "second", env)  # another consumer name: takes the dead worker's entries over
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        summary = json.loads(out.decode().strip().splitlines()[-1])
        blob = torch.load(d / "ck.pt", weights_only=False)
        results[run] = (blob["state"]["examples"], blob["state"]["digest"], state_digest(blob["model"]), summary)
        assert r.xpending(f"k:{run}", "trainer")["pending"] == 0
    ref, killed = results["ref"], results["killed"]
    assert ref[0] == killed[0] == 6000
    assert killed[1] == ref[1]  # the same entries, each once, in the same batches
    assert killed[2] == ref[2]  # bit-identical model


def test_worker_rides_out_a_redis_restart(history_file, tmp_path):
    import threading

    from watchnext.redis_embed import start_embedded

    server = start_embedded(tmp_path / "redis")  # its own server: this test kills it
    try:
        r = redis.Redis.from_url(server.url, socket_timeout=2)
        cfg_path = tmp_path / "c.toml"
        cfg_path.write_text(small_config_text(trainer={"checkpoint_every_examples": 512}))
        config = load_config(cfg_path)
        fill(r, config.stream.key, history_file, 3000)
        time.sleep(1.2)  # appendfsync everysec: the entries are on disk
        stop, out, logs = [False], {}, []
        repo = ModelRepository(tmp_path / "models", "ranker")
        th = threading.Thread(target=lambda: out.setdefault("res", run_stream(
            config, r, repo, tmp_path / "ck.pt", consumer="w", idle_exit_s=3.0, log=logs.append, stop=stop)))
        th.start()
        deadline = time.monotonic() + 60
        while not (tmp_path / "ck.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        server.proc.kill()  # Redis dies mid-run
        server.proc.wait()
        time.sleep(1.0)
        server2 = start_embedded(tmp_path / "redis", port=server.port)  # and comes back with its AOF
        th.join(120)
        assert not th.is_alive()
        res = out["res"]
        assert any("Redis unreachable" in m for m in logs) and any("Redis is back" in m for m in logs)
        assert res.examples == 3000  # every entry trained once: none lost, none twice
        r2 = redis.Redis.from_url(server2.url)
        assert r2.xpending(config.stream.key, config.stream.group)["pending"] == 0
        server2.stop()
    finally:
        server.stop()
