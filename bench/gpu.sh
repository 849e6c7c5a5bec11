#!/usr/bin/env bash
# The device-tool entry for GPU measurements: bash bench/gpu.sh SUITE [SUITE ...] (outputs under $OUT).
# Carry .whl (the GPU image lacks fla-core, datasets, dill, multiprocess); the wheels' download:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     fla-core==0.6.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# Suites (each bounded by its own timeout; seconds are for an H200 with cold caches):
#   wkv        WKV-7 kernels: parity of our Triton kernel and fla-core's chunked kernel against the
#              float64 scan (fresh leaves, frozen tokens, state carried across calls, all 7 gradients),
#              then fwd+bwd timings at B8 T2048 and B2 T8192 (~220 s, most of it fla's cold JIT + autotune;
#              fla caches its autotune results on disk, so later suites of the same call start faster);
#              WKV_ARGS replaces the options (e.g. "--no-chunked --shapes 16,1024,12,64 2,8192,12,64": the
#              launch sweep, parts vs atomic column sums, at the 125m model's shape; "--sweep chunk-grad": the
#              chunk-parallel backward's chunk size, product and scan precision and forward), WKV_TIMEOUT the 220 s
#   wkv-model  hierarchos 125m minimal, full training steps (clip + optimizer), one row per WKV
#              implementation (triton, fla), T=1024 and 8192, eager and under a CUDA graph (~150 s)
#   stall      the `train` command at ~30M (byte tokenizer, width 512, 3 + 3 layers, T=512, B=32,
#              minimal reasoning), every window logged, with Python's garbage collector on and off:
#              does a periodic slow window come from the collector? (~140 s; the ROSA rebuild that made
#              every 8th window slow now runs ahead on a thread: run `kernel` first for the C++ automaton)
#   table      the training-throughput table: 125m minimal at T=1024 and T=8192 and default at T=1024
#              against a compiled GPT-2 of equal size, full training steps for both (clip + fused
#              AdamW; hierarchos with the trainer's optimizer), with the float32 parity preamble (~330 s);
#              TABLE_WIRINGS="x070 hierarchos" adds the old time-mix wiring's rows at T=1024 (same run);
#              TABLE_COMPILE=both compiles hierarchos' RWKV blocks too (every hierarchos row, graphs or not)
#   train-loop the `train` command at ~30M (byte tokenizer, width 512, 3 + 3 layers, minimal depth, T=512, B=32)
#              against a byte-level GPT-2 of the same size in a plain compiled loop (bf16, fused AdamW) on the
#              same text, one after the other: bench_train_loop.py, ours as `train` runs by default (the RWKV
#              blocks compiled under the CUDA graph) and with --no-compile; TRAIN_LOOP_ARGS adds options (~250 s)
#   table-compiled  the table's graphs rows with the RWKV blocks compiled (what `train` runs on CUDA by default),
#              against the compiled GPT-2: 125m minimal and default at T=1024, minimal at T=8192 (~300 s)
#   memory     the 125m minimal T=1024 step's peak memory against GPT-2's (the issue's memory target): compiled
#              blocks + graphs with the chunk-parallel WKV's start states held and recomputed (one process),
#              then under an activation budget (MEMORY_BUDGET, default 0.6, which recomputes the states too)
#              (~2 x 250 s; MEMORY_TIMEOUT each)
#   profile    where a training step's GPU time goes, by kernel kind and by model part (profile_forward.py), and
#              what a forward saves for its backward, by part, with the step's peak, and the 40 largest kernels;
#              hierarchos beside GPT-2; PROFILE_ARGS (default: the train-loop shape, "--size 30m-byte --seq-len 512
#              --batch 32 --models hierarchos:minimal gpt2 --compile --memory --kernels 40": compiled blocks,
#              eager, no graph) (~150 s)
#   tests      the GPU-marked tests (~100 s warm; fla's cold autotune made them outlast 200 s once; 318 s on a
#              cold H100 with everything compiled afresh); torch's AOT-autograd cache writer segfaulted once in
#              test_compile.py (BENCHMARKS.md): TORCHINDUCTOR_AUTOGRAD_CACHE=0 runs them without that cache
#   kernel     build the C++ kernel on the device (the ROSA automaton and WKV step the trainer uses; ~40 s)
#   generate   batch-1 generation at 125m, default and minimal reasoning, the captured sync-free step per
#              GENERATE_MODES (bench_generate --compile-step; default "off off+full fused fused+full": eager or
#              fused time mix, each with and without the plan-point split), against a Hugging Face GPT-2 of
#              the same size (model.generate, KV cache) (~250 s); GENERATE_ARGS adds options (e.g. --tf32, --prefill-autocast)
#   matvecs    the one-token step's matrix-vector launches at 125m (bench_step_matvecs.py): matvecs_triton under
#              each launch configuration against cuBLAS and the card's read bandwidth, replayed from CUDA graphs (~150 s)
#   prefill    the prefill's recurrence, A/B in one call: the generate suite (GENERATE_MODES default "fused", GENERATE_ARGS
#              default "--tf32") with the chunk-parallel forward (wkv7's choice for a prompt at small batch) into
#              $out/prefill_chunk, then with HIERARCHOS_WKV_IMPL=triton (the sequential kernel everywhere) into
#              $out/prefill_sequential (~2 x 140 s)
#   blocks     training steps of the seeds' other cells at 125m minimal, T=1024 and 8192: attention
#              blocks (full, window 512) and WKV-4, beside RWKV-7 and a compiled GPT-2 (~360 s: T=8192 rows need
#              ~40-100 s for their first step)
#   chat       chat on CUDA with its default (the captured step) against --no-cuda-graph: a tiny model
#              trained for 30 steps, greedy replies compared, /status shown (~60 s)
#   quality    one learning-quality table (bench_quality.py; QUALITY_TABLE, default blocks; QUALITY_ARGS, e.g.
#              "--tokens 10000000 --jobs 6 --only RWKV_7__ours_ attention__RoPE"), QUALITY_TIMEOUT s (default 480);
#              each process takes ~9 GB at the blocks table's size (--jobs 7 fits an 80 GB card, 11 did not);
#              finished runs are cached: the ones in bench/records/quality_runs/ (committed) and carried in
#              .device_cache/quality_runs/ are reused and every
#              finished run comes back in quality_runs_TABLE.tgz (unpack it into .device_cache/quality_runs to resume);
#              QUALITY_WORK (default /tmp/hq) names the work folder, so that two tables can run side by side;
#              builds the C++ kernel first when the machine lacks it (~40 s: without it `train` feeds ROSA's
#              hints from the Python automaton on a thread that holds the GIL while it works)
#   puzzles    9x9 Sudoku (bench_puzzles.py): generate 1,000 + 1,000 hard puzzles (or reuse the carried
#              .device_cache/sudoku), time the training step (reference loop, fast step, CUDA-graph segments;
#              PUZZLE_TIME_STEPS=0 skips it; PUZZLE_COMPILE=1 adds compiled RWKV blocks, to the timing as one more
#              variant and to the training runs), then hierarchos RWKV-7 + the same-size Transformer (same steps) beside
#              hierarchos attention stacks, two processes sharing the GPU, each sized to PUZZLE_MINUTES of
#              training (default 5); the data comes back in sudoku.tgz. Two suites can share the GPU:
#              bash bench/gpu.sh quality & sleep 30; PUZZLE_WORKERS=8 bash bench/gpu.sh puzzles & wait
#   quantmodel train the quantization-quality model (bench_quant_quality --size code: ~11.7M, Python
#              sources, byte tokenizer) and leave it under $out/model in <16 MiB pieces, with the
#              held-out and calibration texts, for scoring on a CPU (~200 s)
#   original   the original project (github.com/necat101/Hierarchos) at its default shape (768 wide, B=16,
#              T=128, max_h_steps 5, max_l_steps 5) in its own train loop, against ours (the train command,
#              same shape, 1 + 1 layers, one round): bench_original.py, ORIGINAL_ARGS (default
#              "--steps 2 --warmup 1"), each model's process bounded by ORIGINAL_MODEL_TIMEOUT s (180).
#              Carry .device_cache/original, the original's snapshot (ignored by git, ~10 MB; neither model
#              needs the .whl wheels here), made here by
#                mkdir -p .device_cache/original && git -C /work/.mirror/necat101+Hierarchos/repo archive \
#                  10674eef73b2f3694c360806b4952b87af59abe8 | tar -x -C .device_cache/original && \
#                  echo 10674eef73b2f3694c360806b4952b87af59abe8 > .device_cache/original/ORIGINAL_COMMIT
#              (or from a clone of the original at that commit; ORIGINAL_DIR overrides the folder). The
#              original compiles its worker loop on CUDA by default (with autotuning: on an H100 its first
#              step outlasted 210 s); when that run does not finish, the same call times it eager
#              (--no-compile, row original-eager, ~60 s) and takes the ratio against that (--eager-fallback;
#              ~420 s in all). Its memory on the CPU (float32, RSS) grows about 14 MiB per token of the batch
#              over 8.4 GiB: about 37 GiB at B=16, T=128 (BENCHMARKS.md); if a card runs out, ask for an H200
#   forward    bench_forward.py on CUDA with FORWARD_ARGS (size FORWARD_SIZE, default 125m): any table of it
#   train-compile  `train` on the bundled corpus, eager and --compile (compiled RWKV blocks), TRAIN_COMPILE_STEPS
#              steps (40): time to the first log and median tokens/s after it (~250 s)
#   train-bundled  `train` on the bundled corpus, default architecture, TRAIN_EPOCHS epochs (20; ~260 s bound)
#   generate-contexts  bench_generate.py at sizes small and 125m with 1k / 8k / 32k tokens of context (~300 s)
#   host-formats  the device host's CPU (2 threads, taskset): build the C++ kernel, then bench_generate.py
#              --formats at 125m, fp32 against each quantized format (~240 s)
#   ddp        (kind nvidia-h200-x2 or larger) DDP scaling of `train` on the bundled corpus: torchrun with 1 and
#              DDP_PROCS (2) processes, DDP_STEPS (40) steps each, eager; wall-clock and median rates
#   vulkan     the Vulkan backend on the NVIDIA driver: VULKAN_DIR (default build/vkdev, carried) holds the
#              loader .debs (gl/), headers + glslc + libshaderc (sdk/) and the gguf wheel (whl/), made on a
#              Debian/Ubuntu machine: apt-get download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0
#              libgles2 into gl/; vulkan/{vulkan.h,vulkan_core.h,vk_platform.h} and vk_video/ from libvulkan-dev
#              into sdk/include; sdk/bin/glslc and sdk/lib/libshaderc.so.1 from glslc and libshaderc1. Builds
#              hierarchos_vulkan, runs tests/test_vulkan.py, then bench_vulkan.py with VULKAN_ARGS
set -uo pipefail
source bench/gpu_env.sh  # $out, carried wheels, PYTHONPATH, $out/gpu.txt
python3 -c "import fla; print('fla-core', fla.__version__)" 2>&1 | tee "$out/fla_version.txt"

