"""Tiny random FUDOKI checkpoints in FUDOKI's on-disk layout, and a plain-torch reference forward.

The writer states the original module names independently of the loader's mapping: DeepSeek
Janus' ``MultiModalityCausalLM`` (``language_model`` = HF Llama, ``vision_model.vision_tower`` = timm
SigLIP, ``aligner``/``gen_aligner`` = ``MlpProjector``, ``gen_head`` = ``vision_head``,
``gen_embed``) and LlamaGen's VQ-16 (``gen_vision_model``), rebuilt below with the same attribute
names. The reference forward reads those original tensors directly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
SPECIALS = [BOS, EOS, PAD, IMAGE, BOI, EOI]
# The tiny tokenizer's ids: the 256 byte-level characters (sorted, so printable ASCII c is
# ord(c) - 33, "Ġ" (space) 220, "Ċ" (newline) 198), the merges "As" 256, "Ass" 257, "Assi" 258,
# "Us" 259, then the specials in SPECIALS order.
TINY_IDS = dict(zip(SPECIALS, range(260, 266)))
# Specials at DeepSeek's ids where FUDOKI's code or DeepSeek's files pin them: BOS 100000, EOS 100001
# (the "fudoki" template's stop_token_ids, fudoki/janus/utils/conversation.py), the pad token at
# 100015 (FUDOKI's literal CFG id), <image_placeholder> 100581 (transformers' JanusConfig default);
# the <begin_of_image>/<end_of_image> ids are stand-ins. Byte characters and merges keep their tiny ids.
REAL_IDS = {BOS: 100000, EOS: 100001, PAD: 100015, IMAGE: 100581, BOI: 100016, EOI: 100593}

TINY = {
    "hidden": 32,
    "heads": 4,
    "layers": 2,
    "inter": 64,
    "text_vocab": 320,
    "vis_width": 32,
    "vis_layers": 2,
    "vis_heads": 4,
    "patch": 8,
    "image_size": 32,  # 4 x 4 = 16 image tokens
    "codebook": 64,
    "code_dim": 8,
    "vq_ch": 32,
    "vq_mult": [1, 2],
    "vq_z": 32,
    "vq_res": 1,
}
NUM_IMAGE_TOKENS = (TINY["image_size"] // TINY["patch"]) ** 2
# TINY with FUDOKI's 102400 text tokens, so that id 100015 has an embedding row.
TINY_REAL_VOCAB = dict(TINY, text_vocab=102400)


# ---------------------------------------------------------------------------------------------
# LlamaGen VQ-16 skeleton (names only matter: encoder/decoder.conv_blocks[i].res/attn, mid[0..2])
# ---------------------------------------------------------------------------------------------
def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class _Res(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _gn(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _gn(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)


class _Attn(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _gn(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))


class _Encoder(nn.Module):
    def __init__(self, ch: int, mult: list[int], nrb: int, z: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        in_mult = (1, *mult)
        self.conv_blocks = nn.ModuleList()
        for i in range(len(mult)):
            blk = nn.Module()
            blk.res, blk.attn = nn.ModuleList(), nn.ModuleList()
            cin, cout = ch * in_mult[i], ch * mult[i]
            for _ in range(nrb):
                blk.res.append(_Res(cin, cout))
                cin = cout
                if i == len(mult) - 1:
                    blk.attn.append(_Attn(cin))
            if i != len(mult) - 1:
                blk.downsample = nn.Module()
                blk.downsample.conv = nn.Conv2d(cin, cin, 3, stride=2)
            self.conv_blocks.append(blk)
        self.mid = nn.ModuleList([_Res(cin, cin), _Attn(cin), _Res(cin, cin)])
        self.norm_out, self.conv_out = _gn(cin), nn.Conv2d(cin, z, 3, padding=1)


class _Decoder(nn.Module):
    def __init__(self, ch: int, mult: list[int], nrb: int, z: int) -> None:
        super().__init__()
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(z, cin, 3, padding=1)
        self.mid = nn.ModuleList([_Res(cin, cin), _Attn(cin), _Res(cin, cin)])
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(mult))):
            blk = nn.Module()
            blk.res, blk.attn = nn.ModuleList(), nn.ModuleList()
            cout = ch * mult[i]
            for _ in range(nrb + 1):
                blk.res.append(_Res(cin, cout))
                cin = cout
                if i == len(mult) - 1:
                    blk.attn.append(_Attn(cin))
            if i != 0:
                blk.upsample = nn.Module()
                blk.upsample.conv = nn.Conv2d(cin, cin, 3, padding=1)
            self.conv_blocks.append(blk)
        self.norm_out, self.conv_out = _gn(cin), nn.Conv2d(cin, 3, 3, padding=1)


class _VQ16(nn.Module):
    def __init__(self, t: dict) -> None:
        super().__init__()
        self.encoder = _Encoder(t["vq_ch"], t["vq_mult"], t["vq_res"], t["vq_z"])
        self.decoder = _Decoder(t["vq_ch"], t["vq_mult"], t["vq_res"], t["vq_z"])
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(t["codebook"], t["code_dim"])
        self.quantize.register_buffer("codebook_used", torch.zeros(65536))
        self.quant_conv = nn.Conv2d(t["vq_z"], t["code_dim"], 1)
        self.post_quant_conv = nn.Conv2d(t["code_dim"], t["vq_z"], 1)


# ---------------------------------------------------------------------------------------------
# original state dict
# ---------------------------------------------------------------------------------------------
def original_state_dict(seed: int = 0, t: dict = TINY) -> dict[str, torch.Tensor]:
    """Random weights under the original FUDOKI key names."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.15) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def norm_w(n: int) -> torch.Tensor:
        return 1.0 + rnd(n, scale=0.1)

    h, inter, v = t["hidden"], t["inter"], t["text_vocab"]
    sd: dict[str, torch.Tensor] = {}
    lm = "language_model.model"
    sd[f"{lm}.embed_tokens.weight"] = rnd(v, h, scale=0.5)
    for i in range(t["layers"]):
        p = f"{lm}.layers.{i}"
        for name in ("q", "k", "v", "o"):
            sd[f"{p}.self_attn.{name}_proj.weight"] = rnd(h, h, scale=0.25)
        sd[f"{p}.mlp.gate_proj.weight"] = rnd(inter, h, scale=0.2)
        sd[f"{p}.mlp.up_proj.weight"] = rnd(inter, h, scale=0.2)
        sd[f"{p}.mlp.down_proj.weight"] = rnd(h, inter, scale=0.2)
        sd[f"{p}.input_layernorm.weight"] = norm_w(h)
        sd[f"{p}.post_attention_layernorm.weight"] = norm_w(h)
    sd[f"{lm}.norm.weight"] = norm_w(h)
    sd["language_model.lm_head.weight"] = rnd(v, h, scale=0.3)

    w, ps, n_tok = t["vis_width"], t["patch"], NUM_IMAGE_TOKENS
    vt = "vision_model.vision_tower"
    sd[f"{vt}.patch_embed.proj.weight"] = rnd(w, 3, ps, ps, scale=0.05)
    sd[f"{vt}.patch_embed.proj.bias"] = rnd(w)
    sd[f"{vt}.pos_embed"] = rnd(1, n_tok, w)
    for i in range(t["vis_layers"]):
        p = f"{vt}.blocks.{i}"
        sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"] = norm_w(w), rnd(w)
        sd[f"{p}.attn.qkv.weight"], sd[f"{p}.attn.qkv.bias"] = rnd(3 * w, w, scale=0.25), rnd(3 * w)
        sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"] = rnd(w, w, scale=0.25), rnd(w)
        sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"] = norm_w(w), rnd(w)
        sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"] = rnd(4 * w, w, scale=0.2), rnd(4 * w)
        sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"] = rnd(w, 4 * w, scale=0.2), rnd(w)
    sd[f"{vt}.norm.weight"], sd[f"{vt}.norm.bias"] = norm_w(w), rnd(w)
    # SigLIP's MAP head: in the checkpoint, never used by Janus.
    sd[f"{vt}.attn_pool.latent"] = rnd(1, 1, w)
    for name, rows in (("q", w), ("kv", 2 * w), ("proj", w)):
        sd[f"{vt}.attn_pool.{name}.weight"], sd[f"{vt}.attn_pool.{name}.bias"] = rnd(rows, w), rnd(rows)
    sd[f"{vt}.attn_pool.norm.weight"], sd[f"{vt}.attn_pool.norm.bias"] = norm_w(w), rnd(w)
    sd[f"{vt}.attn_pool.mlp.fc1.weight"], sd[f"{vt}.attn_pool.mlp.fc1.bias"] = rnd(4 * w, w), rnd(4 * w)
    sd[f"{vt}.attn_pool.mlp.fc2.weight"], sd[f"{vt}.attn_pool.mlp.fc2.bias"] = rnd(w, 4 * w), rnd(w)

    sd["aligner.layers.0.weight"], sd["aligner.layers.0.bias"] = rnd(h, w, scale=0.3), rnd(h)
    sd["aligner.layers.2.weight"], sd["aligner.layers.2.bias"] = rnd(h, h, scale=0.3), rnd(h)

    c, e = t["codebook"], t["code_dim"]
    sd["gen_embed.weight"] = rnd(c, e, scale=1.0)
    sd["gen_aligner.layers.0.weight"], sd["gen_aligner.layers.0.bias"] = rnd(h, e, scale=0.4), rnd(h)
    sd["gen_aligner.layers.2.weight"], sd["gen_aligner.layers.2.bias"] = rnd(h, h, scale=0.3), rnd(h)
    sd["gen_head.output_mlp_projector.weight"] = rnd(h, h, scale=0.3)
    sd["gen_head.output_mlp_projector.bias"] = rnd(h)
    sd["gen_head.vision_head.weight"], sd["gen_head.vision_head.bias"] = rnd(c, h, scale=0.3), rnd(c)

    torch.manual_seed(seed)
    for k, tensor in _VQ16(t).state_dict().items():
        sd[f"gen_vision_model.{k}"] = tensor.clone()
    return sd


