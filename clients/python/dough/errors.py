"""Errors: every error code of Dough's API maps to a class of its own.

All derive from :class:`DoughError`; ``code``, ``status`` and ``message`` are
the daemon's ``{"error": {"code", "message"}}`` and the HTTP status.
"""
from __future__ import annotations

from typing import Dict, Optional, Type


class DoughError(Exception):
    """An error of Dough's (the API's answer, or the way to it)."""

    code: str = "error"

    def __init__(self, message: str, *, status: Optional[int] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        where = f" ({self.status} {self.code})" if self.status else ""
        return f"{self.message}{where}"


class DoughConnectionError(DoughError):
    """The daemon could not be reached (not running, wrong URL, network)."""

    code = "connection"


class ConfigError(DoughError):
    """No URL or token: neither given, nor in the environment, nor in the
    state directory."""

    code = "config"


class TaskTimeout(DoughError):
    """``Task.wait(timeout)`` ran out before the task ended (the task runs on)."""

    code = "wait_timeout"


class TaskFailed(DoughError):
    """``run`` of a task that ended without an exit code (its VM failed, it
    was cancelled, ...): ``state``, ``reason`` and ``detail`` say why."""

    code = "task_failed"

    def __init__(self, message: str, *, state: str, reason: Optional[str], detail: Optional[str]):
        super().__init__(message)
        self.state = state
        self.reason = reason
        self.detail = detail


# One class per API error code.


class InvalidRequest(DoughError):
    """400 ``invalid``: a field of the request is wrong (the message names it)."""

    code = "invalid"


class BadJson(InvalidRequest):
    """400 ``bad_json``: the body is not JSON of the right shape."""

    code = "bad_json"


class BadBody(InvalidRequest):
    """400 ``bad_body``: the body could not be read."""

    code = "bad_body"


class BadQuery(InvalidRequest):
    """400 ``bad_query``: a query parameter is wrong."""

    code = "bad_query"


class Unauthorized(DoughError):
    """401 ``unauthorized``: no token, or the wrong one."""

    code = "unauthorized"


class NotFound(DoughError):
    """404 ``not_found``: no such route."""

    code = "not_found"


class TaskNotFound(NotFound):
    """404 ``no_such_task``."""

    code = "no_such_task"


class NodeNotFound(NotFound):
    """404 ``node_not_found``."""

    code = "node_not_found"


class NoEgressRecord(NotFound):
    """404 ``no_egress``: the task has no egress record (yet)."""

    code = "no_egress"


class NoProvenance(NotFound):
    """404 ``no_provenance``: the task has no provenance statement (yet)."""

    code = "no_provenance"


class MethodNotAllowed(DoughError):
    """405 ``method_not_allowed``."""

    code = "method_not_allowed"


class TaskFinished(DoughError):
    """409 ``finished``: the task already ended (cancel of a finished task)."""

    code = "finished"


class TaskInFlight(DoughError):
    """409 ``in_flight``: only a finished task can be deleted."""

    code = "in_flight"


class NodeState(DoughError):
    """409 ``node_state``: the node cannot go to that state now."""

    code = "node_state"


class RequestTooLarge(DoughError):
    """413 ``too_large``: the request body is over the limit."""

    code = "too_large"


class Impossible(DoughError):
    """422 ``impossible``: no node could ever run this task (too big, unknown image)."""

    code = "impossible"


class StoreError(DoughError):
    """500 ``store``: the daemon's store failed."""

    code = "store"


class StateFull(DoughError):
    """507 ``state_full``: the daemon's state directory is full."""

    code = "state_full"


ERRORS: Dict[str, Type[DoughError]] = {
    c.code: c
    for c in (
        InvalidRequest,
        BadJson,
        BadBody,
        BadQuery,
        Unauthorized,
        NotFound,
        TaskNotFound,
        NodeNotFound,
        NoEgressRecord,
        NoProvenance,
        MethodNotAllowed,
        TaskFinished,
        TaskInFlight,
        NodeState,
        RequestTooLarge,
        Impossible,
        StoreError,
        StateFull,
    )
}


def from_response(status: int, body: object) -> DoughError:
    """The exception for an error answer of the API."""
    code, message = "error", f"HTTP {status}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = str(body["error"].get("code", code))
        message = str(body["error"].get("message", message))
    elif isinstance(body, str) and body:
        message = body
    cls = ERRORS.get(code, DoughError)
    return cls(message, status=status, code=code)


__all__ = [
    "ConfigError",
    "DoughConnectionError",
    "DoughError",
    "ERRORS",
    "TaskFailed",
    "TaskTimeout",
    "from_response",
] + [c.__name__ for c in ERRORS.values()]
