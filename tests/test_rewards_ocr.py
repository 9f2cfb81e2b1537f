"""OCR reward: edit-distance rule, target extraction, and RapidOCR for real on text drawn with PIL."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw, ImageFont

from dflow_trl.rewards import get_reward_function
from dflow_trl.rewards.ocr import edit_distance, ocr_similarity, quoted_text


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "abc", 0), ("flaw", "lawn", 2), ("ab", "ba", 2)],
)
def test_edit_distance(a, b, d):
    assert edit_distance(a, b) == d == edit_distance(b, a)


def test_quoted_text():
    assert quoted_text('A neon sign saying "OPEN NOW" at night') == "OPEN NOW"
    assert quoted_text("a mug printed with “Good Morning” in red") == "Good Morning"
    assert quoted_text('first "one" then "two"') == "one"
    assert quoted_text("no quotes here") is None


def test_ocr_similarity_rule():
    assert ocr_similarity("HELLO world", "Hello World") == 1.0  # spaces and case do not count
    assert ocr_similarity("xxhelloworldyy", "Hello World") == 1.0  # contained verbatim
    assert ocr_similarity("Helo", "Hello") == pytest.approx(0.8)
    assert ocr_similarity("", "abc") == 0.0
    assert ocr_similarity("completely unrelated long text", "abc") == 0.0  # floored at 0
    with pytest.raises(ValueError, match="target text is empty"):
        ocr_similarity("abc", "  ")


def test_pluggable_engine_target_column_and_confidence():
    seen = []

    def engine(image):
        seen.append(image.size)
        return [("Hello", 0.99), ("noise", 0.2), ("World", 0.95)]

    reward = get_reward_function("ocr", engine=engine, min_confidence=0.5)
    assert reward.__name__ == "ocr"
    assert reward(['a sign "Hello World"'], [Image.new("RGB", (8, 8))], None) == [1.0]
    by_column = get_reward_function("ocr", engine=engine, target_column="text")
    # With the low-confidence line kept, "HelloNoiseWorld" is 5 edits from "HelloWorld" → 0.5.
    assert by_column(["no quotes"], [Image.new("RGB", (8, 8))], None, text=["Hello World"]) == [0.5]
    assert seen == [(8, 8), (8, 8)]
    with pytest.raises(ValueError, match="no double-quoted target text"):
        reward(["no quotes"], [Image.new("RGB", (8, 8))], None)
    with pytest.raises(KeyError, match="column 'text'"):
        by_column(["x"], [Image.new("RGB", (8, 8))], None)


def render(text: str) -> Image.Image:
    image = Image.new("RGB", (640, 128), "white")
    font = ImageFont.load_default(size=56)
    ImageDraw.Draw(image).text((20, 30), text, fill="black", font=font)
    return image


def test_rapidocr_reads_rendered_text():
    reward = get_reward_function("ocr")  # RapidOCR with the models bundled in its wheel; no download
    prompts = ['a poster that says "Hello World"', 'a poster that says "Hello World"', 'a sign "STOP"']
    images = [render("Hello World"), render("Hello"), Image.new("RGB", (640, 128), "white")]
    scores = reward(prompts, images, None)
    # Exact text → 1; only "Hello" → 5 of 10 characters missing → 0.5; a blank canvas reads nothing → 0.
    assert scores == pytest.approx([1.0, 0.5, 0.0])
