#!/usr/bin/env bash
# SynthRAD2023 task 1 (brain): preprocess -> train -> convert the held-out MRIs -> evaluate.
#   pipelines/synthrad_brain.sh DATA_TRAIN DATA_TEST WORK [CONFIG]
# DATA_TRAIN and DATA_TEST hold <case>/mr.nii.gz, ct.nii.gz, mask.nii.gz; WORK receives cache/, run/, sct/, report/.
# CONFIG defaults to the built-in synthrad_brain (the published CycleGAN, for a GPU); the registered pairs
# are used with the hybrid recipe. Re-running continues where it stopped (cached cases, --resume).
set -euo pipefail
train=${1:?DATA_TRAIN}; test=${2:?DATA_TEST}; work=${3:?WORK}; config=${4:-synthrad_brain}

medcycle preprocess --data "$train" --out "$work/cache" --config "$config" --workers 4
resume=(); [ -f "$work/run/last.pt" ] && resume=(--resume)
medcycle train --config "$config" --set loss.pairing=hybrid --data "$work/cache" --out "$work/run" "${resume[@]}"
medcycle convert -i "$test" -o "$work/sct" --model "$work/run"
medcycle evaluate --pred "$work/sct" --ref "$test" --out "$work/report"
