#!/usr/bin/env bash
# Install everything the benchmark needs, idempotently.
#
#   bash bench/setup.sh            # apt (nginx + nchan, redis-server) and pip (peers, charts)
#   SKIP_APT=1 bash bench/setup.sh # only the Python side (no root needed)
#
# Why a script and not a requirements file: the peers include Nchan, a Debian
# package, and the machines the project runs on keep nothing installed by hand.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [[ -z "${SKIP_APT:-}" ]]; then
    if ! dpkg -s nginx libnginx-mod-nchan redis-server >/dev/null 2>&1; then
        if [[ $(id -u) -ne 0 ]]; then
            echo "bench/setup.sh: apt packages need root (or set SKIP_APT=1)" >&2
            exit 1
        fi
        # Debian starts nginx (port 80) and redis-server (6379) at install time;
        # the benchmark runs its own, with its own config, so keep the packaged
        # services stopped.
        # policy-rc.d is Debian's documented switch for that; remove ours after.
        policy=/usr/sbin/policy-rc.d
        own_policy=""
        if [[ ! -e $policy ]]; then
            printf '#!/bin/sh\nexit 101\n' >"$policy"
            chmod +x "$policy"
            own_policy=1
        fi
        trap '[[ -n "$own_policy" ]] && rm -f "$policy"' EXIT
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends nginx libnginx-mod-nchan redis-server >/dev/null
        echo "bench/setup.sh: installed nginx + libnginx-mod-nchan + redis-server"
    else
        echo "bench/setup.sh: nginx + libnginx-mod-nchan + redis-server already installed"
    fi
fi

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import tidings" >/dev/null 2>&1; then
    "${PIP[@]}" -e "$ROOT"
fi
"${PIP[@]}" \
    uvloop \
    python-socketio \
    "uvicorn[standard]" \
    sse-starlette \
    starlette \
    websockets \
    twisted \
    tornado \
    gevent \
    matplotlib \
    py-spy
echo "bench/setup.sh: python packages ready in .venv"
