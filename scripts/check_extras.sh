#!/usr/bin/env bash
# Each pip extra installed ALONE into a fresh venv, as the README tells users (torch first,
# pinned), then one command that needs it. CI installs all extras together, where one
# extra's dependencies can hide another's missing one (mujoco without imageio was).
#
#   bash scripts/check_extras.sh [OUT_DIR] [EXTRA ...]      # default: /tmp/crl-extras, all
#
# Prints one PASS/FAIL line per extra and exits non-zero if any failed; each extra's log is
# OUT_DIR/<extra>.log.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-/tmp/crl-extras}"
shift || true
EXTRAS=("$@")
[ ${#EXTRAS[@]} -eq 0 ] && EXTRAS=(atari mujoco metaworld ray)
mkdir -p "$OUT"
SMALL=(--wandb disabled --no-progress --run-dir "$OUT/runs" --reference-dir "$OUT/refs"
       --eval-episodes 1 --random-episodes 1)

cat > "$OUT/tiny-sweep.yaml" <<EOF
name: tiny
command: train
base: {agent: ppo, sequence: CartPoleSwap, steps_per_task: 256, n_steps: 128,
       batch_size: 64, n_epochs: 1, eval_every: 128, eval_episodes: 1, wandb: disabled}
grid: {method: [finetune, ewc], seed: [0]}
out: $OUT/sweeps
EOF

run_command() {
  case "$1" in
    atari) crl train --sequence Atari3 --agent ppo --method ewc --steps-per-task 256 \
             --n-steps 128 --batch-size 64 --n-epochs 1 --eval-every 256 \
             --eval-max-steps 300 "${SMALL[@]}" ;;
    mujoco) crl train --sequence MujocoMix --agent sac --method ewc --steps-per-task 300 \
             --exploration-steps 100 --batch-size 32 --net-arch 32,32 --eval-every 300 \
             "${SMALL[@]}" ;;
    metaworld) crl train --sequence CW10 --agent sac --method packnet --steps-per-task 200 \
             --exploration-steps 100 --batch-size 32 --net-arch 32,32 --eval-every 200 \
             "${SMALL[@]}" ;;
    ray) crl sweep "$OUT/tiny-sweep.yaml" --num-cpus 2 ;;
    *) echo "unknown extra $1"; return 2 ;;
  esac
}

failed=0
for extra in "${EXTRAS[@]}"; do
  venv="$OUT/venv-$extra"
  log="$OUT/$extra.log"
  rm -rf "$venv"
  start=$(date +%s)
  (
    set -e
    python3 -m venv "$venv"
    . "$venv/bin/activate"
    pip install -q torch==2.13.0
    pip install -q -e "$ROOT[$extra]"
    run_command "$extra"
  ) > "$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  if [ $rc -eq 0 ]; then
    echo "PASS $extra (${secs} s): $(grep -E '^performance|finished|done' "$log" | tail -1)"
  else
    failed=1
    echo "FAIL $extra (${secs} s, exit $rc): $(tail -3 "$log" | tr '\n' ' ')"
  fi
done
exit $failed
