"""GenEval rewards without mmdet: transformers' Mask2Former COCO instance segmentation + CLIP colour
classification."""

from __future__ import annotations

import io
import json
import threading
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from ._inputs import TRL_EXTRA_KWARGS, resolve_device, resolve_dtype, to_pil_images
from .clip_scorers import LazyClip
from .geneval_rules import (
    CLASS_ALIASES,
    GENEVAL_COLORS,
    Detection,
    GenEvalResult,
    GenEvalThresholds,
    evaluate_metadata,
    geneval_class_name,
    normalize_class_name,
    parse_metadata,
    select_detections,
)

GENEVAL_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
GENEVAL_CLIP_MODEL = "openai/clip-vit-large-patch14"

# GenEval blanks everything outside an object's mask with this grey before classifying its colour.
_CROP_BACKGROUND = "#999999"


def jpeg_round_trip(image: Image.Image, quality: int) -> Image.Image:
    """``image`` encoded as JPEG at ``quality`` (PIL's other defaults) and decoded again."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


class GenEvalReward:
    """GenEval reward for text-to-image: ``mode`` picks the per-constraint ``score`` (Flow-GRPO's training
    reward, in [0, 1]), ``strict`` (1 if exactly right, else 0) or ``correct`` (GenEval's benchmark verdict).

    Each sample's GenEval metadata comes from the ``metadata`` column (a dict or its JSON line), or from
    ``tag``/``include``/``exclude`` columns when the dataset was built from GenEval's jsonl directly.

    ``jpeg_quality`` (1–100, default off) scores each image after a JPEG round trip at that quality, as
    Flow-GRPO does (it sends its GenEval server JPEGs at PIL's default 75), so that detail which does not
    survive compression earns nothing.
    """

    def __init__(
        self,
        detector: str = GENEVAL_DETECTOR,
        clip_model: str = GENEVAL_CLIP_MODEL,
        *,
        mode: Literal["score", "strict", "correct"] = "score",
        metadata_column: str = "metadata",
        threshold: float = GenEvalThresholds.threshold,
        counting_threshold: float = GenEvalThresholds.counting_threshold,
        max_objects: int = GenEvalThresholds.max_objects,
        nms_threshold: float = GenEvalThresholds.nms_threshold,
        position_threshold: float = GenEvalThresholds.position_threshold,
        batch_size: int = 8,
        jpeg_quality: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        if mode not in ("score", "strict", "correct"):
            raise ValueError(f"GenEval mode must be 'score', 'strict' or 'correct', got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if jpeg_quality is not None and (
            isinstance(jpeg_quality, bool)
            or not isinstance(jpeg_quality, int)
            or not 1 <= jpeg_quality <= 100
        ):
            raise ValueError(
                f"jpeg_quality must be an integer from 1 to 100 (Flow-GRPO uses PIL's default, 75), or None "
                f"for no JPEG round trip; got {jpeg_quality!r}"
            )
        self.__name__ = "geneval" if mode == "score" else f"geneval_{mode}"
        self.mode = mode
        self.metadata_column = metadata_column
        self.thresholds = GenEvalThresholds(
            threshold, counting_threshold, max_objects, nms_threshold, position_threshold
        )
        self.batch_size = batch_size
        self.jpeg_quality = jpeg_quality
        self.detector_name = detector
        self.clip = LazyClip(clip_model, None, device, dtype)
        self._device = device
        self._dtype = dtype
        self._lock = threading.Lock()
        self.detector: Any = None
        self.detector_processor: Any = None
        self.labels: dict[str, str] = {}
        self._color_weights: dict[str, torch.Tensor] = {}
        self.last_results: list[GenEvalResult] = []

    # -- loading --------------------------------------------------------------------------------------------

    def _load(self, completions: Any) -> None:
        self.clip.load(completions)
        with self._lock:
            if self.detector is not None:
                return
            from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

            device = resolve_device(self._device, completions)
            dtype = resolve_dtype(self._dtype, completions)
            self.detector_processor = AutoImageProcessor.from_pretrained(self.detector_name)
            model = Mask2FormerForUniversalSegmentation.from_pretrained(self.detector_name, dtype=dtype)
            self.labels = {normalize_class_name(name): name for name in model.config.id2label.values()}
            self.detector = model.to(device).eval().requires_grad_(False)

    def detector_label(self, classname: str) -> str:
        """The detector's label for a GenEval class name (case, separators, COCO's and other common
        spellings tolerated)."""
        name = geneval_class_name(classname)
        for key in (name, CLASS_ALIASES.get(name), normalize_class_name(classname)):
            if key in self.labels:
                return self.labels[key]
        raise ValueError(
            f"GenEval class {classname!r} is not a label of detector {self.detector_name!r}; "
            f"its labels are {sorted(self.labels.values())}"
        )

    def _by_class(
        self, found: dict[str, list[Detection]], meta: dict[str, Any]
    ) -> dict[str, list[Detection]]:
        """One image's detections re-keyed from detector labels to the metadata's GenEval class names."""
        names = {clause["class"] for clause in (*meta["include"], *meta["exclude"])}
        return {name: found[label] for name in names if (label := self.detector_label(name)) in found}

    # -- detection and colour -------------------------------------------------------------------------------

    @torch.no_grad()
    def detect(self, images: list[Image.Image]) -> list[dict[str, list[Detection]]]:
        """All instances above the lowest confidence threshold, per image and detector label."""
        floor = min(self.thresholds.threshold, self.thresholds.counting_threshold)
        model = self.detector
        id2label = model.config.id2label
        results: list[dict[str, list[Detection]]] = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            inputs = self.detector_processor(images=batch, return_tensors="pt")
            inputs = {
                k: v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device)
                for k, v in inputs.items()
            }
            outputs = model(**inputs)
            outputs.class_queries_logits = outputs.class_queries_logits.float()
            outputs.masks_queries_logits = outputs.masks_queries_logits.float()
            processed = self.detector_processor.post_process_instance_segmentation(
                outputs,
                threshold=floor,
                target_sizes=[img.size[::-1] for img in batch],
                return_binary_maps=True,
            )
            for item in processed:
                per_class: dict[str, list[Detection]] = {}
                maps = item["segmentation"]
                for index, info in enumerate(item["segments_info"]):
                    mask = maps[index].bool().cpu().numpy()
                    box = _mask_box(mask)
                    if box is None:
                        continue
                    label = id2label[info["label_id"]]
                    per_class.setdefault(label, []).append(Detection(box, float(info["score"]), mask))
                results.append(per_class)
        return results

    def _color_classifier(self, classname: str) -> torch.Tensor:
        # GenEval's zero-shot classifier: three prompt templates per colour, embeddings averaged. The
        # templates name the object as GenEval does: "a red computer mouse", not COCO's "a red mouse".
        classname = geneval_class_name(classname)
        if classname not in self._color_weights:
            templates = ("a photo of a {c} {o}", "a photo of a {c}-colored {o}", "a photo of a {c} object")
            weights = []
            for color in GENEVAL_COLORS:
                emb = self.clip.text_embeddings([t.format(c=color, o=classname) for t in templates]).mean(0)
                weights.append(torch.nn.functional.normalize(emb, dim=-1))
            self._color_weights[classname] = torch.stack(weights)
        return self._color_weights[classname]

    def classify_colors(self, image: Image.Image, classname: str, objects: list[Detection]) -> list[str]:
        """GenEval's colour per object: mask on grey, crop to the box, CLIP zero-shot over its colour list."""
        blank = Image.new("RGB", image.size, _CROP_BACKGROUND)
        crops = []
        for obj in objects:
            crop = image
            if obj.mask is not None:
                crop = Image.composite(image, blank, Image.fromarray(obj.mask.astype(np.uint8) * 255))
            crops.append(crop.crop(tuple(round(v) for v in obj.box)))
        logits = self.clip.image_embeddings(crops) @ self._color_classifier(classname).T
        return [GENEVAL_COLORS[i] for i in logits.argmax(-1).tolist()]

    # -- reward ---------------------------------------------------------------------------------------------

    def metadata_for(self, n: int, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        if self.metadata_column in kwargs:
            raw = list(kwargs[self.metadata_column])
        elif "include" in kwargs:
            tags = kwargs.get("tag") or [""] * n
            excludes = kwargs.get("exclude") or [None] * n
            raw = [
                {"tag": t, "include": i, "exclude": e} for t, i, e in zip(tags, kwargs["include"], excludes)
            ]
        else:
            present = sorted(k for k in kwargs if k not in TRL_EXTRA_KWARGS)
            raise KeyError(
                f"GenEval needs each sample's metadata: a {self.metadata_column!r} column "
                "(dict or JSON line) or "
                f"'tag'/'include' columns from GenEval's evaluation_metadata.jsonl; the batch has {present}"
            )
        if len(raw) != n:
            raise ValueError(f"GenEval metadata has {len(raw)} entries for {n} completions")
        metadata = []
        for index, entry in enumerate(raw):
            try:
                metadata.append(parse_metadata(entry))
            except ValueError as error:
                raise ValueError(f"sample {index}: {error}") from error
        return metadata

    def __call__(
        self, prompts: list, completions: list, completion_ids: Any = None, **kwargs: Any
    ) -> list[float]:
        metadata = self.metadata_for(len(completions), kwargs)
        self._load(completions)
        # The rules, reasons and colour prompts use GenEval's class names; only detection uses the
        # detector's labels.
        for meta in metadata:
            for clause in (*meta["include"], *meta["exclude"]):
                clause["class"] = geneval_class_name(clause["class"])
                self.detector_label(clause["class"])  # an unknown class fails before any image is scored
        images = to_pil_images(completions)
        if self.jpeg_quality is not None:
            images = [jpeg_round_trip(image, self.jpeg_quality) for image in images]
        detections = self.detect(images)
        results = []
        for image, found, meta in zip(images, detections, metadata):
            selected = select_detections(self._by_class(found, meta), meta["tag"], self.thresholds)
            results.append(
                evaluate_metadata(
                    selected,
                    meta,
                    lambda cls, objs, image=image: self.classify_colors(image, cls, objs),
                    self.thresholds.position_threshold,
                )
            )
        self.last_results = results
        log_extra = kwargs.get("log_extra")
        if callable(log_extra):
            log_extra("geneval_reason", ["; ".join(r.reasons) or "ok" for r in results])
        if self.mode == "score":
            return [r.score for r in results]
        return [float(r.strict if self.mode == "strict" else r.correct) for r in results]


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight box of a binary mask as (x0, y0, x1, y1), exclusive max edge like mmdet's mask2bbox."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def geneval(**kwargs: Any) -> GenEvalReward:
    """Factory for the registry; see :class:`GenEvalReward` for arguments."""
    return GenEvalReward(**kwargs)


def load_geneval_metadata(path: str) -> list[dict[str, Any]]:
    """Read GenEval's ``evaluation_metadata.jsonl`` (one record per line) into validated dicts."""
    with open(path, encoding="utf-8") as handle:
        return [parse_metadata(json.loads(line)) for line in handle if line.strip()]
