#!/usr/bin/env bash
# The GPU checks and CUDA benchmarks in one go, for a machine with CUDA where camera_pl runs from this
# checkout: the `gpu` tests (bf16 observation, pruning, training, save/load, ragged buckets,
# layer-by-layer offload and the compiled low-bit kernels against fake quantization), then
# compressed_speed at Qwen3-30B-A3B's layer sizes and stats_overhead on 64 experts.
# Each step has its own time limit (570 s in all, so that the whole fits one 10-minute call on a lent
# machine), and one failing does not stop the next. Logs go to $OUT (else gpu_checks/), one file a
# step, with the card and the versions first; each step's last lines are printed too.
#
#   bash benchmarks/gpu_checks.sh --wheels   # on a machine with the package index: the transformers
#                                            # wheel this checkout is tested with, into .whl/ (git-ignored)
#   bash benchmarks/gpu_checks.sh            # on the GPU machine; installs .whl/*.whl if present
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then
    grep -qsx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
    version=$(python3 -c 'import transformers; print(transformers.__version__)') || exit 1
    python3 -m pip download --quiet --no-deps -d .whl "transformers==$version" && ls .whl
    exit
fi

out=${OUT:-gpu_checks}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, its output into $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "== $name: exit $? after ${SECONDS} s in all"
    tail -n 25 "$out/$name.log"
}

step versions 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
    python3 -c "import torch, triton, transformers, camera_pl; print(\"torch\", torch.__version__, \"triton\",
    triton.__version__, \"transformers\", transformers.__version__, \"cuda\", torch.cuda.is_available())"'
step test_gpu 180 python3 -m pytest -q -rs tests/test_gpu.py
step compressed_speed 270 python3 benchmarks/compressed_speed.py --device cuda --hidden 2048 --experts 128 \
    --width 768 --top-k 8 --layers 2 --no-loop --runs 3
step stats_overhead 90 python3 benchmarks/stats_overhead.py --device cuda --dtype bfloat16 --hidden 2048 \
    --inter 768 --experts 64 --top-k 8 --layers 4 --batches 4 --batch-size 4 --seq 2048
