"""One exception hierarchy that carries the HTTP status, and the field and reason a client can act on.

Every error body has the same shape::

    {"error": {"field": "candidates[3].video_age_days", "reason": "must be a finite number"}}

`field` names the part of the request at fault ("body" for the request as a
whole); 5xx errors name "service".
"""

from __future__ import annotations

from typing import Any

from watchnext.errors import WatchnextError


class ServiceError(WatchnextError):
    """An answer other than 200: `status`, and the body naming the field and the reason."""

    status = 500

    def __init__(self, field: str, reason: str, status: int | None = None):
        super().__init__(field, reason)
        if status is not None:
            self.status = status

    def body(self) -> dict[str, Any]:
        return {"error": {"field": self.field, "reason": self.reason}}


class BadRequest(ServiceError):
    """Input the service cannot use: wrong type, NaN, wrong vector length, unknown task."""

    status = 422


class PayloadTooLarge(ServiceError):
    status = 413


class Unauthorized(ServiceError):
    status = 401


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class Unavailable(ServiceError):
    """The service cannot answer now (no model loaded yet, Redis down for a write): retry later."""

    status = 503
