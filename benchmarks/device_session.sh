#!/bin/bash
# One call on the lent GPU box (benchmarks/README.md): retrain part of the toy world and/or time the issues' GPU targets.
#   bash benchmarks/device_session.sh clip-vae   # toy CLIP + VAE (--config gpu, ~7 min)
#   bash benchmarks/device_session.sh clip-vision # then the CLIP vision tower on every combination (~4 min; after clip-vae)
#   LATENT_CHANNELS=16 bash benchmarks/device_session.sh vae  # a new VAE + its adversarial decoder continuation (~9 min)
#   bash benchmarks/device_session.sh unet       # toy UNet (--config gpu, ~8 min); needs clip-vae's (or vae's) outputs in data/toy
#   CANDIDATE=runs/toy16_cand bash benchmarks/device_session.sh unet-resume  # 7.5 more GPU minutes for a saved UNet (~9 min);
#       CANDIDATE (optional; carry it): a folder whose vae/, unet/ and TRAINING.json replace data/toy's first
#   UNET_BATCH=N (unet, unet-resume): the UNet's batch instead of the gpu config's 512 (the 5.5 M-parameter UNet is
#       launch-bound on an H100: 4.7 it/s at 512, so a bigger batch may train on more samples in the same minutes)
#   T2I_COMMIT=<sha> bash benchmarks/device_session.sh targets    # the seven GPU target cases only (~5 min)
#   T2I_COMMIT=<sha> bash benchmarks/device_session.sh speed      # latent iteration: one search without checkpoints, 8 batched with step checkpoints; eager, then CUDA graphs / compiled (~9 min)
#   T2I_COMMIT=<sha> bash benchmarks/device_session.sh trace      # the 70-layer trace: eager baseline, then CUDA graphs (~9 min)
#   T2I_COMMIT=<sha> bash benchmarks/device_session.sh both       # one session for both targets: the single search and the
#       trace eager, then the single search under CUDA graphs with what is left (~9 min)
# Needs the wheels in .whl (carry ".whl"); writes logs, sample grids and a tarball of the new weights under $OUT.
# BUDGET (default 560): seconds this script may use from its start; every step's limit is what is left of it, so the
#   logs and JSON of a cut-short step come back before the call's own limit (the run tool's timeout_s: give it ~600).
set -o pipefail
cd "$(dirname "$0")/.." || exit 1  # the repo root: .whl, PYTHONPATH and data/toy are relative to it
BUDGET=${BUDGET:-560}
left() { local l=$((BUDGET - SECONDS - ${1:-0})); [ "$l" -gt 1 ] || l=1; echo "$l"; }  # seconds left (minus $1), >= 1
CUT="" FAILED=""
record() { if [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; then CUT="$CUT $1"; else FAILED="$FAILED $1(rc $2)"; fi; }
case "$1" in clip-vae|clip-vision|vae|unet|unet-resume|targets|speed|trace|both) ;; *) echo "usage: bash benchmarks/device_session.sh {clip-vae|clip-vision|vae|unet|unet-resume|targets|speed|trace|both}" >&2; exit 2 ;; esac
: "${OUT:?run this on the device machine, where OUT is set}"
case "$1" in targets|speed|trace|both)  # their JSON records the commit; the copied tree has no .git
  : "${T2I_COMMIT:?give the commit in the call (T2I_COMMIT=<sha> bash benchmarks/device_session.sh ...)}" ;; esac
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT/samples"
targets() {  # bench.py resets the shared pipeline after each case (a SAGE case's VAE slicing never reaches the next)
  timeout -k 10 "$(left)" python3 benchmarks/bench.py --size full --device cuda --dtype float16 --out "$OUT/targets.json" \
    --cases quickfix_sd14,generate_sd14_b1,generate_sd14_b8,trace_sd14_unet70,generate_sd14_b32,sage_latent_iter,sage_latent_iter_b8 \
    2>&1 | tee "$OUT/bench.log" || record targets $?
}
speed() {  # one process per compiled case: a case that fails to compile does not cost the others; each compiles in its warm-up
  export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
  # eager, most promising first: one search with the late tie and no checkpointing (no recomputation; ~20 GiB of
  # stored activations expected), and 8 batched searches with each differentiated UNet call checkpointed whole
  timeout -k 10 200 python3 benchmarks/bench.py --size full --device cuda --dtype float16 --repeats 2 \
    --channels-last --cudnn-benchmark \
    --cases sage_latent_iter_k40_nockpt,sage_latent_iter_b8_steps \
    --out "$OUT/speed_eager.json" 2>&1 | tee -a "$OUT/speed.log" || record speed_eager $?
  # case:mode:timeout:warmup (a killed case leaves its warm-ups in its JSON, "unfinished"): CUDA graphs for the launch-bound single search first
  # (reduce-overhead records its graphs in the first calls, hence 2 warm-ups), then the batched one compiled
  for spec in sage_latent_iter_k40_nockpt:reduce-overhead:260:2 sage_latent_iter_b8_steps:default:200:1; do
    IFS=: read -r name mode limit warmup <<< "$spec"
    rest=$(left); [ "$rest" -gt 60 ] || break; [ "$limit" -lt "$rest" ] || limit=$rest
    timeout -k 10 "$limit" python3 benchmarks/bench.py --size full --device cuda --dtype float16 --compile --compile-mode "$mode" \
      --channels-last --cudnn-benchmark --warmup "$warmup" --repeats 2 --cases "$name" --out "$OUT/speed_${name}_$mode.json" \
      2>&1 | tee -a "$OUT/speed.log" || record "${name}_$mode" $?
  done
}
trace() {  # the 70-layer trace: an eager baseline on this machine, then the compile mode not yet measured (default
  # mode + channels-last + cuDNN: 16.9 s on 2026-11-25): CUDA graphs (the restoration rows now live on the GPU), with
  # the rest of the budget (~380 s: build, compile at batch 144, 4 traces of 12-17 s); max-autotune (minutes of
  # autotuning on a fresh cache) does not fit the same call and is left out
  export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
  timeout -k 10 150 python3 benchmarks/bench.py --size full --device cuda --dtype float16 --warmup 1 --repeats 1 \
    --channels-last --cudnn-benchmark --cases trace_sd14_unet70 --out "$OUT/trace_eager.json" 2>&1 | tee -a "$OUT/trace.log" || record trace_eager $?
  for spec in reduce-overhead:400:2; do
    IFS=: read -r mode limit warmup <<< "$spec"
    rest=$(left); [ "$rest" -gt 90 ] || break; [ "$limit" -lt "$rest" ] || limit=$rest
    timeout -k 10 "$limit" python3 benchmarks/bench.py --size full --device cuda --dtype float16 --compile \
      --compile-mode "$mode" --channels-last --cudnn-benchmark --warmup "$warmup" --repeats 2 --cases trace_sd14_unet70 \
      --out "$OUT/trace_$mode.json" 2>&1 | tee -a "$OUT/trace.log" || record "trace_$mode" $?
  done
}
both() {  # a session lent once measures both targets: each eager (the baselines of this machine), then the case
  # most likely to meet its target, the launch-bound single search, under CUDA graphs with the rest of the budget
  export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
  timeout -k 10 200 python3 benchmarks/bench.py --size full --device cuda --dtype float16 --repeats 2 \
    --channels-last --cudnn-benchmark --cases sage_latent_iter_k40_nockpt --out "$OUT/speed_eager.json" 2>&1 \
    | tee -a "$OUT/both.log" || record speed_eager $?
  timeout -k 10 150 python3 benchmarks/bench.py --size full --device cuda --dtype float16 --warmup 1 --repeats 1 \
    --channels-last --cudnn-benchmark --cases trace_sd14_unet70 --out "$OUT/trace_eager.json" 2>&1 \
    | tee -a "$OUT/both.log" || record trace_eager $?
  rest=$(left); if [ "$rest" -gt 90 ]; then
    timeout -k 10 "$rest" python3 benchmarks/bench.py --size full --device cuda --dtype float16 --compile \
      --compile-mode reduce-overhead --channels-last --cudnn-benchmark --warmup 2 --repeats 2 \
      --cases sage_latent_iter_k40_nockpt --out "$OUT/speed_sage_latent_iter_k40_nockpt_reduce-overhead.json" 2>&1 \
      | tee -a "$OUT/both.log" || record sage_latent_iter_k40_nockpt_reduce-overhead $?
  else
    CUT="$CUT reduce-overhead(not started: $rest s left)"
  fi
}
case "$1" in
  clip-vae)
    rm -f data/toy/TRAINING.json  # a from-scratch GPU run starts a fresh training log
    timeout -k 10 "$(left 300)" python3 -m lib.toy.train --stage clip --config gpu 2>&1 | tee "$OUT/train_clip.log" \
      || { record clip $?; }  # the VAE (its own stage) still trains; the tarball holds what finished
    timeout -k 10 "$(left 10)" python3 -m lib.toy.train --stage vae --config gpu --samples-dir "$OUT/samples" 2>&1 \
      | tee "$OUT/train_vae.log" || record vae $?
    tar czf "$OUT/toy_clip_vae.tgz" data/toy/text_encoder data/toy/clip_vision data/toy/vae data/toy/TRAINING.json ;;
  clip-vision)  # the scoring instrument's vision tower also sees the held-out combinations; the text tower stays frozen
    timeout -k 10 "$(left 10)" python3 -c "from lib.toy.train import train_instrument_vision as f; f('gpu', 'data/toy')" \
      2>&1 | tee "$OUT/train_clip_vision.log" || record clip-vision $?
    tar czf "$OUT/toy_clip_vision.tgz" data/toy/clip_vision data/toy/TRAINING.json ;;
  vae)  # (each stage: ~35 s of start-up and data around its wall-clock budget, 3.5 + 3 min) the text encoder and CLIP stay; the UNet must be retrained on the new latents afterwards (mode unet)
    timeout -k 10 "$(left 200)" python3 -m lib.toy.train --stage vae --config gpu --latent-channels "${LATENT_CHANNELS:-4}" \
      --samples-dir "$OUT/samples" 2>&1 | tee "$OUT/train_vae.log" || { record vae $?; echo "failed:$FAILED$CUT" | tee -a "$OUT/session.log"; exit 1; }  # never continue the old VAE's decoder
    tar czf "$OUT/toy_vae_mse.tgz" data/toy/vae data/toy/TRAINING.json  # comes back even if the continuation is cut
    if [ "$(left)" -gt 30 ]; then
      timeout -k 10 "$(left)" python3 -c "from lib.toy.train import continue_decoder as f; f('gpu', 'data/toy')" 2>&1 \
        | tee "$OUT/train_vae_decoder.log" || record vae-decoder $?
    else
      CUT="$CUT vae-decoder(not started: $(left) s left)"
    fi
    tar czf "$OUT/toy_vae.tgz" data/toy/vae data/toy/TRAINING.json ;;
  unet|unet-resume)  # unet-resume: CANDIDATE (carried) replaces the committed VAE and UNet here only, e.g. a 16-channel world
    if [ "$1" = unet-resume ] && [ -n "$CANDIDATE" ]; then cp -r "$CANDIDATE/vae" "$CANDIDATE/unet" "$CANDIDATE/TRAINING.json" data/toy/ || exit 1; fi
    timeout -k 10 "$(left 15)" python3 -m lib.toy.train --stage "$1" --config gpu ${UNET_BATCH:+--batch "$UNET_BATCH"} \
      --samples-dir "$OUT/samples" 2>&1 | tee "$OUT/train_$1.log" || record "$1" $?
    tar czf "$OUT/toy_unet.tgz" data/toy/unet data/toy/vae data/toy/TRAINING.json data/toy/model_index.json data/toy/scheduler ;;
  targets) targets ;;
  speed) speed ;;
  trace) trace ;;
  both) both ;;
esac
ls "$OUT"/*.json >/dev/null 2>&1 &&  # one markdown row per measured case, for notebooks/RESULTS.md
  python3 benchmarks/bench.py --summarize "$OUT"/*.json 2>&1 | tee -a "$OUT/session.log"
# a step cut short by its own limit is not a failure (its log says how far it got); a step that failed is
echo "done in ${SECONDS} s of ${BUDGET}; cut short:${CUT:- none}; failed:${FAILED:- none}; results: $(cd "$OUT" && ls *.json *.tgz 2>/dev/null | tr '\n' ' ')" | tee -a "$OUT/session.log"
[ -z "$FAILED" ]
