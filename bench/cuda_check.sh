#!/usr/bin/env bash
# The CUDA path, checked and timed on a machine with an NVIDIA GPU, in one run of a few minutes:
#
#   make install VARIANT=cuda && bash bench/cuda_check.sh [OUT_DIR]      # OUT_DIR: default bench/results/cuda
#   PYTHON=python3 bash bench/cuda_check.sh OUT_DIR                       # another interpreter with the project's deps
#
# 1. tests/kernels on the GPU: every kernel test's Triton run happens in-process on CUDA tensors
#    (forward, backward, gradcheck in fp64), and the sm_90 ahead-of-time compile.
# 2. tests/gpu: a training round in bf16 on the GPU through the Triton kernels (the embedded model; a
#    135M Llama shape in LoRA and full weights), its published version loaded back; the serving engine
#    on the GPU, batched answers against each alone.
# 3. bench/logprobs.py and bench/kl.py at 16k tokens x V in {32000, 151936}, against eager, TRL's
#    per-row loop, OpenRLHF's chunked logsumexp and torch.compile (JSON beside the logs).
#
# Each step has its own time limit, and a failing step does not stop the next: the summary's rc column
# says which passed. Logs and JSON go to OUT_DIR; the last lines printed are the summary.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/cuda}
PY=${PYTHON:-.venv/bin/python}
export BENTOML_DO_NOT_TRACK=true HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}"
mkdir -p "$OUT"
: > "$OUT/summary.txt"

step() {  # step NAME SECONDS CMD...: CMD's output to OUT/NAME.log, its tail here, a summary line
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (at most ${limit}s): $*"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n 12 "$OUT/$name.log"
    printf '%-16s rc=%-3s %4ss\n' "$name" "$rc" "$(($(date +%s) - start))" >>"$OUT/summary.txt"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
    "$PY" -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__,
'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__,
'|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')"
} >>"$OUT/summary.txt" 2>&1

step kernel-tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/kernels
step cuda-tests 210 "$PY" -m pytest -q -p no:cacheprovider -s -rs tests/gpu
grep -h '^CUDA-' "$OUT/cuda-tests.log" | sed 's/^CUDA-[A-Z]* //' >"$OUT/cuda-rounds.jsonl"
step bench-logprobs 100 "$PY" bench/logprobs.py --n 16384 --v 32000 151936 --warmup 3 --repeats 10 \
    --out "$OUT/logprobs-cuda.json"
step bench-kl 100 "$PY" bench/kl.py --n 16384 --v 32000 151936 --warmup 3 --repeats 10 --out "$OUT/kl-cuda.json"

echo "== summary ($OUT)"
cat "$OUT/summary.txt"
