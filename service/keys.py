"""Every Redis key the service writes, in one namespace (`wn:`) that no client string can reach.

Client strings (request ids, user ids, experiment names) appear only as BLAKE2b digests inside key names, or as
fields of hashes; never as key names of their own. The training stream's key is the config's `[stream] key`
(default `watchnext:training`), or with `[stream] shards` = S > 1 its S keys `<key>:0` ... `<key>:<S-1>`;
the online features' keys (`wn:f:...`) are listed in `watchnext/entities.py`.

Impressions (service/impressions.py). R: 20 hex digits of the request_id's digest; U: of the user's id; G: 12
random hex digits, one per response (a retried request is a second impression, never written into the first).

    wn:imp:{R}:U:G     hash   "_": shared sections, ts, arm, model version (JSON); "_due": the window's close;
                              "i:<item id>": {"candidate": features as served, "position": slot, ...}
    wn:imp:{R}         set    "U:G" of every impression served under this request_id
    wn:fb:{R}:U:G      list   feedback events in arrival order (JSON)
    wn:done:{R}:U:G    set    the closed impression's fields (its items), kept a day: late feedback is "expired"
    wn:imp:due         zset   tokens "R:U:G" scored by their window's close
    wn:imp:closing     zset   tokens a closer has taken, scored by when its lease ends
    wn:imp:owner       hash   token -> the closer holding it

(`{R}` puts one request's own keys in one Redis Cluster slot; the closer's scripts also touch the shared keys,
so the service runs against one Redis, not a cluster.)

Experiments (service/experiments.py).

    wn:exp:live        string the live experiment's definition (JSON); absent: none live
    wn:exp:defs        hash   name -> {"experiment": definition, "status", "stopped_at"}
    wn:exp:ev:b2:<h>   list   the experiment's closed impressions as JSON lines; h: 32 hex digits of the name's digest
"""

from __future__ import annotations

import hashlib
import secrets

DUE = "wn:imp:due"
CLOSING = "wn:imp:closing"
OWNER = "wn:imp:owner"
EXP_LIVE = "wn:exp:live"
EXP_DEFS = "wn:exp:defs"
EXP_EVENTS = "wn:exp:ev:"


def digest(text: str, size: int = 10) -> str:
    """2 * size hex digits naming a client string inside a key (the string itself never is one)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=size).hexdigest()


def token(request_id: str, user_id: str) -> str:
    """The server's name of one response's impression: "R:U:G" (G new each time)."""
    return f"{digest(request_id)}:{digest(user_id)}:{secrets.token_hex(6)}"


def imp_key(tok: str) -> str:
    r, rest = tok.split(":", 1)
    return f"wn:imp:{{{r}}}:{rest}"


def users_key(r: str) -> str:
    """The set of impressions ("U:G") served under request_id digest `r`."""
    return f"wn:imp:{{{r}}}"


def fb_key(tok: str) -> str:
    r, rest = tok.split(":", 1)
    return f"wn:fb:{{{r}}}:{rest}"


def done_key(tok: str) -> str:
    r, rest = tok.split(":", 1)
    return f"wn:done:{{{r}}}:{rest}"


def events_key(name: str) -> str:
    """The list of experiment `name`'s closed impressions."""
    return EXP_EVENTS + "b2:" + digest(name, 16)
