#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create the slice unless it exists, copy this
# repository to every worker, install it there, and run the same cyb_jax.main
# command on all workers at once. jax.distributed starts on its own on TPU VMs.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_pod.sh --project P --zone Z --accelerator-type T [options] CONFIG [FLAGS...]

Run `python -m cyb_jax.main --config=CONFIG FLAGS...` on every worker of a TPU VM
slice, e.g. --accelerator-type v4-32 (16 chips on 4 hosts).

  --project P            Google Cloud project (default: $CLOUDSDK_CORE_PROJECT)
  --zone Z               zone of the slice, e.g. us-central2-b (default: $CLOUDSDK_COMPUTE_ZONE)
  --accelerator-type T   slice type, e.g. v4-32 or v5litepod-16
  --name N               TPU VM name (default: cyb-jax-<accelerator type>)
  --version V            TPU software version (default: tpu-ubuntu2204-base)
  --remote-dir D         repository directory on the workers (default: cyb_jax)
  --dry-run              print the gcloud commands instead of running them

  -h, --help             show this help

Every worker writes checkpoints into --workdir, so point it at a directory that all
workers share (an NFS or gcsfuse mount).
USAGE
}

project="${CLOUDSDK_CORE_PROJECT:-}"
zone="${CLOUDSDK_COMPUTE_ZONE:-}"
accelerator=""
name=""
version="tpu-ubuntu2204-base"
remote_dir="cyb_jax"
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --accelerator-type) accelerator="${2:?--accelerator-type needs a value}"; shift 2 ;;
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --version) version="${2:?--version needs a value}"; shift 2 ;;
    --remote-dir) remote_dir="${2:?--remote-dir needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) break ;;
  esac
done
missing=()
[[ -n "$project" ]] || missing+=("--project (or CLOUDSDK_CORE_PROJECT)")
[[ -n "$zone" ]] || missing+=("--zone (or CLOUDSDK_COMPUTE_ZONE)")
[[ -n "$accelerator" ]] || missing+=("--accelerator-type")
[[ $# -ge 1 ]] || missing+=("CONFIG")
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "Error: missing required setting(s): ${missing[*]}. See launch/tpu_pod.sh --help." >&2
  exit 2
fi
config="$1"
shift
name="${name:-cyb-jax-$accelerator}"

cd "$(dirname "$0")/.."
if [[ ! -f "$config" ]]; then
  echo "Error: config file '$config' not found; run from the repository or pass configs/NAME.py." >&2
  exit 2
fi

run() {
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}
tpu=(gcloud compute tpus tpu-vm)
where=(--project="$project" --zone="$zone")

# Reuse the slice when it exists; in a dry run, show the create command.
if [[ $dry_run -eq 1 ]] || ! "${tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  [[ $dry_run -eq 1 ]] && echo "# only if '$name' does not exist yet:"
  run "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator" --version="$version"
fi
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="mkdir -p $remote_dir"
run "${tpu[@]}" scp --recurse cyb_jax configs launch setup.py "$name:$remote_dir" "${where[@]}" --worker=all
# cyb_jax needs Python 3.11; Ubuntu 22.04 TPU images ship 3.10, so install 3.11 when missing
# and keep the project's packages in a virtual environment beside the code.
install="cd $remote_dir && (command -v python3.11 >/dev/null"
install+=" || (sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv))"
install+=" && python3.11 -m venv .venv && .venv/bin/pip install --quiet -e . 'jax[tpu]'"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$install"
main_command="cd $remote_dir && .venv/bin/python -m cyb_jax.main $(printf '%q ' "--config=$config" "$@")"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="${main_command% }"
