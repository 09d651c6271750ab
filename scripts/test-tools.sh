#!/usr/bin/env bash
# The ecosystem's own tools the tests run where they are present (each test skips, saying why, where
# one is missing): Chromium (the HTML report in a real browser), promtool (metrics and alert rules),
# systemd-analyze (the units), Alertmanager (alerts), and three tools whose dependencies clash with the
# project's, each in a virtual environment of its own beside .venv:
#   .venv-mlflow    a real `mlflow server` (mlflow pins pyarrow 25; the project uses 26)
#   .venv-focus     focus-validator 2.2.1 (FOCUS 1.2; needs Python 3.12 and numpy < 2)
#   .venv-focus10   focus-validator 1.0.0 (FOCUS 1.0)
# Safe to run twice: what is already there is kept. Debian packages are installed only as root.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for pair in chromium:chromium promtool:prometheus systemd-analyze:systemd alertmanager:prometheus-alertmanager; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
  done
  [ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "test tools: apt-get install ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}") \
      >/dev/null || echo "test tools: apt-get failed; the tests that need ${missing[*]} will skip" >&2
  fi
fi

venv() {  # venv DIR PYTHON PACKAGES...
  local dir=$1 py=$2; shift 2
  [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "import sys" 2>/dev/null && [ -f "$dir/.ok" ] && return 0
  command -v "$py" >/dev/null || { echo "test tools: no $py for $dir; its tests will skip" >&2; return 0; }
  rm -rf "$dir"
  "$py" -m venv "$dir" && "$dir/bin/pip" install -q --disable-pip-version-check "$@" && touch "$dir/.ok" \
    || { echo "test tools: $dir could not be built; its tests will skip" >&2; rm -rf "$dir"; }
}

venv .venv-mlflow python3 'mlflow[auth]==3.17.2' &
venv .venv-focus10 python3 'focus-validator==1.0.0' 'multimethod<1.11' &
py312=python3.12
for cand in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 "$(command -v python3.12 || true)"; do
  if [ -n "$cand" ] && "$cand" -c "import sys" >/dev/null 2>&1; then py312=$cand; break; fi
done
venv .venv-focus "$py312" 'focus-validator==2.2.1' 'pyarrow==19.0.1' &
wait
exit 0
