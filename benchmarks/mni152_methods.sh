#!/usr/bin/env bash
# Every method and baseline on the MNI152 demo tasks with litemedsam, the same wall-time budget per trained model,
# then each method's own evaluation (M-SAM refinement curves, ProMISe clicks, HeterSAM light decoder, DeSAM
# domain generalisation). Finished runs are reused, so the script can be stopped and started again.
#
#   bash benchmarks/mni152_methods.sh [OUT=bench_out] [MINUTES=4] [SEEDS=0]
#
# Reports: OUT/brain/report_*, OUT/tissue/report, OUT/extras/*.
set -euo pipefail
OUT=${1:-bench_out}
MINUTES=${2:-4}
SEEDS=${3:-0}
SA=${SAMADAPT:-samadapt}
PY=${PYTHON:-python}
B="$OUT/brain"

brain() {  # brain() REPORT TITLE MODEL...
  local report=$1 title=$2
  shift 2
  local args=()
  for m in "$@"; do args+=(-m "$m"); done
  "$SA" compare mni152-brain --out "$B" --minutes "$MINUTES" --seeds "$SEEDS" --report "$report" \
    --title "$title" "${args[@]}"
}

BASE=("decoder=decoder_cpu" "unet=unet_cpu" "box-prompt-gt=box_prompt_gt" "box-prompt-whole=box_prompt_whole")

brain report_desam "DeSAM on MNI152 brain extraction" "${BASE[@]}" \
  "desam-grid=desam_cpu" "desam-box=desam_cpu method.options.mode=box"
brain report_hetersam "HeterSAM fusion settings on MNI152 brain extraction" "${BASE[@]}" \
  "hetersam-deformable-se=hetersam_cpu" \
  "hetersam-light=@hetersam-deformable-se method.options.inference_decoder=light" \
  "hetersam-se=hetersam_cpu method.options.fusion=se method.options.light_decoder=false" \
  "hetersam-none=hetersam_cpu method.options.fusion=none method.options.light_decoder=false"
brain report_promise "ProMISe on MNI152 brain extraction" "${BASE[@]}" \
  "promise-apm-ips=promise_cpu" "promise-apm-ips+gt-points=@promise-apm-ips method.options.eval_points=gt" \
  "promise-apm=promise_cpu method.options.mode=apm" "promise-ips-gt=promise_cpu method.options.mode=ips_gt"
brain report_msam "M-SAM on MNI152 brain extraction" "${BASE[@]}" "msam=msam_cpu"
brain report "All methods on MNI152 brain extraction" "${BASE[@]}" \
  "desam-grid=desam_cpu" "desam-box=desam_cpu method.options.mode=box" "hetersam-deformable-se=hetersam_cpu" \
  "promise-apm-ips=promise_cpu" "msam=msam_cpu"

X="$OUT/extras"
S=${SEEDS%%,*}
"$SA" evaluate refinement --checkpoint "$B/runs/msam/seed$S/checkpoints/best.safetensors" \
  --data "$B/data/mni152-brain" --iterations 5 --out "$X/msam_refinement"
"$SA" evaluate prompting --data "$B/data/mni152-brain" --cache "$B/cache" --out "$X/promise_prompting" \
  --run "apm_ips=$B/runs/promise-apm-ips/seed$S" --run "apm=$B/runs/promise-apm/seed$S" \
  --run "ips_gt=$B/runs/promise-ips-gt/seed$S"
"$SA" evaluate light-decoder --out "$X/hetersam_light" \
  --run "deformable_se=$B/runs/hetersam-deformable-se/seed$S"
for mode in grid box; do
  "$SA" evaluate dg "$B/runs/desam-$mode/seed$S" mni152-brain-2mm mni152-brain-3mm nuclei \
    --out "$X/desam_dg_$mode" --device cpu
done

# Multi-class: MNI152 tissue (CSF / grey / white matter), a quarter of the training slices for every model.
"$SA" compare mni152-tissue --out "$OUT/tissue" --minutes "$MINUTES" --seeds "$SEEDS" --set data.fewshot=0.25 \
  --title "MNI152 tissue (3 classes), 25% of the training slices" \
  -m "unet=unet_cpu" -m "decoder=decoder_cpu" -m "box-prompt-gt=box_prompt_gt" \
  -m "hsam=hsam_cpu" -m "hsam-stage1=@hsam method.options.inference_stage=1" \
  -m "hsam-stage2=@hsam method.options.inference_stage=2"

"$PY" benchmarks/collate_results.py "$B"/report_desam "$B"/report_hetersam "$B"/report_promise "$B"/report_msam \
  > "$OUT/brain.md"
"$PY" benchmarks/collate_results.py "$OUT/tissue/report" > "$OUT/tissue.md"
