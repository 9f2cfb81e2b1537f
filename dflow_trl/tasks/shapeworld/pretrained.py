"""The pretrained ShapeWorld model that ships inside the package (no network needed).

One :class:`DFMTransformer` for both ShapeWorld tasks — text-to-image on the metric-induced path
over the palette colours, understanding on the masked text path — pretrained by
``examples/shapeworld/pretrain.py``. ``SHAPEWORLD_DIR`` holds its ``config.json``,
``model.safetensors`` and tokenizer files.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from ...models.dfm_transformer import DFMTransformer, Task

SHAPEWORLD_DIR: Path = Path(__file__).resolve().parent / "assets"

__all__ = ["SHAPEWORLD_DIR", "load_shapeworld_model"]


def load_shapeworld_model(
    task: Task = "t2i", path: str | Path | None = None
) -> tuple[DFMTransformer, PreTrainedTokenizerFast]:
    """``(model, tokenizer)`` of the shipped ShapeWorld DFM (or the one saved at ``path``), in eval
    mode and switched to ``task`` (``"t2i"`` or ``"understanding"``). Reads local files only."""
    if task not in ("t2i", "understanding"):
        raise ValueError(f"task must be 't2i' or 'understanding', got {task!r}")
    folder = Path(path) if path is not None else SHAPEWORLD_DIR
    missing = [
        f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / f).is_file()
    ]
    if missing:
        raise ValueError(f"{str(folder)!r} is not a saved ShapeWorld model: it lacks {missing}")
    model = DFMTransformer.from_pretrained(folder, local_files_only=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return model.set_task(task).eval(), tokenizer
