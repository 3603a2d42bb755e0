#!/usr/bin/env bash
# Continue a counting model (default: the committed one) on a GPU with eight recipes at once (one process each),
# to see which escapes the ~0.22 loss plateau (bag-of-letters at `:`) towards the paper's
# mechanism (a0.0 at the query letter attends to that letter). The paper's own run sat on the
# same plateau for ~25 epochs (~230k steps at lr 5e-4, batch 128) before it dropped.
#
#   bash research/counting_recipe/counting_continue_gpu.sh OUT_DIR MINUTES [INIT_FROM]
#
# It was written for the plateau model committed before the mimetic init (normal init, 90.85%);
# the committed model is now at 99.99%, so pass a plateau model as INIT_FROM to repeat it.
#
# Writes OUT_DIR/screens.json (every recipe's probe rows) and OUT_DIR/checkpoints.tar.gz
# (each recipe's final model as a circuitkit checkpoint).
set -euo pipefail
out=${1:?usage: counting_continue_gpu.sh OUT_DIR MINUTES [INIT_FROM]}
minutes=${2:?usage: counting_continue_gpu.sh OUT_DIR MINUTES [INIT_FROM]}
init_from=${3:-case_studies/models/counting}
work=$(mktemp -d)
common=(--device cuda --threads 1 --steps 10000000 --every 5000 --minutes "$minutes"
        --set init_from="$init_from" --set min_lr_ratio=1 --set warmup=1000)
declare -A recipes=(
  [lr5e-4_b128]="--set lr=5e-4 --set batch_size=128"
  [lr1e-3_b128]="--set lr=1e-3 --set batch_size=128"
  [lr2e-3_b128]="--set lr=2e-3 --set batch_size=128"
  [lr1e-3_b512]="--set lr=1e-3 --set batch_size=512"
  [lr3e-3_b512]="--set lr=3e-3 --set batch_size=512"
  [lr1e-3_b128_wd0.1]="--set lr=1e-3 --set batch_size=128 --set weight_decay=0.1"
  [lr5e-4_b128_seed1]="--set lr=5e-4 --set batch_size=128 --set seed=1"
  [lr2e-3_b256_seed2]="--set lr=2e-3 --set batch_size=256 --set seed=2"
)
for label in "${!recipes[@]}"; do
  # shellcheck disable=SC2086
  python3 research/counting_recipe/counting_recipe_screen.py "${common[@]}" ${recipes[$label]} --label "$label" \
    --results "$work/$label.json" --save "$work/ckpt/$label" > "$work/$label.log" 2>&1 &
done
wait || true
python3 - "$work" "$out" <<'PY'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
res = {}
for f in sorted(work.glob("*.json")):
    res[f.stem] = json.loads(f.read_text())
    m = work / "ckpt" / f.stem / "metrics.json"
    res[f.stem]["saved_metrics"] = json.loads(m.read_text()) if m.exists() else None
for f in sorted(work.glob("*.log")):
    res.setdefault(f.stem, {})["log_tail"] = f.read_text()[-1500:]
out.mkdir(parents=True, exist_ok=True)
(out / "screens.json").write_text(json.dumps(res, indent=1))
for k, v in res.items():
    last = (v.get("rows") or [{}])[-1]
    print(k, last, (v.get("saved_metrics") or {}).get("accuracy"))
PY
tar -czf "$out/checkpoints.tar.gz" -C "$work" ckpt
