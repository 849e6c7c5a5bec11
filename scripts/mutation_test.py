"""Mutation testing of the core modules with mutmut (not part of CI; see TESTING.md).

Each module is mutated in its own scratch copy of the checkout (tracked and untracked files plus
the built kernels), against the fast tests that pin it, so a mutant runs only the tests that
exercise the mutated function (mutmut's per-function test selection) and the working tree is never
touched. Prints a table of killed / survived / timed-out mutants per module and writes JSON with
every surviving mutant's name, for TESTING.md.

    pip install mutmut==3.8.1
    python scripts/mutation_test.py                          # every module below
    python scripts/mutation_test.py --modules hierarchos/model/hrm.py --jobs 2
    python scripts/mutation_test.py --show SURVIVOR_NAME    # the diff of one surviving mutant

mutmut skips decorated functions; in the scratch copy each one is split into a plain
`_name__undecorated` (mutated) and the decorated `name` that forwards to it (`undecorate`), so
`--only 'hierarchos.io.*__undecorated*'` scores io's context managers.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> the fast tests that pin it (its own test module first, then the contract tests)
MODULES: dict[str, list[str]] = {
    "hierarchos/model/hrm.py": ["tests/test_hrm.py", "tests/test_q_halting.py", "tests/test_sync_free_step.py",
                                "tests/test_model.py"],  # (its float32 parity tests take the one-token plan)
    "hierarchos/model/rwkv.py": ["tests/test_rwkv_cell.py", "tests/test_time_mix_wiring.py",
                                 "tests/test_rwkv_step_triton.py", "-m", "not slow and not gpu"],  # (TimeMix._fused_step)
    "hierarchos/model/lm.py": ["tests/test_lm_rules.py", "tests/test_step_threads.py"],
    "hierarchos/model/attention.py": ["tests/test_attention_rules.py", "tests/test_attention.py",  # not its CLI run:
                                      "--deselect", "tests/test_attention.py::test_cli_trains_attention_stacks_and_chats"],
    "hierarchos/model/deepembed.py": ["tests/test_embedding_tables.py"],
    "hierarchos/model/puzzle_embedding.py": ["tests/test_embedding_tables.py"],
    "hierarchos/model/losses.py": ["tests/test_losses.py", "tests/test_q_halting.py"],
    "hierarchos/model/state.py": ["tests/test_state.py", "tests/test_model.py"],
    "hierarchos/model/rosa.py": ["tests/test_rosa.py", "tests/test_rosa_rules.py"],
    "hierarchos/ops/wkv.py": ["tests/test_wkv.py", "tests/test_wkv_rules.py"],
    "hierarchos/ops/wkv_inputs.py": ["tests/test_wkv.py", "tests/test_wkv_rules.py"],
    # wkv4: not its CLI run (20 s, a child process) nor the 5 s compile test (agreement only; the op tests
    # pin the rule); test_wkv4_triton for the dispatch to the Triton kernel (interpreted, not the GPU tests)
    "hierarchos/ops/wkv4.py": ["tests/test_wkv4.py", "tests/test_wkv4_rules.py",
                               "tests/test_wkv4_triton.py", "-m", "not slow and not gpu",
                               "--deselect", "tests/test_wkv4.py::test_cli_trains_a_wkv4_model_quantizes_and_chats",
                               "--deselect", "tests/test_wkv4.py::test_compiled_wkv4_blocks_compute_the_same_function"],
    "hierarchos/ops/aligned.py": ["tests/test_aligned.py"],
    "hierarchos/ops/amp.py": ["tests/test_amp.py", "tests/test_model.py"],
    "hierarchos/quant/fused_step.py": ["tests/test_quant_fused_step.py"],  # needs the built kernel (copied)
    # the samplers and the noise (the generation loops have their own, slower tests: chat, generate_batch)
    "hierarchos/generate.py": ["tests/test_sync_free_step.py", "tests/test_noise_triton.py", "-m", "not gpu", "-k",
                               "sample or sampling or race or noise or truncated or body or split"],
    "hierarchos/model/memory.py": ["tests/test_memory.py", "tests/test_sync_free_step.py", "tests/test_compile.py",
                                   "-k", "not cuda"],
    "hierarchos/quant/formats.py": ["tests/test_quant_formats.py", "tests/test_kernel.py",
                                    "tests/test_quant_format_rules.py"],
    # io and lora: the deterministic crash tests, not the SIGKILL ones (slow, and they run in a child process),
    # nor the checkpoint crash test (19 s under mutmut; test_io_rules pins the pointer and rotation rules)
    "hierarchos/io.py": ["tests/test_io_rules.py", *[f"tests/test_io.py::{t}" for t in (
        "test_model_dir_round_trip", "test_model_dir_overwrite_replaces_whole_dir", "test_model_dir_errors",
        "test_atomic_dir_exception_leaves_old_untouched", "test_crash_between_renames_recovers_new_dir",
        "test_recover_rolls_back_and_discards_uncommitted", "test_atomic_write_text", "test_checkpoint_round_trip",
        "test_rotation_keeps_newest_and_best", "test_checkpoint_resolution_and_errors", "test_checkpoint_to_model_dir",
        "test_plain_checkpoint_conversion_refuses_a_lora_checkpoint")],
        *[f"tests/test_crash_safety.py::{t}" for t in (
            "test_atomic_write_bytes_crash_at_every_step", "test_atomic_write_text_crash_at_every_step",
            "test_atomic_dir_crash_at_every_step", "test_save_model_dir_crash_at_every_step",
            "test_save_model_files_crash_at_every_step_config_last")],
        "tests/test_untrusted.py::test_checkpoint_optimizer_pickle_never_runs"],
    "hierarchos/lora.py": ["tests/test_lora_rules.py", "tests/test_lora.py",
                           "tests/test_crash_safety.py::test_save_adapter_crash_at_every_step_metadata_last"],
    "hierarchos/train/trainer.py": ["tests/test_trainer_rules.py", "tests/test_numerical_faults.py",
                                    "tests/test_rosa_ahead.py", *[  # (the trainer's ROSA hints pipeline)
        f"tests/test_trainer.py::{t}" for t in (  # not test_loss_falls_and_validation_reports (5 s, pinned by the rules)
            "test_resume_equals_uninterrupted_run", "test_non_finite_loss_skips_the_step_and_keeps_weights",
            "test_deepembed_rows_no_batch_touched_stay_fixed", "test_resume_restores_best_val_and_skipped_steps",
            "test_validation_carries_the_state_across_windows_of_one_stream",
            "test_validation_bits_per_byte_is_summed_nll_over_utf8_bytes")],
        # the trainer's CUDA-graph branch, run on the CPU (GraphedWindow without capture, and the capture path
        # with record_eagerly standing in for the graph)
        "tests/test_cuda_graph.py::test_trainer_with_graphed_windows_trains_the_same_run"],
    "hierarchos/chat.py": ["tests/test_chat_rules.py", *[f"tests/test_chat.py::{t}" for t in (  # not the CLI runs
        "test_greedy_step_equals_argmax_of_parallel_forward", "test_state_size_fixed_over_200_tokens",
        "test_stop_string_ends_reply_and_is_never_streamed",  # not test_ctrl_c: mutmut's workers ignore SIGINT
        "test_slash_commands", "test_status_shows_time_to_first_token_and_speed_of_the_last_reply",
        "test_reply_times_are_measured_on_the_real_clock", "test_cuda_graph_replies_equal_plain_replies",
        "test_bad_command_prints_one_line_hint", "test_interactive_loop_ctrl_c_at_prompt_and_ctrl_d",
        "test_learning_changes_only_memory", "test_learning_is_one_sgd_step_down_the_gradient_and_lowers_the_surprise",
        "test_below_threshold_changes_nothing", "test_cosine_schedule_and_since")]],
    "hierarchos/model/grow.py": ["tests/test_grow.py", "tests/test_grow_rules.py"],
    "hierarchos/prefill.py": ["tests/test_prefill.py"],  # (the captured path is the GPU test's)
    "hierarchos/ops/capture.py": ["tests/test_capture_guard.py"],
    "hierarchos/model/puzzle.py": ["tests/test_puzzle_rules.py", "tests/test_puzzle_train.py", "tests/test_maze_train.py",  # not the maze bench
                                   "--deselect", "tests/test_maze_train.py::test_bench_puzzles_maze_tiny_smoke"],
    # the Triton kernels: mutmut mutates the kernel bodies too (they are plain functions, wrapped at first
    # use), and the CPU tests run them under Triton's interpreter (TRITON_INTERPRET=1, set by the tests);
    # compiled CUDA kernels would read the trampoline's source, so the GPU-marked tests are left out
    "hierarchos/ops/ce_triton.py": ["tests/test_losses.py", "tests/test_triton_rules.py", "-m", "not slow and not gpu"],
    # wkv_triton: its fast rules test, not test_wkv_triton's interpreted sweep (~40 s a run here)
    "hierarchos/ops/wkv_triton.py": ["tests/test_wkv_triton_rules.py", "tests/test_triton_rules.py",
                                     "tests/test_wkv_triton.py::test_manual_backward_matches_autograd_float64",
                                     "tests/test_wkv_triton.py::test_triton_is_never_auto_on_cpu_and_forcing_it_is_one_error",
                                     "-m", "not slow and not gpu"],
    # the one-token time-mix kernel under the interpreter, and the block step and stepper around it
    "hierarchos/ops/rwkv_step_triton.py": ["tests/test_rwkv_step_triton.py", "-m", "not slow and not gpu"],
    # the one-token products' kernel under the interpreter, its device check and the model's rule for it
    "hierarchos/ops/matvec_triton.py": ["tests/test_matvec_triton.py", "-m", "not slow and not gpu"],
    "hierarchos/ops/threads.py": ["tests/test_step_threads.py"],
    # the chunk-parallel prefill kernels under the interpreter, their wrapper and device check, and the
    # dispatch rules that pick them
    "hierarchos/ops/wkv_chunk_triton.py": ["tests/test_wkv_chunk_triton.py", "tests/test_wkv_rules.py",
                                           "-m", "not slow and not gpu"],
    # the chunk-parallel backward: its derivation in PyTorch, and its kernels under the interpreter, device
    # check and dispatch rule
    "hierarchos/ops/wkv_chunk_grad.py": ["tests/test_wkv_chunk_grad_triton.py", "-m", "not slow and not gpu"],
    "hierarchos/ops/wkv_chunk_grad_triton.py": ["tests/test_wkv_chunk_grad_triton.py", "-m", "not slow and not gpu"],
    # the WKV-4 kernels under the interpreter, and their PyTorch reference backward
    "hierarchos/ops/wkv4_triton.py": ["tests/test_wkv4_triton.py", "-m", "not slow and not gpu"],
    "hierarchos/train/rosa_ahead.py": ["tests/test_rosa_ahead.py"],
    "hierarchos/ops/compile_settings.py": ["tests/test_compile_settings.py"],
}

# Triton's interpreter re-reads a kernel's source (to turn each assignment into a tensor) and runs that
# copy: under mutmut it would read the trampoline's wrapped original, with the trampoline's globals, so
# no mutant would ever run (and the original fails on a module constant). This pytest plugin, loaded only
# in the scratch copy of a Triton module, hands the interpreter the function the trampoline would call
# (the active mutant or the original) and records the stats hit the trampoline would have recorded.
TRITON_MODULES = ("hierarchos/ops/ce_triton.py", "hierarchos/ops/wkv_triton.py", "hierarchos/ops/rwkv_step_triton.py",
                  "hierarchos/ops/wkv4_triton.py", "hierarchos/ops/wkv_chunk_triton.py", "hierarchos/ops/matvec_triton.py",
                  "hierarchos/ops/wkv_chunk_grad_triton.py")
TRITON_PLUGIN = '''"""mutmut + Triton's interpreter (written by scripts/mutation_test.py for a mutation run only)."""
import sys

