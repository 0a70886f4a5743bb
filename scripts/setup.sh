#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install mtlsproxy into it with its test
# extra, in the editable mode that Twisted's plugin scan can see.  Installs the
# Debian packages it needs (python3-venv, curl, openssl) when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
apt_install() {
    if command -v apt-get >/dev/null; then
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        echo "setup: please install: $*" >&2
        exit 1
    fi
}

PYTHON="${PYTHON:-python3}"
"$PYTHON" - <<'PY' || { echo "setup: mtlsproxy needs Python 3.11 or newer" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

missing=()
command -v curl >/dev/null || missing+=(curl)
command -v openssl >/dev/null || missing+=(openssl)
command -v ssh >/dev/null || missing+=(openssh-client)
if [ ! -x .venv/bin/python ] && ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    missing+=(python3-venv)
fi
if [ -n "${MTLSPROXY_BENCH_PEERS:-}" ]; then
    # The proxies the benchmark compares with (tests/test_bench.py runs
    # them through bench/run.py's correctness gates).
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || missing+=(stunnel4)
fi
if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# editable_mode=compat puts the checkout itself on sys.path, so the flat
# layout's twisted/plugins/ is found by twisted.plugin.getPlugins.
.venv/bin/python -m pip install -q --disable-pip-version-check \
    -e '.[test]' --config-settings editable_mode=compat

# The TLS scanner that grades the default policy (tests/test_tlsgrade.py).
# SSLyze pins an older cryptography than mtlsproxy needs, so it gets a
# virtualenv of its own, inside the ignored .venv/.
if [ ! -x .venv/tools/sslyze/bin/sslyze ]; then
    "$PYTHON" -m venv .venv/tools/sslyze
    .venv/tools/sslyze/bin/python -m pip install -q --disable-pip-version-check 'sslyze>=6.1,<7'
fi
