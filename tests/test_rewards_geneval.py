"""GenEval: the scoring rules on synthetic detections, and the Mask2Former + CLIP path on tiny checkpoints."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dflow_trl.rewards import get_reward_function
from dflow_trl.rewards.geneval import GenEvalReward
from dflow_trl.rewards.geneval_rules import (
    COUNTING_THRESHOLD,
    GENEVAL_CLASSES,
    GENEVAL_COLORS,
    MAX_OBJECTS,
    NMS_THRESHOLD,
    POSITION_THRESHOLD,
    THRESHOLD,
    Detection,
    GenEvalThresholds,
    compute_iou,
    evaluate_metadata,
    geneval_class_name,
    parse_metadata,
    relative_position,
    select_detections,
)
from dflow_trl.rewards.testing import COCO_LABELS, save_tiny_clip, save_tiny_mask2former


def det(x0, y0, x1, y1, score=0.95):
    return Detection((x0, y0, x1, y1), score)


def colors_are(*colors):
    calls = []

    def classify(classname, objects):
        calls.append((classname, len(objects)))
        return list(colors[: len(objects)])

    classify.calls = calls
    return classify


def test_geneval_constants_match_the_published_evaluator():
    assert (THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS, NMS_THRESHOLD, POSITION_THRESHOLD) == (
        0.3,
        0.9,
        16,
        1.0,
        0.1,
    )
    assert GENEVAL_COLORS == (
        "red",
        "orange",
        "yellow",
        "green",
        "blue",
        "purple",
        "pink",
        "brown",
        "black",
        "white",
    )


def test_compute_iou_uses_inclusive_pixels():
    assert compute_iou((0, 0, 9, 9), (5, 5, 14, 14)) == pytest.approx(25 / 175)
    assert compute_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0


def test_select_detections_thresholds_order_cap_and_nms():
    raw = {
        "cat": [det(0, 0, 9, 9, 0.3), det(0, 0, 9, 9, 0.31), det(50, 50, 60, 60, 0.95)],
        "dog": [det(0, 0, 5, 5, 0.2)],
    }
    kept = select_detections(raw, "two_object")
    assert [d.score for d in kept["cat"]] == [0.95, 0.31]  # strictly above 0.3, most confident first
    assert "dog" not in kept
    # Counting prompts use the 0.9 threshold.
    assert [d.score for d in select_detections(raw, "counting")["cat"]] == [0.95]
    many = {"cat": [det(i * 20, 0, i * 20 + 9, 9, 0.5 + i / 100) for i in range(20)]}
    assert len(select_detections(many, "single_object")["cat"]) == MAX_OBJECTS
    overlapping = {"cat": [det(0, 0, 9, 9, 0.9), det(1, 1, 10, 10, 0.8), det(40, 40, 49, 49, 0.7)]}
    assert len(select_detections(overlapping, "x")["cat"]) == 3  # GenEval's default does no NMS
    nms = select_detections(overlapping, "x", GenEvalThresholds(nms_threshold=0.5))
    assert [d.score for d in nms["cat"]] == [0.9, 0.7]


@pytest.mark.parametrize(
    ("a", "b", "relations"),
    [
        ((0, 0, 10, 10), (30, 0, 40, 10), {"left of"}),
        ((30, 0, 40, 10), (0, 0, 10, 10), {"right of"}),
        ((0, 0, 10, 10), (0, 30, 10, 40), {"above"}),
        ((0, 30, 10, 40), (0, 0, 10, 10), {"below"}),
        ((0, 0, 10, 10), (11, 0, 21, 10), {"left of"}),
        ((0, 0, 10, 10), (1, 0, 11, 10), set()),  # offset within 0.1 × the summed widths
        ((0, 0, 10, 10), (30, 30, 40, 40), {"left of", "above"}),
        ((0, 0, 10, 10), (40, 12, 50, 22), {"left of"}),  # mostly horizontal
    ],
)
def test_relative_position(a, b, relations):
    assert relative_position(a, b) == relations


def test_single_object_and_two_object():
    meta = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    one = evaluate_metadata({"cat": [det(0, 0, 9, 9)]}, meta)
    assert (one.correct, one.strict, one.score) == (True, True, 1.0)
    two = evaluate_metadata({"cat": [det(0, 0, 9, 9), det(20, 20, 29, 29)]}, meta)
    assert (two.correct, two.strict, two.score) == (
        True,
        False,
        0.0,
    )  # GenEval accepts extras; strict does not
    none = evaluate_metadata({"dog": [det(0, 0, 9, 9)]}, meta)
    assert (none.correct, none.strict, none.score) == (False, False, 0.0)
    pair = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    half = evaluate_metadata({"cat": [det(0, 0, 9, 9)]}, pair)
    assert (half.correct, half.score) == (False, 0.5)


def test_counting_with_exclude():
    meta = {
        "tag": "counting",
        "include": [{"class": "cup", "count": 3}],
        "exclude": [{"class": "cup", "count": 4}],
    }
    cups = [det(i * 20, 0, i * 20 + 9, 9) for i in range(5)]
    exact = evaluate_metadata({"cup": cups[:3]}, meta)
    assert (exact.correct, exact.strict, exact.score) == (True, True, 1.0)
    fewer = evaluate_metadata({"cup": cups[:2]}, meta)
    assert (fewer.correct, fewer.strict) == (False, False) and fewer.score == pytest.approx(2 / 3)
    more = evaluate_metadata({"cup": cups[:4]}, meta)
    assert (more.correct, more.strict) == (False, False) and more.score == pytest.approx(2 / 3)
    assert any("fewer than 4 cup" in r for r in more.reasons)
    far_too_many = evaluate_metadata({"cup": cups * 2}, meta)
    assert far_too_many.score == 0.0  # the count term is floored at 0


def test_colors_judged_on_most_confident_objects():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    classify = colors_are("red")
    result = evaluate_metadata({"car": [det(0, 0, 9, 9, 0.9), det(20, 0, 29, 9, 0.8)]}, meta, classify)
    assert result.correct and not result.strict
    assert classify.calls == [("car", 1)]  # only the top object, classified once for both verdicts
    wrong = evaluate_metadata({"car": [det(0, 0, 9, 9)]}, meta, colors_are("blue"))
    assert (wrong.correct, wrong.strict, wrong.score) == (False, False, 0.5)
    attr = {
        "tag": "color_attr",
        "include": [
            {"class": "car", "count": 1, "color": "red"},
            {"class": "bus", "count": 1, "color": "green"},
        ],
    }
    detections = {"car": [det(0, 0, 9, 9)], "bus": [det(20, 0, 29, 9)]}
    both = evaluate_metadata(detections, attr, lambda cls, objs: ["red"] if cls == "car" else ["green"])
    assert (both.correct, both.score) == (True, 1.0)
    swapped = evaluate_metadata(detections, attr, lambda cls, objs: ["green"] if cls == "car" else ["red"])
    assert (swapped.correct, swapped.score) == (False, 0.5)
    with pytest.raises(ValueError, match="no colour classifier"):
        evaluate_metadata(detections, attr)


def test_position():
    meta = {
        "tag": "position",
        "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
    }
    right = evaluate_metadata({"dog": [det(50, 0, 60, 10)], "cat": [det(0, 0, 10, 10)]}, meta)
    assert (right.correct, right.strict, right.score) == (True, True, 1.0)
    wrong = evaluate_metadata({"dog": [det(0, 0, 10, 10)], "cat": [det(50, 0, 60, 10)]}, meta)
    assert (wrong.correct, wrong.score) == (False, pytest.approx(2 / 3))
    no_target = evaluate_metadata({"cat": [det(0, 0, 10, 10)]}, meta)
    assert (no_target.correct, no_target.score) == (False, pytest.approx(1 / 3))
    assert any("no matched dog" in r for r in no_target.reasons)


def test_parse_metadata_accepts_geneval_lines_and_explains_errors():
    line = (
        '{"tag": "position", "include": [{"class": "dog", "count": 1}, '
        '{"class": "cat", "count": 1, "position": ["above", 0]}], "prompt": "a photo of a cat above a dog"}'
    )
    meta = parse_metadata(line)
    assert meta["include"][1]["position"] == ("above", 0) and meta["prompt"].startswith("a photo")
    bad = [
        ("not json", "not valid JSON"),
        ({"tag": "x"}, "non-empty 'include'"),
        ({"include": [{"count": 1}]}, "'class' name"),
        ({"include": [{"class": "cat", "count": 0}]}, "positive integer"),
        ({"include": [{"class": "cat", "color": "teal"}]}, "not one of GenEval's"),
        ({"include": [{"class": "cat", "position": ["near", 0]}]}, "relation in"),
        ({"include": [{"class": "cat", "position": ["above", 0]}]}, "earlier include clause"),
    ]
    for raw, message in bad:
        with pytest.raises(ValueError, match=message):
            parse_metadata(raw)


def test_geneval_class_names():
    assert len(set(GENEVAL_CLASSES)) == len(GENEVAL_CLASSES) == 80
    spelled = (
        "computer mouse", "tv remote", "computer keyboard", "cell phone", "hair drier", "dining table",
        "potted plant", "wine glass", "hot dog", "teddy bear", "sports ball", "baseball bat",
        "baseball glove", "tennis racket", "fire hydrant", "stop sign", "parking meter", "traffic light",
    )  # fmt: skip
    assert set(spelled) <= set(GENEVAL_CLASSES)
    assert all(geneval_class_name(name) == name for name in GENEVAL_CLASSES)
    # COCO detectors' 80 labels are GenEval's 80 classes, three of them under shorter names.
    assert {geneval_class_name(label) for label in COCO_LABELS} == set(GENEVAL_CLASSES)
    assert geneval_class_name("mouse") == "computer mouse" and geneval_class_name("TV_Remote") == "tv remote"
    assert geneval_class_name("Hair-Dryer") == "hair drier" and geneval_class_name("Unicorn") == "unicorn"


# -- model path -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def geneval_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("geneval")
    detector = save_tiny_mask2former(root / "m2f", num_queries=2)
    # Make every query a confident "cat": zero class weights, a large bias on the cat logit.
    from transformers import Mask2FormerForUniversalSegmentation

    model = Mask2FormerForUniversalSegmentation.from_pretrained(detector)
    with torch.no_grad():
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.zero_()
        model.class_predictor.bias[model.config.label2id["cat"]] = 20.0
    model.save_pretrained(detector)
    return detector, save_tiny_clip(root / "clip", projection_dim=16)


@pytest.fixture(scope="module")
def picture():
    return Image.new("RGB", (80, 64), (200, 30, 30))


def test_geneval_model_path_known_answers(geneval_dirs, picture):
    detector, clip = geneval_dirs
    reward = get_reward_function("geneval", detector=str(detector), clip_model=str(clip), mode="correct")
    assert reward.__name__ == "geneval_correct"
    metas = [
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}]},
        json.dumps({"tag": "single_object", "include": [{"class": "dog", "count": 1}]}),
        {"tag": "counting", "include": [{"class": "cat", "count": 1}]},
    ]
    logged = {}
    scores = reward(
        ["p"] * 3, [picture] * 3, None, metadata=metas, log_extra=lambda c, v: logged.setdefault(c, v)
    )
    found = reward.detect([picture])[0]
    assert set(found) == {"cat"} and 1 <= len(found["cat"]) <= 2
    cats = found["cat"]
    assert all(0.3 < d.score < 0.9 for d in cats)  # class prob ≈ 1 × mean mask probability in (0.5, 1)
    for d in cats:  # boxes are the tight boxes of the instance masks, in image pixels
        x0, y0, x1, y1 = d.box
        assert d.mask.shape == (64, 80) and d.mask[int(y0) : int(y1), int(x0) : int(x1)].sum() == d.mask.sum()
    # A cat is found, a dog is not, and counting prompts' 0.9 threshold rejects these detections.
    assert scores == [1.0, 0.0, 0.0]
    assert "expected at least" not in logged["geneval_reason"][0] and "dog" in logged["geneval_reason"][1]


def test_geneval_model_path_score_strict_and_colour(geneval_dirs, picture):
    detector, clip = geneval_dirs
    reward = get_reward_function("geneval", detector=str(detector), clip_model=str(clip))
    color_meta = {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}]}
    count_meta = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    score = reward(["p", "p"], [picture, picture], None, metadata=[count_meta, color_meta])
    cats = select_detections(reward.detect([picture])[0], "colors")["cat"]
    colors = reward.classify_colors(picture, "cat", cats[:1])
    assert len(colors) == 1 and colors[0] in GENEVAL_COLORS
    count_term = max(0.0, 1 - abs(1 - len(cats)))
    color_term = float(colors[0] == "red") if len(cats) == 1 else 0.0
    assert score == pytest.approx([count_term, (count_term + color_term) / 2])
    strict = get_reward_function("geneval", detector=str(detector), clip_model=str(clip), mode="strict")
    assert strict(["p"], [picture], None, metadata=[count_meta]) == [float(len(cats) == 1)]


def test_geneval_reads_columns_aliases_and_reports_errors(geneval_dirs, picture):
    detector, clip = geneval_dirs
    reward = get_reward_function("geneval", detector=str(detector), clip_model=str(clip), mode="correct")
    # GenEval's jsonl loaded straight into a dataset gives tag/include columns instead of one metadata column.
    out = reward(["p"], [picture], None, tag=["single_object"], include=[[{"class": "cat", "count": 1}]])
    assert out == [1.0]
    assert (
        reward.detector_label("computer mouse") == "mouse" and reward.detector_label("TV remote") == "remote"
    )
    with pytest.raises(ValueError, match="'unicorn' is not a label of detector"):
        reward(["p"], [picture], None, metadata=[{"tag": "x", "include": [{"class": "unicorn"}]}])
    with pytest.raises(KeyError, match="needs each sample's metadata"):
        reward(["p"], [picture], None, answer=["x"])
    with pytest.raises(ValueError, match=r"sample 0: .*positive integer"):
        reward(["p"], [picture], None, metadata=[{"include": [{"class": "cat", "count": -1}]}])
    with pytest.raises(ValueError, match="mode must be"):
        get_reward_function("geneval", mode="loose")


def test_geneval_colour_prompts_use_geneval_class_names(geneval_dirs, picture):
    detector, clip = geneval_dirs
    reward = get_reward_function("geneval", detector=str(detector), clip_model=str(clip), mode="correct")
    # Every query of the tiny detector is a cat; relabel them as COCO's "mouse" (GenEval's computer mouse).
    detect = reward.detect
    reward.detect = lambda images: [{"mouse": d["cat"]} for d in detect(images)]
    texts = []
    embed = reward.clip.text_embeddings
    reward.clip.text_embeddings = lambda batch: (texts.extend(batch), embed(batch))[1]
    meta = {
        "tag": "color_attr",
        "include": [{"class": "computer mouse", "count": 1, "color": "red"}, {"class": "tv remote"}],
    }
    reward(["a photo of a red computer mouse and a tv remote"], [picture], None, metadata=[meta])
    assert texts[:3] == [
        "a photo of a red computer mouse",
        "a photo of a red-colored computer mouse",
        "a photo of a red object",
    ]
    assert len(texts) == 3 * len(GENEVAL_COLORS)
    assert all("computer mouse" in text for text in texts if not text.endswith("object"))
    # Reasons name GenEval's classes too.
    assert "expected at least 1 tv remote, found 0" in reward.last_results[0].reasons
    # Called with the detector's label, the classifier still names the object as GenEval does.
    texts.clear()
    reward._color_weights.clear()
    objects = select_detections(detect([picture])[0], "colors")["cat"][:1]
    reward.classify_colors(picture, "mouse", objects)
    assert texts[0] == "a photo of a red computer mouse"


def test_geneval_knows_every_geneval_class(geneval_dirs, picture):
    detector, clip = geneval_dirs
    reward = get_reward_function("geneval", detector=str(detector), clip_model=str(clip))
    reward(["p"], [picture], None, metadata=[{"tag": "single_object", "include": [{"class": "cat"}]}])
    assert {reward.detector_label(name) for name in GENEVAL_CLASSES} == set(COCO_LABELS)


def _jpeg(image, quality):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


@pytest.mark.parametrize("quality", [None, 30])
def test_geneval_jpeg_round_trip_before_scoring(geneval_dirs, quality):
    detector, clip = geneval_dirs
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    reward = get_reward_function(
        "geneval", detector=str(detector), clip_model=str(clip), jpeg_quality=quality
    )
    detected, coloured = [], []
    detect, classify = reward.detect, reward.classify_colors
    reward.detect = lambda images: (detected.extend(images), detect(images))[1]
    reward.classify_colors = lambda image, cls, objs: (coloured.append(image), classify(image, cls, objs))[1]
    meta = {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}]}
    reward(["p"], [noisy], None, metadata=[meta])
    expected = np.asarray(noisy) if quality is None else _jpeg(noisy, quality)
    assert len(detected) == 1 and np.array_equal(np.asarray(detected[0]), expected)
    assert coloured and all(np.array_equal(np.asarray(image), expected) for image in coloured)
    if quality is not None:
        assert not np.array_equal(expected, np.asarray(noisy))  # the round trip did change the pixels


@pytest.mark.parametrize("quality", [0, 101, -5, 75.0, True, "75"])
def test_geneval_jpeg_quality_is_validated(quality):
    with pytest.raises(ValueError, match="jpeg_quality must be an integer from 1 to 100"):
        GenEvalReward(jpeg_quality=quality)
    assert (
        GenEvalReward(jpeg_quality=1).jpeg_quality == 1
        and GenEvalReward(jpeg_quality=100).jpeg_quality == 100
    )