try:
    from triton.runtime.interpreter import FunctionRewriter, InterpretedFunction
except Exception:  # noqa: BLE001 (no triton: nothing to patch)
    InterpretedFunction = None

if InterpretedFunction is not None:
    from mutmut.core import MutmutCallStack
    from mutmut.mutation.trampoline import get_mutant_under_test
    from mutmut.stats import record_trampoline_hit
    from mutmut.utils.format_utils import mangled_name_from_mutant_name

    _plain_rewrite = InterpretedFunction.rewrite
    _rewritten = {}

    def _rewrite(self):
        fn = self.fn
        mutants = getattr(sys.modules.get(fn.__module__), f"mutants_x_{fn.__name__}__mutmut", None)
        if getattr(fn, "__wrapped__", None) is None or not isinstance(mutants, dict):
            return _plain_rewrite(self)
        orig = mutants["_mutmut_orig"]
        active = get_mutant_under_test()
        if active == "fail":
            from mutmut.core import MutmutProgrammaticFailException
            raise MutmutProgrammaticFailException("Verifying setup (the Triton kernel's trampoline).")
        if active == "stats":
            record_trampoline_hit(f"{fn.__module__}.{mangled_name_from_mutant_name(orig.__name__)}",
                                  caller=MutmutCallStack.get()[0])
        module, _, name = active.rpartition(".")
        target = mutants.get(name, orig) if module == fn.__module__ else orig
        if target not in _rewritten:
            _rewritten[target] = FunctionRewriter(target, **self.kwargs).rewrite_ast()
        return _rewritten[target]

    InterpretedFunction.rewrite = _rewrite
