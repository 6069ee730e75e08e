#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one short run (about 4 minutes on an H100, at most about
# 9): the GPU tests, then the engine and generation benchmarks on the device. Written for a lent
# GPU machine whose python3 has torch, torchvision and transformers but not the service's
# packages: --noconftest skips tests/conftest.py, which imports the service (tests/engine has
# no conftest of its own). Full logs go to $OUT (default: gpu-results/); the exit status is
# the first failing step's.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
step() { "$@" || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }; }

python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__,
    torch.cuda.get_device_name())"
step timeout 270 python3 -m pytest --noconftest -p no:cacheprovider tests/engine/test_cuda.py \
    -q -rs --timeout 120 > "$out/pytest.log" 2>&1
grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|skipped|error" "$out/pytest.log"
for batch in 1 32; do
    step timeout 80 python3 -m bench.engine --device cuda --models resnet18 mobilenet_v2 \
        --batch "$batch" >> "$out/bench_engine.log" 2>&1
done
step timeout 60 python3 -m bench.engine --device cuda --models resnet18 mobilenet_v2 \
    --mode reference --no-memory >> "$out/bench_engine.log" 2>&1
grep '^{' "$out/bench_engine.log"
step timeout 60 python3 -m bench.generation --device cuda > "$out/bench_generation.log" 2>&1
grep -v Warning "$out/bench_generation.log" | tail -25
exit "$status"
