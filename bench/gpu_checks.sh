#!/usr/bin/env bash
# One-shot GPU checks: the test suite on CUDA (device "auto" picks the GPU), the RQ-VAE benchmark, MovieLens-100k
# end to end, and 1M x 1024 RQ-VAE timing. Each step has its own time limit; results go to $OUT (or ./gpu_out).
# ML-100k needs pre-converted splits (python bench/ml100k.py --convert-only --keep DIR; tar czf .devdata/ml100k.tgz)
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GENREC_CACHE_DIR=/tmp/genrec_cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
timeout 90 python3 -m pytest -x -q -p no:cacheprovider tests 2>&1 | tail -15 | tee "$OUT/pytest_cuda.txt"
timeout 150 python3 bench/semantic_ids.py --sets 50kx32 200kx1024 --methods ours "ours+dedup" "ours rqkmeans" "public recipe" \
  --device cuda 2>&1 | grep -v "it/s" | tee "$OUT/rqvae_gpu.txt"
if [ -f .devdata/ml100k.tgz ]; then
  mkdir -p /tmp/ml && tar xzf .devdata/ml100k.tgz -C /tmp/ml
  timeout 270 python3 bench/ml100k.py --data-root /tmp/ml/ml100k --seeds 0 1 2 --epochs 60 --device cuda \
    --num-workers 4 2>&1 | grep -v "it/s\|B/s" | tee "$OUT/ml100k_gpu.txt"
fi
timeout 60 python3 bench/semantic_ids.py --sets 1mx1024 --methods ours --device cuda 2>&1 | grep -v "it/s" | tee "$OUT/rqvae_1m_gpu.txt"
exit 0