def fudoki_config(t: dict = TINY) -> dict:
    """FUDOKI's ``config.json`` (Janus-1.3B layout), with tiny architecture overrides in ``params``."""
    h = t["hidden"]
    return {
        "model_type": "multi_modality",
        "architectures": ["MultiModalityCausalLM"],
        "torch_dtype": "float32",
        "language_config": {
            "model_type": "llama",
            "hidden_size": h,
            "intermediate_size": t["inter"],
            "num_attention_heads": t["heads"],
            "num_key_value_heads": t["heads"],
            "num_hidden_layers": t["layers"],
            "max_position_embeddings": 1024,
            "vocab_size": t["text_vocab"],
            "torch_dtype": "float32",
        },
        "vision_config": {
            "cls": "CLIPVisionTower",
            "model_type": "vision",
            "params": {
                "image_size": t["image_size"],
                "model_name": "siglip_large_patch16_384",
                "select_feature": "same",
                "select_layer": -1,
                "width": t["vis_width"],
                "layers": t["vis_layers"],
                "heads": t["vis_heads"],
                "mlp_ratio": 4,
                "patch_size": t["patch"],
            },
        },
        "aligner_config": {
            "cls": "MlpProjector",
            "model_type": "aligner",
            "params": {"depth": 2, "input_dim": t["vis_width"], "n_embed": h, "projector_type": "mlp_gelu"},
        },
        "gen_vision_config": {
            "cls": "VQ-16",
            "model_type": "gen_vision",
            "params": {
                "image_token_size": t["codebook"],
                "n_embed": t["code_dim"],
                "ch": t["vq_ch"],
                "ch_mult": t["vq_mult"],
                "z_channels": t["vq_z"],
                "num_res_blocks": t["vq_res"],
            },
        },
        "gen_aligner_config": {
            "cls": "MlpProjector",
            "model_type": "gen_aligner",
            "params": {"depth": 2, "input_dim": t["code_dim"], "n_embed": h, "projector_type": "mlp_gelu"},
        },
        "gen_head_config": {
            "cls": "vision_head",
            "model_type": "gen_head",
            "params": {"image_token_embed": h, "image_token_size": t["codebook"], "n_embed": h},
        },
    }


