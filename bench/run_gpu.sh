#!/usr/bin/env bash
# The one command for the GPU machine (Python 3.12, torch 2.11, no registry): installs the wheels carried in
# ./wheels (bench/build_wheels.sh), then runs every GPU bench inside one wall-clock budget, writing to $OUT.
#
#   here:   bash bench/build_wheels.sh
#   there:  bash bench/run_gpu.sh                 (device run: carry ["wheels"], timeout_s 330)
#
# Budget (GPU_BENCH_TOTAL_S, default 285 s): install ~15 s; sample / plan-vs-measured / data-prep benches,
# when present, get fixed shares; bench/gpu_bench.py the rest. Each runs under `timeout`, and each writes
# its results as it goes, so a bench that overruns still leaves its numbers. Back in $OUT (at most 8 files):
# run_gpu.log (everything printed), gpu_bench.json / .md, and one file or tarball per other bench.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run_gpu.log") 2>&1

TOTAL=${GPU_BENCH_TOTAL_S:-285}
START=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
PY=${PYTHON:-python3}
SITE=/tmp/ditscale-site
export TORCH_CUDA_ARCH_LIST=9.0          # the image says 9.0a, which DeepSpeed's op builder cannot parse
                                          # (only its JIT ops need it: the trainer uses torch's fused AdamW)
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

echo "== install ($(left) s left)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
shopt -s nullglob
wheels=(wheels/*.whl)
if (( ${#wheels[@]} == 0 )); then
  echo "no wheels in ./wheels: run bash bench/build_wheels.sh here and carry 'wheels'" >&2
else
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
fi
# streaming imports transformers' BatchFeature / BatchEncoding; it pins transformers<5, the image has 5.x.
if ! "$PY" -c "import streaming" 2>/dev/null; then
  echo "import streaming fails with the image's transformers: installing the carried fallback (transformers 4.x)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" wheels/fallback/*.whl
fi
"$PY" - <<'EOF'
import importlib
for name in ("torch", "deepspeed", "streaming", "webdataset", "diffusers", "pydantic", "transformers", "huggingface_hub"):
    try:
        m = importlib.import_module(name)
        print(f"  {name:16s} {getattr(m, '__version__', '?'):12s} {m.__file__}")
    except Exception as e:
        print(f"  {name:16s} FAILED: {type(e).__name__}: {e}")
import torch
print("  cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU")
EOF

# Other GPU benches: name:seconds. Each gets --out DIR and --budget SECONDS where it takes them.
OTHERS=(sample_bench:35 plan_vs_measured:30 data_prep_bench:30)
reserved=10
for entry in "${OTHERS[@]}"; do
  [[ -f bench/${entry%%:*}.py ]] && reserved=$(( reserved + ${entry##*:} ))
done

gpu_budget=$(( $(left) - reserved ))
echo "== gpu_bench.py (budget ${gpu_budget} s)"
timeout --signal=TERM --kill-after=10 $(( gpu_budget + 15 )) \
  "$PY" bench/gpu_bench.py --out "$OUT" --budget "$gpu_budget" || echo "gpu_bench exited with $?"

for entry in "${OTHERS[@]}"; do
  name=${entry%%:*} share=${entry##*:}
  [[ -f bench/$name.py ]] || { echo "== $name: bench/$name.py not present, skipped"; continue; }
  share=$(( share < $(left) - 5 ? share : $(left) - 5 ))
  if (( share < 10 )); then echo "== $name: skipped (budget)"; continue; fi
  echo "== $name.py (budget ${share} s)"
  mkdir -p "$OUT/$name"
  flags=()     # pass --out / --budget only to a bench that takes them
  grep -q -- '"--out"' "bench/$name.py" && flags+=(--out "$OUT/$name")
  grep -q -- '"--budget"' "bench/$name.py" && flags+=(--budget "$(( share - 5 ))")
  timeout --signal=TERM --kill-after=5 "$share" "$PY" "bench/$name.py" "${flags[@]}" || echo "$name exited with $?"
  # $OUT returns at most 8 files: one per bench (its single file, or a tarball of several).
  files=("$OUT/$name"/*)
  if (( ${#files[@]} == 1 )) && [[ -f ${files[0]} ]]; then
    mv "${files[0]}" "$OUT/$name-${files[0]##*/}"
  elif (( ${#files[@]} > 1 )); then
    tar czf "$OUT/$name.tar.gz" -C "$OUT" "$name"
  fi
  rm -rf "${OUT:?}/$name"
done

echo "== done in $(( $(date +%s) - START )) s"
[[ -f $OUT/gpu_bench.md ]] && cat "$OUT/gpu_bench.md"