'''

# decorators whose function must keep its own source or body (Triton and TorchScript read the source;
# an overload stub has no body worth mutating); functions under them stay unscored
KEEP_DECORATED = re.compile(r"(^|\.)(jit|script|autotune|heuristics|overload|staticmethod|classmethod)$")
UNDECORATED = "__undecorated"


def undecorate(source: str) -> tuple[str, list[str]]:
    """Rewrite the decorated functions of a module so mutmut mutates them (it skips any decorated
    function but a lone @staticmethod or @classmethod). Each `@deco def f(params): body` becomes a
    plain `def _f__undecorated(params): body` (mutmut's target) followed by `@deco def f(params)` that
    only forwards its arguments to it (`yield from` for a generator, `await` for a coroutine), in the
    same scope: same signature, defaults, name, docstring and decorators, so the module behaves the
    same. Top-level functions and methods of top-level classes only (mutmut's reach). Returns the new
    source and the qualified names of the rewritten functions."""
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    edits: list[tuple[int, int, str]] = []  # (first line, last line, replacement), 1-based
    done: list[str] = []

    def yields(func) -> bool:
        stack = list(func.body)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.Yield, ast.YieldFrom)):
                return True
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                stack.extend(ast.iter_child_nodes(node))
        return False

    def split(func, owner: str | None, taken: set[str]) -> None:
        names = [ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in func.decorator_list]
        if names in (["staticmethod"], ["classmethod"]) or any(KEEP_DECORATED.search(n) for n in names):
            return
        is_async = isinstance(func, ast.AsyncFunctionDef)
        if is_async and yields(func):
            return  # an async generator cannot be forwarded by one statement
        inner = f"_{func.name}{UNDECORATED}"
        while inner in taken:  # a property's getter and setter share a name
            inner += "_"
        taken.add(inner)
        a = func.args
        call = ast.Call(ast.Name(inner) if owner is None else ast.Attribute(ast.Name(owner), inner),
                        [ast.Name(p.arg) for p in (*a.posonlyargs, *a.args)]
                        + ([ast.Starred(ast.Name(a.vararg.arg))] if a.vararg else []),
                        [ast.keyword(p.arg, ast.Name(p.arg)) for p in a.kwonlyargs]
                        + ([ast.keyword(None, ast.Name(a.kwarg.arg))] if a.kwarg else []))
        value = ast.Await(call) if is_async else ast.YieldFrom(call) if yields(func) else call
        doc = func.body[:1] if ast.get_docstring(func, clean=False) is not None else []
        wrapper = copy.copy(func)
        wrapper.body = [*doc, ast.Return(value)]
        indent = " " * func.col_offset
        wrapper_text = "".join(f"{indent}{line}\n" for line in ast.unparse(ast.fix_missing_locations(
            wrapper)).splitlines())
        first = lines[func.lineno - 1]
        head = re.sub(rf"^(\s*(?:async\s+)?def\s+){func.name}\b", rf"\g<1>{inner}", first, count=1)
        body = "".join([head, *lines[func.lineno:func.end_lineno]])
        if not body.endswith("\n"):
            body += "\n"
        edits.append((func.decorator_list[0].lineno, func.end_lineno, f"{body}\n{wrapper_text}"))
        done.append(f"{owner}.{func.name}" if owner else func.name)

    def scope(statements, owner: str | None) -> None:
        taken = {s.name for s in statements if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for stmt in statements:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.decorator_list:
                split(stmt, owner, taken)

    scope(tree.body, None)
    for stmt in tree.body:
        if isinstance(stmt, ast.ClassDef):
            scope(stmt.body, stmt.name)
    for start, end, text in sorted(edits, reverse=True):
        lines[start - 1:end] = [text]
    return "".join(lines), sorted(done)


STATUS = re.compile(r"^\s*(\S+):\s*(killed|survived|timeout|suspicious|no tests|skipped|segfault|"
                    r"not checked|check was interrupted by user|caught by type check)\s*$")


def scratch_copy(dest: Path) -> None:
    """Tracked and untracked (not ignored) files, plus the kernels built in place."""
    if dest.exists():
        shutil.rmtree(dest)
    listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True)
    if listing.returncode == 0:
        files = listing.stdout.split("\n")
    else:  # a copy of the tree without .git (a device machine): every file but caches and earlier runs
        skip = {".git", ".whl", "mutants", "__pycache__", ".pytest_cache", ".hypothesis"}
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    files += [str(p.relative_to(ROOT)) for p in (ROOT / "hierarchos").glob("hierarchos_*.so")]
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_module(module: str, tests: list[str], work: Path, jobs: int, timeout_multiplier: float,
               only: list[str] | None = None, keep_decorated: bool = False) -> dict:
    scratch_copy(work)
    undecorated: list[str] = []
    if not keep_decorated:  # in the scratch copy only: its decorated functions become mutmut's targets
        source, undecorated = undecorate((work / module).read_text())
        (work / module).write_text(source)
    # forkserver: torch's thread pools are not fork-safe once used (forked mutants hung until their
    # timeout); one thread per mutant, `jobs` mutants at once
    # timeout_multiplier: mutmut kills a mutant at (estimated test time + 1 s) x multiplier x 2 of CPU time and
    # half that of wall time, and counts it as killed; on a shared, loaded machine a test's wall time is 5-10x
    # its CPU time, so mutmut's default 15 scored slow (surviving) mutants as timeouts
    cfg = ["[mutmut]", "source_paths=hierarchos", f"only_mutate={module}", "process_isolation=forkserver",
           f"timeout_multiplier={timeout_multiplier:g}",
           "pytest_add_cli_args_test_selection=", *[f"    {t}" for t in tests],
           "pytest_add_cli_args=", "    -p", "    no:cacheprovider", "    -q",
           "also_copy=", "    hierarchos_cli.py", "    kernels", "    scripts", ""]  # CLI tests run the entry script; test_grow imports scripts/
    if module in TRITON_MODULES:
        (work / "mutmut_triton_plugin.py").write_text(TRITON_PLUGIN)
        cfg[cfg.index("    -q")] = "    -q\n    -p\n    mutmut_triton_plugin"
        cfg.insert(-1, "    mutmut_triton_plugin.py")
    (work / "setup.cfg").write_text("\n".join(cfg))
    t0 = time.time()
    env_cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *(only or [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(env_cmd, cwd=work, capture_output=True, text=True, env=env)
    (work / "mutmut-run.log").write_text(run.stdout + run.stderr)
    listing = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                             capture_output=True, text=True).stdout
    by_status: dict[str, list[str]] = {}
    for line in listing.splitlines():
        m = STATUS.match(line)
        if m:
            by_status.setdefault(m.group(2), []).append(m.group(1))
    killed = len(by_status.get("killed", [])) + len(by_status.get("timeout", [])) \
        + len(by_status.get("segfault", []))
    total = sum(len(v) for k, v in by_status.items() if k not in ("skipped", "not checked", "no tests"))
    return {"module": module, "tests": tests, "seconds": round(time.time() - t0, 1), "killed": killed,
            "survived": by_status.get("survived", []), "no_tests": by_status.get("no tests", []),
            "other": {k: v for k, v in by_status.items() if k not in ("killed", "survived", "no tests")},
            "total": total, "score": round(killed / total, 4) if total else None,
            "undecorated": undecorated, "returncode": run.returncode}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modules", nargs="*", default=list(MODULES), help="modules to mutate (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="mutants tested at once")
    p.add_argument("--timeout-multiplier", type=float, default=60.0,
                   help="mutmut's timeout_multiplier (its default 15 scores slow mutants as killed under load)")
    p.add_argument("--only", nargs="*", help="mutant names or globs to run (e.g. 'hierarchos.train.trainer.*evaluate*'); "
                   "the score then counts only those")
    p.add_argument("--work", default="/tmp/hierarchos-mutation", help="scratch directory (one copy per module)")
    p.add_argument("--json", default="bench/results/mutation.json", help="where the results go")
    p.add_argument("--keep-decorated", action="store_true",
                   help="leave decorated functions as they are (mutmut then skips them, as before this flag)")
    p.add_argument("--show", help="print the diff of one mutant (from the last run of its module)")
    args = p.parse_args()
    work = Path(args.work)
    if args.show:
        module = re.split(r"\.x[ǁ_]", args.show)[0].replace(".", "/") + ".py"
        out = subprocess.run([sys.executable, "-m", "mutmut", "show", args.show], cwd=work / Path(module).stem,
                             capture_output=True, text=True)
        print(out.stdout or out.stderr)
        return out.returncode
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        print(f"mutation_test: unknown module(s) {unknown}; known: {', '.join(MODULES)}", file=sys.stderr)
        return 2
    results = []
    for module in args.modules:
        result = run_module(module, MODULES[module], work / Path(module).stem, args.jobs, args.timeout_multiplier,
                            args.only, args.keep_decorated)
        results.append(result)
        score = "n/a" if result["score"] is None else f"{100 * result['score']:.1f}%"
        print(f"{module:34s} killed {result['killed']:4d} / {result['total']:4d}  {score:>6s}  "
              f"survived {len(result['survived']):3d}  ({result['seconds']:.0f} s)", flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
