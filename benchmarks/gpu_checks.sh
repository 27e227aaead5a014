#!/usr/bin/env bash
# Everything a lent GPU session does, as one script (the device tool bills every second it holds the card):
#   1. profile the gpt and moe graphs whole on the card (paper and 1.3b first: the plan search's graphs), each
#      with its whole-step coverage and the roofline's error for the card -> costs-gpu-*.json (merge here:
#      python -m graphs.data --merge FILE); the ColocRL graphs' sets were measured on 2026-11-26;
#   2. the CUDA-only tests (engine on cuda:0 alone and beside a CPU worker, with recomputation; loaders across
#      CPU and CUDA);
#   3. the engine's overhead over eager PyTorch on cuda:0 (figure engine_overhead[cuda]).
# Run from the repository root: bash benchmarks/gpu_checks.sh   (results under $OUT, else ./gpu-out); wheels in
# .whl/ (jsonschema and its needs) are installed first when the machine lacks them.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))"; } 2>&1 | tee "$OUT/versions.txt"
if python3 -c "import jsonschema" 2>/dev/null; then :; elif [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
timeout 250 python3 -m graphs.data --device cuda --models gpt,moe --configs paper,1.3b \
    --costs-out "$OUT/costs-gpu-big.json" 2>&1 | tee "$OUT/profile-big.log"
timeout 140 python3 -m pytest -q -s -p no:cacheprovider tests/test_engine_cuda.py \
    tests/test_loaders.py::test_apply_across_cpu_and_cuda 2>&1 | tee "$OUT/tests.log"
timeout 70 python3 -m graphs.data --device cuda --models gpt,moe --configs small,medium \
    --costs-out "$OUT/costs-gpu-small.json" 2>&1 | tee "$OUT/profile-small.log"
timeout 70 python3 benchmarks/bench_engine.py --device cuda 2>&1 | tee "$OUT/bench.log"
