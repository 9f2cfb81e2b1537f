"""Reading FUDOKI's published checkpoint layout and mapping it onto transformers' Janus classes.

FUDOKI (``LucasJinWang/FUDOKI``) ships DeepSeek Janus' original layout: a ``config.json`` of
``model_type: multi_modality`` whose sub-configs name the module classes, state-dict keys of the
original modules (``language_model.model.*``, ``vision_model.vision_tower.*``, ``gen_vision_model.*``,
``gen_head.*`` …), a tokenizer, and the two matrices that define its probability paths,
``text_embedding.pt`` and ``image_embedding.pt`` (pickled ``nn.Embedding`` modules).

This module turns that into a :class:`transformers.JanusConfig` and a state dict with transformers'
key names (the mapping of transformers' ``convert_janus_weights_to_hf.py``: fused SigLIP ``qkv``
split into ``q/k/v``, ``pos_embed`` squeezed, LlamaGen's ``conv_blocks``/``res``/``mid.{0,1,2}``
renamed, the unused attention-pool head and VQ usage counter dropped). Every file is read without
unpickling arbitrary objects.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import torch

FUDOKI_MODEL_TYPE = "multi_modality"
PATH_EMBEDDING_FILES = {"text": "text_embedding.pt", "image": "image_embedding.pt"}
# Where :meth:`FudokiForFlow.save_pretrained` keeps the path matrices next to a transformers checkpoint.
SAVED_PATH_EMBEDDINGS = "fudoki_path_embeddings.safetensors"

IMAGE_TAG = "<image_placeholder>"
BOI_TAG = "<begin_of_image>"
EOI_TAG = "<end_of_image>"

# Janus' SigLIP towers (``janus/models/siglip_vit.py``); FUDOKI names one in ``vision_config.params``.
SIGLIP_ARCHS: dict[str, dict[str, Any]] = {
    "siglip_large_patch16_384": {
        "image_size": 384,
        "patch_size": 16,
        "width": 1024,
        "layers": 24,
        "heads": 16,
        "mlp_ratio": 4,
    },
    "siglip_so400m_patch14_384": {
        "image_size": 336,
        "patch_size": 14,
        "width": 1152,
        "layers": 27,
        "heads": 16,
        "mlp_ratio": 3.7362,
    },
    "siglip_so400m_patch14_224": {
        "image_size": 224,
        "patch_size": 14,
        "width": 1152,
        "layers": 27,
        "heads": 16,
        "mlp_ratio": 3.7362,
    },
}
# LlamaGen's VQ-16 (``janus/models/vq_model.py``): the encoder/decoder defaults FUDOKI builds it with.
VQ16_ARCH: dict[str, Any] = {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "z_channels": 256, "num_res_blocks": 2}
# Architecture keys a small (test) checkpoint may add to ``params`` to override the named tower.
SIGLIP_OVERRIDES = ("width", "layers", "heads", "mlp_ratio", "patch_size")
VQ_OVERRIDES = ("ch", "ch_mult", "z_channels", "num_res_blocks")

_SUB_CONFIGS = (
    "language_config",
    "vision_config",
    "aligner_config",
    "gen_vision_config",
    "gen_aligner_config",
    "gen_head_config",
)


class FudokiCheckpointError(ValueError):
    """A FUDOKI checkpoint folder that cannot be read as published."""


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FudokiCheckpointError(f"{folder} has no config.json; is it a FUDOKI checkpoint folder?")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_fudoki_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` holds a checkpoint in FUDOKI's original (``multi_modality``) layout."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return False
    return read_config(folder).get("model_type") == FUDOKI_MODEL_TYPE


def _params(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    sub = cfg[name]
    if not isinstance(sub, dict) or not isinstance(sub.get("params", {}), dict):
        raise FudokiCheckpointError(f"config.json: {name} must be an object with a 'params' object")
    return dict(sub.get("params", {}))


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise FudokiCheckpointError(f"config.json: {msg}")


def janus_config_from_fudoki(cfg: dict[str, Any], token_ids: dict[str, int | None]) -> Any:
    """transformers ``JanusConfig`` equivalent to FUDOKI's ``multi_modality`` config.

    ``token_ids`` gives ``pad``/``bos``/``eos``/``image`` ids from the checkpoint's tokenizer.
    Raises :class:`FudokiCheckpointError` naming the field when the config is not one
    transformers' Janus modules can represent.
    """
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    if cfg.get("model_type") != FUDOKI_MODEL_TYPE:
        raise FudokiCheckpointError(
            f"config.json has model_type {cfg.get('model_type')!r}; FUDOKI's layout has {FUDOKI_MODEL_TYPE!r}"
        )
    missing = [name for name in _SUB_CONFIGS if name not in cfg]
    _expect(not missing, f"missing sub-configs {missing}")

    # -- language model: FUDOKI builds LlamaConfig(**language_config) --------------------------
    lang = {
        k: v
        for k, v in cfg["language_config"].items()
        if k not in ("model_type", "architectures", "_name_or_path")
    }
    if "torch_dtype" in lang:
        lang.setdefault("dtype", lang.pop("torch_dtype"))
    lang["tie_word_embeddings"] = False  # FUDOKI's lm_head is its own matrix
    for key in ("pad", "bos", "eos"):
        if token_ids.get(key) is not None:
            lang[f"{key}_token_id"] = token_ids[key]
    text_config = LlamaConfig(**lang)
    hidden = text_config.hidden_size

    # -- understanding tower: SigLIP + MLP aligner ---------------------------------------------
    vision_cls = cfg["vision_config"].get("cls", "")
    _expect(
        vision_cls == "CLIPVisionTower",
        f"vision_config.cls {vision_cls!r} is not supported (FUDOKI: CLIPVisionTower)",
    )
    vp = _params(cfg, "vision_config")
    name = vp.get("model_name", "siglip_large_patch16_384")
    arch = dict(SIGLIP_ARCHS.get(name, {}))
    arch.update({k: vp[k] for k in SIGLIP_OVERRIDES if k in vp})
    _expect(
        all(k in arch for k in ("width", "layers", "heads", "mlp_ratio", "patch_size")),
        f"unknown SigLIP tower {name!r}; known: {sorted(SIGLIP_ARCHS)} "
        f"(or give {list(SIGLIP_OVERRIDES)} in params)",
    )
    _expect(
        "pixel_mean" not in vp and "pixel_std" not in vp,
        "vision_config.params.pixel_mean/pixel_std (an extra in-model normalisation) are not supported",
    )
    image_size = int(vp.get("image_size", arch.get("image_size", 384)))
    select_layer = int(vp.get("select_layer", -1))
    layers = int(arch["layers"])
    # Janus truncates the tower to the selected block, so later blocks are absent from the weights.
    layers = min(layers, layers + select_layer + 1) if select_layer <= 0 else min(layers, select_layer)
    ap = _params(cfg, "aligner_config")
    _expect(
        ap.get("projector_type", "mlp_gelu") == "mlp_gelu",
        "aligner_config.params.projector_type must be 'mlp_gelu'",
    )
    _expect(
        int(ap.get("input_dim", arch["width"])) == int(arch["width"]),
        "aligner input_dim must equal the SigLIP width",
    )
    _expect(
        int(ap.get("n_embed", hidden)) == hidden, "aligner n_embed must equal language_config.hidden_size"
    )
    patch = int(arch["patch_size"])
    vision_config = JanusVisionConfig(
        hidden_size=int(arch["width"]),
        num_hidden_layers=layers,
        num_attention_heads=int(arch["heads"]),
        mlp_ratio=float(arch["mlp_ratio"]),
        image_size=image_size,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        attention_bias=True,
        projection_dim=hidden,
        depth=int(ap.get("depth", 2)),
        num_image_tokens=(image_size // patch) ** 2,
    )

    # -- generation tower: VQ-16, embedding, aligner, head -------------------------------------
    gv_cls = cfg["gen_vision_config"].get("cls", "")
    gvp = _params(cfg, "gen_vision_config")
    _expect(gv_cls == "VQ-16", f"gen_vision_config.cls {gv_cls!r} is not supported (FUDOKI: VQ-16)")
    vq = dict(VQ16_ARCH)
    vq.update({k: gvp[k] for k in VQ_OVERRIDES if k in gvp})
    codebook = int(gvp.get("image_token_size", 16384))
    code_dim = int(gvp.get("n_embed", 8))
    gap = _params(cfg, "gen_aligner_config")
    ghp = _params(cfg, "gen_head_config")
    _expect(
        gap.get("projector_type", "mlp_gelu") == "mlp_gelu",
        "gen_aligner_config.params.projector_type must be 'mlp_gelu'",
    )
    _expect(
        int(gap.get("input_dim", code_dim)) == code_dim, "gen_aligner input_dim must equal gen_vision n_embed"
    )
    _expect(
        int(gap.get("n_embed", hidden)) == hidden,
        "gen_aligner n_embed must equal language_config.hidden_size",
    )
    _expect(
        int(ghp.get("n_embed", hidden)) == hidden, "gen_head n_embed must equal language_config.hidden_size"
    )
    # transformers' Janus uses one width (projection_dim) for the generation aligner and head.
    _expect(
        int(ghp.get("image_token_embed", hidden)) == hidden,
        "gen_head image_token_embed must equal language_config.hidden_size (transformers' Janus shares it)",
    )
    _expect(
        int(ghp.get("image_token_size", codebook)) == codebook,
        "gen_head image_token_size must equal the VQ codebook size",
    )
    vq_config = JanusVQVAEConfig(
        embed_dim=code_dim,
        num_embeddings=codebook,
        base_channels=int(vq["ch"]),
        channel_multiplier=[int(m) for m in vq["ch_mult"]],
        latent_channels=int(vq["z_channels"]),
        num_res_blocks=int(vq["num_res_blocks"]),
        projection_dim=hidden,
        image_token_embed_dim=hidden,
        num_hidden_layers=int(gap.get("depth", 2)),
        hidden_act="gelu",
    )

    image_id = token_ids.get("image")
    _expect(image_id is not None, f"the tokenizer has no {IMAGE_TAG} token")
    config = JanusConfig(
        text_config=text_config,
        vision_config=vision_config,
        vq_config=vq_config,
        image_token_id=int(image_id),
        tie_word_embeddings=False,
    )
    # Not in FUDOKI's published config: a checkpoint whose unconditional (CFG) token is not FUDOKI's
    # literal 100015 names it here (FudokiForFlow.uncond_token_id reads it from the Janus config).
    uncond = cfg.get("uncond_token_id")
    if uncond is not None:
        _expect(
            isinstance(uncond, int) and not isinstance(uncond, bool) and uncond >= 0,
            f"uncond_token_id must be a non-negative integer token id, got {uncond!r}",
        )
        config.uncond_token_id = int(uncond)
    return config


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
def _mlp_projector_key(prefix: str, rest: str) -> str | None:
    # MlpProjector('mlp_gelu') = Sequential(Linear, GELU, Linear, GELU, …): Linear k sits at index 2k.
    m = re.fullmatch(r"layers\.(\d+)\.(weight|bias)", rest)
    if m is None or int(m.group(1)) % 2:
        return None
    k = int(m.group(1)) // 2
    return f"{prefix}.fc1.{m.group(2)}" if k == 0 else f"{prefix}.hidden_layers.{k - 1}.{m.group(2)}"


def _siglip_key(rest: str) -> str | list[str] | None:
    """Key of ``vision_model.vision_tower.<rest>``; a list for the fused qkv (split in that order)."""
    base = "model.vision_model"
    if rest.startswith("attn_pool."):
        return []  # SigLIP's attention-pool head: Janus never calls it
    simple = {
        "pos_embed": f"{base}.embeddings.position_embedding.weight",
        "patch_embed.proj.weight": f"{base}.embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": f"{base}.embeddings.patch_embedding.bias",
        "norm.weight": f"{base}.post_layernorm.weight",
        "norm.bias": f"{base}.post_layernorm.bias",
    }
    if rest in simple:
        return simple[rest]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", rest)
    if m is None:
        return None
    layer, module, kind = m.groups()
    pre = f"{base}.encoder.layers.{layer}"
    if module == "attn.qkv":
        return [f"{pre}.self_attn.{p}_proj.{kind}" for p in ("q", "k", "v")]
    names = {
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
        "attn.proj": "self_attn.projection_layer",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    return f"{pre}.{names[module]}.{kind}" if module in names else None


def _vq_key(rest: str) -> str | list[str] | None:
    """Key of ``gen_vision_model.<rest>`` (LlamaGen VQ-16)."""
    if rest == "quantize.codebook_used":
        return []  # a usage counter kept by LlamaGen's training code
    rest = re.sub(r"^encoder\.conv_blocks\.", "encoder.down.", rest)
    rest = re.sub(r"^decoder\.conv_blocks\.", "decoder.up.", rest)
    rest = re.sub(r"^((?:encoder|decoder)\.(?:down|up)\.\d+)\.res\.", r"\1.block.", rest)
    rest = re.sub(
        r"^((?:encoder|decoder)\.mid)\.([012])\.",
        lambda m: f"{m.group(1)}.{('block_1', 'attn_1', 'block_2')[int(m.group(2))]}.",
        rest,
    )
    return f"model.vqmodel.{rest}"


def map_fudoki_key(key: str) -> str | list[str] | None:
    """transformers' name(s) for an original FUDOKI/Janus key.

    Returns a name, a list of names (``[]``: dropped on purpose; three names: a fused qkv to split),
    or ``None`` when the key is not part of FUDOKI's layout.
    """
    if key.startswith("language_model.model."):
        if key.endswith("rotary_emb.inv_freq"):
            return []  # older Llama checkpoints saved this buffer; it is recomputed from the config
        return "model.language_model." + key[len("language_model.model.") :]
    if key == "language_model.lm_head.weight":
        return "lm_head.weight"
    if key.startswith("vision_model.vision_tower."):
        return _siglip_key(key[len("vision_model.vision_tower.") :])
    if key.startswith("gen_vision_model."):
        return _vq_key(key[len("gen_vision_model.") :])
    if key.startswith("gen_aligner."):
        return _mlp_projector_key("model.generation_aligner", key[len("gen_aligner.") :])
    if key.startswith("aligner."):
        return _mlp_projector_key("model.aligner", key[len("aligner.") :])
    if key == "gen_embed.weight":
        return "model.generation_embeddings.weight"
    m = re.fullmatch(r"gen_head\.(output_mlp_projector|vision_head)\.(weight|bias)", key)
    if m:
        return (
            "model.generation_head."
            f"{'proj_out' if m.group(1) == 'output_mlp_projector' else 'vision_head'}.{m.group(2)}"
        )
    return None


def convert_fudoki_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Original FUDOKI state dict → transformers Janus names; also returns the keys it cannot place."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        new = map_fudoki_key(key)
        if new is None:
            unknown.append(key)
        elif isinstance(new, list):
            if new:
                if tensor.shape[0] % 3:
                    raise FudokiCheckpointError(
                        f"{key}: fused qkv of shape {tuple(tensor.shape)} does not split in 3"
                    )
                out.update(zip(new, tensor.chunk(3, dim=0)))
        elif new.endswith("position_embedding.weight") and tensor.ndim == 3:
            out[new] = tensor.squeeze(0)  # timm keeps a leading batch dim on pos_embed
        else:
            out[new] = tensor
    return out, unknown


def _weight_files(folder: Path) -> list[Path]:
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    raise FudokiCheckpointError(
        f"{folder} holds no weights: expected model.safetensors, pytorch_model.bin "
        "or a sharded index of either"
    )


def load_original_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint under its original name (safetensors, or ``.bin`` read with
    ``torch.load(weights_only=True)``, never a full unpickle)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(folder)):
        if not path.is_file():
            raise FudokiCheckpointError(f"weight shard {path} listed in the index is missing")
        if path.suffix == ".safetensors":
            part = load_file(str(path), device="cpu")
        else:
            try:
                part = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # torch raises a bare UnpicklingError naming the global
                raise FudokiCheckpointError(
                    f"{path} could not be read with torch.load(weights_only=True): {err}. "
                    "It must hold a plain state dict of tensors."
                ) from err
        if not isinstance(part, dict) or not all(torch.is_tensor(v) for v in part.values()):
            raise FudokiCheckpointError(f"{path} does not hold a state dict of tensors")
        state.update(part)
    return state


# ---------------------------------------------------------------------------------------------
# the path matrices
# ---------------------------------------------------------------------------------------------
def load_path_embedding(path: str | Path) -> torch.Tensor:
    """The ``(V, E)`` matrix of ``text_embedding.pt`` / ``image_embedding.pt``, read safely.

    FUDOKI pickles whole ``nn.Embedding`` modules; this allow-lists exactly that class for
    ``torch.load(weights_only=True)`` and accepts a plain tensor or a ``{"weight": tensor}`` state
    dict too. Anything else in the pickle is refused before it is loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FudokiCheckpointError(f"path embedding file {path} not found")
    allowed = {"torch.nn.modules.sparse.Embedding"}
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as err:
        raise FudokiCheckpointError(f"{path} is not a torch.save file: {err}") from err
    if unsafe - allowed:
        raise FudokiCheckpointError(
            f"{path} pickles {sorted(unsafe - allowed)}; only a tensor, a state dict or an nn.Embedding is "
            "accepted (refusing to unpickle anything else)"
        )
    with torch.serialization.safe_globals([torch.nn.Embedding]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.nn.Embedding):
        obj = obj.weight
    elif isinstance(obj, dict):
        if set(obj) != {"weight"}:
            raise FudokiCheckpointError(
                f"{path} holds a dict with keys {sorted(obj)}; expected only 'weight'"
            )
        obj = obj["weight"]
    if not torch.is_tensor(obj) or obj.ndim != 2 or not obj.is_floating_point():
        raise FudokiCheckpointError(f"{path} must hold a (V, E) floating matrix")
    return obj.detach().float().contiguous()


