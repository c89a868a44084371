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

With `[stream] shards` = S > 1 the promises hold per key. This module reads the stream (`StreamReader`, one
key); training/stream_worker.py is the worker's loop, over one key or S, in one process or over the ranks of a
torchrun group.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

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
