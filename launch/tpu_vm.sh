#!/bin/bash
# DeepSSIM on a Cloud TPU VM slice (v4-32, v5e-16, ...): the same command on every worker
# (one process per host, driving its 4 or 8 chips); each process finds the slice's
# workers from the TPU metadata server and joins jax.distributed by itself.
#
#   export TPU_NAME=my-v4-32 ZONE=us-central2-b        # PROJECT=... optional
#   launch/tpu_vm.sh copy                               # this checkout -> ~/deepssim-jax
#   launch/tpu_vm.sh setup                              # venv + jax[tpu] + the package
#   launch/tpu_vm.sh run --config=configs/ixi.py --workdir=/mnt/shared/runs/ixi \
#       --config.train.batch_size=512
#   MODULE=ldm_jax.main launch/tpu_vm.sh run --config=...
#   launch/tpu_vm.sh stop                               # kill leftovers (TPU stays locked
#                                                       # while one is alive)
#
# The workdir must be a path every worker mounts (Filestore NFS, gcsfuse): checkpoints are
# written by all processes together, metrics and tables by process 0 and read by all.
# deepssim_jax's own files are written with POSIX renames, so gs:// URLs do not work.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
MODULE="${MODULE:-deepssim_jax.main}"
REMOTE_DIR="${REMOTE_DIR:-deepssim-jax}"
gcloud_tpu=(gcloud compute tpus tpu-vm)
common=(--zone="${ZONE}" ${PROJECT:+--project="${PROJECT}"})

on_all_workers() {
  "${gcloud_tpu[@]}" ssh "${TPU_NAME}" "${common[@]}" --worker=all --command="$1"
}

cmd="${1:?usage: tpu_vm.sh copy|setup|run ARGS...|stop}"
shift
case "${cmd}" in
  copy)
    git ls-files -z | tar --null -T - -czf /tmp/deepssim-jax.tgz
    "${gcloud_tpu[@]}" scp /tmp/deepssim-jax.tgz "${TPU_NAME}:~/" "${common[@]}" --worker=all
    on_all_workers "mkdir -p ~/${REMOTE_DIR} && tar -xzf ~/deepssim-jax.tgz -C ~/${REMOTE_DIR}"
    ;;
  setup)
    on_all_workers "cd ~/${REMOTE_DIR} && python3 -m venv .venv && . .venv/bin/activate && \
pip install -q -U pip 'jax[tpu]' && pip install -q -e ."
    ;;
  run)
    args=$(printf '%q ' "$@")
    # All workers run the same command; process 0 (worker 0) logs and shows progress.
    on_all_workers "cd ~/${REMOTE_DIR} && . .venv/bin/activate && python -m ${MODULE} ${args}"
    ;;
  stop)
    on_all_workers "pkill -f 'python -m ${MODULE}' || true"
    ;;
  *)
    echo "unknown command ${cmd}: copy | setup | run ARGS... | stop" >&2
    exit 2
    ;;
esac