# ---------------------------------------------------------------------------------------------
# tokenizer and image processor
# ---------------------------------------------------------------------------------------------
def load_tokenizer(folder: str | Path) -> Any:
    """The checkpoint's tokenizer, producing the token ids FUDOKI's own code produces.

    Janus' image tokens are registered as named special tokens, and special tokens are added as
    FUDOKI's tokenizer adds them: ``VLChatProcessor`` loads ``LlamaTokenizerFast``
    (``fudoki/janus/models/processing_vlm.py``: ``tokenizer_class = ("LlamaTokenizer",
    "LlamaTokenizerFast")``), whose constructor (transformers 4.42.4, FUDOKI's pin) *replaces*
    ``tokenizer.json``'s post-processor with ``<bos> $A`` (``add_bos_token``, default true) and an
    optional trailing ``<eos>`` (``add_eos_token``, default false) from ``tokenizer_config.json``.
    transformers' generic fast tokenizer keeps the file's post-processor instead, so a
    ``tokenizer.json`` without one would lose the BOS that FUDOKI's prompts start with.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(folder)
    extra = {"image_token": IMAGE_TAG, "boi_token": BOI_TAG, "eoi_token": EOI_TAG}
    # DeepSeek's tokenizer.json is byte-level BPE under a Llama class name: read the file as is.
    loader = PreTrainedTokenizerFast if (folder / "tokenizer.json").is_file() else AutoTokenizer
    tok = loader.from_pretrained(str(folder), extra_special_tokens=extra)
    vocab = tok.get_vocab()
    absent = [t for t in (IMAGE_TAG, BOI_TAG, EOI_TAG) if t not in vocab]
    if absent:
        raise FudokiCheckpointError(f"the tokenizer in {folder} lacks FUDOKI's special tokens {absent}")
    add_bos, add_eos = _special_token_flags(folder)
    set_llama_special_tokens(tok, add_bos, add_eos, where=str(folder))
    return tok


def _special_token_flags(folder: Path) -> tuple[bool, bool]:
    """``add_bos_token`` / ``add_eos_token`` of ``tokenizer_config.json``, with LlamaTokenizerFast's
    defaults (true / false) when absent."""
    path = folder / "tokenizer_config.json"
    settings: dict[str, Any] = {}
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    flags = []
    for key, default in (("add_bos_token", True), ("add_eos_token", False)):
        value = settings.get(key, default)
        if not isinstance(value, bool):
            raise FudokiCheckpointError(f"{path}: {key} must be true or false, got {value!r}")
        flags.append(value)
    return flags[0], flags[1]


def set_llama_special_tokens(tok: Any, add_bos: bool, add_eos: bool, where: str = "the tokenizer") -> None:
    """Give a fast tokenizer LlamaTokenizerFast's post-processor: ``[<bos>] $A [<eos>]``."""
    from tokenizers import processors

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise FudokiCheckpointError(
            f"{where}: FUDOKI's tokenizer is a fast (tokenizer.json) tokenizer; got {type(tok).__name__}"
        )
    bos, eos = tok.bos_token, tok.eos_token
    for wanted, token, name in ((add_bos, bos, "bos"), (add_eos, eos, "eos")):
        if wanted and token is None:
            raise FudokiCheckpointError(
                f"{where}: add_{name}_token is set but the tokenizer defines no {name}_token; "
                f"set {name}_token in tokenizer_config.json"
            )
    head = f"{bos}:0 " if add_bos else ""
    tail = f" {eos}:0" if add_eos else ""
    head_b = f" {bos}:1" if add_bos else ""
    tail_b = f" {eos}:1" if add_eos else ""
    special = ([(str(bos), tok.bos_token_id)] if add_bos else []) + (
        [(str(eos), tok.eos_token_id)] if add_eos else []
    )
    # transformers' own flags too, so that it rebuilds the same template if it ever rebuilds it.
    for name, value in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
        with contextlib.suppress(AttributeError):
            setattr(tok, name, value)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{head}$A:0{tail}", pair=f"{head}$A:0{tail}{head_b} $B:1{tail_b}", special_tokens=special
    )


