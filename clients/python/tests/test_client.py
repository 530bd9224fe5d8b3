"""The Python client against a real `dough serve` running real VMs (see
conftest.py); no part of the daemon is stood in for."""
import asyncio
import subprocess
import time

import pytest

import dough
from dough import AsyncDough, Dough


@pytest.fixture
def d(daemon):
    with Dough(daemon["url"], daemon["token"]) as c:
        yield c


def test_run_streams_output_live_and_returns_the_exit_code(d):
    out, err = [], []
    code = d.run("echo hello; echo oops >&2; exit 3", on_stdout=out.append, on_stderr=err.append)
    assert code == 3
    assert "".join(out) == "hello\n"
    assert "".join(err) == "oops\n"

    # Live: the first line arrives while the task is still running (it
    # runs on until cancelled, so this holds however slow the machine).
    task = d.submit("echo ready; sleep 600")
    seen = []
    for ev in task.stream():
        if ev.kind == "state":
            seen.append(ev.state)
        elif ev.data == "ready\n":
            assert task.state == "running"
            break
    assert "running" in seen
    # Cancelled, its output so far is kept.
    task.cancel()
    final = task.wait(timeout=120)
    assert final["state"] == "cancelled", final
    assert task.logs().startswith("ready\n")


def test_cancel_and_wait_timeouts(d):
    task = d.submit("echo started; sleep 600")
    for ev in task.stream():
        if ev.kind == "output" and "started" in ev.data:
            break
    with pytest.raises(dough.TaskTimeout):
        task.wait(timeout=0.2)
    rec = task.cancel()
    assert rec["id"] == task.id
    final = task.wait(timeout=120)
    assert (final["state"], final["reason"]) == ("cancelled", "cancelled")
    with pytest.raises(dough.TaskFinished) as e:
        task.cancel()
    assert e.value.status == 409 and e.value.code == "finished"


def test_a_task_past_its_timeout_is_killed(d):
    started = time.monotonic()
    assert d.run("sleep 600", timeout=2) == 124
    assert time.monotonic() - started < 300
    t = d.tasks(state="timed_out")
    assert t and t[0]["reason"] == "timeout"


def test_bad_requests_raise_their_own_exceptions(d, daemon):
    with pytest.raises(dough.InvalidRequest) as e:
        d.submit([])
    assert e.value.status == 400 and "command" in e.value.message
    with pytest.raises(dough.InvalidRequest):
        d.submit("true", egress="sideways")
    with pytest.raises(dough.InvalidRequest) as e:
        d.submit("true", vcpus=4096)
    assert "vcpus" in e.value.message
    with pytest.raises(dough.Impossible) as e:
        d.submit("true", memory_mib=262144)
    assert e.value.status == 422 and "memory_mib" in e.value.message
    with pytest.raises(dough.TaskNotFound):
        d.task("no-such-task").status()
    with pytest.raises(dough.BadQuery):
        d.tasks(state="sideways")
    with Dough(daemon["url"], "wrong-token") as bad:
        with pytest.raises(dough.Unauthorized):
            bad.tasks()
    with Dough("http://127.0.0.1:1", "t") as nowhere:
        with pytest.raises(dough.DoughConnectionError):
            nowhere.tasks()
    with pytest.raises(ValueError):
        d.submit("true", timeout=0)
    # Every error is a DoughError.
    assert all(issubclass(c, dough.DoughError) for c in dough.ERRORS.values())


def test_url_and_token_come_from_the_environment_or_the_state_dir(daemon, monkeypatch):
    monkeypatch.delenv("DOUGH_URL", raising=False)
    monkeypatch.delenv("DOUGH_TOKEN", raising=False)
    monkeypatch.setenv("DOUGH_STATE_DIR", daemon["state_dir"])
    with Dough() as c:
        assert (c.url, c.token) == (daemon["url"], daemon["token"])
        assert c.keys()[0]["algorithm"] == "ed25519"
    monkeypatch.setenv("DOUGH_URL", "http://example.invalid:9")
    monkeypatch.setenv("DOUGH_TOKEN", "tok")
    with Dough() as c:
        assert (c.url, c.token) == ("http://example.invalid:9", "tok")
    monkeypatch.delenv("DOUGH_URL")
    monkeypatch.setenv("DOUGH_STATE_DIR", "/nonexistent")
    with pytest.raises(dough.ConfigError) as e:
        Dough()
    assert "dough serve" in str(e.value)


def test_the_stream_resumes_after_a_dropped_connection(d, daemon, proxy):
    n = 40
    task = d.submit(f"for i in $(seq 1 {n}); do echo line $i; sleep 0.1; done")
    via = Dough(proxy.url, daemon["token"]).task(task.id)
    got, cut = [], False
    for ev in via.stream():
        if ev.kind == "output":
            got.append(ev.data)
            if not cut and "line 5\n" in "".join(got):
                proxy.cut()  # the connection dies under the reader
                cut = True
    assert cut
    assert proxy.accepted >= 2, "the stream was reopened"
    assert "".join(got) == "".join(f"line {i}\n" for i in range(1, n + 1))
    assert via.status()["state"] == "succeeded"


def test_a_repository_task_gives_its_branch_and_commits(d, internet):
    repo = internet["git_root"] / "r.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "config", "http.receivepack", "true"], check=True)
    work = internet["git_root"] / "seed"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    (work / "README.md").write_text("# r\n")
    g = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@example"]
    subprocess.run(g + ["add", "."], check=True)
    subprocess.run(g + ["commit", "-qm", "init"], check=True)
    subprocess.run(g + ["push", "-q", str(repo), "main"], check=True)
    task = d.submit(
        "echo hi > hello.txt",
        repo={"url": f"{internet['git_url']}/r.git", "commit_message": "Say hi"},
    )
    final = task.wait(timeout=300)
    assert final["state"] == "succeeded", (final, task.logs())
    r = task.result
    assert r is not None
    assert r.branch == f"dough/{task.id}" and r.base == "main" and r.pushed
    assert [c.subject for c in r.commits] == ["Say hi"]
    assert r.pr_url is None and "DOUGH_FORGE_TOKEN" in (r.note or "")
    shown = subprocess.run(
        ["git", "-C", str(repo), "show", f"{r.branch}:hello.txt"], capture_output=True, text=True
    )
    assert shown.stdout == "hi\n"
    assert r.head == r.commits[-1].sha
    # Its network and provenance are there too.
    assert task.egress()["policy"] == "open"
    assert task.provenance()["payloadType"] == "application/vnd.in-toto+json"


def test_the_async_client_does_the_same(daemon):
    async def main():
        async with AsyncDough(daemon["url"], daemon["token"]) as a:
            out = []
            code = await a.run(["sh", "-c", "echo async; exit 5"], on_stdout=out.append)
            assert (code, "".join(out)) == (5, "async\n")
            t = await a.submit("echo go; sleep 600")
            async for ev in t.stream():
                if ev.kind == "output":
                    break
            await t.cancel()
            final = await t.wait(timeout=120)
            assert final["state"] == "cancelled"
            with pytest.raises(dough.TaskFinished):
                await t.cancel()
            with pytest.raises(dough.TaskNotFound):
                await a.task("nope").status()
            assert any(x["id"] == t.id for x in await a.tasks(limit=50))

    asyncio.run(main())
