#!/usr/bin/env bash
# The measurements to run on a GPU, one benchmark per argument, in the order given:
#   bash benchmarks/gpu.sh kernels sr64_remat sr64_remat_pallas sr64_unrolled sr64_unrolled_pallas \
#     sr64_unrolled_pallas_128 sr64_bf16 sr64_large upscale upscale_pallas sr64_fp32 sr256 sr256_remat imagenet64
# Each writes NAME.json (kernels: kernels.txt) to $OUT (or benchmarks/results) and prints its table (with the sr64
# training runs, the device time per kind of op over 3 profiled steps); all output goes to log.txt there too.
# $PYTHON (default python3) runs them.
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
log="$out/log.txt"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$log"
"$python" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax",
  optax.__version__, jax.devices())' 2>&1 | tee -a "$log"

bench() {  # NAME SECONDS FLAGS...: one benchmark run, stopped after SECONDS
  local name=$1 seconds=$2
  shift 2
  echo "## $name: $*" | tee -a "$log"
  local start=$SECONDS
  timeout "$seconds" "$python" -m benchmarks.benchmark --output="$out/$name.json" "$@" >>"$log" 2>&1
  echo "exit $? after $((SECONDS - start)) s" | tee -a "$log"
  [ -f "$out/$name.json" ] && "$python" -c 'import json, sys; from benchmarks.benchmark import markdown
print(markdown(json.load(open(sys.argv[1]))))' "$out/$name.json" | tee -a "$log"
}

for what in "$@"; do
  case $what in
    kernels) echo "## kernels: $python -m benchmarks.kernel_bench --batch=64" | tee -a "$log"
      timeout 120 "$python" -m benchmarks.kernel_bench --batch=64 2>&1 | tee "$out/kernels.txt" >>"$log"
      tail -6 "$out/kernels.txt" ;;
    sr64_bf16) bench sr64_bf16 140 --config=configs/sr64.py --compute_dtype=bfloat16 --batch_sizes=16 \
      --profile_steps=3 ;;
    sr64_unrolled) bench sr64_unrolled 450 --config=configs/sr64.py --compute_dtype=bfloat16 --config.scan_unroll=64 \
      --batch_sizes=64 --profile_steps=3 ;;
    sr64_large) bench sr64_large 150 --config=configs/sr64.py --compute_dtype=bfloat16 --batch_sizes=40 \
      --profile_steps=3 ;;
    sr64_remat) bench sr64_remat 150 --config=configs/sr64.py --compute_dtype=bfloat16 --remat --batch_sizes=64 \
      --profile_steps=3 ;;
    sr64_remat_pallas) bench sr64_remat_pallas 150 --config=configs/sr64.py --compute_dtype=bfloat16 --remat \
      --batch_sizes=64 --config.variant=pallas --profile_steps=3 ;;
    sr64_unrolled_pallas) bench sr64_unrolled_pallas 450 --config=configs/sr64.py --compute_dtype=bfloat16 \
      --config.scan_unroll=64 --config.variant=pallas --batch_sizes=64 --profile_steps=3 ;;
    sr64_unrolled_pallas_128) bench sr64_unrolled_pallas_128 450 --config=configs/sr64.py --compute_dtype=bfloat16 \
      --config.scan_unroll=64 --config.variant=pallas --batch_sizes=128 --profile_steps=3 ;;  # fits an H200
    sr64_fp32) bench sr64_fp32 120 --config=configs/sr64.py --compute_dtype=float32 --batch_sizes=16 ;;
    upscale) bench upscale 70 --config=configs/sr64.py --mode=upscale --compute_dtype=bfloat16 --batch_sizes=256 ;;
    upscale_pallas) bench upscale_pallas 70 --config=configs/sr64.py --mode=upscale --compute_dtype=bfloat16 \
      --batch_sizes=256 --config.variant=pallas ;;
    sr256) bench sr256 240 --config=configs/sr256.py --compute_dtype=bfloat16 --batch_sizes=4 --steps=3 \
      --find_max_batch ;;
    sr256_remat) bench sr256_remat 240 --config=configs/sr256.py --compute_dtype=bfloat16 --remat --batch_sizes=4 \
      --steps=3 --find_max_batch ;;
    imagenet64) bench imagenet64 120 --config=configs/vdvae_imagenet64.py --compute_dtype=bfloat16 \
      --batch_sizes=64 ;;
    *) echo "unknown benchmark: $what" >&2; exit 2 ;;
  esac
done
