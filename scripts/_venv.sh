# shellcheck shell=bash
# Shared bootstrap for scripts/test and scripts/serve: sourced, not executed.
#
#   tidings_venv [EXTRA]   create .venv if missing and `pip install -e .[EXTRA]` into it,
#                          skipping the install when nothing changed since the last one.
#   tidings_apt CMD PKG    make sure command CMD exists, installing Debian package PKG with
#                          apt-get (running `apt-get update` first) only when it is missing.
#
# Works on a bare Debian machine with python3 where we are root (or have sudo).

TIDINGS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TIDINGS_VENV="$TIDINGS_ROOT/.venv"
_tidings_apt_updated=""

_tidings_log() { printf 'tidings: %s\n' "$*" >&2; }

_tidings_apt_install() {
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            _tidings_log "need root (or sudo) to install: $*"
            return 1
        fi
    fi
    if [ -z "$_tidings_apt_updated" ]; then
        _tidings_log "installing $* with apt-get"
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        _tidings_apt_updated=1
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

tidings_apt() {
    local cmd="$1" pkg="$2"
    command -v "$cmd" >/dev/null 2>&1 || _tidings_apt_install "$pkg"
}

_tidings_make_venv() {
    local py
    py="$(command -v python3 || true)"
    if [ -z "$py" ]; then
        _tidings_apt_install python3 python3-venv
        py="$(command -v python3)"
    fi
    if ! "$py" -m venv "$TIDINGS_VENV" >/dev/null 2>&1; then
        # Debian ships ensurepip separately (python3-venv / python3.X-venv).
        rm -rf "$TIDINGS_VENV"
        local ver
        ver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
        _tidings_apt_install "python$ver-venv" || _tidings_apt_install python3-venv
        "$py" -m venv "$TIDINGS_VENV"
    fi
}

tidings_venv() {
    local extra="${1:-}" spec="." stamp want
    [ -n "$extra" ] && spec=".[$extra]"
    if [ ! -x "$TIDINGS_VENV/bin/python" ] || ! "$TIDINGS_VENV/bin/python" -c '' 2>/dev/null; then
        rm -rf "$TIDINGS_VENV"
        _tidings_log "creating $TIDINGS_VENV"
        _tidings_make_venv
    fi
    # The install is redone only when pyproject.toml changes (or the requested extras
    # are not installed yet). An install with the test extra also covers the plain one.
    want="$(cksum <"$TIDINGS_ROOT/pyproject.toml")"
    for stamp in "$TIDINGS_VENV/.tidings-installed-${extra:-base}" \
                 "$TIDINGS_VENV/.tidings-installed-test"; do
        if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
            return 0
        fi
    done
    _tidings_log "installing tidings$([ -n "$extra" ] && echo "[$extra]") into .venv"
    (cd "$TIDINGS_ROOT" && PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
        "$TIDINGS_VENV/bin/python" -m pip install -q -e "$spec") || return 1
    printf '%s\n' "$want" >"$TIDINGS_VENV/.tidings-installed-${extra:-base}"
}
