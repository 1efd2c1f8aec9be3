#!/usr/bin/env bash
# The GPU checks in one run (for a machine with CUDA, PyTorch, timm and pytest; carry the wheels
# of pytorch-metric-learning, fastreid, yacs, termcolor and faiss-cpu in .whl/ when missing):
#   1. the CUDA tests (tests/core/test_cuda.py and every other CUDA-only test),
#   2. the interleaved timing suite on the GPU (float32 and bf16 autocast; face 100k classes and
#      the CPU table's 10k), ratios against the floor and the three-GEMM limit,
#      2c. the head compiled (floor, head, margin cloud) at face size, s=64 and s=24,
#   3. the whole test suite with a GPU present (the adapters take their CUDA branches).
# Every part has its own time limit and writes into OUT (default ./cuda_check_out).
set -u
OUT=${OUT:-./cuda_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl 2>&1 | tail -2
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-compile -e . 2>&1 | tail -2
{ nvidia-smi -L; python3 -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'timm', timm.__version__)"; } | tee "$OUT/env.txt"

echo "== 1. CUDA tests"
timeout "${T_TESTS:-150}" python3 -m pytest -q -p no:cacheprovider -rs tests/core/test_cuda.py \
  "tests/core/test_transfer.py::test_cuda_matches_cpu" \
  "tests/demo/test_evaluate.py::test_cli_evaluate_on_cuda_matches_the_cpu" 2>&1 | tee "$OUT/cuda_tests.log" | tail -25

echo "== 1b. synchronising calls in a training step (with their stacks)"
timeout "${T_SYNC:-45}" python3 -m benchmarks.cuda_sync_report 2>&1 | tee "$OUT/sync_report.txt"

echo "== 2. GPU timings"
S="python3 -m benchmarks.suite --device cuda --threads 1 --inner ${INNER:-10} --reps ${REPS:-7}"
timeout "${T_BENCH:-80}" $S --batch 256 --classes 10000 --out "$OUT/suite_cuda_fp32_10k.json" > "$OUT/suite_cuda_fp32_10k.txt" 2>&1
timeout "${T_BENCH:-80}" $S --batch 512 --classes 100000 --settings face --out "$OUT/suite_cuda_fp32_100k.json" > "$OUT/suite_cuda_fp32_100k.txt" 2>&1
timeout "${T_BENCH:-80}" $S --batch 512 --classes 100000 --settings face --autocast bf16 --out "$OUT/suite_cuda_bf16_100k.json" > "$OUT/suite_cuda_bf16_100k.txt" 2>&1
grep -h -B2 -A13 "face s=64 m=0.35 trained" "$OUT"/suite_cuda_*.txt | grep -v "^built\|^repetition" | head -60

echo "== 2c. GPU timings, the head under torch.compile (Inductor; the first call of each compiles)"
timeout "${T_COMPILE:-150}" $S --batch 512 --classes 100000 --settings face,reid --data trained \
  --methods floor,gemm3,leap,leap_cloud_margin,floor_compiled,leap_compiled,leap_cloud_margin_compiled \
  --out "$OUT/suite_cuda_fp32_100k_compiled.json" > "$OUT/suite_cuda_fp32_100k_compiled.txt" 2>&1
grep -v "^built\|^repetition\|warn" "$OUT/suite_cuda_fp32_100k_compiled.txt" | tail -18

echo "== 3. whole suite with a GPU present"
timeout "${T_SUITE:-240}" python3 -m pytest -v -p no:cacheprovider -n "${WORKERS:-14}" -rfEs 2>&1 \
  | grep -v -i "benchmark" > "$OUT/suite_tests.log"
grep -E "(FAILED|ERROR)" "$OUT/suite_tests.log" | sort -u | tee "$OUT/suite_failures.txt"
tail -3 "$OUT/suite_tests.log"
