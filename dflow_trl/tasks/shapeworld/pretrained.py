"""The pretrained ShapeWorld model that ships inside the package (no network needed).

One :class:`DFMTransformer` for both ShapeWorld tasks — text-to-image on the metric-induced path
over the palette colours, understanding on the masked text path — pretrained by
``examples/shapeworld/pretrain.py``. ``SHAPEWORLD_DIR`` holds its ``config.json``,
``model.safetensors`` and tokenizer files.

``SHAPEWORLD_UNDERSTANDING_DIR`` holds the same model after one more pretraining stage on both
tasks with noisy answers (``--answer-noise 0.4``): it has seen every question type answered right
most of the time and wrongly some of it, so it is imperfect the way RL sharpens, as the
noisy-caption corpus makes the text-to-image base. ``task="understanding"`` loads it by default.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from ...models.dfm_transformer import DFMTransformer, Task

SHAPEWORLD_DIR: Path = Path(__file__).resolve().parent / "assets"
SHAPEWORLD_UNDERSTANDING_DIR: Path = SHAPEWORLD_DIR / "understanding"

__all__ = ["SHAPEWORLD_DIR", "SHAPEWORLD_UNDERSTANDING_DIR", "load_shapeworld_model", "shipped_dir"]


def shipped_dir(task: str | None = "t2i") -> Path:
    """The folder of the shipped weights for ``task``: the understanding stage for
    ``"understanding"``, the two-stage base otherwise."""
    return SHAPEWORLD_UNDERSTANDING_DIR if task == "understanding" else SHAPEWORLD_DIR


def load_shapeworld_model(
    task: Task = "t2i", path: str | Path | None = None
) -> tuple[DFMTransformer, PreTrainedTokenizerFast]:
    """``(model, tokenizer)`` of the shipped ShapeWorld DFM for ``task`` (``"t2i"``: ``SHAPEWORLD_DIR``;
    ``"understanding"``: ``SHAPEWORLD_UNDERSTANDING_DIR``), or of the one saved at ``path``, in
    eval mode and switched to ``task``. Reads local files only."""
    if task not in ("t2i", "understanding"):
        raise ValueError(f"task must be 't2i' or 'understanding', got {task!r}")
    folder = Path(path) if path is not None else shipped_dir(task)
    missing = [
        f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / f).is_file()
    ]
    if missing:
        raise ValueError(f"{str(folder)!r} is not a saved ShapeWorld model: it lacks {missing}")
    model = DFMTransformer.from_pretrained(folder, local_files_only=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return model.set_task(task).eval(), tokenizer
