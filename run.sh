#!/usr/bin/env bash
# The one entry point: bootstraps .venv on first use, then serve / dev / sign / test / bench.
#   ./run.sh [serve] --upstream URL [flags]   gunicorn (fileproxy/server/gunicorn_settings.py)
#   ./run.sh dev --upstream URL [flags]       one process, for debugging
#   ./run.sh sign URL [--key ID] [flags]      print a signed link (./run.sh sign --help)
#   ./run.sh test [pytest args]               the test suite
#   ./run.sh bench NAME [args]                benchmarks/NAME.py (loopback, load, net)
#   ./run.sh lint [ruff args]                 ruff check, then mypy (settings in setup.cfg)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"

ensure_venv() {
  local stamp="$venv/.fileproxy-installed"
  if [[ -x "$venv/bin/python" && -f "$stamp" && "$stamp" -nt "$root/setup.cfg" ]]; then
    return
  fi
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "run.sh: fileproxy needs Python 3.11 or newer (found: $("$python" --version 2>&1))" >&2
    exit 2
  fi
  echo "run.sh: setting up $venv (first run)..." >&2
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet -e "$root[test,bench]" >&2
  touch "$stamp"
}

ensure_venv
py="$venv/bin/python"
cd "$root"
case "${1:-}" in
  test) shift; exec "$py" -m pytest "$@" ;;
  lint) shift; "$venv/bin/ruff" check "$root" "$@" && exec "$venv/bin/mypy" ;;
  bench)
    shift
    name="${1:?usage: ./run.sh bench loopback|load|faults|net|h2net|h2floor|tuning|cutupload|soak [args]}"; shift
    exec "$py" -m "benchmarks.$name" "$@" ;;
  dev) shift; exec "$py" -m fileproxy dev "$@" ;;
  serve) shift; exec "$py" -m fileproxy serve "$@" ;;
  sign) exec "$py" -m fileproxy "$@" ;;
  *) exec "$py" -m fileproxy serve "$@" ;;
esac
