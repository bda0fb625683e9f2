#!/usr/bin/env bash
# Submit a multi-node GPU job to SLURM. The job runs cyb_jax.main under srun,
# one process per GPU or one per node; jax.distributed reads the coordinator,
# the process count and the process id from SLURM's environment.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/slurm.sh --nodes N [options] CONFIG [FLAGS...]

Submit `python -m cyb_jax.main --config=CONFIG FLAGS...` with sbatch.

  --nodes N            number of nodes (required)
  --gpus-per-node G    GPUs on each node (default: 8)
  --processes MODE     'per-gpu' (default): one process per GPU, each sees its own GPU;
                       'per-node': one process per node that drives all G GPUs
  --partition P        SLURM partition (default: the cluster's default)
  --time T             time limit, e.g. 24:00:00 (default: the partition's)
  --job-name J         job name (default: cyb_jax)
  --python PATH        Python on the nodes with cyb_jax installed (default: python3)
  --dry-run            print the batch script and the sbatch command instead of submitting
  -h, --help           show this help

The job starts in the directory you submit from; run it from the repository root.
USAGE
}

nodes=""
gpus_per_node=8
processes="per-gpu"
partition=""
time_limit=""
job_name="cyb_jax"
python="python3"
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="${2:?--nodes needs a value}"; shift 2 ;;
    --gpus-per-node) gpus_per_node="${2:?--gpus-per-node needs a value}"; shift 2 ;;
    --processes) processes="${2:?--processes needs per-gpu or per-node}"; shift 2 ;;
    --partition) partition="${2:?--partition needs a value}"; shift 2 ;;
    --time) time_limit="${2:?--time needs a value}"; shift 2 ;;
    --job-name) job_name="${2:?--job-name needs a value}"; shift 2 ;;
    --python) python="${2:?--python needs a path}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) break ;;
  esac
done
missing=()
[[ -n "$nodes" ]] || missing+=("--nodes")
[[ $# -ge 1 ]] || missing+=("CONFIG")
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "Error: missing required setting(s): ${missing[*]}. See launch/slurm.sh --help." >&2
  exit 2
fi
for value in "$nodes" "$gpus_per_node"; do
  if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
    echo "Error: invalid count '$value'; --nodes and --gpus-per-node take positive integers." >&2
    exit 2
  fi
done
config="$1"
shift
if [[ ! -f "$config" ]]; then
  echo "Error: config file '$config' not found; run from the repository root." >&2
  exit 2
fi

case "$processes" in
  per-gpu)
    tasks_per_node="$gpus_per_node"
    gpu_binding="#SBATCH --gpus-per-task=1"
    # SLURM_LOCALID selects each process's GPU (jax.distributed's SLURM detection).
    device_ids=""
    ;;
  per-node)
    tasks_per_node=1
    gpu_binding="#SBATCH --gpus-per-node=$gpus_per_node"
    # One process drives every GPU of its node.
    device_ids="export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus_per_node - 1)))"
    ;;
  *)
    echo "Error: invalid --processes '$processes'; expected per-gpu or per-node." >&2
    exit 2
    ;;
esac

optional=""
[[ -n "$partition" ]] && optional+="#SBATCH --partition=$partition"$'\n'
[[ -n "$time_limit" ]] && optional+="#SBATCH --time=$time_limit"$'\n'
command="$(printf '%q ' "$python" -m cyb_jax.main "--config=$config" "$@")"

script="#!/usr/bin/env bash
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$tasks_per_node
$gpu_binding
${optional}#SBATCH --output=%x-%j.out
set -euo pipefail
${device_ids:+$device_ids
}# $((nodes * tasks_per_node)) processes over $((nodes * gpus_per_node)) GPUs.
srun ${command% }
"

if [[ $dry_run -eq 1 ]]; then
  echo "# batch script:"
  printf '%s' "$script"
  echo "# submit with:"
  echo "sbatch <batch script>"
else
  printf '%s' "$script" | sbatch
fi
