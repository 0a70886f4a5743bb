#!/usr/bin/env bash
# Set up .venv, generate a demo PKI in demo/pki, start two demo HTTP backends
# and the proxy (mTLS required) on 127.0.0.1:8443, and print the curl line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m mtlsproxy.demo
