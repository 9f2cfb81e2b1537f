"""GenEval's scoring rules on detections, independent of any detector.

Re-implements the rules of GenEval (djghosh13/geneval, ``evaluation/evaluate_images.py``) and the
per-constraint training score of Flow-GRPO's GenEval reward server, so that any detector that yields
boxes, scores and masks can drive them. Three verdicts per image:

* ``correct`` – GenEval's benchmark rule: at least ``count`` objects of each included class, colour and
  relative position checked on the ``count`` most confident ones, and every ``exclude`` clause respected.
* ``strict`` – Flow-GRPO's stricter rule: exactly ``count`` objects, plus the same colour/position/exclude
  checks.
* ``score`` – mean over per-constraint terms (count closeness, fraction of the right colour, position), in
  [0, 1].
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# GenEval's 80 object names (its object_names.txt), which its prompts and metadata use: COCO's classes,
# with three spelt out ("computer mouse", "tv remote", "computer keyboard").
GENEVAL_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# COCO detectors (detectron2, transformers' Mask2Former) label three of GenEval's classes by shorter names.
CLASS_ALIASES = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}
# The detector's labels, in GenEval's order.
COCO_LABELS = tuple(CLASS_ALIASES.get(name, name) for name in GENEVAL_CLASSES)
# Other names of GenEval's classes: COCO detectors' labels (detectron2, mmdet, transformers) and common
# variants (VOC's, British spellings).
GENEVAL_CLASS_ALIASES = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "hair dryer": "hair drier",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "cellphone": "cell phone",
    "doughnut": "donut",
}
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_POSITIONS = ("left of", "right of", "above", "below")

# GenEval's defaults (evaluate_images.py, the --options it reads).
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
NMS_THRESHOLD = 1.0
POSITION_THRESHOLD = 0.1


@dataclass(frozen=True)
class Detection:
    """One detected instance: box ``(x0, y0, x1, y1)`` in pixels, confidence, optional HxW boolean mask."""

    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class GenEvalThresholds:
    threshold: float = THRESHOLD
    counting_threshold: float = COUNTING_THRESHOLD
    max_objects: int = MAX_OBJECTS
    nms_threshold: float = NMS_THRESHOLD
    position_threshold: float = POSITION_THRESHOLD

    def confidence_for(self, tag: str) -> float:
        return self.counting_threshold if tag == "counting" else self.threshold


@dataclass(frozen=True)
class GenEvalResult:
    correct: bool
    strict: bool
    score: float
    reasons: tuple[str, ...]


# Classifies the colour of each given detection of a class; returns one GENEVAL_COLORS name per detection.
ColorClassifier = Callable[[str, list[Detection]], list[str]]


def normalize_class_name(name: str) -> str:
    """Lower case, single spaces for ``_``, ``-`` and runs of whitespace."""
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def geneval_class_name(name: str) -> str:
    """GenEval's spelling of a class name ("Computer_Mouse" and COCO's "mouse" give "computer mouse"); a
    name GenEval does not know comes back normalised."""
    key = normalize_class_name(name)
    return GENEVAL_CLASS_ALIASES.get(key, key)


def parse_metadata(raw: Any) -> dict[str, Any]:
    """Validate one GenEval metadata record (a dict or its JSON line) and fill ``count`` defaults."""
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ValueError(f"GenEval metadata is not valid JSON: {error}: {raw[:200]!r}") from error
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"GenEval metadata must be a dict with 'tag' and 'include', got {type(raw).__name__}"
        )
    include = raw.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"GenEval metadata needs a non-empty 'include' list of clauses, got {include!r}")
    clauses = [_parse_clause(c, i, "include") for i, c in enumerate(include)]
    for index, clause in enumerate(clauses):
        if "position" in clause:
            target = clause["position"][1]
            if not 0 <= target < index:
                raise ValueError(
                    f"include[{index}] position target {target} must name an earlier include clause "
                    f"(0..{index - 1})"
                )
    exclude = [_parse_clause(c, i, "exclude") for i, c in enumerate(raw.get("exclude") or [])]
    return {
        "tag": str(raw.get("tag", "")),
        "prompt": raw.get("prompt", ""),
        "include": clauses,
        "exclude": exclude,
    }


def _parse_clause(clause: Any, index: int, kind: str) -> dict[str, Any]:
    where = f"{kind}[{index}]"
    if not isinstance(clause, Mapping) or not isinstance(clause.get("class"), str):
        raise ValueError(f"{where} must be a dict with a 'class' name, got {clause!r}")
    count = clause.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{where} 'count' must be a positive integer, got {count!r}")
    parsed: dict[str, Any] = {"class": clause["class"], "count": count}
    if clause.get("color") is not None:
        if clause["color"] not in GENEVAL_COLORS:
            raise ValueError(
                f"{where} colour {clause['color']!r} is not one of GenEval's {list(GENEVAL_COLORS)}"
            )
        parsed["color"] = clause["color"]
    if clause.get("position") is not None:
        position = clause["position"]
        if (
            not isinstance(position, (list, tuple))
            or len(position) != 2
            or position[0] not in GENEVAL_POSITIONS
            or isinstance(position[1], bool)
            or not isinstance(position[1], int)
        ):
            raise ValueError(
                f"{where} position must be [relation, clause_index] "
                f"with relation in {list(GENEVAL_POSITIONS)}, "
                f"got {position!r}"
            )
        parsed["position"] = (position[0], position[1])
    return parsed


def compute_iou(box_a: tuple[float, ...], box_b: tuple[float, ...]) -> float:
    """IoU with GenEval's inclusive-pixel (+1) box areas."""

    def area(box: tuple[float, ...]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area(
        (max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3]))
    )
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def select_detections(
    candidates: Mapping[str, list[Detection]], tag: str, thresholds: GenEvalThresholds = GenEvalThresholds()
) -> dict[str, list[Detection]]:
    """GenEval's per-class filtering: confidence above the (tag's) threshold, most confident first, capped,
    NMS."""
    confidence = thresholds.confidence_for(tag)
    kept: dict[str, list[Detection]] = {}
    for classname, detections in candidates.items():
        ordered = sorted((d for d in detections if d.score > confidence), key=lambda d: -d.score)
        ordered = ordered[: thresholds.max_objects]
        chosen: list[Detection] = []
        while ordered:
            best = ordered.pop(0)
            chosen.append(best)
            if thresholds.nms_threshold < 1:
                ordered = [d for d in ordered if compute_iou(best.box, d.box) < thresholds.nms_threshold]
        if chosen:
            kept[classname] = chosen
    return kept


