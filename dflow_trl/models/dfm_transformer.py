"""``DFMTransformer``: a small bidirectional transformer discrete flow model built on Llama layers.

One sequence holds the condition and the canvas: ``[condition (left-padded)] <sep> [canvas]``.
Attention is full (bidirectional) over each sample's real tokens. Like FUDOKI it is one model for
two tasks:

* ``"t2i"``: condition = prompt text, canvas = ``D_img`` image tokens (``canvas_kind = "image"``),
  logits from the image head;
* ``"understanding"``: condition = image tokens + question text, canvas = ``D_txt`` answer
  tokens (``canvas_kind = "text"``), logits from the text head.

Text ids live in ``[0, V_txt)`` and image ids are embedded at ``V_txt + id`` in one table. Each
canvas has its own probability path (``image_path`` / ``text_path`` in the config): ``metric``
(FUDOKI's, over given embeddings, e.g. palette colours), or ``mask`` / ``uniform`` mixture paths.
The model is not given t (FUDOKI's isn't either). The q/k/v/o/gate/up/down projections carry
Llama's names, so LoRA recipes written for FUDOKI apply unchanged.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import nn
from transformers import GenerationConfig, LlamaConfig, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from ..paths import MixturePath, ProbabilityPath, build_path
from .base import DiscreteFlowModelMixin, FlowInputs

Task = Literal["t2i", "understanding"]


POOLINGS = ("mean", "positional", "encoder", "ordered")
# Width of each prompt slot in the "ordered" pooling's flattened prompt.
ORDERED_SLOT_WIDTH = 32


def _check_pooling(value: bool | str | None) -> str | bool:
    """``condition_pooling`` normalised: False (none), ``"mean"`` (True is accepted for it),
    ``"positional"``, ``"encoder"`` or ``"ordered"``."""
    if value is None or value is False:
        return False
    if value is True:
        return "mean"
    if value not in POOLINGS:
        raise ValueError(f"condition_pooling must be False, True, or one of {list(POOLINGS)}; got {value!r}")
    return value


class DFMTransformerConfig(PretrainedConfig):
    """Configuration of :class:`DFMTransformer`.

    Args:
        text_vocab_size: V_txt, the tokenizer's vocabulary (text canvas vocabulary too).
        image_vocab_size: V_img, image token vocabulary (0: no image modality).
        image_shape: ``(H, W)`` of image canvases (``D_img = H·W``).
        text_canvas_length: ``D_txt``, answer canvas length for understanding.
        max_prompt_length: condition text is left-padded/truncated to this many tokens.
        image_path, text_path: path specs, e.g. ``{"type": "metric", "c": 3.0, "a": 0.9,
            "embeddings": [[r, g, b], ...]}``, ``{"type": "mask", "exponent": 1.0}``,
            ``{"type": "uniform", "exponent": 1.0}``.
        palette: RGB (0-255) per image token, for decoding image canvases to PIL images.
        image_column: dataset column holding the condition image tokens for understanding.
        task: default task, ``"t2i"`` or ``"understanding"``.
        time_conditioning: add an embedding of the flow time t to every position (FUDOKI is not
            time-conditioned; a small model is much better at denoising when told t). The
            trainer and samplers then pass ``flow_time`` to ``forward``.
        condition_pooling: also add a pooled summary of the condition's text tokens to every
            position: ``"mean"`` (or ``True``) pools their embeddings, a bag of words;
            ``"positional"`` pools ``GELU(W (e(w_i) + p_i))`` with ``p_i`` the embedding of the
            word's index in the prompt, so "a square left of a circle" and "a circle left of a
            square" differ; ``"encoder"`` pools the outputs of one bidirectional Llama layer run
            over the prompt alone (SD3's pooled text embedding in miniature), so each word's
            feature already holds its neighbours: which colour goes with which shape, which
            shape comes first; ``"ordered"`` adds to the mean an MLP of the prompt's token
            embeddings concatenated in order (right-aligned, as prompts are left-padded), so
            every word is read in its slot: the first shape named, the colour before it, the
            relation between. Attention alone lets a small model trained briefly ignore a short
            prompt among hundreds of canvas tokens.
        image_position_2d: also give every image token (canvas or condition) learned row and
            column embeddings, so what the model learns at one cell carries over to cells in the
            same row or column instead of being learned afresh for each of the H·W positions.
    """

    model_type = "dfm_transformer"

    def __init__(
        self,
        text_vocab_size: int = 64,
        image_vocab_size: int = 8,
        image_shape: tuple[int, int] | list[int] = (4, 4),
        text_canvas_length: int = 2,
        max_prompt_length: int = 16,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        intermediate_size: int = 128,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        image_path: dict[str, Any] | None = None,
        text_path: dict[str, Any] | None = None,
        palette: list[list[int]] | None = None,
        image_column: str = "scene_tokens",
        task: Task = "t2i",
        time_conditioning: bool = False,
        condition_pooling: bool | str = False,
        image_position_2d: bool = False,
        pad_token_id: int = 0,
        sep_token_id: int = 1,
        uncond_token_id: int = 2,
        mask_token_id: int = 3,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        self.text_vocab_size = int(text_vocab_size)
        self.image_vocab_size = int(image_vocab_size)
        self.image_shape = list(image_shape)
        self.text_canvas_length = int(text_canvas_length)
        self.max_prompt_length = int(max_prompt_length)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.image_path = dict(image_path or {"type": "uniform", "exponent": 1.0})
        self.text_path = dict(text_path or {"type": "mask", "exponent": 1.0})
        self.palette = palette
        self.image_column = image_column
        self.task = task
        self.time_conditioning = bool(time_conditioning)
        self.condition_pooling = _check_pooling(condition_pooling)
        self.image_position_2d = bool(image_position_2d)
        self.sep_token_id = sep_token_id
        self.uncond_token_id = uncond_token_id
        self.mask_token_id = mask_token_id
        self.initializer_range = initializer_range
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    @property
    def image_canvas_length(self) -> int:
        return int(self.image_shape[0] * self.image_shape[1])

    @property
    def max_position_embeddings(self) -> int:
        image_cond = self.image_canvas_length if self.image_vocab_size else 0
        return (
            image_cond + self.max_prompt_length + 1 + max(self.image_canvas_length, self.text_canvas_length)
        )

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.text_vocab_size + self.image_vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            attn_implementation=getattr(self, "_attn_implementation", None) or "sdpa",
        )


class DFMTransformer(DiscreteFlowModelMixin, PreTrainedModel):
    """Bidirectional transformer DFM over ``[condition] <sep> [canvas]`` sequences."""

    config_class = DFMTransformerConfig
    base_model_prefix = "dfm"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["LlamaDecoderLayer"]

    def __init__(self, config: DFMTransformerConfig) -> None:
        super().__init__(config)
        llama = config.llama_config()
        self.embed_tokens = nn.Embedding(llama.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.time_mlp = (
            nn.Sequential(
                nn.Linear(TIME_FEATURES, config.hidden_size),
                nn.SiLU(),
                nn.Linear(config.hidden_size, config.hidden_size),
            )
            if config.time_conditioning
            else None
        )
        if config.image_position_2d:
            self.embed_rows = nn.Embedding(config.image_shape[0], config.hidden_size)
            self.embed_cols = nn.Embedding(config.image_shape[1], config.hidden_size)
        self.condition_proj = (
            nn.Linear(config.hidden_size, config.hidden_size) if config.condition_pooling else None
        )
        self.condition_mixer = (
            nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.GELU())
            if config.condition_pooling == "positional"
            else None
        )
        self.condition_order = None
        if config.condition_pooling == "ordered":
            h, m = config.hidden_size, config.max_prompt_length
            self.condition_order = nn.ModuleDict({
                "slot": nn.Linear(h, ORDERED_SLOT_WIDTH),
                "mix": nn.Sequential(nn.Linear(m * ORDERED_SLOT_WIDTH, h), nn.GELU(), nn.Linear(h, h)),
            })  # fmt: skip
        self.condition_encoder = None
        if config.condition_pooling == "encoder":
            self.condition_encoder = LlamaDecoderLayer(llama, layer_idx=config.num_hidden_layers)
            self.condition_encoder.self_attn.is_causal = False
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(llama, layer_idx=i) for i in range(config.num_hidden_layers)]
        )
        for layer in self.layers:
            layer.self_attn.is_causal = False
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(llama)
        self.text_head = nn.Linear(config.hidden_size, config.text_vocab_size, bias=False)
        self.image_head = nn.Linear(config.hidden_size, max(config.image_vocab_size, 1), bias=False)
        self._llama_config = llama
        self.gradient_checkpointing = False
        self._paths: dict[str, ProbabilityPath] = {}
        self.post_init()
        # TRL reads/writes generation_config (pad/eos ids) even though a DFM never calls generate().
        self.generation_config = GenerationConfig(
            pad_token_id=config.pad_token_id, eos_token_id=config.pad_token_id
        )

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        enc = getattr(self, "condition_encoder", None)
        order = getattr(self, "condition_order", None)
        if order is not None and module is order["mix"][-1]:
            nn.init.zeros_(module.weight)  # starts as "mean" pooling, like "encoder" below
        if enc is not None and module in (enc.self_attn.o_proj, enc.mlp.down_proj):
            # Zero-initialised residual branches (as DiT's adaLN-zero): the encoder starts as the
            # identity, so "encoder" pooling starts as "mean" pooling and only learns what
            # word order adds; from a random start its noise drowned the bag-of-words signal.
            nn.init.zeros_(module.weight)

    # ---- task ---------------------------------------------------------------------------------
    @property
    def task(self) -> Task:
        return self.config.task

    def set_task(self, task: Task) -> DFMTransformer:
        if task not in ("t2i", "understanding"):
            raise ValueError(f"task must be 't2i' or 'understanding', got {task!r}")
        if task == "t2i" and not self.config.image_vocab_size:
            raise ValueError("this model has no image vocabulary, so it cannot do text-to-image")
        self.config.task = task
        return self

    @property
    def canvas_kind(self) -> str:
        return "image" if self.task == "t2i" else "text"

    @property
    def canvas_length(self) -> int:
        return self.config.image_canvas_length if self.task == "t2i" else self.config.text_canvas_length

    def get_probability_path(self) -> ProbabilityPath:
        if self.task not in self._paths:
            cfg = self.config
            if self.task == "t2i":
                path = build_path(cfg.image_path, cfg.image_vocab_size, None)
            else:
                path = build_path(cfg.text_path, cfg.text_vocab_size, cfg.mask_token_id)
            self._paths[self.task] = path
        return self._paths[self.task]

    # ---- inputs -------------------------------------------------------------------------------
    def _tokenize(self, texts: list[str], processing_class: Any) -> torch.Tensor:
        if processing_class is None:
            raise ValueError("DFMTransformer needs its tokenizer (processing_class) to encode prompts")
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise ValueError(
                f"DFMTransformer expects plain-text prompts, got {bad[0]}; "
                "conversational prompts are not supported"
            )
        n = self.config.max_prompt_length
        full = [processing_class(t, add_special_tokens=False)["input_ids"] for t in texts]
        long = [(t, len(r)) for t, r in zip(texts, full) if len(r) > n]
        if long:
            warnings.warn(
                f"{len(long)} of {len(texts)} prompts are longer than the model's max_prompt_length={n} "
                f"tokens and keep only their last {n} (e.g. {long[0][0]!r}: {long[0][1]} tokens); shorten "
                "them, or use a model built with a larger max_prompt_length",
                stacklevel=3,
            )
        rows = [r[-n:] for r in full]
        out = torch.full((len(rows), n), self.config.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                out[i, n - len(r) :] = torch.tensor(r, dtype=torch.long)
        return out

    def prepare_flow_inputs(
        self, prompts: list[Any], processing_class: Any = None, **columns: list[Any]
    ) -> FlowInputs:
        cfg = self.config
        prompt_ids = self._tokenize(list(prompts), processing_class)
        b = prompt_ids.shape[0]
        pieces = [prompt_ids]
        cond_mask = [prompt_ids != cfg.pad_token_id]
        if self.task == "understanding":
            if cfg.image_column not in columns:
                raise ValueError(
                    f"understanding needs the condition image as dataset column {cfg.image_column!r} "
                    f"(a list of {cfg.image_canvas_length} image token ids per row); "
                    f"got columns {sorted(columns)}"
                )
            img = torch.as_tensor(columns[cfg.image_column], dtype=torch.long)
            if img.shape != (b, cfg.image_canvas_length):
                raise ValueError(
                    f"column {cfg.image_column!r} must hold {cfg.image_canvas_length} ids per row, "
                    f"got {tuple(img.shape)}"
                )
            pieces.insert(0, img + cfg.text_vocab_size)
            cond_mask.insert(0, torch.ones_like(img, dtype=torch.bool))
        d = self.canvas_length
        sep = torch.full((b, 1), cfg.sep_token_id, dtype=torch.long)
        canvas = torch.zeros((b, d), dtype=torch.long)
        input_ids = torch.cat([*pieces, sep, canvas], dim=1)
        attention_mask = torch.cat([*cond_mask, torch.ones(b, 1 + d, dtype=torch.bool)], dim=1).long()
        canvas_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        canvas_mask[:, -d:] = True
        uncond = input_ids.clone()
        text_start = input_ids.shape[1] - 1 - d - cfg.max_prompt_length
        prompt_span = torch.zeros_like(canvas_mask)
        prompt_span[:, text_start : text_start + cfg.max_prompt_length] = prompt_ids != cfg.pad_token_id
        uncond[prompt_span] = cfg.uncond_token_id
        dev = self.device
        return FlowInputs(input_ids.to(dev), attention_mask.to(dev), canvas_mask.to(dev), uncond.to(dev))

    # ---- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        canvas_mask: torch.BoolTensor | None = None,
        flow_time: torch.Tensor | float | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Canvas posterior logits ``(B, D, V)`` when ``canvas_mask`` is given (canvas positions hold
        canvas ids), else the final hidden states ``(B, L, H)`` of already-embedded-space ids.
        ``flow_time`` (scalar or ``(B,)``) is required, and only used, with ``time_conditioning``."""
        if canvas_mask is None:
            return self._hidden(input_ids, attention_mask, flow_time)
        ids = input_ids
        if self.task == "t2i":
            ids = torch.where(canvas_mask, input_ids + self.config.text_vocab_size, input_ids)
        hidden = self._hidden(ids, attention_mask, flow_time, canvas_mask)
        canvas_h = hidden[canvas_mask].view(input_ids.shape[0], -1, hidden.shape[-1])
        head = self.image_head if self.task == "t2i" else self.text_head
        logits = head(canvas_h).float()
        path = self.get_probability_path()
        if isinstance(path, MixturePath) and path.source == "mask":
            # The mask is the source, never a clean token: x1 = mask would be an absorbing non-answer.
            logits = logits.index_fill(
                -1, torch.tensor([path.mask_token_id], device=logits.device), float("-inf")
            )
        return logits

    def _hidden(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None,
        flow_time: Any = None,
        canvas_mask: torch.BoolTensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.embed_tokens(input_ids)
        pooled = self._pooled_condition(h, input_ids, attention_mask, canvas_mask)
        if self.time_mlp is not None:
            if flow_time is None:
                raise ValueError(
                    "this DFMTransformer is time-conditioned: pass flow_time (t of x_t) to forward"
                )
            t = torch.as_tensor(flow_time, dtype=h.dtype, device=h.device).reshape(-1).expand(h.shape[0])
            h = h + self.time_mlp(_time_features(t)).unsqueeze(1)
        if pooled is not None:
            h = h + self.condition_proj(pooled).unsqueeze(1)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        h = h + self.embed_positions(positions)
        if self.config.image_position_2d:
            h = h + self._image_positions(input_ids)
        mask = create_bidirectional_mask(
            config=self._llama_config, inputs_embeds=h, attention_mask=attention_mask.bool(),
            allow_is_bidirectional_skip=False,
        )
        pos_emb = self.rotary_emb(h, positions)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = self._gradient_checkpointing_func(
                    layer.__call__, h, mask, positions, None, False, pos_emb
                )
            else:
                h = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=pos_emb)
        return self.norm(h)

    def _pooled_condition(
        self,
        emb: torch.Tensor,
        ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        canvas_mask: torch.BoolTensor | None,
    ) -> torch.Tensor | None:
        """Mean over the condition's text tokens (not the canvas, not image tokens) of their
        embeddings (``"mean"``), of ``GELU(W (e(w_i) + p_i))`` (``"positional"``) or of the
        prompt encoder's outputs (``"encoder"``), scaled to unit RMS; None without
        ``condition_pooling``."""
        if self.condition_proj is None:
            return None
        cond = attention_mask.bool() & (ids < self.config.text_vocab_size)
        if canvas_mask is not None:
            cond = cond & ~canvas_mask
        if self.condition_mixer is not None:
            # Index within the prompt, not within the sequence, so padding does not shift it.
            rank = (cond.long().cumsum(1) - 1).clamp_min(0)
            emb = self.condition_mixer(emb + self.embed_positions(rank))
        if self.condition_encoder is not None:
            emb, cond = self._encode_prompt(emb, cond)
        w = cond.unsqueeze(-1).to(emb.dtype)
        pooled = (emb * w).sum(1) / w.sum(1).clamp_min(1.0)
        if self.condition_order is not None:
            pooled = pooled + self._ordered_prompt(emb, cond)
        # Unit RMS: prompts share most words, so their raw means differ by a small fraction of an
        # already small embedding, and training took far longer to pick up that difference.
        return nn.functional.rms_norm(pooled, pooled.shape[-1:], eps=self.config.rms_norm_eps)

    def _ordered_prompt(self, emb: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """MLP of the ``max_prompt_length`` prompt slots (just before ``<sep>``, left-padded, so
        the last word is always in the last slot), each projected to ``ORDERED_SLOT_WIDTH``,
        padding zeroed, concatenated in order."""
        m = self.config.max_prompt_length
        end = emb.shape[1] - self.canvas_length - 1  # <sep>
        span = emb[:, end - m : end] * cond[:, end - m : end].unsqueeze(-1).to(emb.dtype)
        return self.condition_order["mix"](self.condition_order["slot"](span).flatten(1))

    def _encode_prompt(self, emb: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt encoder over the prompt span only: the ``max_prompt_length`` positions and
        ``<sep>`` just before the canvas (the layout of :meth:`prepare_flow_inputs`, the tokens
        ``"mean"`` pools), padding masked out of the keys."""
        n = self.config.max_prompt_length + 1
        end = emb.shape[1] - self.canvas_length
        span, keep = emb[:, end - n : end], cond[:, end - n : end]
        # A row with no prompt token (an empty prompt) would attend to nothing; its output is
        # weighted 0 in the mean anyway, so let it attend everywhere instead of producing NaN.
        keys = keep | ~keep.any(1, keepdim=True)
        mask = create_bidirectional_mask(
            config=self._llama_config, inputs_embeds=span, attention_mask=keys,
            allow_is_bidirectional_skip=False,
        )
        positions = torch.arange(n, device=emb.device).unsqueeze(0)
        out = self.condition_encoder(
            span, attention_mask=mask, position_ids=positions,
            position_embeddings=self.rotary_emb(span, positions),
        )
        return out, keep

    def _image_positions(self, ids: torch.LongTensor) -> torch.Tensor:
        """Row + column embeddings at image tokens (ids ≥ V_txt, row-major), zero elsewhere."""
        is_image = ids >= self.config.text_vocab_size
        k = (is_image.long().cumsum(1) - 1).clamp_min(0)
        width = self.config.image_shape[1]
        rows = (k // width).clamp_max(self.config.image_shape[0] - 1)
        emb = self.embed_rows(rows) + self.embed_cols(k % width)
        return emb * is_image.unsqueeze(-1).to(emb.dtype)

    def canvas_logits(self, input_ids, attention_mask, canvas_mask, **extra):
        return self.forward(input_ids, attention_mask, canvas_mask=canvas_mask, **extra)

    @property
    def wants_flow_time(self) -> bool:
        return bool(self.config.time_conditioning)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    # ---- decoding -----------------------------------------------------------------------------
    def decode_canvas(self, canvas: torch.LongTensor, processing_class: Any = None) -> list[Any]:
        if self.canvas_kind == "text":
            if processing_class is None:
                raise ValueError("decoding a text canvas needs the tokenizer (processing_class)")
            return processing_class.batch_decode(canvas.tolist(), skip_special_tokens=True)
        from PIL import Image

        h, w = self.config.image_shape
        palette = self.config.palette or _gray_palette(self.config.image_vocab_size)
        lut = torch.tensor(palette, dtype=torch.uint8)
        rgb = lut[canvas.cpu().clamp(0, len(palette) - 1)].view(-1, h, w, 3).numpy()
        return [Image.fromarray(img, mode="RGB") for img in rgb]


TIME_FEATURES = 32


def _time_features(t: torch.Tensor) -> torch.Tensor:
    """Sinusoidal features of ``t ∈ [0, 1]``: ``(B, TIME_FEATURES)``."""
    freqs = torch.exp(torch.linspace(0, 6, TIME_FEATURES // 2, device=t.device, dtype=t.dtype))
    angles = t[:, None] * freqs[None] * torch.pi
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def _gray_palette(n: int) -> list[list[int]]:
    return [[int(255 * i / max(n - 1, 1))] * 3 for i in range(n)]