def write_tokenizer(
    folder: Path,
    post_processor: str | None = "bos",
    special_ids: dict[str, int] | None = None,
    pad_token: str | None = PAD,
    add_bos_token: bool | None = True,
) -> dict[str, int]:
    """A byte-level BPE tokenizer with FUDOKI's special tokens, in the files FUDOKI ships
    (``tokenizer.json``, ``tokenizer_config.json`` of class ``LlamaTokenizerFast``,
    ``special_tokens_map.json``). Returns the special tokens' ids.

    ``post_processor``: what ``tokenizer.json`` adds around a text: ``"bos"`` (``<bos> $A``),
    ``None`` (no post-processor) or ``"eos"`` (``$A <eos>``). ``special_ids``: where the specials sit
    (default :data:`TINY_IDS`, right after the byte vocabulary; :data:`REAL_IDS` puts them at
    DeepSeek's ids). ``pad_token``: the pad token of ``special_tokens_map.json`` (``None``: none, so
    FUDOKI pads with EOS). ``add_bos_token``: ``tokenizer_config.json``'s flag (``None``: absent).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = [("A", "s"), ("As", "s"), ("Ass", "i"), ("U", "s")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    ids = dict(TINY_IDS if special_ids is None else special_ids)
    vocab.update(ids)  # the specials sit at these ids (a sparse vocabulary is fine for BPE)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ids])
    assert all(tok.token_to_id(t) == i for t, i in ids.items())
    if post_processor == "bos":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, ids[BOS])]
        )
    elif post_processor == "eos":
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, ids[EOS])]
        )
    elif post_processor is not None:
        raise ValueError(post_processor)
    tok.save(str(folder / "tokenizer.json"))
    if post_processor is None:  # make sure the file really has none
        with open(folder / "tokenizer.json", encoding="utf-8") as f:
            assert json.load(f)["post_processor"] is None
    config = {
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": None,
        "model_max_length": 16384,
        "clean_up_tokenization_spaces": False,
        "add_eos_token": False,
    }
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    _dump(folder / "tokenizer_config.json", config)
    special_map = {"bos_token": BOS, "eos_token": EOS, "additional_special_tokens": [IMAGE]}
    if pad_token is not None:
        special_map["pad_token"] = pad_token
    _dump(folder / "special_tokens_map.json", special_map)
    return ids


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def with_tokenizer(base: str | Path, folder: str | Path, **tokenizer: object) -> Path:
    """``base``'s checkpoint with another tokenizer: every other file linked, not copied."""
    base, folder = Path(base), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.name not in TOKENIZER_FILES:
            (folder / f.name).symlink_to(f.resolve())
    write_tokenizer(folder, **tokenizer)  # type: ignore[arg-type]
    return folder


