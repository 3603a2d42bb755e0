#!/usr/bin/env bash
# The GPU benchmarks (issue 17): the CPU benchmarks' own scripts, run with --device cuda.
#
#   benchmarks/gpu.sh OUTDIR [SECONDS]
#
# Within SECONDS of wall time (default 420), one after the other, each under its own time limit:
#   1. patching_sweep.py   the head x position sweep at batch 256, circuitkit against TransformerLens;
#   2. decoder_training.py counting with the CPU recipe (7,500 steps, 4 slots, floor 0.02), 2 training minutes
#                          at most, then the final evaluation at 1,024 samples per query;
#   3. case_study.py       `circuitkit run counting --quick --device cuda` end to end;
#   4. decoder_training.py addition with the CPU recipe (12,000 steps, mixed sites), capped by the time left.
# A step that fails or runs out of time does not stop the next.  Everything lands in OUTDIR: env.txt (GPU,
# versions), log.txt, and one JSON per step.  PYTHON names the interpreter (default python3); the environment
# must already import circuitkit and transformer_lens.
set -u
out=${1:?usage: benchmarks/gpu.sh OUTDIR [SECONDS]}
budget=${2:-420}
py=${PYTHON:-python3}
start=$(date +%s)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$out"

left() { echo $((budget - ($(date +%s) - start))); }

# step NAME LIMIT CMD...: run CMD under min(LIMIT, time left); skip it when under 30 s are left
step() {
    local name=$1 limit=$2 l
    shift 2
    l=$(left)
    ((l < limit)) && limit=$l
    if ((limit < 30)); then
        echo "== $name skipped: ${l}s left"
        return
    fi
    echo "== $name (limit ${limit}s, $(date -u +%T))"
    timeout "$limit" "$@"
    echo "== $name exit $? after $(( $(date +%s) - start ))s in all"
}

{
    nvidia-smi
    "$py" -c "import platform, torch, transformers, transformer_lens, circuitkit.manifest as m; \
print(platform.python_version(), torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); \
print(m.package_versions())"
    nproc
} >"$out/env.txt" 2>&1

{
    step sweep 150 "$py" benchmarks/patching_sweep.py --device cuda --batch 256 --repeats 5 \
        --out "$out/patching_sweep_cuda.json"
    step decoder_counting 240 "$py" benchmarks/decoder_training.py --task counting --device cuda --steps 7500 \
        --slots 4 --rebalance-floor 0.02 --minutes 2 --out "$out/decoder_counting_cuda.json"
    step quick_counting 150 "$py" benchmarks/case_study.py counting --quick --device cuda \
        --out "$out/case_study_counting-quick-cuda.json"
    minutes=$(awk -v l="$(left)" 'BEGIN { m = (l - 90) / 60; print (m > 0.5 ? m : 0.5) }')
    step decoder_addition 600 "$py" benchmarks/decoder_training.py --task addition --device cuda --steps 12000 \
        --slots 4 --mixed-sites --rebalance-floor 0.02 --minutes "$minutes" --out "$out/decoder_addition_cuda.json"
} 2>&1 | tee "$out/log.txt"
