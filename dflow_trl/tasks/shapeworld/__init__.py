"""ShapeWorld: the project's embedded synthetic task, a GenEval-like text-to-image and understanding
(VQA) task on ``16 × 16`` palette grids, built on the core like any user's task.

Images are ``16 × 16`` grids of palette tokens (``palette``), showing simple shapes
(``shapes``) placed per a ``SceneSpec`` (``scenes``). Text-to-image prompts come in GenEval's six
categories with GenEval-format metadata and a split into disjoint RL-training and evaluation
prompt strings (``prompts``); the pretraining corpus of noisy captions is ``corpus``; understanding
questions have one-word answers (``vqa``); ``scoring`` is the programmatic GenEval analogue;
``tokenizer`` covers all the text; ``datasets`` builds the ``datasets.Dataset`` tables.

``rewards`` holds the task's reward functions (registered with ``dflow_trl.rewards`` through the
``dflow_trl.rewards`` entry points: ``shapeworld_strict``, ``shapeworld_partial``,
``shapeworld_answer``), ``evaluation`` the held-out scores, ``pretrained`` the loader of the model
shipped in ``assets/``, and ``demo`` the ``dflow-trl demo`` command. The core never imports this
package; the model-side names (``load_shapeworld_model``, ``SHAPEWORLD_DIR``, ``evaluate_*``,
``balanced_t2i_eval_set``) import their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .datasets import VQA_DEFAULT_SIZES, make_t2i_dataset, make_vqa_dataset
from .palette import (
    BACKGROUND,
    CANVAS_LENGTH,
    COLORS,
    GRID,
    PALETTE_SIZE,
    as_grid,
    color_token,
    grid_to_image,
    palette_embeddings,
    palette_rgb,
    render_grid_strip,
)
from .prompts import (
    HELD_OUT_BINDINGS,
    HELD_OUT_COUNTS,
    HELD_OUT_PAIRS,
    TAGS,
    all_prompts,
    check_metadata,
    in_split,
    is_held_out,
    scene_is_train_safe,
    spec_from_metadata,
    t2i_prompts,
    t2i_split_of,
)
from .scenes import (
    DEFAULT_COLORS,
    RELATIONS,
    SLOTS,
    DetectedObject,
    ObjectSpec,
    SceneSpec,
    place_scene,
    relative_position,
    render_scene,
)
from .scoring import ScoreDetails, parse_grid, score_t2i, summarize_by_tag
from .shapes import SHAPES, classify_cells
from .tokenizer import (
    ANSWER_LENGTH,
    MAX_TEXT_LENGTH,
    SPECIAL_TOKENS,
    build_shapeworld_tokenizer,
    decode_answer,
    encode_answer,
    normalize_answer,
)
from .vqa import ANSWERS, QTYPES

__all__ = [
    "ANSWERS",
    "ANSWER_LENGTH",
    "BACKGROUND",
    "CANVAS_LENGTH",
    "COLORS",
    "DEFAULT_COLORS",
    "GRID",
    "HELD_OUT_BINDINGS",
    "HELD_OUT_COUNTS",
    "HELD_OUT_PAIRS",
    "MAX_TEXT_LENGTH",
    "PALETTE_SIZE",
    "QTYPES",
    "RELATIONS",
    "SHAPES",
    "SHAPEWORLD_DIR",
    "SHAPEWORLD_UNDERSTANDING_DIR",
    "SLOTS",
    "SPECIAL_TOKENS",
    "TAGS",
    "VQA_DEFAULT_SIZES",
    "DetectedObject",
    "ObjectSpec",
    "SceneSpec",
    "ScoreDetails",
    "all_prompts",
    "as_grid",
    "balanced_t2i_eval_set",
    "build_shapeworld_tokenizer",
    "check_metadata",
    "classify_cells",
    "color_token",
    "decode_answer",
    "encode_answer",
    "evaluate_t2i",
    "evaluate_vqa",
    "grid_to_image",
    "in_split",
    "is_held_out",
    "load_shapeworld_model",
    "make_t2i_dataset",
    "make_vqa_dataset",
    "normalize_answer",
    "palette_embeddings",
    "palette_rgb",
    "parse_grid",
    "place_scene",
    "relative_position",
    "render_grid_strip",
    "render_scene",
    "scene_is_train_safe",
    "score_t2i",
    "spec_from_metadata",
    "summarize_by_tag",
    "t2i_prompts",
    "t2i_split_of",
]

# Names whose modules pull in the model and the sampler: imported on first access.
_LAZY = {
    "SHAPEWORLD_DIR": "pretrained",
    "SHAPEWORLD_UNDERSTANDING_DIR": "pretrained",
    "load_shapeworld_model": "pretrained",
    "balanced_t2i_eval_set": "evaluation",
    "evaluate_t2i": "evaluation",
    "evaluate_vqa": "evaluation",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
