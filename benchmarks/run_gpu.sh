#!/usr/bin/env bash
# The GPU checks (gated-delta module, models, the rest of the suite) and benchmarks, as run on
# the lent NVIDIA machine (MLX CUDA build made importable by ../shared/device:
# `source .dev/pb/bootstrap.sh` first). One step per call, so that each stays under the
# machine's 10-minute limit per command:
#   benchmarks/run_gpu.sh suite     # the whole suite (slow ones aside) on the GPU in seven
#                                   # parallel groups, one process each (pytest-xdist and
#                                   # pytest-timeout; 16 cores: about 5 min on the H200)
#   benchmarks/run_gpu.sh tests     # tests/kernels on the GPU but the chunk kernels' (about 5 min)
#   benchmarks/run_gpu.sh models    # tests/models on the GPU (about 4 min)
#   benchmarks/run_gpu.sh rest      # every other test file on the GPU (about 4 min)
#   benchmarks/run_gpu.sh decode    # bench_gated_delta.py, decode B = 1, 8, 32, 128
#   benchmarks/run_gpu.sh prefill   # bench_gated_delta.py, prefill T = 128 ... 8192
#   benchmarks/run_gpu.sh convdecode  # bench_gated_delta_decode.py: gated_delta_decode against
#                                     # today's conv ops + kernel, 0.8B / 9B shapes, B = 1, 32, 128
#   benchmarks/run_gpu.sh chunk-tests  # the chunk kernels' GPU tests only (about 2-4 min)
#   benchmarks/run_gpu.sh chunk-parts  # the chunk path's parts (prep, state pass per BV) and
#                                      # the fused/chunked crossover, Hv 16/32/64 (about 2 min)
#   benchmarks/run_gpu.sh chunk-mma  # the matrix-unit state pass: tile layer and chunked path
#                                    # checked against the fused kernel / float64 (Hv 16/32/64,
#                                    # T 512..32768, masks, initial state), then timed against
#                                    # the fused kernel and FLA's chunk kernel (about 5 min)
#   benchmarks/run_gpu.sh chunk     # prefill T = 512 ... 32768 x Hv = 16 ... 64: ours fused and
#                                   # chunked kernels, FLA chunk / fused_recurrent, mlx-lm ops
#                                   # (T <= 2048), mx.fast (T <= 8192); about 4 min
#   benchmarks/run_gpu.sh chunk-table  # the same table (issue 9's targets), one process per Hv
#                                      # and side (ours with mlx-lm / mx.fast; FLA's two kernels
#                                      # in bench_fla.py, which never loads MLX), merged into one
#                                      # table and plot with ours / FLA chunk per cell (about 12
#                                      # min: two calls, CHUNK_TABLE_SIDES=ours then =fla)
#   benchmarks/run_gpu.sh diet-tests  # the decode kernel's GPU tests (gated norm included), the
#                                     # compiled step against the plain path (about 4 min)
#   benchmarks/run_gpu.sh diet-kernel # bench_gated_delta_decode.py --norm: the conv decode kernel
#                                     # with the gated norm as ops after it and inside it,
#                                     # 0.8B / 9B layers, B = 1, 32, 64 (about 2 min)
#   benchmarks/run_gpu.sh diet-bench  # probe_host_cost.py (host cost by kind, the step's build /
#                                     # async_eval / token split), then bench_decode.py at MLX's
#                                     # default CUDA graph size and with larger graphs, in two
#                                     # processes (about 8 min)
#   benchmarks/run_gpu.sh finish    # issues 13 and 9's last measurements (session 18's lead):
#                                   # bench_mtp.py --device-run at the tiny model's acceptance
#                                   # rates too, then the 128k memory growth over 8 rounds with
#                                   # the layers queued 1 and 0 ahead (about 7 min)
#   benchmarks/run_gpu.sh memory    # issue 9's growth and prefill tok/s, 0.8B (8 rounds) and
#                                   # 9B (3): layers queued one ahead on one stream, over
#                                   # streams of their own (text.QUEUE_STREAMS) or drained
#                                   # (text.DRAIN_LAYERS); VARIANTS=..., ROUNDS=8,3
#                                   # (about 6 min)
#   benchmarks/run_gpu.sh recheck   # what session 9 could not confirm on the GPU (the quantized
#                                   # MoE prefill probe and test, the rows kernel, speculative,
#                                   # the whole chunk file), groups in parallel processes, each
#                                   # failure printed as it happens (benchmarks/pytest_eager.py);
#                                   # about 7 minutes
# Logs and JSON/PNG go to $OUT (the device tool brings them back), or benchmarks/out.
# Merge the two benchmark halves afterwards:
#   python benchmarks/bench_gated_delta.py --merge <decode>.json <prefill>.json --out benchmarks/results
set -euo pipefail
step=${1:-}
case "$step" in
  suite | tests | models | rest | decode | prefill | convdecode | chunk | chunk-table) ;;
  chunk-tests | chunk-parts | chunk-mma) ;;
  diet-tests | diet-kernel | diet-bench | recheck | finish | memory) ;;
  *)
    echo "usage: benchmarks/run_gpu.sh suite|tests|models|rest|decode|prefill|convdecode|chunk|chunk-table|chunk-tests|chunk-parts|chunk-mma|diet-tests|diet-kernel|diet-bench|recheck|finish|memory" >&2
    exit 2
    ;;
