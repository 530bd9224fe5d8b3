"""A real `dough serve` with real VMs for the client's tests.

`tests/run.sh` runs pytest inside a network namespace of its own (the
daemon's "host"); here a second namespace stands in for the internet (a git
server on 203.0.113.2), linked to it by a veth. Nothing touches the
machine's own network.
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
INET_ADDR = "203.0.113.2"
HOST_ADDR = "203.0.113.1"
GIT_PORT = 8000


def sh(*args):
    subprocess.run(args, check=True, capture_output=True)


def in_own_netns():
    """pytest must run where run.sh put it: in the namespace it made, not in
    the machine's."""
    ns = os.environ.get("DOUGH_PYTEST_NETNS")
    if not ns:
        return False
    return os.stat(f"/run/netns/{ns}").st_ino == os.stat("/proc/self/ns/net").st_ino


@pytest.fixture(scope="session")
def internet():
    assert in_own_netns(), "run the client's tests with clients/python/tests/run.sh"
    ns = f"dpy-inet-{os.getpid()}"
    sh("ip", "netns", "add", ns)
    root = tempfile.mkdtemp(prefix="dough-pygit-")
    server = None
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", "pyup0", "type", "veth", "peer", "name", "pydown0", "netns", ns)
        sh("ip", "addr", "add", f"{HOST_ADDR}/24", "dev", "pyup0")
        sh("ip", "link", "set", "pyup0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{INET_ADDR}/24", "dev", "pydown0")
        sh("ip", "-n", ns, "link", "set", "pydown0", "up")
        sh("ip", "route", "add", "default", "via", INET_ADDR)
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(HERE / "gitserver.py"), root, INET_ADDR, str(GIT_PORT)],
            stdout=subprocess.PIPE,
        )
        assert server.stdout.readline().strip() == b"ready"
        yield {"ns": ns, "git_root": Path(root), "git_url": f"http://{INET_ADDR}:{GIT_PORT}/git"}
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", ns])
        subprocess.run(["ip", "link", "del", "pyup0"], capture_output=True)
        subprocess.run(["rm", "-rf", root])


@pytest.fixture(scope="session")
def daemon(internet):
    """`dough serve` on 127.0.0.1 of the test namespace, its own state dir."""
    state = tempfile.mkdtemp(prefix="dough-pyt-", dir="/tmp")
    env = dict(os.environ)
    env.update(
        DOUGH_STATE_DIR=state,
        DOUGH_IMAGE_DIR=os.environ.get("DOUGH_IMAGE_DIR", "/var/lib/dough/images/default"),
    )
    for k in ("DOUGH_URL", "DOUGH_TOKEN", "DOUGH_LOG"):
        env.pop(k, None)
    log = open(Path(state) / "serve.log", "wb")
    p = subprocess.Popen(
        [os.environ["DOUGH_BIN"], "serve", "--listen", "127.0.0.1:0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url_file = Path(state) / "api-url"
    t0 = time.monotonic()
    while not url_file.exists():
        assert p.poll() is None, (Path(state) / "serve.log").read_text()
        assert time.monotonic() - t0 < 30, "the daemon did not start listening"
        time.sleep(0.05)
    yield {
        "state_dir": state,
        "url": url_file.read_text().strip(),
        "token": (Path(state) / "api-token").read_text().strip(),
    }
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    log.close()
    subprocess.run(["rm", "-rf", state])


class Proxy:
    """A TCP relay to the daemon whose connections the test can cut: a real
    dropped connection in the middle of a stream."""

    def __init__(self, target):
        host, port = target.replace("http://", "").split(":")
        self.target = (host, int(port))
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.conns = []
        self.accepted = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            u = socket.create_connection(self.target)
            with self.lock:
                self.conns += [c, u]
                self.accepted += 1
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    @staticmethod
    def pump(a, b):
        try:
            while True:
                d = a.recv(65536)
                if not d:
                    break
                b.sendall(d)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        """Close every connection open now (both ends)."""
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.listener.close()
        self.cut()


@pytest.fixture
def proxy(daemon):
    p = Proxy(daemon["url"])
    yield p
    p.close()
