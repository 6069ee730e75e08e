#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one short run (about 4 minutes on an H100): the GPU tests,
# then the engine and generation benchmarks on the device. Written for a lent GPU machine whose
# python3 has torch, torchvision and transformers but not the service's packages: --noconftest
# skips tests/conftest.py, which imports the service. Logs go to $OUT (default: gpu-results/).
set -uo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
timeout 330 python3 -m pytest --noconftest -p no:cacheprovider tests/engine/test_cuda.py -q -rs \
    --timeout 120 2>&1 | tee "$out/pytest.log" | grep -E "^(FAILED|ERROR|E  )|passed|failed"
for batch in 1 32; do
    timeout 90 python3 -m bench.engine --device cuda --models resnet18 mobilenet_v2 --batch "$batch"
done 2>&1 | grep '^{' | tee "$out/bench_engine.jsonl"
timeout 60 python3 -m bench.engine --device cuda --models resnet18 mobilenet_v2 --mode reference \
    --no-memory 2>&1 | grep '^{' | tee -a "$out/bench_engine.jsonl"
timeout 60 python3 -m bench.generation --device cuda 2>&1 | tee "$out/bench_generation.json"