def record_special_token_flags(tok: Any, folder: str | Path) -> None:
    """Write into ``folder/tokenizer_config.json`` whether ``tok`` adds BOS / EOS, so that
    :func:`load_tokenizer` rebuilds the same post-processor (transformers drops these keys on save)."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return
    with_special = list(tok("a", add_special_tokens=True)["input_ids"])
    plain = list(tok("a", add_special_tokens=False)["input_ids"])
    add_bos = tok.bos_token_id is not None and with_special[:1] == [tok.bos_token_id]
    add_eos = (
        tok.eos_token_id is not None
        and with_special[-1:] == [tok.eos_token_id]
        and len(with_special) > len(plain) + int(add_bos)
    )
    with open(path, encoding="utf-8") as f:
        settings = json.load(f)
    settings.update(add_bos_token=add_bos, add_eos_token=add_eos)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(settings, f, ensure_ascii=False, indent=2)


def load_image_processor(folder: str | Path | None, image_size: int) -> Any:
    """transformers' Janus image processor set up as FUDOKI preprocesses understanding images:
    longest side resized to ``image_size`` (bilinear), grey (127) padding to a square, mean = std = 0.5.
    ``folder`` may hold a ``preprocessor_config.json`` overriding the normalisation; ``None``: defaults."""
    from transformers.image_utils import PILImageResampling

    try:
        import torchvision  # noqa: F401
        from transformers import JanusImageProcessor as Processor
    except ImportError:  # the PIL backend needs no torchvision
        from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil as Processor

    pre: dict[str, Any] = {}
    path = None if folder is None else Path(folder) / "preprocessor_config.json"
    if path is not None and path.is_file():
        with open(path, encoding="utf-8") as f:
            pre = json.load(f)
    kwargs = {
        k: pre[k]
        for k in ("do_normalize", "image_mean", "image_std", "min_size", "rescale_factor")
        if k in pre
    }
    kwargs.setdefault("image_mean", [0.5, 0.5, 0.5])
    kwargs.setdefault("image_std", [0.5, 0.5, 0.5])
    size = int(pre.get("image_size", image_size))
    if size != image_size:
        raise FudokiCheckpointError(
            f"preprocessor_config.json image_size {size} differs from the vision tower's {image_size}"
        )
    return Processor(size={"height": size, "width": size}, resample=PILImageResampling.BILINEAR, **kwargs)
