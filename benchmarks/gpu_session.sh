#!/usr/bin/env bash
# The GPU measurements (benchmarks/gpu_h100.md), as few commands as a short GPU lease allows. Run from the
# repo root on a CUDA machine that has torch, timm, Lightning, torchmetrics and scikit-learn but not the rest:
#   .whl/                   wheels of hydra-core, omegaconf, antlr4, albumentations, albucore, pydantic(-core),
#                           annotated-types, typing-inspection, typing-extensions, simsimd, stringzilla,
#                           umap-learn, pynndescent (W&B is not needed: logger=csv)
#   .gpu_data/prepared/     `reddino-pack quality=60 out=.gpu_data/prepared` of the three shared datasets
# Phases (one command each, under 10 minutes):
#   bash benchmarks/gpu_session.sh tests        GPU tests: the fast path end to end, FSDP through Lightning
#   bash benchmarks/gpu_session.sh throughput   ViT-S and ViT-B, model-bound and end to end, GPU-side augment
#   STEPS=N bash benchmarks/gpu_session.sh pretrain   ViT-S from scratch on all patches, Chula 5-fold eval
#   bash benchmarks/gpu_session.sh recipe       the GPU recipe (experiment=real_gpu_s, <= 10 min of training)
#                                               then reddino-eval on Chula RBC-12 (teacher, random init,
#                                               morphometrics); PRETRAIN_ARGS / EVAL_ARGS add overrides
# NO_WHEELS=1 skips the wheel install (a machine with the full environment, e.g. the CPU toy-size test).
# Everything lands in $OUT (logs, JSON figures, results.json of the run and of the evaluation).
set -uo pipefail
phase=${1:?usage: gpu_session.sh tests|throughput|pretrain|recipe}
OUT=${OUT:-/tmp/reddino-gpu}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
if [ "${NO_WHEELS:-0}" != 1 ]; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true
export REDDINO_CACHE_DIR=${REDDINO_CACHE_DIR:-$PWD/.gpu_data}
# the [masked patches, 131072] iBOT tensors are ~11 GB each: without expandable segments the caching
# allocator fragmented 42 GB on a ViT-S batch of 280 and ran out of memory (first attempt, 2026-11-22)
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
WORKERS=${WORKERS:-14}   # loader workers: 16 cores less the main process and the compile workers
REAL=(data=real "data.pretrain_units.datasets=[bccd,txl_pbc,chula_rbc12]"
  "data.loader.num_workers=$WORKERS" logger=csv)
log="$OUT/$phase.log"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  nproc; python3 -c "import torch, timm, pytorch_lightning as pl; print(torch.__version__, timm.__version__, pl.__version__)"
} 2>&1 | tee "$log"

bench() {  # name, extra args...
  local name=$1; shift
  echo "=== throughput $name: $*" | tee -a "$log"
  python3 -m benchmarks.throughput --device cuda --json "$OUT/$name.json" "$@" 2>&1 \
    | grep -v -e Warning -e warn -e '^\s*$' | tee -a "$log"
}

case $phase in
tests)
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/integration/test_gpu.py \
    tests/integration/test_ddp.py::test_fsdp_run_trains_exports_and_reports 2>&1 | tail -25 | tee -a "$log"
  ;;
throughput)
  bench vit_s --steps 20 --warmup 6 --profile "$OUT/vit_s_kernels.txt" experiment=reddino_s "${REAL[@]}"
  bench vit_b --modes model --steps 12 --warmup 4 --profile "$OUT/vit_b_kernels.txt" experiment=reddino_b \
    "${REAL[@]}"
  bench vit_s_gpu_augment --modes loader --steps 20 --warmup 6 experiment=reddino_s "${REAL[@]}" \
    augment=reddino_gpu
  bench vit_s_plain --modes model --steps 10 --warmup 3 experiment=reddino_s "${REAL[@]}" fast_path.enabled=false
  ;;
pretrain)
  bench vit_s_loader --modes loader --steps 10 --warmup 4 experiment=reddino_s "${REAL[@]}"
  STEPS=${STEPS:?set STEPS from the end-to-end rate of the throughput phase}
  run=/tmp/pretrain_vit_s
  echo "=== pretrain ViT-S/14 from scratch, $STEPS steps" | tee -a "$log"
  timeout 360 python3 -m reddino.pretrain experiment=reddino_s "${REAL[@]}" "ssl.optim.epochs=1" \
    "ssl.optim.epoch_length=$STEPS" ${PRETRAIN_ARGS:-} "+trainer.max_time=${MAX_TIME:-00:00:03:30}" \
    trainer.log_every_n_steps=10 report.figures.enabled=false "hydra.run.dir=$run" 2>&1 \
    | grep -v -e Warning -e warn | tail -30 | tee -a "$log"
  cp "$run/results.json" "$OUT/pretrain_results.json"
  cp "$run/csv/metrics.csv" "$OUT/pretrain_metrics.csv"
  cp "$run/config.yaml" "$OUT/pretrain_config.yaml"
  echo "=== Chula RBC-12 5-fold (grouped by image): teacher vs random init vs morphometrics" | tee -a "$log"
  timeout ${EVAL_TIMEOUT:-240} python3 -m reddino.evaluate "weights=$run/export" data=real logger=csv progress=false \
    "features.num_workers=$WORKERS" probes.linear.device=cuda umap.enabled=false \
    hydra.run.dir=/tmp/eval_chula 2>&1 | grep -v -e Warning -e warn | tail -20 | tee -a "$log"
  cp /tmp/eval_chula/results.json "$OUT/eval_results.json"
  cp /tmp/eval_chula/results.md "$OUT/eval_results.md" 2>/dev/null
  ;;
recipe)
  run=${RUN_DIR:-/tmp/pretrain_recipe}
  echo "=== the GPU recipe: experiment=real_gpu_s, then Chula RBC-12 5-fold (grouped by image)" | tee -a "$log"
  # shellcheck disable=SC2086  # PRETRAIN_ARGS / EVAL_ARGS are lists of overrides
  timeout "${PRETRAIN_TIMEOUT:-900}" $PYTHON -m reddino.pretrain experiment=real_gpu_s logger=csv \
    "data.loader.num_workers=$WORKERS" report.figures.enabled=false callbacks.knn_probe.enabled=true \
    ${PRETRAIN_ARGS:-} "hydra.run.dir=$run" 2>&1 | grep -v -e Warning -e warn | tail -30 | tee -a "$log"
  status=${PIPESTATUS[0]}
  cp "$run/results.json" "$OUT/recipe_pretrain_results.json" || exit 1
  cp "$run/csv/metrics.csv" "$OUT/recipe_metrics.csv"
  cp "$run/config.yaml" "$OUT/recipe_config.yaml"
  [ "$status" = 0 ] || exit "$status"
  # shellcheck disable=SC2086
  timeout "${EVAL_TIMEOUT:-300}" $PYTHON -m reddino.evaluate "weights=$run/export" data=real logger=csv \
    progress=false "features.num_workers=$WORKERS" probes.linear.device=cuda umap.enabled=false \
    ${EVAL_ARGS:-} "hydra.run.dir=$OUT/recipe_eval" 2>&1 | grep -v -e Warning -e warn | tail -20 | tee -a "$log"
  status=${PIPESTATUS[0]}
  [ "$status" = 0 ] || exit "$status"
  ;;
*) echo "unknown phase $phase" >&2; exit 2 ;;
esac
