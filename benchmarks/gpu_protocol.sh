#!/usr/bin/env bash
# Issue 12's GPU items as prepared commands for a lent device machine (an
# H200 with PyTorch and JAX but no Keras and no TensorFlow, 64 MiB carried a
# call, 10 minutes a call, 15 minutes a session), in the order the issue asks:
# the throughput table, then paired ResNet-56 runs of the paper protocol
# (baseline and we-reference, 200 epochs), as many seeds as fit.
#
# Here, once (CPU machine, network to PyPI; CIFAR-10 at $KERAS_WE_DATA_DIR):
#   bash benchmarks/gpu_protocol.sh pack
# makes .whl/ (Keras and its two missing dependencies, for Python 3.12) and
# runs/gpu/cifar10.npz.part0..3 (the 170 MB file in 4 parts, each carried by
# one call) and runs/gpu/cifar10_small.npz (the throughput table's 5,120
# training and 1,000 test images, 19 MB). Then, on the device, one call
# each (`run` with `carry`; the repository itself is 4 MB of the 64 MiB):
#   1. carry [".whl", "runs/gpu/cifar10_small.npz"], command
#      "bash benchmarks/gpu_protocol.sh throughput"
#   2-5. carry ["runs/gpu/cifar10.npz.part0", "runs/gpu/cifar10.sha256"],
#      then part1, part2, part3, command "bash benchmarks/gpu_protocol.sh
#      data" (the parts stay there while the machine is warm; the call that
#      finds all four joins them and checks the sum)
#   6. command "bash benchmarks/gpu_protocol.sh paper 540" (trains until
#      540 s are used, then stops; a later call resumes the runs from their
#      backups, by itself on a warm machine, or with runs/gpu/paper carried
#      back to a fresh one: see the stage)
# Each call writes its results to $OUT (what comes back); commit them under
# benchmarks/results/ after each call. A fresh machine has lost .whl, the
# parts and the joined file: start again at 1.
#
# SCALE=smoke runs every stage with tiny sizes and a 3-epoch preset, to
# check this script on a CPU (OUT defaults to runs/gpu/out there).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?"stage: pack, throughput, data or paper SECONDS"}
OUT=${OUT:-runs/gpu/out}
SCALE=${SCALE:-full}
GPU=runs/gpu
mkdir -p "$OUT" "$GPU"
export TF_CPP_MIN_LOG_LEVEL=3 XLA_PYTHON_CLIENT_PREALLOCATE=false

install() {
  if ! python3 -c "import keras_we" 2>/dev/null; then
    python3 -m pip install -q --no-deps .whl/*.whl
    python3 -m pip install -q --no-deps -e .
  fi
  python3 - <<'EOF'
import jax, torch
print("devices:", jax.devices(), "torch cuda:", torch.cuda.is_available())
EOF
}

case "$stage" in
pack)
  data=${KERAS_WE_DATA_DIR:?"set KERAS_WE_DATA_DIR to the folder of cifar10.npz"}/cifar10.npz
  rm -rf .whl && mkdir .whl
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  keras_version=$(python -c "import keras; print(keras.__version__)")
  for package in "keras==$keras_version" namex optree; do
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$package"
  done
  rm -f "$GPU"/cifar10.npz.part*
  split -n 4 -d -a 1 "$data" "$GPU/cifar10.npz.part"
  sha256sum "$data" | cut -d' ' -f1 > "$GPU/cifar10.sha256"
  # The throughput table's 5,120 training and 1,000 test images travel
  # with part 0, as a small file of their own.
  python - "$data" "$GPU/cifar10_small.npz" <<'EOF'
import sys, numpy as np
with np.load(sys.argv[1]) as d:
    np.savez(sys.argv[2], x_train=d["x_train"][:5120], y_train=d["y_train"][:5120],
             x_test=d["x_test"][:1000], y_test=d["y_test"][:1000])
EOF
  du -ch .whl "$GPU"/cifar10.npz.part* | tail -n 5
  ;;
throughput)
  install
  small=$(mktemp -d)
  cp "$GPU/cifar10_small.npz" "$small/cifar10.npz"
  sizes=(--train-size 5120 --test-size 1000 --epochs 4)
  [ "$SCALE" = smoke ] && sizes=(--train-size 256 --test-size 100 --epochs 2)
  for depth in 20 56; do
    KERAS_WE_DATA_DIR=$small python3 benchmarks/throughput.py --depth $depth --backends jax,torch \
      "${sizes[@]}" --variants "default;augment=device;augment=device,steps_per_execution=8" \
      --out "$OUT/throughput_resnet$depth.json" | tee "$OUT/throughput_resnet$depth.md" || true
  done
  ;;
data)
  if [ -f "$GPU/cifar10.npz.part0" ] && [ -f "$GPU/cifar10.npz.part3" ]; then
    cat "$GPU"/cifar10.npz.part[0-3] > "$GPU/cifar10.npz"
    if [ -f "$GPU/cifar10.sha256" ] && [ "$(sha256sum "$GPU/cifar10.npz" | cut -d' ' -f1)" != "$(cat "$GPU/cifar10.sha256")" ]; then
      echo "the joined cifar10.npz does not match its sum; carry the parts again" >&2
      exit 1
    fi
    echo "cifar10.npz joined and checked"
  fi
  ls -la "$GPU"
  ;;
paper)
  seconds=${2:?"paper SECONDS: how long to train in this call"}
  install
  test -f "$GPU/cifar10.npz" || { echo "no $GPU/cifar10.npz: run the data calls first" >&2; exit 1; }
  # Six runs at once: three seeds of each method, one process each.
  preset=(--preset paper --model resnet56) parallel=6
  [ "$SCALE" = smoke ] && preset=(--preset smoke --epochs 3) parallel=2
  KERAS_BACKEND=jax KERAS_WE_DATA_DIR=$GPU timeout --signal=INT "$seconds" \
    python3 -m keras_we compare "${preset[@]}" --methods baseline,we-reference --seeds 0,1,2 --parallel $parallel \
    --augment device --out "$GPU/paper" --quiet || echo "stopped after $seconds s"
  # Everything, backups included, in pieces of 15 MB (what comes back from
  # $OUT is at most 16 MiB a file). On a warm machine the next call resumes
  # by itself; on a fresh one, join the pieces here
  # (cat paper_runs.tar.gz.* | tar -xz -C runs/gpu) and carry runs/gpu/paper.
  tar -cz -C "$GPU" paper | split -b 15M - "$OUT/paper_runs.tar.gz."
  cp "$GPU"/paper/table.md "$GPU"/paper/summary.json "$OUT"/ 2>/dev/null || true
  ;;
*)
  echo "unknown stage $stage: pack, throughput, data or paper SECONDS" >&2
  exit 2
  ;;
esac
