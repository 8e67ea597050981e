#!/usr/bin/env bash
# The one test command: system tools, Python deps, lint, then pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k containerd -x).
set -euo pipefail
cd "$(dirname "$0")/.."

# Real registry and clients the integration tests drive, a browser for the status page, and
# the Redis and load balancer a fleet of replicas runs with (Debian packages; SeaweedFS, the
# object store, comes from PyPI).
DEBS=(docker-registry skopeo containerd chromium podman buildah stargz-snapshotter redis-server haproxy)
# A virtual environment keeps the tests off the system Python (Debian refuses pip there).
python3 -m venv --help >/dev/null 2>&1 || DEBS+=(python3-venv)
missing=()
for pkg in "${DEBS[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    sudo=$([ "$(id -u)" = 0 ] || echo "sudo -E")  # as a user, through sudo
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "${missing[@]}"
fi

export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e '.[test]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy --strict proxy cache
.venv/bin/python -m pytest -q "$@"
