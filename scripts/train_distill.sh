#!/usr/bin/env bash
# The long online-distillation run of the shipped block drafter, and the export of its checkpoint.
# See docs/drafter-training.md.
#
#   scripts/train_distill.sh start    # start (or resume) the run in the background, niced, one thread
#   scripts/train_distill.sh export   # copy the run's latest servable checkpoint into the package and commit it
#   scripts/train_distill.sh status   # the last logged step
#
# The run resumes from RUN/state.pt; without one it warm-starts from the committed asset (fresh optimiser).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
RUN=${RUN:-$(cd .. && pwd)/runs/distill-smollm2}  # beside the checkout: survives a fresh work tree
STEPS=${STEPS:-1000000}
DTYPE=${DTYPE:-fp32}   # fp32: ~2x the teacher's speed of bf16 on AVX2-only CPUs; bf16 where it is native
THREADS=${THREADS:-1}  # 2 on an otherwise idle 2-core machine
NICE=${NICE:-15}
ASSET=specserve/assets/drafters/smollm2-135m-block.pt

case ${1:-status} in
  start)
    mkdir -p "$RUN"
    init=()
    [[ ! -f $RUN/state.pt && -f $ASSET ]] && init=(--init-from "$ASSET")
    nohup nice -n "$NICE" "$PY" -m specserve.cli distill-drafter --out "$RUN" --dtype "$DTYPE" --steps "$STEPS" \
      --anchors 64 --save-every 10 --threads "$THREADS" "${init[@]}" >> "$RUN/train.log" 2>&1 &
    echo "$!" > "$RUN/pid"
    echo "started PID $! in $RUN (log $RUN/train.log, JSON log $RUN/log.jsonl)"
    ;;
  export)
    [[ -f $RUN/drafter.pt ]] || { echo "no $RUN/drafter.pt yet" >&2; exit 1; }
    mkdir -p "$(dirname "$ASSET")"
    # The run's absolute directory is this machine's: keep only its name in the shipped checkpoint.
    "$PY" - "$RUN/drafter.pt" "$ASSET.tmp" <<'PYEOF'
import os, sys, torch
ckpt = torch.load(sys.argv[1], weights_only=True)
distill = ckpt.get("meta", {}).get("distill", {})
if distill.get("out_dir"):
    distill["out_dir"] = os.path.basename(distill["out_dir"].rstrip("/"))
torch.save(ckpt, sys.argv[2])
PYEOF
    mv "$ASSET.tmp" "$ASSET"
    step=$("$PY" -c "import torch,sys; m=torch.load(sys.argv[1],weights_only=True)['meta']; print(m['step'], m['tokens_seen'])" "$ASSET")
    git add "$ASSET" && git commit -q -m "Block drafter checkpoint: step/tokens ${step}" -- "$ASSET"
    echo "committed $ASSET (step/tokens $step)"
    ;;
  status)
    tail -n 1 "$RUN/log.jsonl"
    ;;
  *) echo "usage: $0 start|export|status" >&2; exit 2 ;;
esac