ensure_kernel() {  # the C++ kernel (ROSA automaton, WKV step) once per machine: `train` without it feeds
  # ROSA's hints from the pure-Python automaton (the quality tables' runs of 2026-12-06 did)
  (  # one build at a time when two suites start side by side; the second finds the first's
    flock 9
    python3 -c "import hierarchos.hierarchos_kernels" 2>/dev/null && exit 0
    timeout 150 python3 kernels/build.py --jobs 16 --require > "$out/kernel_build.log" 2>&1 \
      || echo "kernel build failed (see kernel_build.log); training uses the Python automaton" | tee -a "$out/suites.txt"
  ) 9>/tmp/hierarchos_kernel_build.lock
}

corpus() {  # ~11 MB of text from the repository's own sources, repeated
  local path=/tmp/corpus.txt
  [ -s $path ] && return
  cat $(git ls-files '*.py' '*.md' 2>/dev/null || find . -name '*.py') > /tmp/corpus_once.txt
  while [ "$(stat -c %s $path 2>/dev/null || echo 0)" -lt 11000000 ]; do cat /tmp/corpus_once.txt >> $path; done
}

for suite in "$@"; do
  echo "=== suite $suite" | tee -a "$out/suites.txt"
  start=$SECONDS
  case $suite in
    wkv)
      timeout ${WKV_TIMEOUT:-220} python3 bench/bench_wkv.py ${WKV_ARGS:---no-sweep --no-chunked --reps 10} --json "$out/wkv.json" 2>&1 \
        | tee "$out/wkv.log" ;;
    wkv-model)
      timeout 150 python3 bench/bench_forward.py --device cuda --size 125m --seq-lens 1024 8192 --configs minimal \
        --no-rosa-for --cuda-graphs minimal --wkv-impls triton fla --optimizer --steps 3 --warmup 2 \
        --max-seconds-per-row 25 --no-check --no-flops --json "$out/forward_wkv_impls.json" 2>&1 \
        | tee "$out/forward_wkv_impls.log" ;;
    stall)
      corpus
      args="--train /tmp/corpus.txt --tokenizer-path byte --context_dim 512 --h_hidden 512 --l_hidden 512
            --h_layers 3 --l_layers 3 --h_cycles 1 --max_h_steps 1 --max_l_steps 0 --max_length 512
            --batch_size 32 --epochs 1 --max-steps ${STALL_STEPS:-300} --log-every 1 --starting-lr 4e-4"
      for mode in ${STALL_MODES:-gc nogc}; do
        pre="import sys, runpy"; [ $mode = nogc ] && pre="$pre, gc; gc.disable()"
        timeout 70 python3 -c "$pre; sys.argv[0] = 'hierarchos_cli.py'; runpy.run_path('hierarchos_cli.py', run_name='__main__')" \
          train $args --out-dir /tmp/stall_$mode 2>&1 | tr '\r' '\n' | grep -v '^ *$' | tail -n 30 > "$out/train_$mode.log"
        cp /tmp/stall_$mode/metrics.jsonl "$out/train_${mode}_metrics.jsonl" 2>/dev/null
      done
      python3 bench/compare_train_runs.py --stalls "$out" ${STALL_MODES:-gc nogc} | tee "$out/stall_summary.txt" ;;
    table)  # a row per WKV implementation when fla-core is there
      impls=""; python3 -c "import fla" 2>/dev/null && impls="--wkv-impls triton fla"
      timeout 230 python3 bench/bench_forward.py --device cuda --size 125m --seq-lens 1024 \
        --configs minimal default --no-rosa-for --cuda-graphs minimal default --compile ${TABLE_COMPILE:-gpt2} --optimizer $impls \
        --wirings ${TABLE_WIRINGS:-x070} --steps 4 --warmup 2 --max-seconds-per-row 45 --check \
        --json "$out/forward_table_1024.json" 2>&1 \
        | tee "$out/forward_table_1024.log"
      timeout 140 python3 bench/bench_forward.py --device cuda --size 125m --seq-lens 8192 --configs minimal \
        --no-rosa-for --cuda-graphs minimal --compile ${TABLE_COMPILE:-gpt2} --optimizer $impls --steps 4 --warmup 2 \
        --max-seconds-per-row 45 --no-check --json "$out/forward_table_8192.json" 2>&1 \
        | tee "$out/forward_table_8192.log" ;;
    train-loop)
      ensure_kernel
      timeout ${TRAIN_LOOP_TIMEOUT:-420} python3 bench/bench_train_loop.py --device cuda --timeout 250 \
        --work-dir /tmp/train_loop --ours-variants "" " --no-compile" ${TRAIN_LOOP_ARGS:-} --json "$out/train_loop.json" 2>&1 \
        | tee "$out/train_loop.log"
      for f in /tmp/train_loop/ours*.log; do cp "$f" "$out/train_loop_$(basename $f)" 2>/dev/null; done ;;
    table-compiled)  # the trainer's CUDA default: compiled RWKV blocks under the CUDA graph, graphs rows only
      timeout ${TABLE_TIMEOUT:-200} python3 bench/bench_forward.py --device cuda --size 125m --seq-lens 1024 \
        --configs minimal default --no-rosa-for --cuda-graphs minimal default --skip-eager --compile both --optimizer \
        --steps 4 --warmup 2 --max-seconds-per-row 120 --no-check --json "$out/forward_table_compiled_1024.json" 2>&1 \
        | tee "$out/forward_table_compiled_1024.log"
      timeout ${TABLE_TIMEOUT:-200} python3 bench/bench_forward.py --device cuda --size 125m --seq-lens 8192 \
        --configs minimal --no-rosa-for --cuda-graphs minimal --skip-eager --compile both --optimizer --steps 4 \
        --warmup 2 --max-seconds-per-row 120 --no-check --json "$out/forward_table_compiled_8192.json" 2>&1 \
        | tee "$out/forward_table_compiled_8192.log" ;;
    memory)  # the 125m minimal T=1024 step's peak (compiled blocks + graphs) with the WKV start states held and
             # recomputed, then with an activation budget (MEMORY_BUDGET, default 0.6; recomputed states), vs GPT-2
      timeout ${MEMORY_TIMEOUT:-300} python3 bench/bench_forward.py --device cuda --size 125m --seq-lens 1024 \
        --configs minimal --no-rosa-for --cuda-graphs minimal --skip-eager --compile both --optimizer --steps 4 \
        --warmup 2 --max-seconds-per-row 120 --no-check --no-flops --wkv-states held recomputed \
        --json "$out/forward_memory_states.json" 2>&1 | tee "$out/forward_memory_states.log"
      timeout ${MEMORY_TIMEOUT:-300} python3 bench/bench_forward.py --device cuda --size 125m --seq-lens 1024 \
        --configs minimal --no-rosa-for --cuda-graphs minimal --skip-eager --compile both --optimizer --steps 4 \
        --warmup 2 --max-seconds-per-row 120 --no-check --no-flops --activation-budget ${MEMORY_BUDGET:-0.6} \
        --json "$out/forward_memory_budget.json" 2>&1 | tee "$out/forward_memory_budget.log" ;;
    profile)
      timeout ${PROFILE_TIMEOUT:-240} python3 bench/profile_forward.py --device cuda \
        ${PROFILE_ARGS:---size 30m-byte --seq-len 512 --batch 32 --models hierarchos:minimal gpt2 --compile --memory --kernels 40} \
        --json "$out/profile.json" 2>&1 | tee "$out/profile.log" ;;
    tests)
      timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -rf -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/pytest_gpu.log" ;;
    kernel)
      timeout 150 python3 kernels/build.py --jobs 16 --require 2>&1 | tee "$out/kernel_build.log" ;;
    prefill)
      for variant in chunk sequential; do
        mkdir -p "$out/prefill_$variant"
        impl=$([ $variant = sequential ] && echo triton || echo "")
        HIERARCHOS_WKV_IMPL=$impl OUT="$out/prefill_$variant" GENERATE_MODES=${GENERATE_MODES:-fused} \
          GENERATE_ARGS=${GENERATE_ARGS:---tf32} GENERATE_TIMEOUT=${GENERATE_TIMEOUT:-150} GENERATE_BUDGET=${GENERATE_BUDGET:-110} \
          bash "$0" generate
      done ;;
    generate)
      timeout ${GENERATE_TIMEOUT:-280} python3 bench/bench_generate.py --device cuda --size 125m --contexts 1024 \
        --new-tokens 128 --batch 1 --cuda-graph --configs default minimal --gpt2 --skip-step-rows \
        --compile-step ${GENERATE_MODES:-off off+full fused fused+full} --budget-s ${GENERATE_BUDGET:-200} ${GENERATE_ARGS:-} \
        --json "$out/generate_cuda.json" 2>&1 | tee "$out/generate_cuda.log" ;;
    matvecs)
      timeout ${MATVECS_TIMEOUT:-240} python3 bench/bench_step_matvecs.py ${MATVECS_ARGS:-} --json "$out/step_matvecs.json" 2>&1 \
        | tee "$out/step_matvecs.log" ;;
    blocks)
      timeout ${BLOCKS_TIMEOUT:-420} python3 bench/bench_forward.py --device cuda --size 125m --seq-lens ${BLOCKS_SEQ_LENS:-1024 8192} \
        --configs minimal --no-rosa-for --blocks rwkv7 attention attention-window wkv4 --window-size 512 --compile gpt2 \
        --optimizer --steps 4 --warmup 2 --max-seconds-per-row ${BLOCKS_ROW_SECONDS:-80} --no-check --json "$out/forward_blocks.json" 2>&1 \
        | tee "$out/forward_blocks.log" ;;
    chat)
      cp README.md /tmp/chat_corpus.txt  # train reads .txt/.json/.jsonl/.csv/.parquet
      timeout 90 python3 hierarchos_cli.py train --tiny --tokenizer-path byte --train /tmp/chat_corpus.txt --max-steps 30 \
        --max_length 128 --batch_size 8 --device cuda --out-dir /tmp/chat_m 2>&1 | tr '\r' '\n' | tail -n 5 > "$out/chat.log"
      ok=1
      for mode in cuda-graph no-cuda-graph; do
        flag=""; [ $mode = no-cuda-graph ] && flag=--no-cuda-graph
        printf 'hello there\n/status\nand again\n' | timeout 60 python3 hierarchos_cli.py chat --model-path /tmp/chat_m \
          --device cuda --temperature 0 --max-new-tokens 48 --seed 1 --no-learn $flag > /tmp/chat_$mode.out 2> /tmp/chat_$mode.err
        code=$?; echo "== $mode: exit $code" >> "$out/chat.log"; cat /tmp/chat_$mode.out /tmp/chat_$mode.err >> "$out/chat.log"
        { [ $code = 0 ] && [ -s /tmp/chat_$mode.out ]; } || ok=0
      done
      grep -q "CUDA graph: 1 captured" /tmp/chat_cuda-graph.out /tmp/chat_cuda-graph.err || ok=0
      if [ $ok = 1 ] && cmp -s /tmp/chat_cuda-graph.out /tmp/chat_no-cuda-graph.out; then
        echo "chat: PASS (exit 0, replies, the graph captured, same greedy replies without it)" | tee -a "$out/chat.log"
      else
        echo "chat: FAIL (see chat.log)" | tee -a "$out/chat.log"
      fi ;;
    quality)
      table=${QUALITY_TABLE:-blocks}; work=${QUALITY_WORK:-/tmp/hq}
      ensure_kernel
      mkdir -p $work/runs; cp bench/records/quality_runs/*.json .device_cache/quality_runs/*.json $work/runs/ 2>/dev/null
      echo "carried runs: $(ls $work/runs | wc -l)" | tee "$out/quality_$table.log"
      timeout ${QUALITY_TIMEOUT:-480} python3 bench/bench_quality.py --table $table --work $work ${QUALITY_ARGS:-} 2>&1 \
        | tee -a "$out/quality_$table.log"
      (cd $work && tar czf "$out/quality_runs_$table.tgz" runs $(ls *.json corpus/manifest-*.json 2>/dev/null) \
        $(ls models/*/train.log models/*/out/metrics.jsonl 2>/dev/null)) ;;
    puzzles)
      data=/tmp/sudoku
      if [ -s .device_cache/sudoku/test.safetensors ]; then cp -r .device_cache/sudoku $data
      else timeout 240 python3 hierarchos_cli.py puzzle generate --out $data --train 1000 --test 1000 --workers ${PUZZLE_WORKERS:-16} \
             --seed 0 2>&1 | tr '\r' '\n' | tail -n 5 | tee "$out/puzzles_generate.log"; fi
      tar czf "$out/sudoku.tgz" -C /tmp sudoku
      # the step's speed alone on the GPU first: reference loop vs fast step vs captured segments (capture
      # worked? replays / eager_segments; graph pools' memory; weight difference from the reference)
      [ "${PUZZLE_TIME_STEPS:-5}" -gt 0 ] && timeout ${PUZZLE_TIME_TIMEOUT:-300} python3 bench/bench_puzzles.py \
        --device cuda --data $data --time-steps ${PUZZLE_TIME_STEPS:-5} --rounds 3 \
        --models hierarchos-rwkv7 hierarchos-attention ${PUZZLE_COMPILE:+--compile} --out "$out/puzzles_step.json" 2>&1 \
        | tee "$out/puzzles_step.log"
      m=${PUZZLE_MINUTES:-5}
      timeout ${PUZZLE_TIMEOUT:-540} python3 bench/bench_puzzles.py --device cuda --data $data --minutes $m \
        ${PUZZLE_COMPILE:+--compile} --models hierarchos-rwkv7 transformer --out "$out/puzzles_rwkv7.json" > "$out/puzzles_rwkv7.log" 2>&1 &
      timeout ${PUZZLE_TIMEOUT:-540} python3 bench/bench_puzzles.py --device cuda --data $data --minutes $m \
        ${PUZZLE_COMPILE:+--compile} --models hierarchos-attention --out "$out/puzzles_attention.json" > "$out/puzzles_attention.log" 2>&1 &
      wait
      tail -n 12 "$out/puzzles_rwkv7.log" "$out/puzzles_attention.log" ;;
    quantmodel)
      timeout ${QUANT_TIMEOUT:-320} python3 bench/bench_quant_quality.py --train --corpus code --size code \
        --code-train-bytes ${QUANT_TRAIN_BYTES:-20000000} --device cuda --threads 8 --no-table --work-dir /tmp/qq 2>&1 \
        | tr '\r' '\n' | grep -v '^ *$' | tail -n 60 > "$out/quant_train.log"
      mkdir -p "$out/model"
      split -b 15M /tmp/qq/model-code/model.safetensors "$out/model/model.safetensors.part-"
      tar cf "$out/model/texts_and_config.tar" -C /tmp/qq heldout.txt calibration.txt model-code/hierarchos_config.json \
        model-code/hierarchos_tokenizer.json model-code/tokenizer.json model-code/metrics.jsonl ;;
    original)
      orig=${ORIGINAL_DIR:-.device_cache/original}
      timeout ${ORIGINAL_TIMEOUT:-580} python3 bench/bench_original.py --original "$orig" --device cuda \
        --timeout ${ORIGINAL_MODEL_TIMEOUT:-180} ${ORIGINAL_ARGS:---steps 2 --warmup 1} --eager-fallback \
        --work-dir /tmp/bench_original --json "$out/original.json" 2>&1 | tee "$out/original.log"
      cp /tmp/bench_original/original.log "$out/original_train.log" 2>/dev/null
      cp /tmp/bench_original/original_default.log "$out/original_default_train.log" 2>/dev/null
      cp /tmp/bench_original/ours.log "$out/ours_train.log" 2>/dev/null ;;
    forward)
      size=${FORWARD_SIZE:-125m}
      timeout ${FORWARD_TIMEOUT:-580} python3 bench/bench_forward.py --device cuda --size $size \
        --json "$out/forward_cuda_$size.json" ${FORWARD_ARGS:-} 2>&1 | tee "$out/bench_forward_$size.log" ;;
    train-compile)
      for mode in no-compile compile; do
        flag="--no-compile"; [ "$mode" = compile ] && flag="--compile"
        begin=$(date +%s.%N)
        timeout 300 python3 hierarchos_cli.py train --epochs 20 --max-steps ${TRAIN_COMPILE_STEPS:-40} --max_length 512 \
          --batch_size 16 --starting-lr 4e-4 --warmup-steps 10 --log-every 5 $flag --out-dir "/tmp/run_$mode" 2>&1 \
          | tr '\r' '\n' | grep -v '^ *$' > "$out/train_$mode.log"
        end=$(date +%s.%N)
        cp "/tmp/run_$mode/metrics.jsonl" "$out/train_${mode}_metrics.jsonl" 2>/dev/null
        python3 - "$out/train_${mode}_metrics.jsonl" "$mode" "$begin" "$end" <<'PY'
import json, os, sys
path, mode, start, end = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
if not rows:
    print(f"{mode}: no metrics (see train_{mode}.log)"); sys.exit()
steady = sorted(r["tokens_per_s"] for r in rows[2:]) or [rows[-1]["tokens_per_s"]]
print(f"{mode}: wall {end - start:.0f} s, first log (step {rows[0]['step']}) after {rows[0]['time'] - start:.0f} s, "
      f"median tokens/s after it {steady[len(steady) // 2]:,.0f}, final loss {rows[-1]['loss']:.3f}")
PY
        grep -E "^(compile|model|gpu):" "$out/train_$mode.log"
      done 2>&1 | tee "$out/compile_summary.txt" ;;
    train-bundled)
      timeout 260 python3 hierarchos_cli.py train --epochs ${TRAIN_EPOCHS:-20} --max_length 512 --batch_size 16 \
        --starting-lr 1e-3 --warmup-steps 20 --log-every 5 --out-dir /tmp/run_bundled 2>&1 | tr '\r' '\n' \
        | grep -v '^ *$' | tee "$out/train_bundled.log" | grep -vE "it/s|win/s" | tail -n 40
      cp /tmp/run_bundled/metrics.jsonl "$out/train_bundled_metrics.jsonl" 2>/dev/null ;;
    generate-contexts)
      for size in small 125m; do
        timeout 150 python3 bench/bench_generate.py --device cuda --size $size --contexts 1024 8192 32768 \
          --new-tokens 64 --json "$out/generate_cuda_$size.json" 2>&1 | tee "$out/generate_cuda_$size.log"
      done ;;
    host-formats)
      python3 kernels/build.py > "$out/kernel_build.log" 2>&1 || tail -n 5 "$out/kernel_build.log"
      OMP_NUM_THREADS=2 HIERARCHOS_THREADS=2 timeout 240 taskset -c 0,1 python3 bench/bench_generate.py --device cpu \
        --size 125m --contexts 256 --new-tokens 24 --rounds 2 --formats fp32 Q4_0 Q8_0 INT4 Q2_K \
        --json "$out/generate_cpu_125m_formats_devicehost.json" 2>&1 | tee "$out/generate_formats.log" | tail -n 12 ;;
    ddp)
      n=${DDP_PROCS:-2}; steps=${DDP_STEPS:-40}
      for procs in 1 "$n"; do
        NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 timeout 240 torchrun --standalone \
          --nproc_per_node="$procs" hierarchos_cli.py train --epochs 100 --max-steps "$steps" --max_length 512 \
          --batch_size 16 --starting-lr 4e-4 --warmup-steps 10 --log-every 5 --val-fraction 0 --save-every 0 \
          --no-cuda-graphs --out-dir "/tmp/ddp$procs" > "$out/ddp_$procs.log" 2>&1
        echo "torchrun --nproc_per_node=$procs: rc $?"
        cp "/tmp/ddp$procs/metrics.jsonl" "$out/ddp_${procs}_metrics.jsonl" 2>/dev/null
      done
      # two rates per run: wall-clock over steps 10..last from the metrics' timestamps (checkpoints and
      # evaluation included: the robust one), and the median of rank 0's per-window tokens/s x ranks
      python3 - "$out" "$n" 16 512 <<'PY' | tee "$out/ddp_summary.txt"
import json, statistics, sys
out, n, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
wall = {}
for procs in (1, n):
    try:
        rows = [json.loads(line) for line in open(f"{out}/ddp_{procs}_metrics.jsonl")]
    except OSError:
        print(f"{procs} GPU(s): no metrics"); continue
    t = {r["step"]: r["time"] for r in rows}
    first, last = min(s for s in t if s >= 10), max(t)
    wall[procs] = (last - first) * batch * seq * procs / (t[last] - t[first])
    median = statistics.median(r["tokens_per_s"] for r in rows if r["step"] > 10) * procs
    print(f"{procs} GPU(s): {wall[procs]:,.0f} tokens/s wall-clock (steps {first}-{last}), "
          f"{median:,.0f} tokens/s median per-window, final loss {rows[-1]['loss']:.3f}")
if 1 in wall and n in wall:
    print(f"speed-up {wall[n] / wall[1]:.2f}x on {n} GPUs (wall-clock), scaling efficiency {wall[n] / wall[1] / n:.1%}")
PY
      ;;
    vulkan)
      (  # a subshell: the loader's environment stays out of later suites
        dir=$(cd "${VULKAN_DIR:-build/vkdev}" && pwd) || exit 1
        for deb in "$dir"/gl/*.deb; do dpkg -x "$deb" /; done  # the loader (and glvnd) into /
        ldconfig
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$dir"/whl/*.whl
        export VULKAN_SDK="$dir/sdk" LD_LIBRARY_PATH="$dir/sdk/lib:${LD_LIBRARY_PATH:-}" PYTHONPATH=".:/tmp/site:${PYTHONPATH:-}"
        python3 kernels/build.py --vulkan --jobs "$(nproc)" 2>&1 | tee "$out/build.log"
        vk_status() { python3 -c "from hierarchos.quant import vulkan; print(vulkan.vulkan_status() or vulkan.device_info())"; }
        if vk_status | grep -q "no Vulkan"; then  # the NVIDIA ICD manifest lives outside the loader's search path
          export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json \
            VK_ICD_FILENAMES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
        fi
        vk_status | tee -a "$out/gpu.txt"
        HIERARCHOS_REQUIRE_VULKAN=1 python3 -m pytest -q -p no:cacheprovider tests/test_vulkan.py 2>&1 \
          | tee "$out/pytest_vulkan_gpu.log"
        python3 bench/bench_vulkan.py --json "$out/vulkan_gpu.json" ${VULKAN_ARGS:-} 2>&1 | tee "$out/bench_vulkan.log"
      ) ;;
    *) echo "unknown suite $suite (wkv, wkv-model, stall, table, table-compiled, train-loop, memory, profile, tests, kernel,"\
         "generate, matvecs, prefill, blocks, chat, quality, puzzles, quantmodel, original, forward, train-compile,"\
         "train-bundled, generate-contexts, host-formats, ddp, vulkan)"; exit 2 ;;
  esac
  echo "=== suite $suite: $((SECONDS - start)) s" | tee -a "$out/suites.txt"
done
