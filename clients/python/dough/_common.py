"""What the sync and async clients share: where the daemon is, request
bodies, server-sent events, results."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import ConfigError

DEFAULT_STATE_DIR = "/var/lib/dough"
TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")


def resolve(url: Optional[str], token: Optional[str], state_dir: Optional[str]) -> Tuple[str, str]:
    """The daemon's URL and token, found as the CLI finds them: given, else
    ``DOUGH_URL``/``DOUGH_TOKEN``, else the state directory's ``api-url`` and
    ``api-token`` files (``DOUGH_STATE_DIR``, default /var/lib/dough)."""
    d = Path(state_dir or os.environ.get("DOUGH_STATE_DIR") or DEFAULT_STATE_DIR)

    def read(name: str, env: str) -> str:
        try:
            return (d / name).read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"no {env} and no {d / name} ({e.strerror}): is `dough serve` running?"
            ) from None

    url = url or os.environ.get("DOUGH_URL") or read("api-url", "DOUGH_URL")
    token = token or os.environ.get("DOUGH_TOKEN") or read("api-token", "DOUGH_TOKEN")
    return url.rstrip("/"), token


def task_body(
    command: Union[str, Sequence[str], None],
    *,
    image: Optional[str] = None,
    repo: Union[str, Mapping[str, Any], None] = None,
    prompt: Optional[str] = None,
    egress: Optional[str] = None,
    allow_hosts: Optional[Iterable[str]] = None,
    allow_cidrs: Optional[Iterable[str]] = None,
    env: Optional[Mapping[str, str]] = None,
    secret_env: Optional[Iterable[str]] = None,
    vcpus: Optional[int] = None,
    memory_mib: Optional[int] = None,
    timeout: Optional[float] = None,
    labels: Optional[Mapping[str, str]] = None,
    priority: Optional[int] = None,
    root: Optional[bool] = None,
    workdir: Optional[str] = None,
    agent: Optional[str] = None,
    model_url: Optional[str] = None,
    pull_request: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The JSON body of ``POST /v1/tasks``. A string command runs with
    ``sh -c``; ``repo`` is a URL or ``{"url", "base", "branch", ...}``;
    ``timeout`` is in seconds (whole, rounded up)."""
    body: Dict[str, Any] = {}
    if isinstance(command, str):
        body["command"] = ["sh", "-c", command]
    elif command is not None:
        body["command"] = list(command)
    if repo is not None:
        body["repo"] = {"url": repo} if isinstance(repo, str) else dict(repo)
    if timeout is not None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        body["timeout_secs"] = int(-(-timeout // 1))
    for key, value in (
        ("image", image),
        ("prompt", prompt),
        ("egress", egress),
        ("vcpus", vcpus),
        ("memory_mib", memory_mib),
        ("priority", priority),
        ("root", root),
        ("workdir", workdir),
        ("agent", agent),
        ("model_url", model_url),
    ):
        if value is not None:
            body[key] = value
    for key, items in (
        ("allow_hosts", allow_hosts),
        ("allow_cidrs", allow_cidrs),
        ("secret_env", secret_env),
    ):
        if items is not None:
            body[key] = list(items)
    for key, mapping in (("env", env), ("labels", labels), ("pull_request", pull_request)):
        if mapping is not None:
            body[key] = dict(mapping)
    return body


@dataclass
class Event:
    """One event of a task's stream: ``kind`` is "output" (``stream`` is
    stdout or stderr, ``offset`` the byte offset of ``data`` in the task's
    output) or "state" (``state``, ``reason``, ``exit_code``)."""

    kind: str
    stream: Optional[str] = None
    offset: Optional[int] = None
    data: str = ""
    state: Optional[str] = None
    reason: Optional[str] = None
    exit_code: Optional[int] = None
    at_ms: Optional[int] = None

    @property
    def terminal(self) -> bool:
        return self.kind == "state" and self.state in TERMINAL


def event_of(name: str, data: Dict[str, Any]) -> Optional[Event]:
    if name == "output":
        return Event(
            kind="output",
            stream=data.get("stream"),
            offset=data.get("offset"),
            data=data.get("data", ""),
        )
    if name == "state":
        return Event(
            kind="state",
            state=data.get("state"),
            reason=data.get("reason"),
            exit_code=data.get("exit_code"),
            at_ms=data.get("at_ms"),
        )
    return None


class SseParser:
    """Server-sent events from lines: ``feed(line)`` returns (event, data)
    when a blank line ends one."""

    def __init__(self) -> None:
        self.name = "message"
        self.data: List[str] = []

    def feed(self, line: str) -> Optional[Tuple[str, str]]:
        line = line.rstrip("\r\n")
        if not line:
            if not self.data:
                self.name = "message"
                return None
            out = (self.name, "\n".join(self.data))
            self.name, self.data = "message", []
            return out
        if line.startswith(":"):
            return None
        key, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if key == "event":
            self.name = value
        elif key == "data":
            self.data.append(value)
        return None


@dataclass
class Commit:
    sha: str
    subject: str


@dataclass
class TaskResult:
    """What a repository task's work became."""

    branch: str
    base: str
    base_commit: str
    commits: List[Commit] = field(default_factory=list)
    head: Optional[str] = None
    pushed: bool = False
    pr_url: Optional[str] = None
    note: Optional[str] = None

    @staticmethod
    def of(record: Mapping[str, Any]) -> Optional["TaskResult"]:
        r = record.get("result")
        if not r:
            return None
        return TaskResult(
            branch=r.get("branch", ""),
            base=r.get("base", ""),
            base_commit=r.get("base_commit", ""),
            commits=[Commit(c["sha"], c.get("subject", "")) for c in r.get("commits", [])],
            head=r.get("head"),
            pushed=bool(r.get("pushed")),
            pr_url=r.get("pr_url"),
            note=r.get("note"),
        )


def exit_code_of(record: Mapping[str, Any]) -> Optional[int]:
    """The task's exit code as `dough run` gives it (124: timed out), or
    None when it ended without one."""
    if record.get("exit_code") is not None:
        return int(record["exit_code"])
    if record.get("state") == "timed_out":
        return 124
    return None


#: Pause between reads of a task's state while waiting (grows to the max).
POLL_FIRST, POLL_MAX = 0.1, 1.0

#: Errors of the connection itself, after which a stream is reopened.
STREAM_RETRY_PAUSE = 0.5
STREAM_RETRIES = 20