def relative_position(
    box_a: tuple[float, ...], box_b: tuple[float, ...], margin: float = POSITION_THRESHOLD
) -> set[str]:
    """Relations of A to B ("left of", "right of", "above", "below"); overlap within ``margin`` × sizes
    counts as none."""
    a = np.asarray(box_a[:4], dtype=np.float64).reshape(2, 2)
    b = np.asarray(box_b[:4], dtype=np.float64).reshape(2, 2)
    offset = a.mean(axis=0) - b.mean(axis=0)
    dims = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - margin * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def evaluate_metadata(
    detections: Mapping[str, list[Detection]],
    metadata: Any,
    classify_colors: ColorClassifier | None = None,
    position_threshold: float = POSITION_THRESHOLD,
) -> GenEvalResult:
    """Judge one image's (already selected, most-confident-first) detections against its GenEval metadata."""
    meta = parse_metadata(metadata)
    color_cache: dict[tuple[str, int], list[str]] = {}

    def colors_of(classname: str, objects: list[Detection]) -> list[str]:
        key = (classname, len(objects))
        if key not in color_cache:
            if classify_colors is None:
                raise ValueError("metadata asks for a colour but no colour classifier was given")
            color_cache[key] = list(classify_colors(classname, objects))
        return color_cache[key]

    correct, _, reasons = _judge(detections, meta, colors_of, position_threshold, exact=False)
    strict, terms, strict_reasons = _judge(detections, meta, colors_of, position_threshold, exact=True)
    reasons += [f"strict: {r}" for r in strict_reasons if r not in reasons]
    return GenEvalResult(
        correct=correct, strict=strict, score=sum(terms) / len(terms), reasons=tuple(reasons)
    )


def _judge(
    detections: Mapping[str, list[Detection]],
    meta: dict[str, Any],
    colors_of: Callable[[str, list[Detection]], list[str]],
    margin: float,
    exact: bool,
) -> tuple[bool, list[float], list[str]]:
    """One pass of the rules; ``exact`` demands exactly ``count`` objects (strict) instead of at least
    (GenEval)."""
    passed = True
    terms: list[float] = []
    reasons: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for clause in meta["include"]:
        classname, count = clause["class"], clause["count"]
        found = list(detections.get(classname, []))
        top = found[:count]  # colour and position are judged on the most confident `count` objects
        terms.append(max(0.0, 1 - abs(count - len(found)) / count))
        matched = len(found) == count if exact else len(found) >= count
        if not matched:
            reasons.append(
                f"expected {'exactly' if exact else 'at least'} {count} {classname}, found {len(found)}"
            )
            # Attributes of objects that are not there (or not the right number) earn nothing.
            terms.extend(0.0 for key in ("color", "position") if key in clause)
        else:
            if "color" in clause:
                colors = colors_of(classname, top)
                right = colors.count(clause["color"])
                terms.append(right / count)
                if right < count:
                    matched = False
                    reasons.append(
                        f"expected {count} {clause['color']} {classname}, found {right} (colours {colors})"
                    )
            if "position" in clause:
                relation, target = clause["position"]
                group = matched_groups[target]
                if not matched:
                    ok = False
                elif group is None:
                    ok = False
                    reasons.append(
                        f"no matched {meta['include'][target]['class']} for {classname} to be {relation}"
                    )
                else:
                    ok = all(relation in relative_position(o.box, t.box, margin) for o in top for t in group)
                    if not ok:
                        reasons.append(f"expected {classname} {relation} {meta['include'][target]['class']}")
                terms.append(1.0 if ok else 0.0)
                matched = ok
        matched_groups.append(top if matched else None)
        passed = passed and matched
    for clause in meta["exclude"]:
        found = len(detections.get(clause["class"], []))
        if found >= clause["count"]:
            passed = False
            reasons.append(f"expected fewer than {clause['count']} {clause['class']}, found {found}")
    return passed, terms, reasons
