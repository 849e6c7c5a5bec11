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
#              fla caches its autotune results on disk, so later suites of the same call start faster)
#   wkv-model  hierarchos 125m minimal, full training steps (clip + optimizer), one row per WKV
#              implementation (triton, fla), T=1024 and 8192, eager and under a CUDA graph (~150 s)
#   stall      the `train` command at ~30M (byte tokenizer, width 512, 3 + 3 layers, T=512, B=32,
#              minimal reasoning), every window logged, with Python's garbage collector on and off:
#              does a periodic slow window come from the collector? (~140 s)
#   table      the training-throughput table: 125m minimal at T=1024 and T=8192 and default at T=1024
#              against a compiled GPT-2 of equal size, full training steps for both (clip + fused
#              AdamW; hierarchos with the trainer's optimizer), with the float32 parity preamble (~330 s)
#   tests      the GPU-marked tests (~100 s warm; fla's cold autotune made them outlast 200 s once)
#   kernel     build the C++ kernel on the device (the ROSA automaton and WKV step the trainer uses; ~40 s)
#   generate   batch-1 generation at 125m, default and minimal reasoning, eager step, sync-free step and
#              CUDA graph, against a Hugging Face GPT-2 of the same size (model.generate, KV cache) (~150 s)
#   blocks     training steps of the seeds' other cells at 125m minimal, T=1024 and 8192: attention
#              blocks (full, window 512) and WKV-4, beside RWKV-7 and a compiled GPT-2 (~360 s: T=8192 rows need
#              ~40-100 s for their first step)
#   chat       chat on CUDA with its default (the captured step) against --no-cuda-graph: a tiny model
#              trained for 30 steps, greedy replies compared, /status shown (~60 s)
#   quality    one learning-quality table (bench_quality.py; QUALITY_TABLE, default blocks; QUALITY_ARGS, e.g.
#              "--tokens 10000000 --jobs 6 --only RWKV_7__ours_ attention__RoPE"), QUALITY_TIMEOUT s (default 480);
#              finished runs are cached: the ones carried in .device_cache/quality_runs/ are reused and every
#              finished run comes back in quality_runs.tgz (unpack it into .device_cache/quality_runs to resume)
#   puzzles    9x9 Sudoku (bench_puzzles.py): generate 1,000 + 1,000 hard puzzles (or reuse the carried
#              .device_cache/sudoku), then hierarchos RWKV-7 + the same-size Transformer (same steps) beside
#              hierarchos attention stacks, two processes sharing the GPU, each sized to PUZZLE_MINUTES of
#              training (default 5); the data comes back in sudoku.tgz. Two suites can share the GPU:
#              bash bench/gpu.sh quality & sleep 30; PUZZLE_WORKERS=8 bash bench/gpu.sh puzzles & wait
#   quantmodel train the quantization-quality model (bench_quant_quality --size code: ~11.7M, Python
#              sources, byte tokenizer) and leave it under $out/model in <16 MiB pieces, with the
#              held-out and calibration texts, for scoring on a CPU (~200 s)
set -uo pipefail
source bench/gpu_env.sh  # $out, carried wheels, PYTHONPATH, $out/gpu.txt
python3 -c "import fla; print('fla-core', fla.__version__)" 2>&1 | tee "$out/fla_version.txt"

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
      timeout 220 python3 bench/bench_wkv.py --no-sweep --no-chunked --reps 10 --json "$out/wkv.json" 2>&1 \
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
        --configs minimal default --no-rosa-for --cuda-graphs minimal default --compile gpt2 --optimizer $impls \
        --steps 4 --warmup 2 --max-seconds-per-row 45 --check --json "$out/forward_table_1024.json" 2>&1 \
        | tee "$out/forward_table_1024.log"
      timeout 140 python3 bench/bench_forward.py --device cuda --size 125m --seq-lens 8192 --configs minimal \
        --no-rosa-for --cuda-graphs minimal --compile gpt2 --optimizer $impls --steps 4 --warmup 2 \
        --max-seconds-per-row 45 --no-check --json "$out/forward_table_8192.json" 2>&1 \
        | tee "$out/forward_table_8192.log" ;;
    tests)
      timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -rf -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/pytest_gpu.log" ;;
    kernel)
      timeout 150 python3 kernels/build.py --jobs 16 --require 2>&1 | tee "$out/kernel_build.log" ;;
    generate)
      timeout ${GENERATE_TIMEOUT:-200} python3 bench/bench_generate.py --device cuda --size 125m --contexts 1024 \
        --new-tokens 128 --batch 1 --cuda-graph --configs default minimal --gpt2 --json "$out/generate_cuda.json" 2>&1 \
        | tee "$out/generate_cuda.log" ;;
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
      table=${QUALITY_TABLE:-blocks}; work=/tmp/hq
      mkdir -p $work/runs; cp .device_cache/quality_runs/*.json $work/runs/ 2>/dev/null
      echo "carried runs: $(ls $work/runs | wc -l)" | tee "$out/quality_$table.log"
      timeout ${QUALITY_TIMEOUT:-480} python3 bench/bench_quality.py --table $table --work $work ${QUALITY_ARGS:-} 2>&1 \
        | tee -a "$out/quality_$table.log"
      (cd $work && tar czf "$out/quality_runs.tgz" runs $(ls *.json corpus/manifest-*.json 2>/dev/null) \
        $(ls models/*/train.log models/*/out/metrics.jsonl 2>/dev/null)) ;;
    puzzles)
      data=/tmp/sudoku
      if [ -s .device_cache/sudoku/test.safetensors ]; then cp -r .device_cache/sudoku $data
      else timeout 240 python3 hierarchos_cli.py puzzle generate --out $data --train 1000 --test 1000 --workers ${PUZZLE_WORKERS:-16} \
             --seed 0 2>&1 | tr '\r' '\n' | tail -n 5 | tee "$out/puzzles_generate.log"; fi
      tar czf "$out/sudoku.tgz" -C /tmp sudoku
      m=${PUZZLE_MINUTES:-5}
      timeout ${PUZZLE_TIMEOUT:-540} python3 bench/bench_puzzles.py --device cuda --data $data --minutes $m \
        --models hierarchos-rwkv7 transformer --out "$out/puzzles_rwkv7.json" > "$out/puzzles_rwkv7.log" 2>&1 &
      timeout ${PUZZLE_TIMEOUT:-540} python3 bench/bench_puzzles.py --device cuda --data $data --minutes $m \
        --models hierarchos-attention --out "$out/puzzles_attention.json" > "$out/puzzles_attention.log" 2>&1 &
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
    *) echo "unknown suite $suite (wkv, wkv-model, stall, table, tests, kernel, generate, blocks, chat, quality, puzzles, quantmodel)"; exit 2 ;;
  esac
  echo "=== suite $suite: $((SECONDS - start)) s" | tee -a "$out/suites.txt"
done
