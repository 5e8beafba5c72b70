#!/usr/bin/env bash
# Build and test shardstore on a lent GPU machine (Python 3.12, its own NumPy/torch, no registry),
# run the GPU checks first (what only a GPU can show), then the test suite and the benchmarks; prints short tables.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/shardstore-device}
mkdir -p "$OUT"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "WARNING: Running pip as" || true
python3 - <<'PY'
import platform, numpy, torch, os
print(f"python {platform.python_version()}  numpy {numpy.__version__}  torch {torch.__version__}"
      f"  cuda {torch.cuda.is_available()} {torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''}"
      f"  cpus {os.cpu_count()}")
PY
python3 bench/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log"
python3 bench/gpu_train_check.py 2>&1 | tee "$OUT/gpu_train_check.log" | grep -E "^\|"
# The default (fast) tests; the object-storage tests and benchmark need moto's S3 server, which that machine lacks.
python3 -m pytest tests -q -p no:cacheprovider --ignore=tests/remote 2>&1 | tee "$OUT/tests.log" | tail -3
python3 -m pytest bench -q -p no:cacheprovider --ignore=bench/test_remote_bench.py --benchmark-only \
    --benchmark-columns=median,min,max \
    --benchmark-json="$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | grep -E "GB/s|shards/s|passed|failed|error"
