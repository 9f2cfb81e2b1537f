"""Turn the paper's prompt files into datasets the FUDOKI recipes read (``train.jsonl`` / ``test.jsonl``).

* ``pickscore``: flow_grpo's ``train.txt`` / ``test.txt`` (one prompt per line) → ``prompt``.
* ``geneval``: flow_grpo's ``train_metadata.jsonl`` / ``test_metadata.jsonl`` → ``prompt``, ``metadata``
  (the GenEval record as a JSON string, read by the ``geneval`` reward).
* ``scienceqa``: a ScienceQA folder (``data/scienceqa/problems.json`` and ``<split>/<qid>/image.png``)
  → ``prompt`` (question, options and hint), ``input_image`` (image path), ``answer`` (letter),
  ``choices`` (the option texts). Questions without an image are skipped unless ``--keep-text-only``.

``datasets.load_dataset(<out>)`` then finds the ``train`` and ``test`` splits.
"""

from __future__ import annotations

import argparse
import json
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

LETTERS = string.ascii_uppercase


def _write(rows: Iterable[dict[str, Any]], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def pickscore_rows(txt: Path) -> Iterable[dict[str, Any]]:
    for line in txt.read_text(encoding="utf-8").splitlines():
        if line.strip():
            yield {"prompt": line.strip()}


def geneval_rows(jsonl: Path) -> Iterable[dict[str, Any]]:
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            yield {"prompt": record["prompt"], "metadata": json.dumps(record)}


def scienceqa_prompt(question: str, choices: Sequence[str], hint: str | None) -> str:
    """The multiple-choice prompt of the paper's ScienceQA runs (VLMEvalKit style)."""
    parts = [f"Hint: {hint}"] if hint else []
    parts.append(f"Question: {question}")
    if choices:
        parts.append("Options:\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)))
        parts.append("Please select the correct answer from the options above. Answer with the letter only.")
    return "\n".join(parts)


def scienceqa_rows(root: Path, split: str, keep_text_only: bool, max_chars: int) -> Iterable[dict[str, Any]]:
    problems = json.loads((root / "data" / "scienceqa" / "problems.json").read_text(encoding="utf-8"))
    for qid, prob in problems.items():
        if prob.get("split") != split:
            continue
        choices = list(prob.get("choices") or [])
        answer = prob.get("answer", -1)
        if not 0 <= answer < len(choices):
            continue
        image = root / split / qid / prob["image"] if prob.get("image") else None
        if image is not None and not image.is_file():
            image = None
        if image is None and not keep_text_only:
            continue
        prompt = scienceqa_prompt(prob["question"], choices, prob.get("hint") or None)
        if len(prompt) > max_chars:  # keeps prompts inside FUDOKI's 500 text tokens
            continue
        yield {
            "prompt": prompt,
            "input_image": None if image is None else str(image.resolve()),
            "answer": LETTERS[answer],
            "choices": choices,
        }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="kind", required=True)
    for kind in ("pickscore", "geneval"):
        s = sub.add_parser(kind)
        s.add_argument("--train", type=Path, required=True)
        s.add_argument("--test", type=Path, default=None)
        s.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("scienceqa")
    s.add_argument("--root", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--keep-text-only", action="store_true")
    s.add_argument("--max-prompt-chars", type=int, default=1800)
    args = p.parse_args(argv)

    if args.kind == "scienceqa":
        for split, name in (("train", "train"), ("val", "test")):
            rows = scienceqa_rows(args.root, split, args.keep_text_only, args.max_prompt_chars)
            print(f"{name}: {_write(rows, args.out / f'{name}.jsonl')} rows")
        return
    reader = pickscore_rows if args.kind == "pickscore" else geneval_rows
    for name, src in (("train", args.train), ("test", args.test)):
        if src is not None:
            print(f"{name}: {_write(reader(src), args.out / f'{name}.jsonl')} rows")


if __name__ == "__main__":
    main()
