"""Text-rendering reward (Flow-GRPO's OCR reward): 1 − normalised edit distance to the prompt's quoted text.

The default engine is RapidOCR (``rapidocr-onnxruntime``): PP-OCRv4 ONNX models ship inside its wheel
and run on CPU, so nothing is downloaded. Any callable ``image -> [(text, confidence), ...]`` can replace it.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Protocol

from PIL import Image

from ._inputs import column, prompt_text, to_pil_images

# Straight or typographic double quotes around the text the image should show.
_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')


class OcrEngine(Protocol):
    def __call__(self, image: Image.Image) -> list[tuple[str, float]]:
        """Recognised text lines in reading order, each with a confidence in [0, 1]."""
        ...


class RapidOcrEngine:
    """RapidOCR with its bundled models; detection + recognition, no angle classifier (as Flow-GRPO)."""

    def __init__(self, **engine_kwargs: Any) -> None:
        self.engine_kwargs = engine_kwargs
        self._engine: Any = None
        self._lock = threading.Lock()

    def __call__(self, image: Image.Image) -> list[tuple[str, float]]:
        with self._lock:
            if self._engine is None:
                try:
                    from rapidocr_onnxruntime import RapidOCR
                except ImportError as error:
                    raise ImportError(
                        "the OCR reward's default engine needs `pip install rapidocr-onnxruntime` "
                        "(or pass engine=<callable image -> [(text, confidence)]>)"
                    ) from error
                self._engine = RapidOCR(**self.engine_kwargs)
            result, _ = self._engine(image, use_cls=False)
        return [(str(text), float(score)) for _box, text, score in result or []]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def quoted_text(prompt: str) -> str | None:
    """The first double-quoted span of a prompt (``A sign saying "OPEN"`` → ``OPEN``), or None."""
    match = _QUOTED.search(prompt)
    if match is None:
        return None
    return match.group(1) if match.group(1) is not None else match.group(2)


def ocr_similarity(recognized: str, target: str) -> float:
    """Flow-GRPO's score: spaces dropped and case folded; 1 if the target appears verbatim, else
    1 − edit distance / len(target), floored at 0 (stray recognised text costs at most the whole target)."""
    recognized = recognized.replace(" ", "").lower()
    target = target.replace(" ", "").lower()
    if not target:
        raise ValueError("the OCR target text is empty; quote at least one non-space character in the prompt")
    if target in recognized:
        return 1.0
    return 1.0 - min(edit_distance(recognized, target), len(target)) / len(target)


class OcrReward:
    """Per image: OCR it, join the recognised lines, compare with the target text."""

    def __init__(
        self,
        engine: OcrEngine | None = None,
        *,
        target_column: str | None = None,
        min_confidence: float = 0.0,
    ) -> None:
        self.__name__ = "ocr"
        self.engine: OcrEngine = engine if engine is not None else RapidOcrEngine()
        self.target_column = target_column
        self.min_confidence = min_confidence

    def targets(self, prompts: list, n: int, kwargs: dict[str, Any]) -> list[str]:
        if self.target_column is not None:
            return [str(t) for t in column(kwargs, self.target_column, n, self.__name__)]
        targets = []
        for index, prompt in enumerate(prompts):
            target = quoted_text(prompt_text(prompt))
            if target is None:
                raise ValueError(
                    f"ocr reward: prompt {index} has no double-quoted target text "
                    f"({prompt_text(prompt)[:80]!r}); "
                    "write the text to render in quotes, e.g. 'a sign that says \"OPEN\"', "
                    "or set target_column"
                )
            targets.append(target)
        return targets

    def recognize(self, image: Image.Image) -> str:
        lines = self.engine(image)
        return "".join(text for text, confidence in lines if confidence >= self.min_confidence)

    def __call__(
        self, prompts: list, completions: list, completion_ids: Any = None, **kwargs: Any
    ) -> list[float]:
        targets = self.targets(prompts, len(completions), kwargs)
        images = to_pil_images(completions)
        return [ocr_similarity(self.recognize(img), target) for img, target in zip(images, targets)]


def ocr(engine: OcrEngine | None = None, **kwargs: Any) -> OcrReward:
    """Factory for the registry; see :class:`OcrReward` for arguments."""
    return OcrReward(engine, **kwargs)
