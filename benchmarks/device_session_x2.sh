#!/usr/bin/env bash
# One call on a 2 x H200 machine (device tool, kind nvidia-h200-x2), batching the session's GPU work:
#   1. DDP training on 2 GPUs (torchrun), 2. FSDP2 on 2 GPUs, then in parallel
#   3a. GPU 0: benchmarks/mlstm_kernels.py (ours, SDPA, competitors in subprocesses, correctness check)
#   3b. GPU 1: resume the 2-process DDP run on 1 process, then the GPU test suite (tests/gpu).
# Logs and results go to $OUT. Competitor wheels are carried in .whl/ (see benchmarks/NOTES.md).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site
nvidia-smi -L | tee $OUT/gpus.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $OUT/gpus.txt
T="python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m fastxlstm train"
COMMON="--preset small --batch-size 16 --seq-len 256 --device cuda --no-progress --sample-tokens 120"
{ echo "== DDP, 2 x H200: $T $COMMON --steps 60 --eval-every 30 --precision bf16 --out /tmp/ddp"
  time timeout 110 $T $COMMON --steps 60 --eval-every 30 --precision bf16 --out /tmp/ddp --stop-at 40
  echo "== FSDP2, 2 x H200"
  time timeout 75 $T $COMMON --steps 20 --eval-every 0 --precision bf16 --fsdp --out /tmp/fsdp
} > $OUT/ddp_2xh200.txt 2>&1
( CUDA_VISIBLE_DEVICES=0 timeout 290 python3 benchmarks/mlstm_kernels.py --out $OUT/h200_mlstm.json \
    --check-seq 1024 --competitor-timeout 75 > $OUT/bench.log 2>&1 ) &
( { echo "== resume the 2-process DDP run (stopped at step 40) on 1 process to step 60"
    CUDA_VISIBLE_DEVICES=0 true
    time CUDA_VISIBLE_DEVICES=1 timeout 70 python3 -m fastxlstm train $COMMON --steps 60 --eval-every 30 \
      --precision bf16 --out /tmp/ddp --resume; } >> $OUT/ddp_2xh200.txt 2>&1
  CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m pytest tests/gpu -q -rA -p no:cacheprovider > $OUT/gpu_tests.log 2>&1 ) &
wait
tail -5 $OUT/gpu_tests.log; tail -3 $OUT/bench.log; grep -E "bits per byte|error|Error" $OUT/ddp_2xh200.txt | head
