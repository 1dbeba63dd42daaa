#!/usr/bin/env bash
# The test command (README): installs, starts a local SLURM cluster (3 nodes, each in its own network
# namespace: the multi-node and node-loss tests need them; ASSET_SLURM_NODES=1 for a one-node cluster),
# runs the suite, stops SLURM.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh || exit 1
export ASSET_SLURM_NODES=${ASSET_SLURM_NODES:-3}
if bash scripts/local_slurm.sh start; then
  export SLURM_CONF=${ASSET_SLURM_DIR:-/tmp/asset_slurm}/slurm.conf
  trap 'bash scripts/local_slurm.sh stop' EXIT
elif [ "${CI:-}" = "true" ]; then
  echo "error: could not start the local SLURM cluster in CI" >&2; exit 1
fi
python3 -m pytest -q -p no:cacheprovider --timeout=900 --durations=15 tests "$@"
