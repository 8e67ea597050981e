#!/usr/bin/env bash
# The one test command: system tools, Python deps, lint, then pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k containerd -x).
set -euo pipefail
cd "$(dirname "$0")/.."

# Real registry and clients the integration tests drive (Debian packages).
DEBS=(docker-registry skopeo containerd)
missing=()
for pkg in "${DEBS[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}"
fi

export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q -e '.[test]'
# Test-only packages not (yet) listed in pyproject's [test] extra.
python3 -m pip install -q 'bcrypt>=4'

ruff check .
python3 -m pytest -q "$@"
