"""Rebuild the offline evaluation data in hierarchos/eval_tasks/ from the bundled plays.

    python scripts/build_eval_tasks.py

Writes three small JSONL files (deterministic: running it twice gives the same bytes):
  shakespeare_who_speaks.jsonl  multiple choice: which of four characters of the play says this line (the
                                line scored after each speaker's header, "MACBETH.", as the plays print it)
  shakespeare_next_line.jsonl   multiple choice: which of four lines of the play continues this speech
  shakespeare_heldout.jsonl     documents for perplexity: the last HELDOUT_BYTES of the corpus (the tail of
                                The Tempest), which `train`'s default --val-fraction 0.05 holds out
The task YAMLs beside them (written by hand) name these files.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hierarchos.data import bundled_corpus_path  # noqa: E402
from hierarchos.io import atomic_write_text  # noqa: E402

OUT = REPO / "hierarchos" / "eval_tasks"
N_ITEMS = 120
N_CHOICES = 4
SEED = 6006
# `train` holds out the last 5% of the token stream of the sorted plays: about 19.5 kB of text with the
# bundled tokenizer and with the byte tokenizer (checked), so the last 12 kB are inside it.
HELDOUT_BYTES = 12_000
DOC_BYTES = 1_500


def _bundled_builder():
    """The play parser of scripts/build_bundled_data.py (speeches with speaker, act, scene, lines)."""
    spec = importlib.util.spec_from_file_location("build_bundled_data", REPO / "scripts" / "build_bundled_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def play_texts() -> dict[str, str]:
    """title -> play text without the provenance header, in the sorted file order `train` reads."""
    plays = {}
    for path in sorted(Path(bundled_corpus_path()).glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        header_end = text.index("=" * 78 + "\n\n", 10) + 80  # the second rule closes the header
        title = text.splitlines()[1].split(", by William Shakespeare")[0]
        plays[title] = text[header_end:]
    return plays


def play_speeches(builder, text: str) -> list[dict]:
    # start at the first act ("ACT I." or "ACT 1"): the cast list before it would parse as speeches
    return builder.speeches(text[re.search(r"^ACT (I|1)\b", text, re.M).start():])


def header(text: str, name: str) -> str:
    """The speaker line as this play prints it: "MACBETH." in most plays, "THESEUS" in the Dream."""
    upper = name.upper()
    return f"{upper}." if text.count(f"\n{upper}.\n") >= text.count(f"\n{upper}\n") else upper


def who_speaks(rng: random.Random, plays: dict[str, list[dict]], texts: dict[str, str]) -> list[dict]:
    rows = []
    candidates = []
    for title, speeches in plays.items():
        said_by: dict[str, set[str]] = {}
        for s in speeches:
            for line in s["lines"]:
                said_by.setdefault(line, set()).add(s["speaker"])
        counts: dict[str, int] = {}
        for s in speeches:
            counts[s["speaker"]] = counts.get(s["speaker"], 0) + 1
        cast = sorted(name for name, n in counts.items() if n >= 10)  # characters who speak often enough
        for s in speeches:
            line = s["lines"][0]
            if len(line) >= 30 and said_by[line] == {s["speaker"]} and s["speaker"] in cast:
                candidates.append((title, line, s["speaker"], cast))
    for title, line, speaker, cast in rng.sample(candidates, N_ITEMS):
        choices = rng.sample([name for name in cast if name != speaker], N_CHOICES - 1) + [speaker]
        rng.shuffle(choices)
        rows.append({"play": title, "line": line, "choices": choices, "label": choices.index(speaker),
                     "headers": [header(texts[title], name) for name in choices]})
    return rows


def next_line(rng: random.Random, plays: dict[str, list[dict]], texts: dict[str, str]) -> list[dict]:
    rows = []
    candidates = []
    for title, speeches in plays.items():
        pool = sorted({line for s in speeches for line in s["lines"] if len(line) >= 20})
        for s in speeches:
            if len(s["lines"]) >= 3 and len(s["lines"][2]) >= 20:
                candidates.append((title, s, pool))
    for title, s, pool in rng.sample(candidates, N_ITEMS):
        answer = s["lines"][2]
        distractors = []
        while len(distractors) < N_CHOICES - 1:
            line = rng.choice(pool)
            if line not in s["lines"] and line not in distractors:
                distractors.append(line)
        choices = distractors + [answer]
        rng.shuffle(choices)
        rows.append({"play": title, "speaker": s["speaker"], "header": header(texts[title], s["speaker"]),
                     "context": "\n".join(s["lines"][:2]),
                     "choices": choices, "label": choices.index(answer)})
    return rows


def heldout_docs(texts: dict[str, str]) -> list[dict]:
    """The corpus tail cut into documents of about DOC_BYTES at blank lines (speech boundaries)."""
    last_title, last_text = list(texts.items())[-1]
    tail = last_text.encode("utf-8")[-HELDOUT_BYTES:].decode("utf-8", errors="ignore")
    tail = tail[tail.index("\n\n") + 2:]  # start at a speech boundary
    docs, current = [], ""
    for block in tail.split("\n\n"):
        if not block.strip():
            continue
        current = f"{current}\n\n{block}" if current else block
        if len(current.encode("utf-8")) >= DOC_BYTES:
            docs.append(current)
            current = ""
    if current:
        docs.append(current)
    return [{"play": last_title, "text": doc.strip("\n") + "\n"} for doc in docs]


def build() -> dict[str, str]:
    """file name -> JSONL text of every data file (tests compare them with the committed ones)."""
    builder = _bundled_builder()
    texts = play_texts()
    plays = {title: play_speeches(builder, text) for title, text in texts.items()}
    files = {"shakespeare_who_speaks.jsonl": who_speaks(random.Random(SEED), plays, texts),
             "shakespeare_next_line.jsonl": next_line(random.Random(SEED + 1), plays, texts),
             "shakespeare_heldout.jsonl": heldout_docs(texts)}
    return {name: "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows) for name, rows in files.items()}


def main() -> None:
    for name, text in build().items():
        atomic_write_text(OUT / name, text)
        print(f"hierarchos/eval_tasks/{name}: {text.count(chr(10))} rows, {len(text.encode()):,} bytes")


if __name__ == "__main__":
    main()
