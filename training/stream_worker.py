"""The continuous worker: train on the Redis training stream, export as it goes, in one process or over the
ranks of a torchrun group (docs/distributed.md). The promises it keeps are in training/stream.py.

With `[stream] shards` = 1 (the default) the stream is the one key `[stream] key`.

With `[stream] shards` = S > 1 the service writes each example to the key `<key>:<crc32(user id) % S>`
(`Stream.shard_of`, service/impressions.py), so one user's examples stay in order on one key. Each key has its
own consumer group `[stream] group`. One process consumes all S keys; under torchrun rank r of N consumes the
keys i with i % N == r (S >= N; fewer keys than ranks is refused), as the consumer `<--consumer or host
name>-rank<r>`, a name that survives a restart so a restarted rank first reads its own pending entries again
(then, per key, what a dead consumer left pending, once idle for `claim_idle_ms`, then new entries). A rank reads
its keys ahead into one queue per key and takes entries merged by id (time order).

Every iteration every rank makes the same collective calls (the loop cannot hang on a rank without entries):

1. read: fill this rank's batch up to `batch_size` entries from its keys (possibly none);
2. agree: one all-reduce of flags (has rows, full, cannot fill more now, waited `max_wait_s`, stop, idle,
   checkpoint due, export due), so every rank takes the same decisions;
3. step, when every rank is full or cannot fill more now, and one is full or has waited: each rank trains its
   rows of the global batch (`Trainer.step` -> training/distributed.py; a rank without rows takes part with none);
4. checkpoint: every rank's last trained entry id per key is all-gathered into the checkpoint's
   `source.last_ids`; rank 0 writes it; a barrier; then each rank acknowledges its own entries;
5. export: rank 0 writes the version; the version number is broadcast.

Exactly once, per key, as for the one key (training/stream.py): an entry is acknowledged only after a checkpoint
that holds it is on disk, so a crash of any rank loses nothing (unacknowledged entries are delivered again); an
entry delivered again whose id is <= the checkpoint's last id for its key was trained already: it is
acknowledged, not trained. With every entry present before the run (the tests), the batches do not depend on
timing: rank r's rows of step k are the next `batch_size` entries of its keys, so a run killed and restarted
trains the same batches as one that was not.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import cast

import numpy as np
import redis
import torch

from watchnext.config import Config
from watchnext.errors import WatchnextError
from watchnext.examples import BadLines, Decoder
from watchnext.repository import ModelRepository

from . import distributed
from .stream import FIELD, StreamReader, StreamResult, _text, parse_id
from .trainer import Trainer, pick_device

BLOCK_MS = 200  # the longest a rank waits on Redis for new entries in one iteration


def owned(keys: list[str], rank: int, world: int) -> list[tuple[int, str]]:
    """(shard index, key) of the keys rank `rank` of `world` consumes: those with index % world == rank."""
    if len(keys) < world:
        raise WatchnextError(
            "stream.shards", f"{len(keys)} stream key{'s' if len(keys) > 1 else ''} for {world} ranks: every rank "
            f"needs a shard of its own; set [stream] shards to {world} or a multiple of it (the service must use "
            f"the same value), or start fewer ranks")
    return [(i, k) for i, k in enumerate(keys) if i % world == rank]


class ShardReader:
    """This process's keys: a StreamReader each, read ahead into one queue per key, taken merged by entry id.

    Entries that will never train (deleted while pending, without an `example` field, or with an id <= the
    key's last trained id: already in the checkpoint) are put in `skipped`, to acknowledge at the next
    checkpoint."""

    def __init__(self, r: redis.Redis, keys: list[tuple[int, str]], group: str, consumer: str,
                 claim_idle_ms: int, last: dict[str, tuple[int, int]], bad: BadLines):
        self.r, self.keys, self.group, self.consumer = r, keys, group, consumer
        self.claim_idle_ms = claim_idle_ms
        self.readers = [StreamReader(r, k, group, consumer, claim_idle_ms) for _, k in keys]
        self.queues: list[deque[tuple[bytes, bytes]]] = [deque() for _ in keys]
        self.last = last
        self.bad = bad
        self.skipped: list[list[bytes]] = [[] for _ in keys]
        self.got_any = False  # the last `take` read an entry (of any kind) from Redis

    def take(self, want: int, block_ms: int | None, log=None) -> tuple[list[tuple[int, bytes, bytes]], bool]:
        """Up to `want` entries (index into `keys`, id, example), merged by id; and True when that is all that can
        be had now (every key caught up, or waiting to take a dead consumer's entries over). When none can be had,
        waits up to `block_ms` (None or 0: not at all) for new entries on any key."""
        self.got_any = False
        for j, rd in enumerate(self.readers):
            while len(self.queues[j]) < want:
                self._keep(j, rd.read(want - len(self.queues[j]), None, log, wait=False))
                if rd.dry:
                    break
        out = self._merge(want)
        if not out and block_ms and any(rd.phase == "claim" for rd in self.readers):
            time.sleep(min(block_ms, self.claim_idle_ms) / 1000)  # a dead consumer's entries are not idle enough yet
        elif not out and block_ms:  # every key caught up: wait for the next entry on any of them
            res = self.r.xreadgroup(self.group, self.consumer, {k: ">" for _, k in self.keys}, count=want,
                                    block=block_ms)
            where = {k: j for j, (_, k) in enumerate(self.keys)}
            for key, entries in cast(list, res or []):  # RESP2: [key, entries] per key that had any
                self._keep(where[_text(key)], list(entries))
            out = self._merge(want)
        return out, len(out) < want  # short: every queue ran empty, so every key was dry

    def _keep(self, j: int, entries: list[tuple[bytes, dict | None]]) -> None:
        key = self.keys[j][1]
        for i, fields in entries:
            self.got_any = True
            if fields is None or parse_id(i) <= self.last[key]:
                self.skipped[j].append(i)  # deleted, or already in the checkpoint
                continue
            val = fields.get(FIELD)
            if val is None:
                self.bad.add(f"stream {key} entry {i.decode()}", f"has no '{FIELD.decode()}' field")
                self.skipped[j].append(i)
                continue
            self.queues[j].append((i, val))

    def _merge(self, want: int) -> list[tuple[int, bytes, bytes]]:
        out: list[tuple[int, bytes, bytes]] = []
        while len(out) < want:
            heads = [(parse_id(q[0][0]), j) for j, q in enumerate(self.queues) if q]
            if not heads:
                break
            j = min(heads)[1]
            i, v = self.queues[j].popleft()
            out.append((j, i, v))
        return out

    def empty(self) -> bool:
        return not any(self.queues)


def run_stream(
    config: Config,
    r: redis.Redis,
    repo: ModelRepository | None,
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
    device: torch.device | None = None,
) -> StreamResult:
    """Consume the stream's keys (all of them in one process, this rank's under torchrun) until
    stopped (`stop[0] = True` on any rank) or every rank has been idle for `idle_exit_s`. `repo` None: no export.
    Every rank calls it; rank 0 alone writes the checkpoint, the metrics and the versions."""
    sc, tc = config.stream, config.trainer
    rank, world = distributed.rank_world()
    lead = rank == 0
    mine = owned(sc.keys(), rank, world)
    checkpoint = Path(checkpoint)
    device = device or pick_device()
    resume = checkpoint.is_file() and not fresh
    trainer = Trainer.load(checkpoint, config, device) if resume else Trainer(config, device)
    st = trainer.state
    if st.source.get("kind") != "stream" or st.source.get("key") != sc.key:
        st.source = {"kind": "stream", "key": sc.key}  # a model trained on files or another stream carries on
    last_ids: dict[str, str] = st.source.setdefault("last_ids", {})  # every key's last trained id
    if "last_id" in st.source:  # the one key's, as a checkpoint and a version's watermark also name it
        last_ids.setdefault(sc.key, st.source["last_id"])
    st.source["shards"] = sc.shards
    name = (consumer or socket.gethostname()) + (f"-rank{rank}" if world > 1 else "")
    decoder = Decoder(config, on_bad_line="skip", check_order=False)
    reader = ShardReader(r, mine, sc.group, name, sc.claim_idle_ms,
                         {k: parse_id(last_ids.get(k, "0-0")) for _, k in mine}, decoder.bad)
    stop = stop if stop is not None else [False]
    bs = tc.batch_size
    bad_before = st.bad_lines
    ex_start = ex_ckpt = st.examples
    buf: list[tuple[int, bytes, bytes]] = []  # (index into mine, id, example) for the next step
    unacked: list[list[bytes]] = [[] for _ in mine]  # per key: trained or skipped, not yet acknowledged
    versions: list[int] = []
    t_ckpt = t_export = last_entry = time.monotonic()
    first_wait = 0.0  # when the oldest row in `buf` was read
    busy = False  # at the last agreement a rank had a full batch: do not wait on Redis
    outage: dict = {"since": None, "wait": 0.2}
    mfile = open(metrics_file, "a") if metrics_file and lead else None
    who = f"[stream rank {rank}]" if world > 1 else "[stream]"

    def train_buffer() -> None:
        """This rank's rows of one step (every rank calls it, perhaps with none)."""
        nonlocal buf
        chunk, ids = None, None
        if buf:
            block = b"\n".join(v.replace(b"\n", b" ") for _, _, v in buf) + b"\n"
            decoder.line_names = [f"{mine[j][1]} {i.decode()}" for j, i, _ in buf]
            table, lines, row_end = decoder.parse_lines(block, "stream", 1)
            chunk = decoder.encode(table, lines, row_end, "stream")
            # the digest's ids: (shard, ms, seq) of each row kept (all of them, unless bad entries were skipped)
            rows = np.array([(mine[j][0], *parse_id(i)) for j, i, _ in buf], dtype=np.int64).reshape(-1, 3)
            ids = rows if len(chunk) == len(buf) else rows[chunk.line - 1]
            for j, i, _ in buf:  # ids grow along a key: the last of each key's rows is its newest
                reader.last[mine[j][1]] = parse_id(i)
                unacked[j].append(i)
            buf = []
        if chunk is not None and ids is not None and len(chunk):
            trainer.step(chunk, ids)  # None: not finite, skipped and counted
        elif trainer.shared:
            distributed.step(trainer, None, None, id_width=3)  # no rows here this step: takes part with none

    def checkpoint_and_ack() -> None:
        """Every rank's last ids and bad entries into the checkpoint; rank 0 writes it; then each rank acks."""
        nonlocal t_ckpt, ex_ckpt
        own = {k: f"{reader.last[k][0]}-{reader.last[k][1]}" for _, k in mine if reader.last[k] > (0, 0)}
        parts = distributed.gather_objects((own, decoder.bad.count))
        for ids, _ in parts:
            last_ids.update(ids)
        if sc.shards == 1:
            st.source["last_id"] = last_ids.get(sc.key, "0-0")
        st.bad_lines = bad_before + sum(n for _, n in parts)
        if lead:
            trainer.save(checkpoint)
        distributed.barrier()  # the checkpoint holding every rank's entries is on disk
        t_ckpt, ex_ckpt = time.monotonic(), st.examples
        for j, rd in enumerate(reader.readers):
            unacked[j] += reader.skipped[j]
            reader.skipped[j] = []
            if unacked[j]:
                try:
                    rd.ack(unacked[j])
                    unacked[j] = []
                except (redis.ConnectionError, redis.TimeoutError):
                    pass  # acknowledged at the next checkpoint; delivered again meanwhile, they are skipped

    def export() -> None:
        nonlocal t_export
        assert repo is not None
        v = distributed.broadcast(trainer.export(repo, promote=promote) if lead else None)
        st.parent_version, st.exported_at_examples = v, st.examples
        versions.append(v)
        t_export = time.monotonic()
        if lead:
            log(f"[stream] exported version {v} after {st.examples:,} examples" + (" (promoted)" if promote else ""))
            if mfile:
                rep = {"examples": st.examples, "version": v, "promoted": promote,
                       "skipped_batches": st.skipped_batches, **trainer.metrics.report()}
                mfile.write(json.dumps(rep) + "\n")
                mfile.flush()

    if lead:
        log(f"[stream] consuming {sc.shards} shard{'s' if sc.shards > 1 else ''} of {sc.key} on {world} "
            f"rank{'s' if world > 1 else ''} in group {sc.group}; {st.examples:,} examples trained so far")
    log(f"{who} keys {', '.join(k for _, k in mine)} as {name}, resuming after "
        + ", ".join(f"{k} {last_ids.get(k, '0-0')}" for _, k in mine))
    distributed.barrier()  # every rank loaded: the first waits below are Redis's, not a slow start's
    try:
        while True:
            # 1. read this rank's rows, up to a batch
            want = bs - len(buf)
            dry = True
            if want > 0 and not stop[0]:
                now = time.monotonic()
                wait = BLOCK_MS if not buf else int(max(0.0, first_wait + max_wait_s - now) * 1000)
                try:
                    got, dry = reader.take(want, None if busy else min(BLOCK_MS, wait), log)
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    if outage["since"] is None:
                        outage["since"] = time.monotonic()
                        log(f"{who} Redis unreachable ({e.__class__.__name__}): retrying; trained work is kept")
                    time.sleep(outage["wait"])
                    outage["wait"] = min(outage["wait"] * 2, 5.0)
                    got = []
                else:
                    if outage["since"] is not None:
                        log(f"{who} Redis is back after {time.monotonic() - outage['since']:.1f} s")
                        outage.update(since=None, wait=0.2)
                if reader.got_any:
                    last_entry = time.monotonic()
                if got and not buf:
                    first_wait = time.monotonic()
                buf += got
            # 2. agree: every rank takes the same decisions from the same sums
            now = time.monotonic()
            full = len(buf) >= bs
            flags = distributed.agree([
                int(bool(buf)),
                int(full),
                int(full or dry),
                int(bool(buf) and now - first_wait >= max_wait_s),
                int(stop[0]),
                int(idle_exit_s is not None and not buf and reader.empty() and now - last_entry >= idle_exit_s),
                int(bool(st.examples > ex_ckpt or any(unacked) or any(reader.skipped))
                    and now - t_ckpt >= min(tc.checkpoint_interval_s, tc.export_interval_s)),
                int(now - t_export >= tc.export_interval_s),
            ], device)
            rows, n_full, n_ready, n_waited, n_stop, n_idle, n_ckpt, n_export = flags
            busy = n_full > 0
            finishing = n_stop > 0 or n_idle == world
            # 3. step: one global batch, each rank's rows in rank order
            if rows and (finishing or (n_ready == world and (n_full or n_waited))):
                train_buffer()
            # 4. checkpoint, acknowledge; 5. export
            if finishing:
                if n_idle == world and lead:
                    log(f"[stream] no entries for {idle_exit_s:g} s on any rank: stopping")
                break
            if st.examples - ex_ckpt >= tc.checkpoint_every_examples or n_ckpt:
                checkpoint_and_ack()
            new = st.examples - st.exported_at_examples
            if repo is not None and new > 0 and (new >= tc.export_every_examples or n_export):
                checkpoint_and_ack()
                export()
                checkpoint_and_ack()  # remembers the parent version
        checkpoint_and_ack()
        if repo is not None and st.examples > st.exported_at_examples and idle_exit_s is not None:
            export()
            checkpoint_and_ack()
        return StreamResult(st.examples, st.examples - ex_start, versions, st.bad_lines, st.skipped_batches)
    finally:
        if mfile:
            mfile.close()


def run_stream_cli(config: Config, repo: ModelRepository, ckpt: Path, args, metrics_file: Path) -> int:
    """`watchnext train --stream`, in one process or under torchrun (WORLD_SIZE > 1)."""
    from watchnext.redis_embed import redis_for

    world = distributed.world_size_from_env()
    owned(config.stream.keys(), 0, world)  # refuse fewer keys than ranks before starting anything
    device = distributed.init_from_env(pick_device(args.device))
    server = None
    try:
        rank, _ = distributed.rank_world()
        got: tuple[str, str] | None = None  # (url, "") or ("", why not), from rank 0
        if rank == 0:  # REDIS_URL, or the embedded server on this data (started here when none runs)
            try:
                url, server = redis_for(os.environ.get("REDIS_URL"), ckpt.parent / "redis")
                got = (url, "")
            except WatchnextError as e:
                got = ("", str(e))
            if server is not None:
                print(f"[stream] REDIS_URL is not set: started an embedded redis-server at {server.url}",
                      file=sys.stderr)
        url, why = distributed.broadcast(got)
        if not url:
            raise WatchnextError("", why)  # every rank says it, in one line
        r = redis.Redis.from_url(url)
        stop = [False]

        def on_signal(signum, frame):  # finish the step, checkpoint, acknowledge, exit (every rank agrees)
            stop[0] = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            res = run_stream(config, r, None if args.no_export else repo, ckpt, consumer=args.consumer,
                              promote=args.promote, idle_exit_s=args.idle_exit, metrics_file=metrics_file,
                              stop=stop, fresh=getattr(args, "fresh", False), device=device)
        except RuntimeError as e:
            if world > 1 and distributed.peer_lost(e):  # another rank died (torchrun stops this one next)
                raise WatchnextError("torch.distributed", f"lost another rank ({str(e).splitlines()[0][:160]}); "
                                     "the last checkpoint keeps what was trained and entries after it are delivered "
                                     "again: run the same command to resume") from None
            raise
        distributed.barrier()  # every rank is done with Redis before rank 0 stops an embedded server
        if rank == 0:
            print(json.dumps({"examples": res.examples, "trained_this_run": res.trained_now,
                              "versions": res.versions, "bad_entries": res.bad,
                              "skipped_batches": res.skipped_batches, "checkpoint": str(ckpt)}))
        return 0
    finally:
        if server is not None:
            server.stop()
        distributed.shutdown()
