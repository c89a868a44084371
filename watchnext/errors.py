"""The one error base class: a problem the user can act on, naming where (`field`) and why (`reason`).

Every error meant for a user derives from `WatchnextError`: config, data, settings, repository,
experiment, service and command-line errors. The HTTP handler turns one into a 4xx/5xx body
`{"error": {"field": ..., "reason": ...}}`; the CLI handler prints `watchnext: field: reason` and exits
non-zero. Anything else that escapes is a bug: logged with its traceback and reported as one, never as
bad input.

`field` names the part at fault: a dotted path in a body ("candidates[3].video_age_days"), a config key
("watchnext.toml: features[3].kind"), a file and line ("history.jsonl:12"), or a setting
("WATCHNEXT_THREADS"); "" when the reason says it all.
"""

from __future__ import annotations


class WatchnextError(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field, self.reason = field, reason
