"""GPU benchmark of dFlowGRPO on a FUDOKI-shaped model with random weights.

The model is ``FudokiForFlow`` built from the ``JanusConfig`` that FUDOKI's published
``config.json`` maps to (DeepSeek-LLM 1.3B body: hidden 2048, 24 layers, 16 heads, intermediate
5632, text vocab 102400; SigLIP-L/16 at 384 px; VQ-16 with V = 16384 codes; 576-token images),
randomly initialised in bf16 with sdpa attention. No checkpoint, tokenizer file or network is
needed: the tokenizer is a byte-level stand-in with FUDOKI's special tokens and the image path
embedding is random. It measures, for text-to-image with LoRA (r = 48, α = 96 on
``FudokiForFlow.lora_target_modules``), G = 24 images of one prompt, K = 8 flow steps and the
``monte_carlo`` estimator with n = 24 recorded draws:

* **rollout images/s** — ``dflow_trl.rollout.rollout`` of the G images (K forwards of the policy
  plus the metric-path sampler and its records), and the same K forwards alone;
* **RL step wall time** — one optimizer step of ``DFlowGRPOTrainer``: the rollouts, VQ decoding,
  a synthetic reward, then forward + backward of every trained step of every rollout (gradient
  accumulation over the group) and the AdamW step; split into generation+scoring and training;
* **model-FLOPs utilisation** against ``--peak-tflops`` (default 989: H100 SXM, dense bf16);
* **peak GPU memory** (``torch.cuda.max_memory_allocated``) of the rollout and of the RL step.

Run (estimated 1–3 minutes on one H100, inside the 8-minute budget; each iteration's time is
printed as it completes)::

    python benchmarks/fudoki_gpu.py --output fudoki_gpu.json
    python benchmarks/fudoki_gpu.py --train-batch-size 2 --no-gradient-checkpointing   # no recompute
    python benchmarks/fudoki_gpu.py --tiny    # CPU smoke run of the same code path (tiny dims, fp32, <15 s)

FLOP convention (printed with the results). Matmul FLOPs only, 2 per multiply-add, over the
*valid* (unpadded) tokens; embedding look-ups, norms, softmaxes, the sampler and the VQ decoder are
not counted, nor is gradient-checkpointing recompute (model FLOPs, not hardware FLOPs). With T valid
tokens, D canvas tokens and L layers of width d:

* forward ``F = 2 (N_body + N_lora) T + 2 (N_align + N_head) D + 4 L d T²`` — ``N_body`` the
  language model's linear weights and ``N_lora`` the LoRA matrices (every token), ``N_align`` /
  ``N_head`` the generation aligner / head (canvas tokens only), ``4 L d T²`` the bidirectional
  attention scores and values;
* backward, **LoRA-exact** (the headline MFU): input gradients through every frozen weight on the
  way down to the first LoRA layer, weight gradients for the LoRA matrices only —
  ``2 (N_body + N_lora) T + 2 N_head D + 8 L d T² + 2 N_lora T`` (about 1.1× the forward, not 2×);
* backward, **6N convention** (reported alongside, as TRL and most LLM papers count): 2× forward,
  i.e. fwd + bwd = 3 F, as if every weight were trained.

An RL step counts G·K rollout forwards plus G·S (forward + backward) for the S trained steps per
rollout (plus G·S reference forwards if ``--beta`` ≠ 0). Out-of-memory errors are caught, reported
with the phase and memory figures, written to ``--output``, and exit with status 3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Fewer fragmentation OOMs with the changing shapes of rollout and training (must precede CUDA init).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

# FUDOKI's tokenizer specials (DeepSeek-LLM), as the layout code looks them up by text.
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE_TAG, BOI_TAG, EOI_TAG = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
PROMPT_TEXT = (
    "a photo of a red bicycle leaning against a blue wooden door on a sunny street with long shadows "
)
EXIT_OOM = 3


@dataclass(frozen=True)
class Shape:
    """Architecture of the FUDOKI-shaped model (``None`` fields keep FUDOKI's named towers)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    text_vocab: int
    codebook: int
    code_dim: int
    image_size: int | None = None  # SigLIP input size; 384 / 16 = 24 → 576 image tokens
    siglip: dict[str, Any] | None = None  # overrides of siglip_large_patch16_384
    vq: dict[str, Any] | None = None  # overrides of VQ-16's encoder/decoder


FULL = Shape(
    hidden=2048, layers=24, heads=16, intermediate=5632, text_vocab=102400, codebook=16384, code_dim=8
)
TINY = Shape(
    hidden=32,
    layers=2,
    heads=4,
    intermediate=64,
    text_vocab=320,
    codebook=64,
    code_dim=8,
    image_size=32,
    siglip={"width": 32, "layers": 2, "heads": 4, "mlp_ratio": 4, "patch_size": 8},  # 4 × 4 = 16 image tokens
    vq={"ch": 32, "ch_mult": [1, 2], "z_channels": 32, "num_res_blocks": 1},
)


# ---------------------------------------------------------------------------------------------
# model, tokenizer, prompt
# ---------------------------------------------------------------------------------------------
def fudoki_raw_config(shape: Shape) -> dict[str, Any]:
    """FUDOKI's ``config.json`` (``multi_modality``, Janus-1.3B layout) for ``shape``."""
    h = shape.hidden
    vision: dict[str, Any] = {
        "model_name": "siglip_large_patch16_384",
        "select_feature": "same",
        "select_layer": -1,
    }
    if shape.image_size is not None:
        vision["image_size"] = shape.image_size
    vision.update(shape.siglip or {})
    width = (shape.siglip or {}).get("width", 1024)
    return {
        "model_type": "multi_modality",
        "language_config": {
            "model_type": "llama",
            "hidden_size": h,
            "intermediate_size": shape.intermediate,
            "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.heads,
            "num_hidden_layers": shape.layers,
            "max_position_embeddings": 16384,
            "vocab_size": shape.text_vocab,
        },
        "vision_config": {"cls": "CLIPVisionTower", "params": vision},
        "aligner_config": {
            "cls": "MlpProjector",
            "params": {"depth": 2, "input_dim": width, "n_embed": h, "projector_type": "mlp_gelu"},
        },
        "gen_vision_config": {
            "cls": "VQ-16",
            "params": {"image_token_size": shape.codebook, "n_embed": shape.code_dim, **(shape.vq or {})},
        },
        "gen_aligner_config": {
            "cls": "MlpProjector",
            "params": {"depth": 2, "input_dim": shape.code_dim, "n_embed": h, "projector_type": "mlp_gelu"},
        },
        "gen_head_config": {
            "cls": "vision_head",
            "params": {"image_token_embed": h, "image_token_size": shape.codebook, "n_embed": h},
        },
    }


def build_tokenizer() -> Any:
    """A byte-level tokenizer (one token per ASCII character) with FUDOKI's special tokens.

    Only the number of prompt tokens matters for the benchmark; ``--prompt-tokens`` sets it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, PAD, IMAGE_TAG, BOI_TAG, EOI_TAG]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TAG, "boi_token": BOI_TAG, "eoi_token": EOI_TAG},
        model_max_length=16384,
    )


def build_model(shape: Shape, tokenizer: Any, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """``FudokiForFlow`` with random weights, built directly on ``device`` in ``dtype``."""
    from dflow_trl.models import FudokiForFlow
    from dflow_trl.models.fudoki.checkpoint import janus_config_from_fudoki

    vocab = tokenizer.get_vocab()
    ids = {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    ids["image"] = vocab[IMAGE_TAG]
    config = janus_config_from_fudoki(fudoki_raw_config(shape), ids)
    torch.manual_seed(seed)
    with torch.device(device):
        model = FudokiForFlow._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.to(device)
    # FUDOKI's image path is the metric path over the VQ codebook (image_embedding.pt); random rows here.
    g = torch.Generator().manual_seed(seed + 1)
    embedding = torch.randn(shape.codebook, shape.code_dim, generator=g)
    # What from_pretrained reads beside the weights. The stand-in tokenizer has no id 100015 (FUDOKI's
    # unconditional token), so its pad token plays that part; CFG is off in the benchmark anyway.
    model.attach(tokenizer, image_embeddings=embedding, uncond_token_id=tokenizer.pad_token_id)
    model.set_task("t2i")
    return model


def make_prompt(model: Any, tokenizer: Any, target_tokens: int) -> tuple[str, int]:
    """A prompt whose FUDOKI t2i prefix (``<bos> User: … Assistant:<begin_of_image>``) has about
    ``target_tokens`` tokens; returns it with the exact prefix length."""

    def prefix_len(text: str) -> int:
        inputs = model.prepare_flow_inputs([text], tokenizer)
        return int(inputs.canvas_mask[0].nonzero()[0, 0])

    overhead = prefix_len("a") - 1
    chars = max(1, target_tokens - overhead)
    text = (PROMPT_TEXT * (chars // len(PROMPT_TEXT) + 1))[:chars].strip() or "a"
    return text, prefix_len(text)


# ---------------------------------------------------------------------------------------------
# FLOP accounting
# ---------------------------------------------------------------------------------------------
@dataclass
class FlopModel:
    """Linear-weight counts by where they apply (see the module docstring for the convention)."""

    body: int  # language-model linears (frozen base weights), every valid token
    lora: int  # LoRA A/B matrices, every valid token
    gen_aligner: int  # code embedding → hidden, canvas tokens
    gen_head: int  # hidden → V image-code logits, canvas tokens
    layers: int
    hidden: int
    total_params: int

    @classmethod
    def from_model(cls, model: torch.nn.Module, layers: int, hidden: int) -> FlopModel:
        body = lora = gen_aligner = gen_head = 0
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            n = module.in_features * module.out_features
            if ".lora_" in name:
                lora += n
            elif ".language_model." in f".{name}":
                body += n
            elif "generation_aligner" in name:
                gen_aligner += n
            elif "generation_head" in name:
                gen_head += n
        total = sum(p.numel() for p in model.parameters())
        return cls(body, lora, gen_aligner, gen_head, layers, hidden, total)

    def attention(self, tokens: int) -> float:
        return 4.0 * self.layers * self.hidden * tokens**2

    def forward(self, tokens: int, canvas: int) -> float:
        linear = 2.0 * (self.body + self.lora) * tokens + 2.0 * (self.gen_aligner + self.gen_head) * canvas
        return linear + self.attention(tokens)

    def backward_lora(self, tokens: int, canvas: int) -> float:
        inputs = (
            2.0 * (self.body + self.lora) * tokens + 2.0 * self.gen_head * canvas + 2 * self.attention(tokens)
        )
        return inputs + 2.0 * self.lora * tokens

    def train(self, tokens: int, canvas: int, convention: str) -> float:
        """Forward + backward of one sequence: ``"lora"`` (exact for frozen weights) or ``"6n"`` (3 F)."""
        if convention == "6n":
            return 3.0 * self.forward(tokens, canvas)
        return self.forward(tokens, canvas) + self.backward_lora(tokens, canvas)


# ---------------------------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gib(n: float) -> float:
    return n / 2**30


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> dict[str, float] | None:
    if device.type != "cuda":
        return None
    return {
        "max_allocated_gib": _gib(torch.cuda.max_memory_allocated(device)),
        "max_reserved_gib": _gib(torch.cuda.max_memory_reserved(device)),
    }


class AutocastPolicy:
    """The policy called under bf16 autocast, as accelerate wraps the trainer's model forward.

    Only the forward is autocast (the LoRA matrices, kept in fp32 by PEFT, then run in bf16); the
    sampler's metric-path arithmetic stays in fp32, as in the trainer's rollouts."""

    def __init__(self, model: torch.nn.Module, device: torch.device, bf16: bool) -> None:
        self.model, self.device, self.bf16 = model, device, bf16

    def __call__(self, **kwargs: Any) -> torch.Tensor:
        if not self.bf16:
            return self.model(**kwargs)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
            return self.model(**kwargs)


@contextlib.contextmanager
def phase(report: dict[str, Any], name: str) -> Iterator[None]:
    """Mark the running phase (for error reports) and print its wall time."""
    report["phase"] = name
    t0 = time.perf_counter()
    print(f"[fudoki-bench] {name} …", flush=True)
    yield
    dt = time.perf_counter() - t0
    report.setdefault("phase_seconds", {})[name] = round(dt, 3)
    print(f"[fudoki-bench] {name}: {dt:.1f} s", flush=True)


def _progress(what: str, i: int, warmup: int, seconds: float) -> None:
    kind = "warmup" if i < warmup else "timed"
    print(f"[fudoki-bench]   {what} {i + 1} ({kind}): {seconds:.3f} s", flush=True)


def _stats(times: list[float]) -> dict[str, Any]:
    return {"mean_s": sum(times) / len(times), "min_s": min(times), "all_s": [round(t, 4) for t in times]}


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
def build_trainer(
    args: argparse.Namespace, model: Any, tokenizer: Any, prompt: str, device: torch.device
) -> Any:
    import numpy as np
    from datasets import Dataset
    from peft import LoraConfig

    from dflow_trl import DFlowGRPOConfig, DFlowGRPOTrainer

    codebook = int(model.config.vq_config.num_embeddings)

    def synthetic_reward(
        prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], **_: Any
    ) -> list[float]:
        """Fraction of image codes in the lower half of the codebook: cheap, and varies across a group."""
        return [float(np.mean(np.asarray(ids) < codebook // 2)) for ids in completion_ids]

    config = DFlowGRPOConfig(
        output_dir=args.work_dir,
        use_cpu=device.type == "cpu",
        bf16=args.bf16,
        fp16=False,
        tf32=None,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        per_device_train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.num_generations // args.train_batch_size,
        num_generations=args.num_generations,
        max_steps=args.warmup + args.iters,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        beta=args.beta,
        num_flow_steps=args.num_flow_steps,
        estimator="monte_carlo",
        num_mc_samples=args.num_mc_samples,
        rollout_batch_size=args.rollout_batch_size,  # set in parse_args: the same chunks as bench_rollout
        log_sample_images=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
    )
    lora = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=model.lora_target_modules
    )
    dataset = Dataset.from_dict({"prompt": [prompt] * 8})
    trainer = DFlowGRPOTrainer(
        model=model,
        reward_funcs=synthetic_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def bench_rollout(
    args: argparse.Namespace,
    policy: Any,
    flow_model: Any,
    batch: Any,
    device: torch.device,
    report: dict[str, Any],
) -> None:
    """Time ``rollout`` of the G images (K steps, n draws recorded) and the K policy forwards alone."""
    from dflow_trl.likelihood import get_estimator
    from dflow_trl.rollout import flow_logits, rollout

    estimator = get_estimator("monte_carlo", num_draws=args.num_mc_samples)
    path = flow_model.get_probability_path()
    chunk = args.rollout_batch_size
    gen = torch.Generator(device=device).manual_seed(args.seed)
    was_training = policy.training
    policy.eval()
    rollout_times, forward_times = [], []
    _reset_peak(device)
    call = AutocastPolicy(policy, device, args.bf16)
    with torch.no_grad():
        for i in range(args.warmup + args.iters):
            _sync(device)
            t0 = time.perf_counter()
            traj = rollout(
                call, batch, path, args.num_flow_steps, estimator=estimator, generator=gen, chunk_size=chunk
            )
            _sync(device)
            dt = time.perf_counter() - t0
            _progress("rollout", i, args.warmup, dt)
            if i >= args.warmup:
                rollout_times.append(dt)
        changed = float((traj.states[:, 1:] != traj.states[:, :-1]).float().mean())
        del traj
        report["rollout_peak_memory"] = _peak(device)
        d = batch.canvas_length
        for i in range(args.warmup + args.iters):
            canvases = [
                path.sample_source((batch.batch_size, d), device=device) for _ in range(args.num_flow_steps)
            ]
            _sync(device)
            t0 = time.perf_counter()
            for canvas in canvases:
                for s in range(0, batch.batch_size, chunk):
                    sub = batch.index(slice(s, s + chunk))
                    logits = flow_logits(call, sub, canvas[s : s + chunk])
                    del logits
            _sync(device)
            dt = time.perf_counter() - t0
            _progress("policy forwards alone", i, args.warmup, dt)
            if i >= args.warmup:
                forward_times.append(dt)
    policy.train(was_training)
    report["rollout"] = {
        **_stats(rollout_times),
        "images_per_s": batch.batch_size / (sum(rollout_times) / len(rollout_times)),
    }
    report["rollout"]["mean_changed_fraction_per_step"] = changed
    report["policy_forwards_only"] = _stats(forward_times)


def bench_rl_step(
    args: argparse.Namespace, trainer: Any, device: torch.device, report: dict[str, Any]
) -> None:
    """``trainer.train()`` for ``warmup + iters`` optimizer steps; per-step wall time split into
    generation+scoring (rollouts, decoding, rewards, advantages) and the rest (loss fwd/bwd, optimizer)."""
    from transformers import TrainerCallback

    steps: list[float] = []
    gen: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            _sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            _sync(device)
            steps.append(time.perf_counter() - self.t0)
            _progress("RL step", len(steps) - 1, args.warmup, steps[-1])

    inner = trainer._generate_and_score_completions

    def timed_generate(inputs: list[dict[str, Any]]) -> dict[str, Any]:
        _sync(device)
        t0 = time.perf_counter()
        out = inner(inputs)
        _sync(device)
        gen.append(time.perf_counter() - t0)
        return out

    trainer._generate_and_score_completions = timed_generate
    trainer.add_callback(StepTimer())
    _reset_peak(device)
    trainer.train()
    report["rl_step_peak_memory"] = _peak(device)
    if len(steps) != args.warmup + args.iters or len(gen) != len(steps):
        raise RuntimeError(
            f"expected {args.warmup + args.iters} optimizer steps with one generation each, "
            f"got {len(steps)} steps "
            f"and {len(gen)} generations; check --num-generations / --train-batch-size"
        )
    timed = slice(args.warmup, None)
    train_part = [s - g for s, g in zip(steps[timed], gen[timed])]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    report["rl_step"] = {
        **_stats(steps[timed]),
        "generation_and_scoring": _stats(gen[timed]),
        "loss_backward_optimizer": _stats(train_part),
        "trained_steps_per_rollout": int(trainer.max_completion_length),
        "losses": losses,
    }


def summarise(args: argparse.Namespace, report: dict[str, Any], flops: FlopModel) -> None:
    """FLOP counts and MFU from the timings in ``report``."""
    seq = report["sequence"]
    t, d = seq["valid_tokens"], seq["canvas_tokens"]
    g, k = args.num_generations, args.num_flow_steps
    peak = args.peak_tflops * 1e12
    fwd = flops.forward(t, d)
    rollout_flops = g * k * fwd
    out: dict[str, Any] = {
        "convention": (
            "matmul FLOPs (2/MAC) over valid tokens; attention 4·L·d·T² forward; "
            "'lora': bwd = input grads of all weights + weight grads of LoRA only; '6n': fwd+bwd = 3·fwd; "
            "no recompute, sampler, norms or VQ decoder"
        ),
        "forward_per_sequence_gflop": fwd / 1e9,
        "rollout_tflop": rollout_flops / 1e12,
        "peak_tflops": args.peak_tflops,
    }
    if "rollout" in report:
        out["rollout_mfu"] = rollout_flops / report["rollout"]["mean_s"] / peak
        out["policy_forwards_only_mfu"] = rollout_flops / report["policy_forwards_only"]["mean_s"] / peak
    if "rl_step" in report:
        rl = report["rl_step"]
        s = rl["trained_steps_per_rollout"]
        # Reference forwards (beta != 0) run with the generation, before the loss.
        ref = g * s * fwd if args.beta != 0 else 0.0
        for conv in ("lora", "6n"):
            train = g * s * flops.train(t, d, conv)
            out[f"rl_step_tflop_{conv}"] = (rollout_flops + ref + train) / 1e12
            out[f"rl_step_mfu_{conv}"] = (rollout_flops + ref + train) / rl["mean_s"] / peak
            out[f"train_part_mfu_{conv}"] = train / rl["loss_backward_optimizer"]["mean_s"] / peak
    report["flops"] = out


def print_table(args: argparse.Namespace, report: dict[str, Any]) -> None:
    seq, p, f = report["sequence"], report["params"], report.get("flops", {})
    rows: list[tuple[str, str]] = []

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.3g} %"

    def mem(m: dict[str, float] | None) -> str:
        return (
            "— (CPU)" if not m else f"{m['max_allocated_gib']:.1f} GiB (reserved {m['max_reserved_gib']:.1f})"
        )

    g, k, n = args.num_generations, args.num_flow_steps, args.num_mc_samples
    if "rollout" in report:
        r, fo = report["rollout"], report["policy_forwards_only"]
        rows += [
            (f"rollout, G={g} K={k} n_mc={n}", f"{r['mean_s']:.3f} s  ({r['images_per_s']:.2f} images/s)"),
            (
                f"  policy forwards alone ({g}×{k})",
                f"{fo['mean_s']:.3f} s  ({g / fo['mean_s']:.2f} images/s)",
            ),
            (
                "  MFU rollout / forwards alone",
                f"{pct(f.get('rollout_mfu'))} / {pct(f.get('policy_forwards_only_mfu'))}",
            ),
            ("  peak memory, rollout", mem(report.get("rollout_peak_memory"))),
        ]
    if "rl_step" in report:
        rl = report["rl_step"]
        rows += [
            (
                f"RL step ({rl['trained_steps_per_rollout']} trained steps × {g} rollouts)",
                f"{rl['mean_s']:.3f} s",
            ),
            ("  generation + scoring", f"{rl['generation_and_scoring']['mean_s']:.3f} s"),
            ("  loss fwd/bwd + optimizer", f"{rl['loss_backward_optimizer']['mean_s']:.3f} s"),
            (
                "  MFU RL step: LoRA-exact / 6N",
                f"{pct(f.get('rl_step_mfu_lora'))} / {pct(f.get('rl_step_mfu_6n'))}",
            ),
            (
                "  MFU training part: LoRA-exact / 6N",
                f"{pct(f.get('train_part_mfu_lora'))} / {pct(f.get('train_part_mfu_6n'))}",
            ),
            ("  peak memory, RL step", mem(report.get("rl_step_peak_memory"))),
        ]
    title = (
        f"CPU SMOKE RUN (tiny dims, {report['dtype']}) — not performance numbers"
        if args.tiny
        else "FUDOKI-shaped dFlowGRPO"
    )
    print(f"\n== {title} ==")
    print(f"device: {report['device']}; torch {report['versions']['torch']}; dtype {report['dtype']}")
    print(
        f"model: {p['total'] / 1e9:.4g} B params; per token {p['body'] / 1e6:.4g} M LM linear + "
        f"{p['lora'] / 1e6:.4g} M LoRA (r={args.lora_r}); "
        f"per canvas token {p['gen'] / 1e6:.4g} M generation head/aligner"
    )
    print(
        f"sequence: {seq['valid_tokens']} valid tokens "
        f"({seq['prompt_tokens']} prompt + {seq['canvas_tokens']} image + "
        f"1 end-of-image), padded to {seq['padded_length']}; V={seq['codebook']}; "
        f"rollout batch {args.rollout_batch_size}; "
        f"train batch {args.train_batch_size} × "
        f"{args.num_generations // args.train_batch_size} accumulation, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}"
    )
    print(
        f"FLOPs: {f.get('forward_per_sequence_gflop', float('nan')):.4g} GFLOP per sequence forward; "
        f"peak {args.peak_tflops:g} TFLOP/s"
    )
    width = max(len(a) for a, _ in rows) if rows else 10
    print(f"| {'metric':<{width}} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for a, b in rows:
        print(f"| {a:<{width}} | {b} |")
    print(
        f"(warmup {args.warmup}, mean of {args.iters} timed iterations; "
        f"total {report.get('total_seconds', 0):.0f} s)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--tiny", action="store_true", help="tiny dims on CPU in fp32: a smoke run of the same code path"
    )
    ap.add_argument("--output", type=str, default=None, help="write the results (or the error) as JSON here")
    ap.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default=None,
        help="default: cuda if available (cpu with --tiny); pick the GPU with CUDA_VISIBLE_DEVICES",
    )
    ap.add_argument(
        "--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H100 SXM: 989)"
    )
    ap.add_argument(
        "--num-generations", type=int, default=24, help="G: images per prompt (one optimizer step)"
    )
    ap.add_argument("--num-flow-steps", type=int, default=8, help="K: Euler steps per rollout")
    ap.add_argument(
        "--num-mc-samples", type=int, default=24, help="n: posterior draws recorded per position and step"
    )
    ap.add_argument("--train-batch-size", type=int, default=8, help="per-device train batch (divides G)")
    ap.add_argument(
        "--rollout-batch-size",
        type=int,
        default=None,
        help="rollouts per sampler forward pass, here and in the trainer (default: all G)",
    )
    ap.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="checkpoint the LM layers; the trainer keeps every trained step's graph of a micro-batch until "
        "backward, so without it memory grows with (trained steps × train batch)",
    )
    ap.add_argument("--lora-r", type=int, default=48)
    ap.add_argument("--lora-alpha", type=int, default=96)
    ap.add_argument("--beta", type=float, default=0.0, help="KL coefficient (≠ 0 adds reference forwards)")
    ap.add_argument(
        "--prompt-tokens", type=int, default=32, help="prompt prefix length incl. <bos> and <begin_of_image>"
    )
    ap.add_argument(
        "--pad-multiple", type=int, default=64, help="pad sequences to a multiple of this (1: none)"
    )
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations (rollout and RL step)")
    ap.add_argument("--iters", type=int, default=2, help="timed iterations (rollout and RL step)")
    ap.add_argument("--skip-rl-step", action="store_true", help="only the rollout benchmark")
    ap.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="model weights and autocast: auto = bf16 on GPU, fp32 on CPU",
    )
    ap.add_argument(
        "--tf32", action="store_true", help="allow TF32 for fp32 matmuls (the metric path's distances)"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: 1 with --tiny)"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.num_generations < 2 or args.num_generations % args.train_batch_size:
        ap.error(
            f"--train-batch-size ({args.train_batch_size}) must divide "
            f"--num-generations ({args.num_generations})"
        )
    if args.iters < 1 or args.warmup < 0:
        ap.error("--iters must be >= 1 and --warmup >= 0")
    # Rollout chunks, in the standalone rollout timing and in the trainer's (which would otherwise
    # use the train batch size).
    args.rollout_batch_size = min(args.rollout_batch_size or args.num_generations, args.num_generations)
    if args.rollout_batch_size < 1:
        ap.error("--rollout-batch-size must be >= 1")
    return args


def run(args: argparse.Namespace, report: dict[str, Any]) -> None:
    import transformers

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit(
            "no CUDA device: the full-size benchmark needs a GPU (use --tiny for the CPU smoke run)"
        )
    args.bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    if args.threads or args.tiny:
        # One thread for the CPU smoke run: on a shared machine, OpenMP threads waiting on a
        # preempted sibling slow tiny ops down by 100×.
        torch.set_num_threads(args.threads or 1)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    shape = TINY if args.tiny else FULL
    if device.type == "cuda":
        # The trainer puts the model on the current device; give the index explicitly to the CUDA calls.
        device = torch.device("cuda", torch.cuda.current_device())
        # The model runs in bf16; the only fp32 matmuls are the metric path's E=8 distance products,
        # where TF32 would cost precision (2 − 2cos cancels) for no speed: off unless --tf32.
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = True  # VQ decoder convolutions
        torch.backends.cudnn.benchmark = True  # fixed shapes
        report["device"] = torch.cuda.get_device_name(device)
    else:
        report["device"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    report["dtype"] = str(dtype).replace("torch.", "")
    report["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    report["args"] = {k: v for k, v in vars(args).items() if k != "work_dir"}

    with phase(report, "build model"):
        tokenizer = build_tokenizer()
        model = build_model(shape, tokenizer, device, dtype, args.seed)
        prompt, prompt_tokens = make_prompt(model, tokenizer, args.prompt_tokens)
        valid = prompt_tokens + model.num_image_tokens + 1  # + <end_of_image>
        padded = math.ceil(valid / args.pad_multiple) * args.pad_multiple if args.pad_multiple > 1 else valid
        if padded > valid:
            model.pad_to, model.max_length = "max_length", padded
        else:
            model.pad_to, model.max_length = "longest", max(model.max_length, valid + 1)
        batch = model.prepare_flow_inputs([prompt], tokenizer).repeat_interleave(args.num_generations)
        if int(batch.attention_mask[0].sum()) != valid or batch.input_ids.shape[1] != padded:
            raise RuntimeError(
                f"layout mismatch: expected {valid} valid of {padded}, got {tuple(batch.input_ids.shape)}"
            )
        report["sequence"] = {
            "prompt": prompt,
            "prompt_tokens": prompt_tokens,
            "canvas_tokens": batch.canvas_length,
            "valid_tokens": valid,
            "padded_length": padded,
            "codebook": int(model.config.vq_config.num_embeddings),
        }
        print(
            f"[fudoki-bench] {report['device']}, {report['dtype']}; "
            f"sequence {valid} tokens padded to {padded}",
            flush=True,
        )

    with phase(report, "build trainer (LoRA)"):
        trainer = build_trainer(args, model, tokenizer, prompt, device)
        policy = trainer.model
        flops = FlopModel.from_model(policy, shape.layers, shape.hidden)
        trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        report["params"] = {
            "total": flops.total_params,
            "body": flops.body,
            "lora": flops.lora,
            "gen": flops.gen_aligner + flops.gen_head,
            "trainable": trainable,
        }
        if trainable != flops.lora:
            print(
                f"[fudoki-bench] note: {trainable} trainable params but {flops.lora} in LoRA linears",
                flush=True,
            )

    with phase(report, "rollout benchmark"):
        bench_rollout(args, policy, model, batch, device, report)
    summarise(args, report, flops)

    if not args.skip_rl_step:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with phase(report, "RL step benchmark (trainer.train)"):
            bench_rl_step(args, trainer, device, report)
        summarise(args, report, flops)
    report["phase"] = "done"


def _is_oom(err: BaseException) -> bool:
    """CUDA OOM, including the forms that surface as a plain ``RuntimeError`` (cuBLAS/cuDNN workspaces)."""
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError)
        and any(
            s in text for s in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")
        )
    )


def _oom_hints(args: argparse.Namespace, phase_name: str | None) -> str:
    hints = []
    if phase_name and phase_name.startswith("RL step"):
        hints.append(f"--train-batch-size {max(1, args.train_batch_size // 2)}")
        if not args.gradient_checkpointing:
            hints.append("--gradient-checkpointing")
    hints.append(f"--rollout-batch-size {max(1, args.rollout_batch_size // 3)}")
    return ", ".join(hints)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work_dir = tempfile.mkdtemp(prefix="fudoki-gpu-bench-")
    report: dict[str, Any] = {"status": "running", "tiny": args.tiny}
    t0 = time.perf_counter()
    code = 0
    try:
        run(args, report)
        report["status"] = "ok"
    except Exception as err:
        if not _is_oom(err):
            report["status"] = "error"
            report["error"] = f"{type(err).__name__}: {err}"
            report["traceback"] = traceback.format_exc()
            raise
        code = EXIT_OOM
        report["status"] = "oom"
        report["error"] = (str(err).splitlines() or ["CUDA out of memory"])[0]
        report["oom_peak_memory"] = _peak(torch.device("cuda")) if torch.cuda.is_available() else None
        print(
            f"\n[fudoki-bench] OUT OF MEMORY during {report.get('phase')!r}: {report['error']}\n"
            f"  peak allocated so far: {report['oom_peak_memory']}\n"
            f"  try: {_oom_hints(args, report.get('phase'))}",
            file=sys.stderr,
            flush=True,
        )
    except SystemExit as err:  # the refusals in run(): no GPU, …
        report["status"], report["error"] = "error", str(err)
        raise
    finally:
        report["total_seconds"] = round(time.perf_counter() - t0, 1)
        shutil.rmtree(args.work_dir, ignore_errors=True)
        if report["status"] in ("ok", "oom") and "params" in report:
            print_table(args, report)  # on OOM: whatever was measured before it
        if args.output:
            Path(args.output).write_text(json.dumps(report, indent=1, default=str))
            print(f"[fudoki-bench] wrote {args.output} (status {report['status']})", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
