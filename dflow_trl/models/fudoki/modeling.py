"""FUDOKI on transformers' own Janus classes.

:class:`FudokiForFlow` is a ``transformers.JanusForConditionalGeneration`` (same modules, same
state-dict names) that computes FUDOKI's posterior instead of Janus' next-token logits:

* **full bidirectional attention** over each sample's valid tokens (padding excluded as keys), with
  positions ``0 … L−1`` as FUDOKI's Llama uses them; works with the ``sdpa`` and ``eager``
  attention implementations;
* **the one-position shift**: the posterior ``p^θ_{1|t}(x1^d | x_t)`` at canvas position ``i`` comes
  from the final hidden state at ``i − 1``;
* the **image canvas** (text-to-image, ``task="t2i"``) reads the generation head (V = 16384 image
  codes) and embeds its tokens with ``generation_embeddings`` → ``generation_aligner``; the **text
  canvas** (``task="understanding"``) reads the LM head (V = 102400) and the 576 image slots of its
  prompt hold SigLIP → aligner features of that sample's own image;
* no time input and no token dropping; heads run on the canvas positions only.

The probability paths are FUDOKI's metric-induced paths over ``image_embedding.pt`` (image canvas)
and ``text_embedding.pt`` (text canvas), ``β_t = 3 (t/(1−t))^0.9``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import JanusForConditionalGeneration

from ..base import DiscreteFlowModelMixin, FlowInputs
from .checkpoint import (
    FUDOKI_MODEL_TYPE,
    PATH_EMBEDDING_FILES,
    SAVED_PATH_EMBEDDINGS,
    FudokiCheckpointError,
    convert_fudoki_state_dict,
    janus_config_from_fudoki,
    load_image_processor,
    load_original_state_dict,
    load_path_embedding,
    load_tokenizer,
    read_config,
    record_special_token_flags,
)
from .layout import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_SYSTEM_PROMPT,
    FUDOKI_UNCOND_TOKEN_ID,
    IMAGE_COLUMN,
    FudokiTokens,
    build_t2i_inputs,
    build_understanding_inputs,
    check_tokenizer,
    load_images,
)

if TYPE_CHECKING:
    from PIL.Image import Image

    from ...paths.base import ProbabilityPath

Task = Literal["t2i", "understanding"]
TASKS: tuple[str, ...] = ("t2i", "understanding")
# FUDOKI's path schedule β_t = c (t / (1 - t))^a.
PATH_C, PATH_A = 3.0, 0.9
SUPPORTED_ATTENTION = ("sdpa", "eager")

# LoRA targets of the paper: q/k/v/o/gate/up/down of the language model only (SigLIP also has
# q/k/v_proj, which a bare name list would catch).
LORA_TARGET_MODULES = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
# Modules to keep out of bitsandbytes quantization (QLoRA quantizes the language model only).
QUANTIZATION_SKIP_MODULES = [
    "model.vision_model",
    "model.aligner",
    "model.vqmodel",
    "model.generation_embeddings",
    "model.generation_aligner",
    "model.generation_head",
    "lm_head",
]


class FudokiForFlow(JanusForConditionalGeneration, DiscreteFlowModelMixin):
    """FUDOKI as a discrete flow model for ``DFlowGRPOTrainer``.

    Load with :meth:`from_pretrained` from a folder in FUDOKI's published layout (or one this class
    saved in transformers' layout), or build it in memory and give it its tokenizer and path
    matrices with :meth:`attach`. ``task`` picks the canvas: ``"t2i"`` (image canvas,
    ``canvas_kind == "image"``) or ``"understanding"`` (answer canvas, ``canvas_kind == "text"``).

    Layout settings (attributes, also ``from_pretrained`` keywords): ``max_length`` (FUDOKI's
    ``txt_max_length + 576`` = 1076), ``answer_length`` (fixed answer canvas ``D``; default
    ``max_length −`` longest prompt), ``system_prompt`` (understanding), ``uncond_token_id`` (CFG;
    FUDOKI's literal 100015 unless the checkpoint's config names another, never the tokenizer's
    pad), ``pad_to`` (``"longest"`` or ``"max_length"`` for text-to-image rows; padding never
    changes the logits).
    """

    lora_target_modules = LORA_TARGET_MODULES
    quantization_skip_modules = QUANTIZATION_SKIP_MODULES

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.task: Task = "t2i"
        self.tokenizer: Any = None
        self.image_processor: Any = None
        # Plain fp32 CPU tensors, not buffers: they define the paths and must not follow the model
        # into bf16 or quantization, nor be written into transformers' state dict.
        self.path_embeddings: dict[str, torch.Tensor] = {}
        self.max_length = DEFAULT_MAX_LENGTH
        self.answer_length: int | None = None
        self.system_prompt = DEFAULT_SYSTEM_PROMPT
        self.pad_to: Literal["longest", "max_length"] = "longest"
        self._paths: dict[str, ProbabilityPath] = {}
        self._checked_tokenizer: Any = None

    # ---- the unconditional (CFG) token ---------------------------------------------------------
    @property
    def uncond_token_id(self) -> int:
        """The id written over the prompt for classifier-free guidance: FUDOKI's literal 100015
        (``fudoki/eval_loop.py``), unless this checkpoint's config names another (``uncond_token_id``
        in FUDOKI's ``config.json``, or set here / by :meth:`from_pretrained` / :meth:`attach`; it
        is saved with the config). Never taken from the tokenizer."""
        given = getattr(self.config, "uncond_token_id", None)
        return FUDOKI_UNCOND_TOKEN_ID if given is None else int(given)

    @uncond_token_id.setter
    def uncond_token_id(self, value: int | None) -> None:
        self.config.uncond_token_id = None if value is None else self._valid_uncond(value)
        self._checked_tokenizer = None  # the tokenizer check depends on it

    @property
    def _uncond_is_fudokis(self) -> bool:
        return getattr(self.config, "uncond_token_id", None) is None

    def _valid_uncond(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"uncond_token_id must be an int token id, got {value!r}")
        v = int(self.config.text_config.vocab_size)
        if not 0 <= value < v:
            default = " (FUDOKI's literal id)" if value == FUDOKI_UNCOND_TOKEN_ID else ""
            raise ValueError(
                f"the unconditional (CFG) token id {value}{default} is outside the language model's "
                f"vocabulary of {v} tokens. For a checkpoint whose unconditional token is another id, "
                "give it: FudokiForFlow.from_pretrained(..., uncond_token_id=ID), "
                '.attach(..., uncond_token_id=ID) or "uncond_token_id": ID in config.json'
            )
        return value

    def _check_tokenizer(self, tokenizer: Any, uncond: int, uncond_is_fudokis: bool) -> None:
        check_tokenizer(
            tokenizer,
            text_vocab_size=int(self.config.text_config.vocab_size),
            image_token_id=getattr(self.config, "image_token_id", None),
            uncond_token_id=uncond,
            uncond_is_fudokis=uncond_is_fudokis,
        )

    # ---- task ----------------------------------------------------------------------------------
    @property
    def canvas_kind(self) -> Literal["image", "text"]:  # type: ignore[override]
        return "image" if self.task == "t2i" else "text"

    def set_task(self, task: Task) -> FudokiForFlow:
        """Switch between ``"t2i"`` and ``"understanding"`` (returns ``self``)."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task = task
        return self

    @property
    def num_image_tokens(self) -> int:
        """Image slots per image (576 for FUDOKI: 24 × 24)."""
        return int(self.config.vision_config.num_image_tokens)

    # ---- loading and saving --------------------------------------------------------------------
    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        task: Task = "t2i",
        max_length: int = DEFAULT_MAX_LENGTH,
        answer_length: int | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        uncond_token_id: int | None = None,
        **kwargs: Any,
    ) -> FudokiForFlow:
        """Load FUDOKI from a local folder (or a Hub repo id, downloaded with ``huggingface_hub``).

        The folder holds either FUDOKI's published layout (``config.json`` of ``model_type
        "multi_modality"``, original key names in safetensors or ``.bin``, tokenizer files,
        ``text_embedding.pt``/``image_embedding.pt``) or the transformers layout written by
        :meth:`save_pretrained`. Other keywords (``dtype``, ``attn_implementation``,
        ``quantization_config``, ``device_map`` …) go to transformers' ``from_pretrained``.
        Any weight that does not find its place, or any module left without weights, is an error,
        and so is a tokenizer that cannot give FUDOKI's token ids (see :meth:`attach`).
        ``uncond_token_id`` overrides the CFG token (FUDOKI's 100015, or the config's
        ``uncond_token_id``).
        """
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        want_info = kwargs.pop("output_loading_info", False)
        folder = _resolve_folder(pretrained_model_name_or_path, kwargs)
        raw = read_config(folder)
        if raw.get("model_type") == FUDOKI_MODEL_TYPE:
            tokenizer = load_tokenizer(folder)
            ids = _token_ids(tokenizer)
            config = janus_config_from_fudoki(raw, ids)
            state, unknown = convert_fudoki_state_dict(load_original_state_dict(folder))
            model, info = super().from_pretrained(
                None, *model_args, config=config, state_dict=state, output_loading_info=True, **kwargs
            )
            embeddings = {
                kind: load_path_embedding(folder / name) for kind, name in PATH_EMBEDDING_FILES.items()
            }
            # PEFT records (and looks up) the base model by this name when saving adapters.
            model.config._name_or_path = model.name_or_path = str(pretrained_model_name_or_path)
        elif raw.get("model_type") == "janus":
            unknown = []
            model, info = super().from_pretrained(
                str(folder), *model_args, output_loading_info=True, **kwargs
            )
            tokenizer = load_tokenizer(folder) if _has_tokenizer(folder) else None
            embeddings = _load_saved_embeddings(folder)
        else:
            raise FudokiCheckpointError(
                f"{folder}/config.json has model_type {raw.get('model_type')!r}; expected FUDOKI's "
                f"{FUDOKI_MODEL_TYPE!r} or a transformers 'janus' checkpoint saved by FudokiForFlow"
            )
        _raise_on_bad_keys(folder, unknown, info)
        model.attach(
            tokenizer,
            image_embeddings=embeddings.get("image"),
            text_embeddings=embeddings.get("text"),
            image_processor=load_image_processor(folder, int(model.config.vision_config.image_size)),
            uncond_token_id=uncond_token_id,
        )
        model.set_task(task)
        model.max_length, model.answer_length = int(max_length), answer_length
        model.system_prompt = system_prompt
        return (model, info) if want_info else model

    def attach(
        self,
        tokenizer: Any,
        image_embeddings: torch.Tensor | torch.nn.Embedding | None = None,
        text_embeddings: torch.Tensor | torch.nn.Embedding | None = None,
        *,
        image_processor: Any = None,
        uncond_token_id: int | None = None,
    ) -> FudokiForFlow:
        """Give a model built in memory what :meth:`from_pretrained` reads beside the weights;
        returns ``self``.

        * ``tokenizer``: FUDOKI's tokenizer (e.g. ``dflow_trl.models.fudoki.load_tokenizer(folder)``), or
          ``None`` to pass one as ``processing_class`` at every call instead. It must hold FUDOKI's
          image tokens (``<image_placeholder>`` at ``config.image_token_id``), ids inside the text
          vocabulary, start encodings with BOS and, unless ``uncond_token_id`` is given, have
          FUDOKI's pad token at id 100015.
        * ``image_embeddings`` / ``text_embeddings``: the ``(V, E)`` matrices of
          ``image_embedding.pt`` / ``text_embedding.pt`` (a tensor or an ``nn.Embedding``) that define
          the image / text probability paths; V must be the VQ codebook size / the text vocabulary.
          They are kept as float32 CPU copies. A kind not given keeps the matrix it had.
        * ``image_processor``: for understanding images; default FUDOKI's preprocessing at the vision
          tower's size (kept if one is already attached).
        * ``uncond_token_id``: the CFG token if this checkpoint's is not FUDOKI's 100015 (stored in
          ``config``).

        Every input is checked before anything changes; a bad one raises ``ValueError`` or
        ``TypeError`` saying what differs.
        """
        explicit = uncond_token_id is not None
        uncond = self._valid_uncond(uncond_token_id) if explicit else self._valid_uncond(self.uncond_token_id)
        fudokis = self._uncond_is_fudokis and not explicit
        new = {
            kind: self._valid_path_embedding(kind, emb)
            for kind, emb in (("image", image_embeddings), ("text", text_embeddings))
            if emb is not None
        }
        if tokenizer is not None:
            self._check_tokenizer(tokenizer, uncond, fudokis)
        if image_processor is not None and not callable(image_processor):
            raise TypeError(
                f"image_processor must be an image processor, got {type(image_processor).__name__}"
            )
        if image_processor is None:
            image_processor = self.image_processor or load_image_processor(
                None, int(self.config.vision_config.image_size)
            )
        # Everything checked: now change the model.
        if explicit:
            self.config.uncond_token_id = uncond
        self.path_embeddings = {**self.path_embeddings, **new}
        for kind in new:
            self._paths.pop(kind, None)
        self.tokenizer = self._checked_tokenizer = tokenizer
        self.image_processor = image_processor
        return self

    def _valid_path_embedding(self, kind: str, emb: Any) -> torch.Tensor:
        name = PATH_EMBEDDING_FILES[kind]
        if isinstance(emb, torch.nn.Embedding):
            emb = emb.weight
        if not torch.is_tensor(emb):
            raise TypeError(
                f"{kind}_embeddings ({name}) must be a tensor or an nn.Embedding, got {type(emb).__name__}"
            )
        if emb.ndim != 2 or not emb.is_floating_point():
            raise ValueError(
                f"{kind}_embeddings ({name}) must be a (V, E) floating matrix, got {emb.dtype} of shape "
                f"{tuple(emb.shape)}"
            )
        expected = {
            "image": (int(self.config.vq_config.num_embeddings), "the VQ codebook has"),
            "text": (int(self.config.text_config.vocab_size), "the text vocabulary has"),
        }[kind]
        if emb.shape[0] != expected[0]:
            raise ValueError(
                f"{kind}_embeddings ({name}) has {emb.shape[0]} rows but {expected[1]} {expected[0]} "
                f"tokens; the path and the {kind} head must share one vocabulary"
            )
        emb = emb.detach().float().cpu().contiguous()
        if not bool(torch.isfinite(emb).all()):
            raise ValueError(f"{kind}_embeddings ({name}) holds non-finite values")
        zero = (emb.norm(dim=1) == 0).nonzero().flatten()
        if zero.numel():
            raise ValueError(
                f"{kind}_embeddings ({name}) rows {zero[:5].tolist()} are zero; "
                "the metric path normalises rows"
            )
        return emb

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save in transformers' Janus layout (loadable by ``JanusForConditionalGeneration``), plus
        the path matrices (``fudoki_path_embeddings.safetensors``) and the tokenizer/image processor."""
        from safetensors.torch import save_file

        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        folder = Path(save_directory)
        if self.path_embeddings:
            save_file(
                {f"{kind}_embedding": emb.contiguous() for kind, emb in self.path_embeddings.items()},
                str(folder / SAVED_PATH_EMBEDDINGS),
            )
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(folder))
            record_special_token_flags(self.tokenizer, folder)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(str(folder))

    def get_processor(self) -> Any:
        """A transformers ``JanusProcessor`` over this checkpoint's tokenizer and image processor
        (usable as ``processing_class``)."""
        from transformers import JanusProcessor

        if self.tokenizer is None:
            raise ValueError(
                "this model was loaded without a tokenizer; load it with FudokiForFlow.from_pretrained"
            )
        return JanusProcessor(
            image_processor=self.image_processor,
            tokenizer=self.tokenizer,
            num_image_tokens=self.num_image_tokens,
        )

    # ---- the discrete-flow interface -----------------------------------------------------------
    def get_probability_path(self) -> ProbabilityPath:
        """FUDOKI's metric-induced path for the current canvas (image or text embeddings)."""
        from ...paths import MetricInducedPath

        kind = self.canvas_kind
        if kind not in self._paths:
            if kind not in self.path_embeddings:
                raise ValueError(
                    f"no {PATH_EMBEDDING_FILES[kind]} was loaded; FudokiForFlow.from_pretrained reads it "
                    f"from the checkpoint, FudokiForFlow.attach({kind}_embeddings=...) gives it to a model "
                    "built in memory"
                )
            self._paths[kind] = MetricInducedPath(self.path_embeddings[kind], c=PATH_C, a=PATH_A)
        return self._paths[kind].to(self.device)

    def prepare_flow_inputs(
        self, prompts: list[Any], processing_class: Any = None, **columns: list[Any]
    ) -> FlowInputs:
        """FUDOKI's layout for ``prompts`` (strings or chat messages) with a placeholder canvas.

        Understanding takes each sample's image from the ``input_image`` column (PIL image, file
        path or uint8 array; ``None`` for a text-only question) or, already preprocessed, from
        ``pixel_values`` (``(3, H, W)`` tensors). Other columns are ignored.
        """
        prompts = list(prompts)
        tokenizer, image_processor = self._processors(processing_class)
        tokens = FudokiTokens.from_tokenizer(tokenizer, self.uncond_token_id)
        if self.task == "t2i":
            inputs = build_t2i_inputs(
                prompts,
                tokenizer,
                tokens,
                self.num_image_tokens,
                max_length=self.max_length,
                pad_to=self.pad_to,
            )
            return inputs.to(self.device)
        pixel_values, has_image = self._understanding_pixels(len(prompts), image_processor, columns)
        inputs = build_understanding_inputs(
            prompts,
            tokenizer,
            tokens,
            self.num_image_tokens,
            has_image,
            max_length=self.max_length,
            answer_length=self.answer_length,
            system_prompt=self.system_prompt,
        )
        if pixel_values is not None:
            inputs.extra["pixel_values"] = pixel_values
        return inputs.to(self.device)

    def canvas_logits(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        canvas_mask: torch.BoolTensor,
        pixel_values: torch.Tensor | None = None,
        **extra: torch.Tensor,
    ) -> torch.Tensor:
        """``(B, D, V)`` posterior logits of the canvas, in the model's dtype.

        ``logits[b, d] = head(h[b, i_d − 1])`` with ``i_d`` the d-th canvas position and ``h`` the
        final hidden states under full attention over the valid tokens of row b. ``pixel_values``
        (``(B, 3, H, W)``) feeds the image slots of understanding prompts.
        """
        if extra:
            raise TypeError(f"FudokiForFlow.canvas_logits got unexpected inputs {sorted(extra)}")
        d = self._check_inputs(input_ids, attention_mask, canvas_mask)
        hidden = self._hidden_states(input_ids, attention_mask, canvas_mask, pixel_values)
        b, _, width = hidden.shape
        # FUDOKI keeps the autoregressive shift: position i is read from hidden state i - 1.
        prev = canvas_mask.nonzero()[:, 1].view(b, d) - 1
        h = hidden.gather(1, prev.unsqueeze(-1).expand(b, d, width))
        head = self.model.generation_head if self.task == "t2i" else self.lm_head
        return head(h)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        canvas_mask: torch.BoolTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """With ``canvas_mask``: :meth:`canvas_logits` (so DDP/DeepSpeed wrappers see the flow
        forward). Without: transformers' Janus forward."""
        if canvas_mask is not None:
            if kwargs:
                raise TypeError(f"a canvas forward takes no further inputs, got {sorted(kwargs)}")
            return self.canvas_logits(input_ids, attention_mask, canvas_mask, pixel_values=pixel_values)
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **kwargs
        )

    def decode_canvas(self, canvas: torch.LongTensor, processing_class: Any = None) -> list[Any]:
        """Final canvases → PIL images (t2i) or answer strings (understanding, cut at the first
        end-of-sentence token, special tokens skipped)."""
        if self.task == "t2i":
            return self.decode_images(canvas)
        tokenizer, _ = self._processors(processing_class)
        eos = FudokiTokens.from_tokenizer(tokenizer).eos
        texts = []
        for row in canvas.tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
        return texts

    @torch.no_grad()
    def decode_images(self, codes: torch.LongTensor, batch_size: int = 8) -> list[Image]:
        """``(B, N)`` image codes → PIL images through the VQ decoder (``[-1, 1]`` → 0–255)."""
        from PIL import Image as PILImage

        n = self.num_image_tokens
        if codes.ndim != 2 or codes.shape[1] != n:
            raise ValueError(f"image canvases must have shape (B, {n}), got {tuple(codes.shape)}")
        self._check_codes(codes)
        vq = self.model.vqmodel
        images = []
        for chunk in codes.split(batch_size):
            pixels = vq.decode(chunk.to(self.device))
            pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            images += [PILImage.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]
        return images

    # ---- internals -----------------------------------------------------------------------------
    def _processors(self, processing_class: Any) -> tuple[Any, Any]:
        if processing_class is None:
            tokenizer, image_processor = self.tokenizer, self.image_processor
        elif hasattr(processing_class, "tokenizer"):
            tokenizer = processing_class.tokenizer
            image_processor = getattr(processing_class, "image_processor", None) or self.image_processor
        else:
            tokenizer, image_processor = processing_class, self.image_processor
        if tokenizer is None:
            raise ValueError(
                "no tokenizer: pass processing_class, load the model with FudokiForFlow.from_pretrained "
                "or give it one with FudokiForFlow.attach"
            )
        if tokenizer is not self._checked_tokenizer:
            self._check_tokenizer(
                tokenizer, self._valid_uncond(self.uncond_token_id), self._uncond_is_fudokis
            )
            self._checked_tokenizer = tokenizer
        return tokenizer, image_processor

    def _understanding_pixels(
        self, batch: int, image_processor: Any, columns: dict[str, list[Any]]
    ) -> tuple[torch.Tensor | None, list[bool]]:
        images, pixels = columns.get(IMAGE_COLUMN), columns.get("pixel_values")
        if images is not None and pixels is not None:
            raise ValueError(
                f"give the understanding image as {IMAGE_COLUMN!r} or as 'pixel_values', not both"
            )
        given = images if images is not None else pixels
        if given is None:
            return None, [False] * batch
        if len(given) != batch:
            raise ValueError(f"{batch} prompts but {len(given)} images")
        has = [x is not None for x in given]
        if not any(has):
            return None, has
        size = int(self.config.vision_config.image_size)
        if images is not None:
            if image_processor is None:
                raise ValueError("no image processor: load the model with FudokiForFlow.from_pretrained")
            loaded = load_images([x for x in images if x is not None])
            done = image_processor(images=loaded, return_tensors="pt")["pixel_values"]
        else:
            done = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in pixels if x is not None])
        if tuple(done.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values must be (3, {size}, {size}) per image, got {tuple(done.shape[1:])}"
            )
        out = torch.zeros(batch, 3, size, size)
        out[torch.tensor(has)] = done.float()
        return out, has

    def _check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, canvas_mask: torch.Tensor
    ) -> int:
        impl = self.config._attn_implementation
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(
                "FUDOKI needs a bidirectional padding mask; "
                f"attention implementation {impl!r} is not supported, "
                f"use one of {SUPPORTED_ATTENTION}"
            )
        if input_ids is None or input_ids.ndim != 2:
            raise ValueError(
                f"input_ids must be (B, L), got {None if input_ids is None else tuple(input_ids.shape)}"
            )
        shape = tuple(input_ids.shape)
        for name, t in (("attention_mask", attention_mask), ("canvas_mask", canvas_mask)):
            if t is None or tuple(t.shape) != shape:
                raise ValueError(
                    f"{name} must have the shape of input_ids {shape}, "
                    f"got {None if t is None else tuple(t.shape)}"
                )
        if canvas_mask.dtype != torch.bool:
            raise ValueError(f"canvas_mask must be a bool tensor, got {canvas_mask.dtype}")
        counts = canvas_mask.sum(1)
        d = int(counts[0])
        if d < 1 or bool((counts != d).any()):
            raise ValueError(
                f"every row needs the same number D >= 1 of canvas positions, got {counts.tolist()}"
            )
        if bool(canvas_mask[:, 0].any()):
            raise ValueError(
                "position 0 cannot be a canvas position: its posterior would come from position -1"
            )
        if bool((canvas_mask & (attention_mask == 0)).any()):
            raise ValueError("canvas positions must be attended tokens (attention_mask 1)")
        if self.task == "t2i":
            self._check_codes(input_ids[canvas_mask])
        return d

    def _check_codes(self, codes: torch.Tensor) -> None:
        v = int(self.config.vq_config.num_embeddings)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= v):
            raise ValueError(
                f"image canvas tokens must be codes in [0, {v}), got [{int(codes.min())}, {int(codes.max())}]"
            )

    def _hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        canvas_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
    ) -> torch.Tensor:
        lm = self.model.language_model
        # Image codes are not text ids: embed a harmless id there, replaced just below.
        text_ids = input_ids.masked_fill(canvas_mask, 0) if self.task == "t2i" else input_ids
        embeds = lm.get_input_embeddings()(text_ids)
        if self.task == "t2i":
            img = self.model.generation_aligner(self.model.generation_embeddings(input_ids[canvas_mask]))
            embeds = _place(embeds, canvas_mask, img)
        else:
            embeds = self._place_image_features(input_ids, attention_mask, canvas_mask, embeds, pixel_values)
        b, length = input_ids.shape
        valid = attention_mask.to(torch.bool)
        # Keys outside a row's valid tokens are masked; padded queries still see the valid keys, so
        # no row of the softmax is empty (their outputs are never read).
        bias = torch.zeros(b, 1, 1, length, dtype=embeds.dtype, device=embeds.device)
        bias = bias.masked_fill(~valid[:, None, None, :], torch.finfo(embeds.dtype).min).expand(
            b, 1, length, length
        )
        positions = torch.arange(length, device=embeds.device).unsqueeze(0)
        out = lm(inputs_embeds=embeds, attention_mask=bias, position_ids=positions, use_cache=False)
        return out.last_hidden_state

    def _place_image_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        canvas_mask: torch.Tensor,
        embeds: torch.Tensor,
        pixel_values: torch.Tensor | None,
    ) -> torch.Tensor:
        slots = (input_ids == self.config.image_token_id) & ~canvas_mask & attention_mask.to(torch.bool)
        per_row = slots.sum(1)
        rows = per_row > 0
        if not bool(rows.any()):
            return embeds
        n = self.num_image_tokens
        if bool((per_row[rows] != n).any()):
            raise ValueError(f"rows with an image need exactly {n} image slots, got {per_row.tolist()}")
        if pixel_values is None:
            raise ValueError("the prompts hold image slots but no pixel_values were given")
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} images for {input_ids.shape[0]} rows")
        vision_dtype = self.model.vision_model.embeddings.patch_embedding.weight.dtype
        feats = self.model.get_image_features(
            pixel_values[rows].to(embeds.device, vision_dtype)
        ).pooler_output
        return _place(embeds, slots, feats.reshape(-1, feats.shape[-1]))


