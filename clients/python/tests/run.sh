#!/usr/bin/env bash
# The Python client's tests: pytest against a real `dough serve` running
# real VMs (target/release/dough, the image in /var/lib/dough). pytest runs
# in a network namespace made here, the daemon's "host" (entered with
# nsenter: only the network namespace changes, so the jail's cgroups stay
# in view); conftest.py makes a second one for the test internet. Names do
# not start with "dough-": that prefix is the VMs', which gc reclaims.
# Needs root. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../../.."
venv=target/py
if [ ! -x "$venv/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
# The client itself, from this tree (httpx and pytest from Debian's packages).
"$venv/bin/pip" install -q --no-deps --no-build-isolation --no-index --force-reinstall ./clients/python
ns="dpy-host-$$"
ip netns add "$ns"
trap 'ip netns del "$ns"' EXIT
ip -n "$ns" link set lo up
nsenter --net="/run/netns/$ns" env DOUGH_BIN="$PWD/target/release/dough" DOUGH_PYTEST_NETNS="$ns" \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider clients/python/tests "$@"
