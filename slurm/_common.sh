# Sourced by the GrowCLIP sbatch scripts (not submitted itself). Variables an admin sets, in the
# environment of `sbatch` (exported into the job by SLURM's default --export=ALL) or here:
#   GROWCLIP_REPO   checkout of this repository on the shared filesystem (default: submit directory)
#   GROWCLIP_PYTHON python of the venv/conda env with the pinned deps (default: $GROWCLIP_REPO/.venv/bin/python)
#   RUN_ROOT        where runs live on Lustre/GPFS, e.g. /lustre/$PROJECT/growclip/runs
#   DATA_ROOT       the corpus (manifest.json, shards/, tokenizer.json, eval/)
# Partition, account and QOS go on the sbatch command line (sbatch -p gpu -A proj -q normal ...) or
# in the config's `cluster` section when the pipeline submits through `python -m jobs submit`.
set -euo pipefail
GROWCLIP_REPO=${GROWCLIP_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
GROWCLIP_PYTHON=${GROWCLIP_PYTHON:-$GROWCLIP_REPO/.venv/bin/python}
export PYTHONPATH=$GROWCLIP_REPO${PYTHONPATH:+:$PYTHONPATH}
cd "$GROWCLIP_REPO"
# config.yaml of the run: RUN_DIR/config.yaml as written by `python -m jobs submit`, or any run
# config plus RUN_DIR given explicitly (1st and 3rd arguments of every script)
CONFIG=${1:?usage: sbatch slurm/<job>.sbatch CONFIG STAGE RUN_DIR}
STAGE=${2:?stage number}
RUN_DIR=${3:-${RUN_ROOT:?set RUN_ROOT or pass RUN_DIR}/$(basename "$(dirname "$CONFIG")")}
ROUND=${4:-}  # search and select: the search round (search.rounds > 1); empty = round 1 / the last
# Lustre: stripe checkpoint dirs over 4 OSTs before the first write (large sequential files):
#   lfs setstripe -c 4 "$RUN_DIR/stage_$(printf %02d "$STAGE")/train/checkpoints"
if command -v lfs >/dev/null 2>&1; then
  ckpt="$RUN_DIR/stage_$(printf %02d "$STAGE")/train/checkpoints"
  mkdir -p "$ckpt" && lfs setstripe -c 4 "$ckpt" 2>/dev/null || true
fi
