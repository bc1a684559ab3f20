#!/usr/bin/env bash
# One call on a 2 x H200 machine (device tool, kind nvidia-h200-x2), batching the session's GPU work:
#   GPU 0: benchmarks/mlstm_kernels.py (ours, SDPA, decode, competitors in subprocesses, then a float64 check)
#   GPU 1: the GPU test suite (tests/gpu), 6 pytest-xdist workers so that the Triton compiles overlap, then a
#          host-side profile of the decode step at B=1 (where eager launches cost more than the kernel).
# Logs and results go to $OUT. Competitor wheels (and pytest-xdist) are carried in .whl/ (see benchmarks/NOTES.md).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site
nvidia-smi -L | tee $OUT/gpus.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $OUT/gpus.txt
python3 -c "import xdist" 2>/dev/null && XD="-n 6" || XD=""
( CUDA_VISIBLE_DEVICES=0 timeout 400 python3 benchmarks/mlstm_kernels.py --out $OUT/h200_mlstm.json \
    --check-seq 1024 --check-dtypes bf16 --competitor-timeout 120 > $OUT/bench.log 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 300 python3 -m pytest tests/gpu -q -rA -p no:cacheprovider $XD > $OUT/gpu_tests.log 2>&1
  CUDA_VISIBLE_DEVICES=1 timeout 60 python3 benchmarks/profile_step_host.py > $OUT/step_host_profile.txt 2>&1
  CUDA_VISIBLE_DEVICES=1 OUT=$OUT timeout 120 python3 benchmarks/sweep_mlstm.py w8 st3 > $OUT/sweep.log 2>&1 ) &
wait
tail -4 $OUT/gpu_tests.log; grep -v Warn $OUT/sweep.log | tail -5; grep -v Warn $OUT/bench.log | tail -3; head -30 $OUT/step_host_profile.txt
