"""The continuous worker: train on the Redis training stream, export as it goes.

Each stream entry has one field, `example`: one labelled example as JSON
(docs/examples.md), written by the service when an impression's attribution window
closes. The worker reads through a consumer group and keeps these promises:

* an entry is acknowledged only once a checkpoint holds it, so a crash loses
  nothing: unacknowledged entries are delivered again;
* the checkpoint records the last trained entry id, so an entry delivered
  again after a crash between checkpoint and acknowledgement is skipped, not
  trained twice (one trainer per model; ids grow);
* entries left pending by a dead worker (another consumer name) are claimed
  once idle for `stream.claim_idle_ms`.

This module is the one key (`[stream] shards = 1`, the default) in one process. The sharded stream, and the
stream under torchrun, are training/stream_shards.py (same promises, per key).
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from watchnext.config import Config
from watchnext.examples import Decoder
from watchnext.repository import ModelRepository

from .trainer import Trainer, pick_device

FIELD = b"example"


def _text(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


def parse_id(entry_id: str | bytes) -> tuple[int, int]:
    s = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = s.partition("-")
    return int(ms), int(seq or 0)


class StreamReader:
    """Consumer-group reads in id order: own pending, then claimed from dead workers, then new."""

    def __init__(self, r: redis.Redis, key: str, group: str, consumer: str, claim_idle_ms: int):
        self.r, self.key, self.group, self.consumer, self.claim_idle_ms = r, key, group, consumer, claim_idle_ms
        self.has_group = False
        # own: what was delivered to this name before a restart; claim: what dead workers
        # left pending; new: everything after. Ids stay in order across the three.
        self.phase = "own"
        self.own_after = "0"  # own pending entries are read after this id: each is delivered once
        self.dry = False  # the last read got fewer than asked and more cannot be had at once
        self.waiting_logged = False

    def ensure_group(self) -> None:
        if self.has_group:
            return
        try:
            self.r.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self.has_group = True

    def read(self, count: int, block_ms: int | None, log=None, wait: bool = True) -> list[tuple[bytes, dict | None]]:
        """Up to `count` entries; `block_ms` (None: not at all) bounds the wait for new ones; `wait`: pause a moment
        when a dead worker's entries are not idle long enough to take yet. Sets `dry`."""
        self.ensure_group()
        self.dry = False
        if self.phase == "own":
            got = self._group_read(self.own_after, count, None)
            if got:
                self.own_after = _text(got[-1][0])
                return got
            self.phase = "claim"
        if self.phase == "claim":
            summary = self.r.xpending(self.key, self.group)
            others = sum(
                int(c["pending"]) for c in summary.get("consumers") or [] if _text(c["name"]) != self.consumer
            )
            if others == 0:
                self.phase = "new"
            else:
                res = self.r.xautoclaim(self.key, self.group, self.consumer, self.claim_idle_ms, "0-0", count=count)
                if len(res) > 2 and res[2]:  # entries deleted from the stream while pending
                    self.r.xack(self.key, self.group, *res[2])
                if res[1]:
                    return list(res[1])
                if log and not self.waiting_logged:
                    log(f"[stream] {others} entries pending on a dead worker: taking them over once idle "
                        f"for {self.claim_idle_ms} ms")
                    self.waiting_logged = True
                if wait:
                    time.sleep(min(0.2, self.claim_idle_ms / 1000))
                self.dry = True
                return []
        got = self._group_read(">", count, block_ms)
        self.dry = len(got) < count
        return got

    def _group_read(self, start: str, count: int, block_ms: int | None):
        res = self.r.xreadgroup(self.group, self.consumer, {self.key: start}, count=count, block=block_ms)
        if not res:
            return []
        return [(i, f) for i, f in res[0][1]]

    def ack(self, ids: list[bytes]) -> None:
        for lo in range(0, len(ids), 10_000):
            self.r.xack(self.key, self.group, *ids[lo : lo + 10_000])