esac
out=${OUT:-benchmarks/out}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
pytest=(python3 -m pytest -q -p no:cacheprovider -rfs)
case "$step" in
  suite)
    # Seven groups side by side: the kernel files split by size (xdist inside the large ones),
    # the models, the decode files, the rest. A group that hangs is cut at 545 s.
    dec="tests/test_fast_decode.py tests/test_decode_diet.py tests/test_packed_decode.py tests/test_cpu_decode.py"
    big="test_gpu_kernels.py test_gpu_chunk_kernel.py test_gpu_chunk_h3.py test_gpu_chunk_fuse.py"
    gpu_other=$(ls tests/kernels/test_gpu_*.py | grep -v $(printf -- '-e %s ' $big))
    # tests/kernels files that run MLX on the default device; the rest there (the lane
    # emulator's g++ programs, the sources' compiles) run on the host alike, in CI
    any_device="chunked decode dispatch export positions ref layering cuda_precompiled"
    cpu_kernels=$(printf 'tests/kernels/test_%s.py ' $any_device)
    t0=$(date +%s)
    run() {
      local name=$1; shift
      timeout 545 "${pytest[@]}" --tb=short --timeout 300 "$@" >"$out/suite_$name.log" 2>&1
      echo "$name rc=$? after $(( $(date +%s) - t0 )) s" >>"$out/suite_times.log"
    }
    rm -f "$out/suite_times.log"
    run kernels -n 3 tests/kernels/test_gpu_kernels.py &
    run chunk -n 3 tests/kernels/test_gpu_chunk_kernel.py tests/kernels/test_gpu_chunk_h3.py \
      tests/kernels/test_gpu_chunk_fuse.py &
    run gpu_other -n 2 $gpu_other &
    run kernels_any -n 2 $cpu_kernels &
    run models -n 2 tests/models &
    run decode -n 2 $dec &
    run rest -n 2 tests --ignore=tests/kernels --ignore=tests/models $(printf -- '--ignore=%s ' $dec) &
    wait
    cat "$out/suite_times.log"
    grep -h "^FAILED\|^ERROR" "$out"/suite_*.log | cut -c1-250 | head -40 || true
    for f in "$out"/suite_*.log; do echo "$(basename "$f"): $(tail -1 "$f" | cut -c1-200)"; done
    ;;
  tests)
    # The chunk kernels' GPU tests run as their own step (chunk-tests), to stay under 10 min.
    "${pytest[@]}" tests/kernels --ignore=tests/kernels/test_gpu_chunk_kernel.py 2>&1 |
      tee "$out/gpu_tests.log"
    ;;
  models) "${pytest[@]}" tests/models 2>&1 | tee "$out/gpu_models.log" ;;
  rest)
    "${pytest[@]}" tests --ignore=tests/kernels --ignore=tests/models 2>&1 |
      tee "$out/gpu_rest.log"
    ;;
  decode)
    python3 benchmarks/bench_gated_delta.py --decode-b 1,8,32,128 --prefill-t "" \
      --target-s 0.5 --out "$out" 2>&1 | tee "$out/bench_decode.log"
    ;;
  prefill)
    python3 benchmarks/bench_gated_delta.py --decode-b "" --prefill-t 128,512,2048,8192 \
      --target-s 0.5 --out "$out" 2>&1 | tee "$out/bench_prefill.log"
    ;;
  convdecode)
    python3 benchmarks/bench_gated_delta_decode.py --layouts 16x4,8x4 --out "$out" 2>&1 |
      tee "$out/bench_conv_decode.log"
    ;;
  memory)
    # Issue 9's memory growth: the layers queued one ahead on one stream (session 19's
    # default), over streams of their own (text.QUEUE_STREAMS, session 20's), drained
    # (text.DRAIN_LAYERS), 0.8B and 9B; VARIANTS=..., ROUNDS=<0.8B>,<9B>
    p=benchmarks/probe_prefill_memory.py
    v=${VARIANTS:-qa1+onestream,streams,drain}
    r=${ROUNDS:-8,3}
    timeout 240 python3 $p --rounds "${r%,*}" --variants "$v" --per-step 0 --out "$out" 2>&1 |
      tee "$out/memory_08b.log" | tail -12
    timeout 200 python3 $p --shape 9b --rounds "${r#*,}" --variants "$v" --per-step 0 \
      --out "$out" 2>&1 | tee "$out/memory_9b.log" | tail -10
    # every queue form against the plain call, on the GPU
    timeout 120 "${pytest[@]}" tests/test_generation.py -k queues 2>&1 | tail -4
    ;;
  finish)
    timeout 280 python3 benchmarks/bench_mtp.py --device-run --variants auto --repeats 3 \
      --out "$out" 2>&1 | tee "$out/finish_mtp.log" | grep -v "^$" | tail -45
    timeout 290 python3 benchmarks/probe_prefill_memory.py --per-step 0 --rounds 8 \
      --variants qa1,qa0 --out "$out" 2>&1 | tee "$out/finish_memory.log" | tail -16
    ;;
  recheck)
    # What session 9 left unconfirmed on the GPU, groups side by side, one process each (a CUDA
    # error in one cannot poison the others; the model tests first compile their kernels with
    # NVRTC, minutes). pytest-timeout must be importable (--timeout).
    export PYTHONPATH=$PYTHONPATH:benchmarks:.
    eager=("${pytest[@]}" -p pytest_eager --tb=short --timeout 280)
    run() { local name=$1; shift; timeout 420 "${eager[@]}" "$@" >"$out/recheck_$name.log" 2>&1; }
    (timeout 120 python3 benchmarks/probe_quantized_prefill.py sweep >"$out/probe_quantized_prefill.log" 2>&1 || true
      run qmoe tests/test_fast_decode.py::test_compiled_decode_quantized_moe) &
    run rows tests/kernels/test_gpu_rows_matmul.py &
    run speculative tests/test_speculative.py &
    run chunk_a tests/kernels/test_gpu_chunk_kernel.py -k "test_chunk_kernel_matches_ref" &
    run chunk_b tests/kernels/test_gpu_chunk_kernel.py -k "not test_chunk_kernel_matches_ref" &
    wait
    cat "$out/probe_quantized_prefill.log" || true
    grep -hE "^### FAILED|^E  " "$out"/recheck_*.log | grep -v "^E    +" | cut -c1-200 | head -60 || true
    for f in "$out"/recheck_*.log; do
      echo "$(basename "$f"): $(grep -c '^### PASSED' "$f") passed, $(grep -c '^### FAILED' "$f") failed"
    done
    ;;
  chunk-tests)
    "${pytest[@]}" tests/kernels/test_gpu_chunk_kernel.py 2>&1 | tee "$out/gpu_chunk_tests.log"
    ;;
  diet-tests)
    { "${pytest[@]}" tests/kernels/test_gpu_kernels.py -k "decode or norm" || echo "FAILED above";
      "${pytest[@]}" tests/kernels/test_gpu_precompiled.py tests/test_fast_decode.py \
        tests/test_decode_diet.py; } 2>&1 | tee "$out/gpu_diet_tests.log"
    ;;
  diet-kernel)
    python3 benchmarks/bench_gated_delta_decode.py --norm --batches 1,32,64 --repeats 3 \
      --out "$out" 2>&1 | tee "$out/bench_decode_norm.log"
    ;;
  diet-bench)
    OUT="$out" python3 benchmarks/probe_host_cost.py 2>&1 | tee "$out/probe_host_cost.log"
    python3 benchmarks/bench_decode.py --device-run --budget-s 200 --out "$out" \
      --env MLX_MAX_OPS_PER_BUFFER=4000,MLX_MAX_MB_PER_BUFFER=1000000 2>&1 |
      tee "$out/bench_decode_env.log"
    ;;
  chunk-parts)
    python3 benchmarks/bench_chunk_parts.py --out "$out/chunk_parts.json" 2>&1 |
      tee "$out/chunk_parts.log"
    ;;
  chunk-mma)
    python3 benchmarks/chunk_mma_gpu.py --out "$out" 2>&1 | tee "$out/chunk_mma.log"
    ;;
  chunk)
    # The slow token-by-token peers stop early (and say so in the table): mlx-lm's ops path
    # costs about a second a call at T=2048, mx.fast's recurrence grows linearly with T.
    python3 benchmarks/bench_gated_delta.py --decode-b "" --prefill-t 512,2048,8192,32768 \
      --hv 16,32,48,64 --max-t "mlx-lm ops=2048,mx.fast=8192" --target-s 0.1 --repeats 3 \
      --budget-s 2 --only "ours cuda,ours metal,ours chunked,fla chunk,fla fused_recurrent,mlx-lm ops,mx.fast" \
      --out "$out" 2>&1 | tee "$out/bench_chunk.log"
    ;;
  chunk-table)
    # Each side and Hv in a process of its own, merged into one table. FLA's kernels run in
    # bench_fla.py, which never loads MLX, one process a kernel, so that a fault costs that
    # kernel's cells only. (Sessions 15-17's "illegal memory access" was this bench's own call:
    # beta passed by position into FLA 0.6.0's fused_recurrent_gated_delta_rule became its
    # per-key gate; CUDA's sticky error then surfaced in the chunk kernel's next call. Fixed in
    # session 17; see bench_fla.py.) CHUNK_TABLE_SIDES picks sides (ours: ours auto, mlx-lm's ops
    # and mx.fast, ~2 min a Hv; fla: ~1 min a Hv), so that the table fits two calls; a side's
    # folders are replaced, the other side's kept.
    lens=512,2048,8192,32768
    for hv in 16 32 48 64; do
      for side in ${CHUNK_TABLE_SIDES:-ours fla}; do
        dir="$out/table/hv${hv}_${side}"
        rm -rf "$dir" "$dir.log" && mkdir -p "$dir"
        if [ "$side" = ours ]; then
          rc=0
          timeout 200 python3 benchmarks/bench_gated_delta.py --decode-b "" --prefill-t "$lens" \
            --hv "$hv" --max-t "mlx-lm ops=2048,mx.fast=8192" --target-s 0.1 --repeats 5 \
            --budget-s 2 --only "ours auto,mlx-lm ops,mx.fast" --out "$dir" >"$dir.log" 2>&1 || rc=$?
          echo "Hv $hv ours rc=$rc"
          continue
        fi
        for kernel in chunk fused_recurrent; do
          rc=0
          timeout 150 python3 benchmarks/bench_fla.py --kernels $kernel --hv "$hv" --t "$lens" \
            --out "$dir" >>"$dir.log" 2>&1 || rc=$?
          echo "Hv $hv fla $kernel rc=$rc $(grep -c "illegal memory" "$dir.log") fault lines"
        done
      done
    done
    # ours first: the merged table keeps the first file's environment (MLX, BLAS)
    python3 benchmarks/bench_gated_delta.py --merge "$out"/table/hv*_ours/*.json \
      "$out"/table/hv*_fla/*.json --out "$out" 2>&1 |
      tee "$out/bench_chunk_table.log"
    # ours / FLA's chunk kernel per shape (issue 9's targets: <= 1.3 at T >= 8192, <= 1 at 2048)
    python3 - "$(ls -t "$out"/gated_delta_cuda_*.json | head -1)" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["results"]
ms = {(r["contender"].split(" (")[0], r["Hv"], r["T"]): r["ms"] for r in rows}
for hv in sorted({k[1] for k in ms}):
    cells = []
    for t in sorted({k[2] for k in ms if k[1] == hv}):
        a, f = ms.get(("ours auto", hv, t)), ms.get(("fla chunk", hv, t))
        cells.append(f"T {t}: {a / f:.2f}x" if a and f else f"T {t}: -")
    print(f"ours auto / fla chunk, Hv {hv}: " + ", ".join(cells))
PY
    ;;
esac