def _place(embeds: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``embeds`` with the rows at ``mask`` (row-major) replaced by ``values``; out of place so that
    autograd hooks on the embedding output stay valid."""
    full = torch.zeros_like(embeds)
    full[mask] = values.to(embeds.dtype)
    return torch.where(mask.unsqueeze(-1), full, embeds)


def _token_ids(tokenizer: Any) -> dict[str, int | None]:
    from .checkpoint import IMAGE_TAG

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "pad": pad,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "image": tokenizer.get_vocab().get(IMAGE_TAG),
    }


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def _load_saved_embeddings(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    saved = folder / SAVED_PATH_EMBEDDINGS
    if saved.is_file():
        tensors = load_file(str(saved))
        return {
            kind: tensors[f"{kind}_embedding"].float()
            for kind in PATH_EMBEDDING_FILES
            if f"{kind}_embedding" in tensors
        }
    # A transformers-layout folder may also carry FUDOKI's original files.
    return {
        kind: load_path_embedding(folder / f)
        for kind, f in PATH_EMBEDDING_FILES.items()
        if (folder / f).is_file()
    }


def _raise_on_bad_keys(folder: Path, unknown: Sequence[str], info: dict[str, Any]) -> None:
    problems = []
    if unknown:
        problems.append(f"unexpected keys (not part of FUDOKI's layout): {sorted(unknown)[:20]}")
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(what, ()))
        if keys:
            problems.append(f"{what.replace('_', ' ')}: {keys[:20]}{' …' if len(keys) > 20 else ''}")
    if problems:
        raise FudokiCheckpointError(f"the weights in {folder} do not fit the model: " + "; ".join(problems))


def _resolve_folder(name_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise FudokiCheckpointError(
            f"{path} is a file; FudokiForFlow.from_pretrained needs a checkpoint folder"
        )
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise FudokiCheckpointError(
            f"{name!r} is neither a local folder nor a Hub repo id like 'LucasJinWang/FUDOKI'"
        )
    from huggingface_hub import snapshot_download

    hub = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    return Path(snapshot_download(name, **hub))