@dataclass
class StreamResult:
    examples: int
    trained_now: int
    versions: list[int]
    bad: int
    skipped_batches: int = 0  # loss or gradients not finite: not trained on


def run_stream(
    config: Config,
    r: redis.Redis,
    repo: ModelRepository,
    checkpoint: Path,
    *,
    consumer: str | None = None,
    promote: bool = False,
    idle_exit_s: float | None = None,
    max_wait_s: float = 0.5,
    metrics_file: Path | None = None,
    log=lambda msg: print(msg, file=sys.stderr, flush=True),
    stop: list[bool] | None = None,
    fresh: bool = False,
) -> StreamResult:
    """Consume the stream until stopped (`stop[0] = True`, SIGTERM/SIGINT in the CLI) or idle.

    `fresh` starts a new model over an existing checkpoint (the next checkpoint replaces it)."""
    sc, tc = config.stream, config.trainer
    checkpoint = Path(checkpoint)
    resume = checkpoint.is_file() and not fresh
    trainer = Trainer.load(checkpoint, config, pick_device()) if resume else Trainer(config, pick_device())
    st = trainer.state
    if st.source.get("kind") != "stream" or st.source.get("key") != sc.key:
        # a model trained on files (or on another stream) carries on from here
        st.source = {"kind": "stream", "key": sc.key, "last_id": "0-0"}
    st.source.setdefault("last_id", "0-0")  # trained on this stream's shards (`last_ids`), not on the one key yet
    last = parse_id(st.source["last_id"])
    reader = StreamReader(r, sc.key, sc.group, consumer or socket.gethostname(), sc.claim_idle_ms)
    decoder = Decoder(config, on_bad_line="skip", check_order=False)
    stop = stop if stop is not None else [False]
    bs = tc.batch_size
    buf_ids: list[bytes] = []
    buf_vals: list[bytes] = []
    unacked: list[bytes] = []
    versions: list[int] = []
    trained_now = 0
    since_ckpt = 0
    t_ckpt = t_export = time.monotonic()
    first_wait = None
    last_entry = time.monotonic()
    mfile = open(metrics_file, "a") if metrics_file else None

    def train_buffer() -> None:
        nonlocal buf_ids, buf_vals, trained_now, since_ckpt, last
        block = b"\n".join(v.replace(b"\n", b" ") for v in buf_vals) + b"\n"
        decoder.line_names = [i.decode() for i in buf_ids]
        table, lines, row_end = decoder.parse_lines(block, f"stream {sc.key}", 1)
        chunk = decoder.encode(table, lines, row_end, f"stream {sc.key}")
        if len(chunk):
            # the ids of the rows kept (all of them, unless bad entries were skipped)
            kept = buf_ids if len(chunk) == len(buf_ids) else [buf_ids[i - 1] for i in chunk.line.tolist()]
            ids = b",".join(kept)
            if trainer.step(chunk, ids) is not None:  # None: not finite, skipped and counted
                trained_now += len(chunk)
                since_ckpt += len(chunk)
        last = parse_id(buf_ids[-1])
        st.source["last_id"] = buf_ids[-1].decode()
        unacked.extend(buf_ids)
        buf_ids, buf_vals = [], []

    def checkpoint_and_ack() -> None:
        nonlocal since_ckpt, t_ckpt
        st.bad_lines = decoder.bad.count
        trainer.save(checkpoint)
        since_ckpt, t_ckpt = 0, time.monotonic()
        if unacked:
            try:
                reader.ack(unacked)
                unacked.clear()
            except (redis.ConnectionError, redis.TimeoutError):
                pass  # acknowledged at the next checkpoint; delivered again meanwhile, they are skipped

    outage = {"since": None, "wait": 0.2}

    def redis_down(e: Exception) -> None:
        if outage["since"] is None:
            outage["since"] = time.monotonic()
            log(f"[stream] Redis unreachable ({e.__class__.__name__}): retrying; trained work is kept")
        time.sleep(outage["wait"])
        outage["wait"] = min(outage["wait"] * 2, 5.0)

    def export() -> None:
        nonlocal t_export
        v = trainer.export(repo, promote=promote)
        versions.append(v)
        t_export = time.monotonic()
        rep = {"examples": st.examples, "version": v, "promoted": promote, "skipped_batches": st.skipped_batches,
               **trainer.metrics.report()}
        log(f"[stream] exported version {v} after {st.examples:,} examples" + (" (promoted)" if promote else ""))
        if mfile:
            mfile.write(json.dumps(rep) + "\n")
            mfile.flush()

    log(f"[stream] consuming {sc.key} as {reader.consumer} in group {sc.group}; "
        f"resuming after id {st.source['last_id']} ({st.examples:,} examples trained so far)")
    try:
        while not stop[0]:
            try:
                entries = reader.read(bs - len(buf_ids), block_ms=200, log=log)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                redis_down(e)
                entries = []
            else:
                if outage["since"] is not None:
                    log(f"[stream] Redis is back after {time.monotonic() - outage['since']:.1f} s")
                    outage.update(since=None, wait=0.2)
            now = time.monotonic()
            skip = []
            for i, fields in entries:
                if fields is None or parse_id(i) <= last:
                    skip.append(i)  # deleted, or already in the checkpoint
                    continue
                val = fields.get(FIELD)
                if val is None:
                    decoder.bad.add(f"stream entry {i.decode()}", f"has no '{FIELD.decode()}' field")
                    skip.append(i)
                    continue
                buf_ids.append(i)
                buf_vals.append(val)
            if skip:
                unacked.extend(skip)
            if entries:
                last_entry = now
                if first_wait is None:
                    first_wait = now
            if buf_ids and (len(buf_ids) >= bs or now - (first_wait or now) >= max_wait_s):
                train_buffer()
                first_wait = None
            if since_ckpt >= tc.checkpoint_every_examples or (
                (since_ckpt or unacked) and now - t_ckpt >= min(tc.checkpoint_interval_s, tc.export_interval_s)
            ):
                checkpoint_and_ack()
            new = st.examples - st.exported_at_examples
            if new > 0 and (new >= tc.export_every_examples or now - t_export >= tc.export_interval_s):
                checkpoint_and_ack()
                export()
                checkpoint_and_ack()  # remembers the parent version
            if idle_exit_s is not None and not buf_ids and now - last_entry >= idle_exit_s:
                log(f"[stream] no entries for {idle_exit_s:g} s: stopping")
                break
        if buf_ids:
            train_buffer()
        checkpoint_and_ack()
        if st.examples > st.exported_at_examples and idle_exit_s is not None:
            export()
            checkpoint_and_ack()
        return StreamResult(st.examples, trained_now, versions, decoder.bad.count, st.skipped_batches)
    finally:
        if mfile:
            mfile.close()


def run_stream_cli(config: Config, repo: ModelRepository, ckpt: Path, args, metrics_file: Path) -> int:
    from watchnext.redis_embed import connect

    from . import distributed

    if config.stream.shards > 1 or distributed.world_size_from_env() > 1:  # training/stream_shards.py
        from .stream_shards import run_sharded_cli

        return run_sharded_cli(config, repo, ckpt, args, metrics_file)

    r, server = connect(data_dir=ckpt.parent / "redis")
    if server is not None:
        print(f"[stream] REDIS_URL is not set: started an embedded redis-server at {server.url}", file=sys.stderr)
    stop = [False]

    def on_signal(signum, frame):  # finish the batch, checkpoint, acknowledge, exit
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    res = run_stream(
        config,
        r,
        repo,
        ckpt,
        consumer=args.consumer,
        promote=args.promote,
        idle_exit_s=args.idle_exit,
        metrics_file=metrics_file,
        stop=stop,
        fresh=getattr(args, "fresh", False),
    )
    print(json.dumps({"examples": res.examples, "trained_this_run": res.trained_now, "versions": res.versions,
                      "bad_entries": res.bad, "skipped_batches": res.skipped_batches, "checkpoint": str(ckpt)}))
    if server is not None:
        server.stop()
    return 0

