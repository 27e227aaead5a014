#!/usr/bin/env bash
# Everything a lent GPU session does, as one script (the device tool bills every second it holds the card):
#   1. profile the six shipped benchmark graphs on the card -> costs-gpu.json (merge here: python -m graphs.data
#      --merge costs-gpu.json), with each graph's whole-step coverage and the roofline's error for the card;
#   2. the CUDA-only tests (engine on cuda:0 alone and beside a CPU worker; loaders across CPU and CUDA);
#   3. the engine's overhead over eager PyTorch on cuda:0 (figure engine_overhead[cuda]).
# Run from the repository root: bash benchmarks/gpu_checks.sh   (results under $OUT, else ./gpu-out)
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))"; } 2>&1 | tee "$OUT/versions.txt"
if python3 -c "import jsonschema" 2>/dev/null; then :; elif [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
timeout 240 python3 -m graphs.data --device cuda --configs small,paper --costs-out "$OUT/costs-gpu.json" 2>&1 | tee "$OUT/profile.log"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_engine_cuda.py \
    tests/test_loaders.py::test_apply_across_cpu_and_cuda 2>&1 | tee "$OUT/tests.log"
timeout 100 python3 benchmarks/bench_engine.py --device cuda 2>&1 | tee "$OUT/bench.log"
