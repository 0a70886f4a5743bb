#!/usr/bin/env bash
# Set up .venv and run the whole trial test suite.  Ends with one line
# "N passed, N failed, N skipped" and trial's exit status.
set -uo pipefail
cd "$(dirname "$0")/.."
MTLSPROXY_BENCH_PEERS=1 bash scripts/setup.sh || exit 1

log="$(mktemp)"
.venv/bin/python -m twisted.trial --temp-directory="${TMPDIR:-/tmp}/mtlsproxy-trial-$$" "${@:-tests}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
.venv/bin/python - "$log" <<'PY'
import re, sys
text = open(sys.argv[1], errors="replace").read()
m = re.findall(r"^(PASSED|FAILED) \((.*)\)\s*$", text, re.M)
counts = {}
if m:
    for part in m[-1][1].split(","):
        k, _, v = part.strip().partition("=")
        counts[k] = int(v)
passed = counts.get("successes", 0)
failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
skipped = counts.get("skips", 0)
if not m:
    failed = max(failed, 1)
print(f"{passed} passed, {failed} failed, {skipped} skipped")
PY
rm -f "$log"
exit $status
