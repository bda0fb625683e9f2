#!/usr/bin/env bash
# Train on this machine: create a virtual environment if needed, install the
# project into it, and run one config with any extra flags.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/local.sh [--venv DIR] [--dry-run] CONFIG [FLAGS...]

Train CONFIG (e.g. configs/ap.py) on this machine. FLAGS go to cyb_jax.main,
e.g. --workdir=runs/my_ap --config.total_steps=200.

  --venv DIR   virtual environment to create or reuse (default: .venv)
  --dry-run    print the commands instead of running them
  -h, --help   show this help
USAGE
}

venv=".venv"
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) venv="${2:?--venv needs a directory}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 ]]; then
  echo "Error: missing CONFIG, e.g. launch/local.sh configs/ap.py" >&2
  usage >&2
  exit 2
fi
config="$1"
shift
if [[ ! -f "$config" ]]; then
  echo "Error: config file '$config' not found; the files in configs/ are: $(ls configs/*.py | tr '\n' ' ')" >&2
  exit 2
fi
config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"

# Config files import configs.base, so the run starts from the repository root.
cd "$(dirname "$0")/.."
run() {
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}
if [[ ! -x "$venv/bin/python" ]]; then
  run python3 -m venv "$venv"
fi
run "$venv/bin/python" -m pip install --quiet -e .
run "$venv/bin/python" -m cyb_jax.main "--config=$config" "$@"
