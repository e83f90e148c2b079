#!/usr/bin/env bash
# Speed where users run: one run on one GPU (sized for a 10-minute lease of an H200; the parts'
# time limits add up to 8 minutes) that prints
#   1. the BatchNorm overhead ratios (per-forward time of batch / blend / ema / source over the
#      plain torch model in eval mode), eager and torch.compile(fullgraph=True, inductor), on
#      torchvision resnet50 at 224 px (batch 64) and WRN-28-10 at 32 px (batch 128)
#      (scripts/bench_bn.py);
#   2. the images/s of every tta.adapt method (tta.list_methods()) on the same two models and
#      batch sizes, without AMP and under torch.autocast bf16 and fp16 (scripts/bench_methods.py).
# Random weights and synthetic inputs: nothing is downloaded. Goal (docs/batchnorm.md, Speed):
# batch/blend/ema <= 1.10x plain eval on the GPU (compiled path) and on CPU.
#
#   bash scripts/bench_gpu.sh            # on the GPU machine
#   bash scripts/bench_gpu.sh --smoke    # CPU, tiny sizes (tests/test_bench_scripts.py), ~20 s
#
# Every part runs under `timeout`; a part that fails or runs out of time is reported in the final
# table and the script exits 1 (after running the other parts). PYTHON picks the interpreter
# (default: .venv/bin/python when present, else python3).
set -u -o pipefail
cd "$(dirname "$0")/.."

smoke=0
for arg in "$@"; do
    case "$arg" in
        --smoke) smoke=1 ;;
        -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench_gpu.sh: unknown argument '$arg'; valid: --smoke, --help" >&2; exit 2 ;;
    esac
done

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log_dir=$(mktemp -d)
trap 'rm -rf "$log_dir"' EXIT

# part: label, time limit (s), command. Sizes: "model size batch" per row below.
if [[ $smoke == 1 ]]; then
    device=cpu amps=none,bf16 compile_backend=eager
    models=("resnet8 32 4")
    bn_args=(--repeats 2 --threads 1)
    methods_args=(--batches 1 --repeats 1 --warmup 0 --skip-memory --threads 1)
    limits=(120 120 120)  # eager BN, compiled BN, methods (per model); the machine may be shared
else
    device=cuda amps=none,bf16,fp16 compile_backend=inductor
    models=("resnet50 224 64" "wide_resnet28_10 32 128")
    bn_args=(--repeats 20)
    methods_args=(--batches 1 --repeats 3)  # CoTTA: 34 and DUA: 65 forwards per batch on the GPU
    limits=(45 120 75)  # x 2 models = 480 s
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "bench_gpu.sh: no CUDA device visible to $PYTHON (use --smoke for the CPU check)" >&2
        exit 1
    fi
fi

labels=() statuses=() seconds=()
run_part() {  # label limit command...
    local label=$1 limit=$2 start rc status
    shift 2
    echo -e "\n===== $label (limit ${limit} s) =====" | tee -a "$log_dir/all"
    start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log_dir/${#labels[@]}"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124 | 137) status="FAILED: timed out after ${limit} s" ;;
        *) status="FAILED: exit status $rc" ;;
    esac
    labels+=("$label") statuses+=("$status") seconds+=($((SECONDS - start)))
}

"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "(no GPU)")' || true
for row in "${models[@]}"; do
    read -r model size batch <<<"$row"
    common=(--device "$device" --models "$model" --size "$size" --batch "$batch" --skip-recal "${bn_args[@]}")
    run_part "BatchNorm overhead, eager: $model ${size} px, batch $batch" "${limits[0]}" \
        "$PYTHON" scripts/bench_bn.py "${common[@]}"
    run_part "BatchNorm overhead, torch.compile ($compile_backend): $model ${size} px, batch $batch" "${limits[1]}" \
        "$PYTHON" scripts/bench_bn.py "${common[@]}" --skip-eager --compile --compile-backend "$compile_backend"
done
for row in "${models[@]}"; do
    read -r model size batch <<<"$row"
    run_part "tta.adapt methods, images/s: $model ${size} px, batch $batch, amp $amps" "${limits[2]}" \
        "$PYTHON" scripts/bench_methods.py --device "$device" --model "$model" --image-size "$size" \
        --batch-size "$batch" --amp "$amps" "${methods_args[@]}"
done

echo -e "\n===== summary ($device$([[ $smoke == 1 ]] && echo ', smoke: tiny sizes, not a measurement')) ====="
failed=0
for i in "${!labels[@]}"; do
    echo -e "\n### ${labels[$i]}: ${statuses[$i]} (${seconds[$i]} s)\n"
    grep -E '^(\||[a-z_0-9]+ \(.*\) on |summary:)' "$log_dir/$i" || true
    [[ ${statuses[$i]} == ok ]] || failed=1
done
echo -e "\n| part | status | seconds |\n|---|---|---:|"
for i in "${!labels[@]}"; do echo "| ${labels[$i]} | ${statuses[$i]} | ${seconds[$i]} |"; done
exit $failed
