#!/usr/bin/env bash
# Real anatomy: real head MRs and CTs (unpaired) + registered phantom pairs -> CycleGAN (15 min on a CPU) ->
# held-out Colin27 sCT -> figures.
#   pipelines/real_heads.sh DATA WORK [CONFIG]
# DATA is what `python benchmarks/real_scans.py fetch --out DATA` writes: DATA/mr/ and DATA/ct/ (training, the
# unpaired two-folder layout), DATA/heldout/colin27_t1.nii.gz (never trained on, converted), DATA/reference/
# (the CT head template and the skull-stripped MNI152, only for the figures). No registry ships a registered real
# pair, so WORK/phantom holds 8 phantom pairs and, per real head CT, a pair on its anatomy (the CT and a T1w MR
# rendered from its tissues); with loss.pairing=hybrid the pairs teach the MR-to-CT intensity relation, the real
# MRs their texture. WORK receives phantom/, cache/, run/, sct/, report/
# (figures.md, figures.json, sct.png; with a row for the real head CT registered onto the template, the figures'
# ceiling). CONFIG defaults to the built-in real_heads_cpu.
# Re-running continues where it stopped (cached cases, --resume) and converts again.
set -euo pipefail
data=${1:?DATA}; work=${2:?WORK}; config=${3:-real_heads_cpu}
repo=$(cd "$(dirname "$0")/.." && pwd)

python -m medcycle phantom --out "$work/phantom" --cases 8 --from-ct "$data/ct"
python -m medcycle preprocess --data "$work/phantom" --mr-dir "$data/mr" --out "$work/cache" --config "$config"
resume=(); [ -f "$work/run/last.pt" ] && resume=(--resume)
python -m medcycle train --config "$config" --data "$work/cache" --out "$work/run" "${resume[@]}"
python -m medcycle convert -i "$data/heldout/colin27_t1.nii.gz" -o "$work/sct/colin27_sct.nii.gz" \
  --model "$work/run" --overwrite
reference=(); [ -f "$data/ct/invesalius_cranium.nii.gz" ] && reference=(--real-ct "$data/ct/invesalius_cranium.nii.gz")
python "$repo/benchmarks/real_anatomy.py" --data "$data" --sct "real heads=$work/sct/colin27_sct.nii.gz" \
  --out "$work/report" "${reference[@]}"