def write_tiny_fudoki_checkpoint(
    folder: str | Path,
    weights: str = "safetensors",
    seed: int = 0,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    t: dict = TINY,
    uncond_token_id: int | str | None = "pad",
    **tokenizer: object,
) -> Path:
    """Write a tiny FUDOKI checkpoint (config, original keys, tokenizer, path embeddings).

    ``t``: the architecture (:data:`TINY_REAL_VOCAB` for FUDOKI's 102400 text tokens).
    ``uncond_token_id``: written into ``config.json`` (not in FUDOKI's published config) because the
    tiny vocabulary has no id 100015: ``"pad"`` (default) the tokenizer's pad id, an int, or
    ``None`` to leave the config as FUDOKI publishes it. ``tokenizer``: :func:`write_tokenizer`'s options.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = original_state_dict(seed, t) if state_dict is None else state_dict
    if weights == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    elif weights == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        raise ValueError(weights)
    ids = write_tokenizer(folder, **tokenizer)  # type: ignore[arg-type]
    config = fudoki_config(t)
    if uncond_token_id == "pad":
        uncond_token_id = ids[PAD]
    if uncond_token_id is not None:
        config["uncond_token_id"] = uncond_token_id
    _dump(folder / "config.json", config)
    _dump(
        folder / "preprocessor_config.json",
        {
            "background_color": [127, 127, 127],
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "image_processor_type": "VLMImageProcessor",
            "image_size": t["image_size"],
            "min_size": 14,
            "processor_class": "VLChatProcessor",
            "rescale_factor": 1 / 255,
        },
    )
    _dump(
        folder / "processor_config.json",
        {
            "add_special_token": False,
            "ignore_id": -100,
            "image_tag": "<image_placeholder>",
            "mask_prompt": True,
            "num_image_tokens": NUM_IMAGE_TOKENS,
            "processor_class": "VLChatProcessor",
            "sft_format": "fudoki",
        },
    )
    # FUDOKI pickles whole nn.Embedding modules.
    g = torch.Generator().manual_seed(seed + 1)
    text = nn.Embedding(t["text_vocab"], 16)
    text.weight.data = torch.randn(t["text_vocab"], 16, generator=g)
    image = nn.Embedding(t["codebook"], t["code_dim"])
    image.weight.data = torch.randn(t["codebook"], t["code_dim"], generator=g)
    torch.save(text, folder / "text_embedding.pt")
    torch.save(image, folder / "image_embedding.pt")
    return folder


def _dump(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)


# ---------------------------------------------------------------------------------------------
# reference forward (plain torch, float64, one sample at a time over its valid tokens)
# ---------------------------------------------------------------------------------------------
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def _llama(sd: dict, x: torch.Tensor, t: dict) -> torch.Tensor:
    """Final hidden states of the Llama stack for ``x`` (n, H) under full attention."""
    n, hdim = x.shape
    nh = t["heads"]
    hd = hdim // nh
    # Llama's rotary tables are computed in float32 (transformers 4.42, FUDOKI's, does the same).
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    ang = torch.cat([torch.arange(n).float()[:, None] * inv[None]] * 2, -1)
    cos, sin = ang.cos().double(), ang.sin().double()
    lm = "language_model.model"
    for i in range(t["layers"]):
        p = f"{lm}.layers.{i}"
        y = _rms(x, sd[f"{p}.input_layernorm.weight"])
        q, k, v = (
            (y @ sd[f"{p}.self_attn.{m}_proj.weight"].T).view(n, nh, hd).transpose(0, 1)
            for m in ("q", "k", "v")
        )
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)  # no causal mask: FUDOKI
        o = (att @ v).transpose(0, 1).reshape(n, hdim)
        x = x + o @ sd[f"{p}.self_attn.o_proj.weight"].T
        y = _rms(x, sd[f"{p}.post_attention_layernorm.weight"])
        gate, up = y @ sd[f"{p}.mlp.gate_proj.weight"].T, y @ sd[f"{p}.mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ sd[f"{p}.mlp.down_proj.weight"].T
    return _rms(x, sd[f"{lm}.norm.weight"])


def _linear(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _siglip_features(sd: dict, pixels: torch.Tensor, t: dict) -> torch.Tensor:
    """SigLIP tower + aligner on one (3, H, W) image → (N, hidden)."""
    vt = "vision_model.vision_tower"
    w, nh = t["vis_width"], t["vis_heads"]
    hd = w // nh
    x = F.conv2d(
        pixels[None],
        sd[f"{vt}.patch_embed.proj.weight"],
        sd[f"{vt}.patch_embed.proj.bias"],
        stride=t["patch"],
    )
    x = x.flatten(2)[0].T + sd[f"{vt}.pos_embed"][0]
    n = x.shape[0]
    for i in range(t["vis_layers"]):
        p = f"{vt}.blocks.{i}"
        y = F.layer_norm(x, (w,), sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], eps=1e-6)
        q, k, v = (
            z.view(n, nh, hd).transpose(0, 1) for z in _linear(sd, f"{p}.attn.qkv", y).chunk(3, dim=-1)
        )
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        x = x + _linear(sd, f"{p}.attn.proj", (att @ v).transpose(0, 1).reshape(n, w))
        y = F.layer_norm(x, (w,), sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], eps=1e-6)
        x = x + _linear(sd, f"{p}.mlp.fc2", F.gelu(_linear(sd, f"{p}.mlp.fc1", y)))
    x = F.layer_norm(x, (w,), sd[f"{vt}.norm.weight"], sd[f"{vt}.norm.bias"], eps=1e-6)
    return _linear(sd, "aligner.layers.2", F.gelu(_linear(sd, "aligner.layers.0", x)))


def reference_canvas_logits(
    sd: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    canvas_mask: torch.Tensor,
    task: str,
    image_token_id: int | None = None,
    pixel_values: torch.Tensor | None = None,
    t: dict = TINY,
) -> torch.Tensor:
    """FUDOKI's forward, written out: per sample over its valid prefix, full attention, shift."""
    sd = {k: v.double() for k, v in sd.items()}
    out = []
    for b in range(input_ids.shape[0]):
        n = int(attention_mask[b].sum())
        assert bool(attention_mask[b, :n].all()), "reference expects right padding"
        ids, canvas = input_ids[b, :n], canvas_mask[b, :n]
        x = sd["language_model.model.embed_tokens.weight"][
            ids.masked_fill(canvas, 0) if task == "t2i" else ids
        ]
        if task == "t2i":
            codes = ids[canvas]
            img = _linear(
                sd,
                "gen_aligner.layers.2",
                F.gelu(_linear(sd, "gen_aligner.layers.0", sd["gen_embed.weight"][codes])),
            )
            x[canvas] = img
        else:
            slots = (ids == image_token_id) & ~canvas
            if slots.any():
                x[slots] = _siglip_features(sd, pixel_values[b].double(), t)
        hidden = _llama(sd, x, t)
        prev = hidden[canvas.nonzero()[:, 0] - 1]
        if task == "t2i":
            logits = _linear(
                sd, "gen_head.vision_head", F.gelu(_linear(sd, "gen_head.output_mlp_projector", prev))
            )
        else:
            logits = prev @ sd["language_model.lm_head.weight"].T
        out.append(logits)
    return torch.stack(out)
