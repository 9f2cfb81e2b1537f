"""PickScore, CLIP score and the aesthetic scorer on tiny random checkpoints loaded through the real code."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dflow_trl.rewards import get_reward_function
from dflow_trl.rewards.aesthetic import build_aesthetic_head, load_aesthetic_head
from dflow_trl.rewards.testing import save_tiny_clip

PROMPTS = ["a red square", "a blue circle on grass", "text"]


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    return save_tiny_clip(root / "clip16", projection_dim=16), save_tiny_clip(
        root / "clip768", projection_dim=768
    )


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(3)]


def reference_logits(model_dir, prompts, images):
    """Pairwise logits from transformers' own CLIPModel.forward: logit_scale.exp() × cosine."""
    from transformers import AutoProcessor, CLIPModel

    processor = AutoProcessor.from_pretrained(model_dir)
    model = CLIPModel.from_pretrained(model_dir).eval()
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    return out.logits_per_image, model.logit_scale.exp().item(), out.image_embeds


def test_pickscore_matches_clip_forward(clip_dirs, images):
    clip16, _ = clip_dirs
    reward = get_reward_function("pickscore", model=str(clip16), processor=str(clip16), batch_size=2)
    assert reward.__name__ == "pickscore"
    scores = reward(prompts=PROMPTS, completions=images, completion_ids=None, trainer_state=None)
    logits, _, _ = reference_logits(clip16, PROMPTS, images)
    assert scores == pytest.approx(logits.diag().tolist(), abs=1e-4)
    # Pairing follows the batch order: reversing both reverses the scores, mismatched pairs differ.
    assert reward(PROMPTS[::-1], images[::-1]) == pytest.approx(scores[::-1], abs=1e-4)
    assert reward(PROMPTS[::-1], images) != pytest.approx(scores, abs=1e-4)
    model = reward.clip.model
    reward(PROMPTS[:1], images[:1])
    assert reward.clip.model is model  # loaded once, reused


def test_clip_score_is_cosine_and_scaled(clip_dirs, images):
    clip16, _ = clip_dirs
    logits, scale, _ = reference_logits(clip16, PROMPTS, images)
    cosine = (logits.diag() / scale).tolist()
    reward = get_reward_function("clip_score", model=str(clip16))
    assert reward.__name__ == "clip_score"
    assert reward(PROMPTS, images) == pytest.approx(cosine, abs=1e-5)
    scaled = get_reward_function("clip_score", model=str(clip16), scale=100.0)
    assert scaled(PROMPTS, images) == pytest.approx([100 * c for c in cosine], abs=1e-3)


def test_image_inputs_accepted_in_every_form(clip_dirs, images):
    clip16, _ = clip_dirs
    reward = get_reward_function("clip_score", model=str(clip16))
    expected = reward(PROMPTS[:1], images[:1])
    array = np.array(images[0])
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    assert reward(PROMPTS[:1], [array]) == pytest.approx(expected, abs=1e-5)
    assert reward(PROMPTS[:1], [tensor]) == pytest.approx(expected, abs=1e-4)
    # Chat-format prompts score their user text.
    chat = [[{"role": "user", "content": PROMPTS[0]}]]
    assert reward(chat, images[:1]) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(TypeError, match="not an image"):
        reward(PROMPTS[:1], ["a string"])
    with pytest.raises(ValueError, match="3 prompts for 1 completions"):
        reward(PROMPTS, images[:1])


def test_dtype_argument(clip_dirs, images):
    clip16, _ = clip_dirs
    reward = get_reward_function("clip_score", model=str(clip16), dtype="bfloat16", device="cpu")
    scores = reward(PROMPTS, images)
    assert reward.clip.model.dtype == torch.bfloat16
    reference = get_reward_function("clip_score", model=str(clip16))(PROMPTS, images)
    assert scores == pytest.approx(reference, abs=0.05)
    with pytest.raises(ValueError, match="not a torch floating dtype"):
        get_reward_function("clip_score", model=str(clip16), dtype="int8")(PROMPTS, images)


def test_aesthetic_head_format_and_score(clip_dirs, images, tmp_path):
    _, clip768 = clip_dirs
    head = build_aesthetic_head()
    torch.manual_seed(1)
    for layer in head:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=0.05)
    # The published file is a LightningModule state dict: keys "layers.{0,2,4,6,7}.{weight,bias}".
    state = {f"layers.{k}": v for k, v in head.state_dict().items()}
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    assert [tuple(state[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == [
        (1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)
    ]  # fmt: skip
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, path)

    reward = get_reward_function("aesthetic", clip_model=str(clip768), head_path=str(path))
    assert reward.__name__ == "aesthetic"
    scores = reward(PROMPTS, images)
    _, _, image_embeds = reference_logits(clip768, PROMPTS, images)  # CLIPModel.forward normalises these
    with torch.no_grad():
        expected = head.eval()(image_embeds).squeeze(-1).tolist()
    assert scores == pytest.approx(expected, abs=1e-5)

    # A head whose only non-zero parameter is the last bias scores every image exactly that value.
    constant = {k: torch.zeros_like(v) for k, v in head.state_dict().items()}
    constant["7.bias"] = torch.tensor([5.5])
    torch.save(constant, tmp_path / "constant.pth")  # bare Sequential keys load too
    fixed = get_reward_function(
        "aesthetic", clip_model=str(clip768), head_path=str(tmp_path / "constant.pth")
    )
    assert fixed(PROMPTS, images) == pytest.approx([5.5] * 3)


def test_aesthetic_head_errors(clip_dirs, images, tmp_path):
    clip16, _ = clip_dirs
    good = tmp_path / "head.pth"
    torch.save(build_aesthetic_head().state_dict(), good)
    with pytest.raises(ValueError, match="projects to 16"):
        get_reward_function("aesthetic", clip_model=str(clip16), head_path=str(good))(PROMPTS, images)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(1, 768)}, wrong)
    with pytest.raises(ValueError, match="not an improved-aesthetic-predictor head"):
        load_aesthetic_head(wrong)
    # weights_only loading refuses pickled objects, so a tampered head cannot run code.
    evil = tmp_path / "evil.pth"
    torch.save({"layers.0.weight": ArbitraryObject()}, evil)
    with pytest.raises(pickle.UnpicklingError):
        load_aesthetic_head(evil)


class ArbitraryObject:
    pass
