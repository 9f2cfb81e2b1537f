"""The noisy-caption pretraining corpus: each wrong caption is wrong the way its category says, the
noise rate is what was asked for, and every prompt of both splits is drawn."""

from __future__ import annotations

import json
import random

import pytest

from dflow_trl.tasks.shapeworld import (
    TAGS,
    all_prompts,
    render_scene,
    score_t2i,
    spec_from_metadata,
    t2i_split_of,
)
from dflow_trl.tasks.shapeworld.corpus import CORRUPTIONS, CaptionCorpus, miscaptioned


def _canonical(meta: dict):
    return render_scene(spec_from_metadata(meta, 0, canonical=True), 0, canonical=True)


@pytest.mark.parametrize("tag", TAGS)
def test_every_wrong_caption_is_wrong_in_its_categorys_way(tag):
    rng = random.Random(0)
    for meta in all_prompts([tag]):
        shown = miscaptioned(meta, rng)
        if tag == "single_object":
            assert shown == meta
            continue
        # The image of what is shown satisfies the shown content and fails the caption.
        assert score_t2i(_canonical(shown), shown)[0] == 1.0
        assert score_t2i(_canonical(shown), meta)[0] == 0.0, (meta["prompt"], shown["prompt"])
        inc, got = meta["include"], shown["include"]
        if tag == "counting":
            assert got[0]["class"] == inc[0]["class"] and abs(got[0]["count"] - inc[0]["count"]) == 1
        elif tag == "colors":
            assert got[0]["class"] == inc[0]["class"] and got[0]["color"] != inc[0]["color"]
        elif tag == "color_attr":
            assert [(r["class"], r["color"]) for r in got] == [
                (inc[0]["class"], inc[1]["color"]),
                (inc[1]["class"], inc[0]["color"]),
            ]
        elif tag == "position":
            assert {r["class"] for r in got} == {r["class"] for r in inc}
            assert got[1]["position"][0] == inc[1]["position"][0] and got[1]["class"] == inc[0]["class"]
        else:
            assert len(got) == 1 and got[0]["class"] in {r["class"] for r in inc}


def test_noise_rate_is_what_was_asked_and_draws_are_seeded():
    corpus = CaptionCorpus(random.Random(1), caption_noise=0.3)
    n, noisy_able, wrong = 4000, 0, 0
    for _ in range(n):
        caption, shown = corpus.draw()
        if caption["tag"] in CORRUPTIONS:
            noisy_able += 1
            wrong += shown != caption
        else:
            assert shown == caption
    rate, se = wrong / noisy_able, (0.3 * 0.7 / noisy_able) ** 0.5
    assert abs(rate - 0.3) < 4.5 * se, (rate, se)
    a = CaptionCorpus(random.Random(5)).batch(6)
    b = CaptionCorpus(random.Random(5)).batch(6)
    assert a[0] == b[0] and a[1].equal(b[1]) and a[1].shape == (6, 256)


def test_corpus_draws_every_category_from_both_sides_of_the_split():
    corpus = CaptionCorpus(random.Random(2), caption_noise=0.0, tag_power=0.0)
    draws = [corpus.draw()[0] for _ in range(1500)]
    assert {m["tag"] for m in draws} == set(TAGS)
    for tag in TAGS:  # tag_power 0: categories equally often
        assert abs(sum(m["tag"] == tag for m in draws) / len(draws) - 1 / 6) < 0.04
    assert {t2i_split_of(m) for m in draws if m["tag"] == "position"} == {"train", "test"}
    # Clean captions describe their images exactly.
    prompts, grids = corpus.batch(30)
    metas = {m["prompt"]: m for m in all_prompts()}
    assert all(score_t2i(g, metas[p])[0] == 1.0 for p, g in zip(prompts, grids))


def test_corpus_rejects_bad_arguments():
    with pytest.raises(ValueError, match="caption_noise"):
        CaptionCorpus(random.Random(0), caption_noise=1.5)
    with pytest.raises(ValueError, match="at least one"):
        CaptionCorpus(random.Random(0), prompts=[])
    only = [json.loads(json.dumps(m)) for m in all_prompts(["colors"])]
    assert {CaptionCorpus(random.Random(0), prompts=only).draw()[0]["tag"]} == {"colors"}
