"""The synchronous client."""
from __future__ import annotations

import json
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import httpx

from . import _common as c
from ._common import Event, TaskResult
from .errors import DoughConnectionError, DoughError, TaskFailed, TaskTimeout, from_response


class Dough:
    """A client of one `dough serve` daemon.

    ``url`` and ``token`` default to ``DOUGH_URL`` and ``DOUGH_TOKEN``, then
    to the files `dough serve` writes in its state directory (``state_dir``,
    ``DOUGH_STATE_DIR``, default /var/lib/dough), as the CLI does::

        from dough import Dough

        with Dough() as d:
            code = d.run("make test", on_stdout=print)
    """

    def __init__(
        self,
        url: Optional[str] = None,
        token: Optional[str] = None,
        *,
        state_dir: Optional[str] = None,
        timeout: float = 30.0,
        transport: Optional[httpx.BaseTransport] = None,
    ) -> None:
        self.url, self.token = c.resolve(url, token, state_dir)
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Dough":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise DoughConnectionError(f"cannot reach {self.url}: {e}") from e
        if r.status_code >= 400:
            try:
                body: object = r.json()
            except ValueError:
                body = r.text
            raise from_response(r.status_code, body)
        return r

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._call(method, path, **kw).json()

    # Tasks.

    def submit(self, command: Any = None, **kw: Any) -> "Task":
        """Queue a task; see :func:`dough._common.task_body` for the fields
        (``image``, ``repo``, ``prompt``, ``egress``, ``allow_hosts``,
        ``env``, ``timeout``, ...). Returns at once with its :class:`Task`."""
        v = self._json("POST", "/v1/tasks", json=c.task_body(command, **kw))
        return Task(self, v["id"])

    def task(self, id: str) -> "Task":
        """A task by id (not fetched until asked)."""
        return Task(self, id)

    def tasks(self, state: Optional[str] = None, limit: int = 100) -> List[Dict[str, Any]]:
        """Task records, newest first."""
        params: Dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        return self._json("GET", "/v1/tasks", params=params)["tasks"]

    def run(
        self,
        command: Any = None,
        *,
        on_stdout: Optional[Callable[[str], None]] = None,
        on_stderr: Optional[Callable[[str], None]] = None,
        **kw: Any,
    ) -> int:
        """Submit, stream the output to the callbacks as it comes, and return
        the exit code (124: timed out, as `dough run`). A task that ends with
        no exit code (cancelled, its VM failed) raises :class:`TaskFailed`."""
        task = self.submit(command, **kw)
        for ev in task.stream():
            if ev.kind == "output":
                cb = on_stdout if ev.stream == "stdout" else on_stderr
                if cb is not None:
                    cb(ev.data)
        record = task.status()
        code = c.exit_code_of(record)
        if code is None:
            raise TaskFailed(
                f"task {task.id} ended {record.get('state')} ({record.get('reason')}): {record.get('detail')}",
                state=str(record.get("state")),
                reason=record.get("reason"),
                detail=record.get("detail"),
            )
        return code

    # The daemon.

    def keys(self) -> List[Dict[str, str]]:
        """The public keys provenance statements are signed with."""
        return self._json("GET", "/v1/keys")["keys"]

    def nodes(self) -> List[Dict[str, Any]]:
        return self._json("GET", "/v1/nodes")["nodes"]

    def pools(self) -> List[Dict[str, Any]]:
        return self._json("GET", "/v1/pools")["pools"]


class Task:
    """A task of the daemon's. Cheap: it holds the id; each method asks."""

    def __init__(self, client: Dough, id: str) -> None:
        self.client = client
        self.id = id
        self.record: Dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"Task({self.id!r}, state={self.record.get('state')!r})"

    def status(self) -> Dict[str, Any]:
        """The task's record now: state, reason, detail, exit code,
        transitions, result."""
        self.record = self.client._json("GET", f"/v1/tasks/{self.id}")
        return self.record

    @property
    def state(self) -> str:
        return self.status()["state"]

    @property
    def result(self) -> Optional[TaskResult]:
        """A repository task's branch, commits and pull request (None
        otherwise, or before it ends)."""
        return TaskResult.of(self.status())

    def wait(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Until the task ends; its final record. :class:`TaskTimeout` after
        ``timeout`` seconds (the task goes on; cancel it if need be)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = c.POLL_FIRST
        while True:
            rec = self.status()
            if rec.get("state") in c.TERMINAL:
                return rec
            if deadline is not None and time.monotonic() >= deadline:
                raise TaskTimeout(
                    f"task {self.id} still {rec.get('state')} after {timeout} s"
                )
            left = pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic()))
            time.sleep(left)
            pause = min(pause * 2, c.POLL_MAX)

    def logs(self) -> str:
        """The stored output, stdout and stderr in order."""
        return self.client._call("GET", f"/v1/tasks/{self.id}/logs").text

    def cancel(self) -> Dict[str, Any]:
        """Stop it (SIGTERM, a grace period, SIGKILL, teardown);
        :class:`TaskFinished` if it already ended."""
        self.record = self.client._json("DELETE", f"/v1/tasks/{self.id}")
        return self.record

    def delete(self) -> None:
        """Forget a finished task with all kept for it."""
        self.client._call("DELETE", f"/v1/tasks/{self.id}", params={"purge": "true"})

    def egress(self) -> Dict[str, Any]:
        """Its egress record (after its VM is gone)."""
        return self.client._json("GET", f"/v1/tasks/{self.id}/egress")

    def provenance(self) -> Dict[str, Any]:
        """Its signed provenance statement (a DSSE envelope)."""
        return self.client._json("GET", f"/v1/tasks/{self.id}/provenance")

    def stream(self, offset: int = 0) -> Iterator[Event]:
        """Output and state events as they happen, from byte ``offset`` of
        the output on (0: all of it), until the task ends. A dropped
        connection is reopened from the last byte received: every byte comes
        once, in order. (Offsets count the task's bytes; output that is not
        UTF-8 arrives with replacement characters.)"""
        last_state = None
        retries = 0
        while True:
            try:
                with self.client._http.stream(
                    "GET",
                    f"/v1/tasks/{self.id}/events",
                    params={"offset": offset},
                    timeout=httpx.Timeout(self.client._http.timeout.connect, read=60.0),
                ) as r:
                    if r.status_code >= 400:
                        r.read()
                        try:
                            body: object = r.json()
                        except ValueError:
                            body = r.text
                        raise from_response(r.status_code, body)
                    parser = c.SseParser()
                    for line in r.iter_lines():
                        got = parser.feed(line)
                        if got is None:
                            continue
                        ev = c.event_of(got[0], json.loads(got[1]))
                        if ev is None:
                            continue
                        retries = 0
                        if ev.kind == "output":
                            if ev.offset is not None:
                                offset = ev.offset + len(ev.data.encode("utf-8"))
                            yield ev
                        else:
                            if ev.state != last_state:
                                last_state = ev.state
                                yield ev
                            if ev.terminal:
                                return
                # The stream ended without a final state: reopen it.
            except httpx.TransportError as e:
                retries += 1
                if retries > c.STREAM_RETRIES:
                    raise DoughConnectionError(
                        f"the event stream of task {self.id} kept failing: {e}"
                    ) from e
            time.sleep(c.STREAM_RETRY_PAUSE)


__all__ = ["Dough", "Task", "DoughError"]
