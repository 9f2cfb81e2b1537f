"""Pretrain the ShapeWorld unified discrete flow model that ships in ``dflow_trl/tasks/shapeworld/assets``.

One :class:`~dflow_trl.models.DFMTransformer` learns both tasks, the way FUDOKI is one model for
both: text-to-image (prompt → 16×16 palette canvas on the metric-induced path over the palette
colours) and understanding (scene tokens + question → answer canvas on the masked path). Training
is discrete flow matching: ``t ~ U[0, 1)`` per sample, ``x_t ~ p_t(· | x1)`` from the model's own
paths, and the cross-entropy of the posterior logits against ``x1`` on the canvas. Every step
holds a text-to-image batch (captions from every prompt of both splits, a ``--caption-noise``
fraction describing their image wrongly, see ``dflow_trl.tasks.shapeworld.corpus``; 10% of prompts
dropped to ``<uncond>`` for classifier-free guidance) and an understanding batch (TRAIN questions;
``--answer-noise`` answers a fraction wrongly, see ``dflow_trl.tasks.shapeworld.vqa_corpus``; the
two stages of the shipped weights were trained without it, their understanding stage with it).
``t = u^power`` with ``u ~ U[0, 1)`` (``--t-power``, 1 = uniform).

The shipped asset was made in two stages (torch 2.13), the defaults and then a continuation at half
the peak learning rate::

    python examples/shapeworld/pretrain.py --output-dir STAGE1 --steps 2400 --threads 1
    python examples/shapeworld/pretrain.py --output-dir dflow_trl/tasks/shapeworld/assets \\
        --init-from STAGE1 --steps 3000 --lr 1e-3 --threads 1

The understanding stage (``assets/understanding``, what ``load_shapeworld_model("understanding")``
loads) continues from those weights on both tasks, with four times the questions per step, noisy
answers and a lower learning rate (42.5 minutes on one thread, the other core busy)::

    python examples/shapeworld/pretrain.py --output-dir dflow_trl/tasks/shapeworld/assets/understanding \\
        --init-from dflow_trl/tasks/shapeworld/assets --steps 1200 --lr 5e-4 --vqa-batch-size 24 \\
        --answer-noise 0.4 --seed 3 --threads 1

Measured on one thread of a 2-core CPU whose other core was busy with other work: 53.0 minutes for
stage 1 and 73.0 minutes for stage 2 (2.1 CPU-hours in all). Stage 1 alone (the previous shipped
base) scored 0.40 held-out strict with colour attribution at 0.02; after stage 2 it scores 0.51,
with every category but single objects between 0.15 and 0.67 (docs/shapeworld.md). The defaults
are the recipe: ``ordered`` prompt pooling, caption noise 0.4, ``--t-power 2``, categories
weighted ``(#prompts)^0.25``. ``training_log.json`` beside the weights holds the loss curve and
arguments (the shipped one both stages', under ``stages``). The metric path uses
FUDOKI's schedule (c = 3, a = 0.9) over centred-RGB palette embeddings (see
``dflow_trl/tasks/shapeworld/palette.py``). Text-to-image scenes are canonical (``place_scene(...,
canonical=True)``) and ``--t-power 2`` spends more steps at small t, where the prompt alone has to
fix the layout; ``docs/shapeworld.md`` says why both were needed.

``--steps`` makes a run bitwise reproducible for a seed; ``--minutes`` instead stops on wall
time and decays the learning rate by elapsed time (quick pilots).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dflow_trl.models import DFMTransformer, DFMTransformerConfig
from dflow_trl.tasks.shapeworld import (
    ANSWER_LENGTH,
    CANVAS_LENGTH,
    GRID,
    MAX_TEXT_LENGTH,
    build_shapeworld_tokenizer,
    encode_answer,
    make_vqa_dataset,
    palette_embeddings,
    palette_rgb,
)
from dflow_trl.tasks.shapeworld.corpus import DEFAULT_CAPTION_NOISE, CaptionCorpus
from dflow_trl.tasks.shapeworld.vqa_corpus import AnswerCorpus


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (reproducible)")
    p.add_argument("--minutes", type=float, default=None, help="wall-time budget instead of --steps")
    p.add_argument("--batch-size", type=int, default=24, help="text-to-image samples per step")
    p.add_argument("--vqa-batch-size", type=int, default=6, help="understanding samples per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--min-lr-ratio", type=float, default=0.05, help="cosine decay floor, as a fraction of --lr"
    )
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--c", type=float, default=3.0, help="metric path schedule beta_t = c (t/(1-t))^a")
    p.add_argument("--a", type=float, default=0.9)
    p.add_argument(
        "--no-time", action="store_true", help="no time conditioning (FUDOKI-like; generates worse)"
    )
    p.add_argument(
        "--pooling",
        choices=["ordered", "encoder", "positional", "mean", "none"],
        default="ordered",
        help="pooled prompt route: an MLP over the prompt's words in order plus their mean (default, "
        "the shipped model), one transformer layer over the prompt, a bag of words, word-and-position "
        "features, or none (the prompt then reaches the canvas only through attention)",
    )
    p.add_argument("--no-2d", action="store_true", help="no row/column embeddings for image tokens")
    p.add_argument(
        "--t-power", type=float, default=2.0,
        help="train at t = u^power, u ~ U[0, 1): > 1 puts more steps at small t, "
        "where the prompt alone must fix the layout",
    )
    p.add_argument(
        "--uncond-prob", type=float, default=0.1, help="prompt dropout for classifier-free guidance"
    )
    p.add_argument(
        "--tag-power",
        type=float,
        default=0.25,
        help="a prompt category is drawn with weight (#prompts)^power: "
        "0 = categories equally, 1 = prompts equally",
    )
    p.add_argument(
        "--caption-noise",
        type=float,
        default=DEFAULT_CAPTION_NOISE,
        help="fraction of text-to-image captions that describe their image wrongly "
        "(dflow_trl.tasks.shapeworld.corpus)",
    )
    p.add_argument(
        "--answer-noise",
        type=float,
        default=0.0,
        help="fraction of understanding draws answered wrongly (dflow_trl.tasks.shapeworld.vqa_corpus)",
    )
    p.add_argument("--vqa-pool", type=int, default=12000, help="TRAIN questions generated up front")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument(
        "--save-every", type=int, default=0,
        help="also save to OUTPUT_DIR/step-N every N steps (0: only at the end)",
    )
    p.add_argument(
        "--init-from", type=Path, default=None,
        help="start from this model folder's weights (same sizes); parameters it lacks, e.g. a new "
        "pooling route's, keep their fresh initialisation",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if (args.steps is None) == (args.minutes is None):
        p.error("give exactly one of --steps or --minutes")
    if (args.steps is not None and args.steps < 1) or (args.minutes is not None and args.minutes <= 0):
        p.error("--steps / --minutes must be positive")
    if args.t_power <= 0:
        p.error("--t-power must be positive")
    if args.save_every < 0:
        p.error("--save-every must be >= 0")
    if not 0 <= args.uncond_prob < 1:
        p.error("--uncond-prob must lie in [0, 1)")
    if not 0 <= args.caption_noise <= 1:
        p.error("--caption-noise must lie in [0, 1]")
    if not 0 <= args.answer_noise <= 1:
        p.error("--answer-noise must lie in [0, 1]")
    return args


def build_config(tokenizer, args: argparse.Namespace) -> DFMTransformerConfig:
    """The shipped model's configuration: palette metric path for images, masked path for answers."""
    ids = tokenizer.convert_tokens_to_ids
    return DFMTransformerConfig(
        text_vocab_size=len(tokenizer),
        image_vocab_size=len(palette_rgb()),
        image_shape=(GRID, GRID),
        text_canvas_length=ANSWER_LENGTH,
        max_prompt_length=MAX_TEXT_LENGTH,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate,
        image_path={"type": "metric", "c": args.c, "a": args.a, "embeddings": palette_embeddings().tolist()},
        text_path={"type": "mask"},
        palette=[[round(255 * v) for v in rgb] for rgb in palette_rgb()],
        image_column="scene_tokens",
        time_conditioning=not args.no_time,
        condition_pooling=False if args.pooling == "none" else args.pooling,
        image_position_2d=not args.no_2d,
        task="t2i",
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
        uncond_token_id=ids("<uncond>"),
        mask_token_id=tokenizer.mask_token_id,
    )


@dataclass
class Batch:
    prompts: list[str]
    x1: torch.LongTensor  # (B, D) clean canvas
    scenes: list[list[int]] | None = None  # condition images (understanding)


class T2ISource:
    """Endless text-to-image pairs from the noisy-caption corpus (``dflow_trl.tasks.shapeworld.corpus``):
    every prompt of every category, a ``caption_noise`` fraction of them captioned wrongly."""

    def __init__(
        self, rng: random.Random, tag_power: float, caption_noise: float = DEFAULT_CAPTION_NOISE
    ) -> None:
        self.corpus = CaptionCorpus(rng, caption_noise=caption_noise, tag_power=tag_power)

    def batch(self, n: int) -> Batch:
        prompts, grids = self.corpus.batch(n)
        return Batch(prompts, grids)


class VQASource:
    """TRAIN understanding questions drawn with replacement from a pool made up front, a
    ``answer_noise`` fraction of draws answered wrongly (``dflow_trl.tasks.shapeworld.vqa_corpus``)."""

    def __init__(
        self, rng: random.Random, tokenizer, pool: int, seed: int, answer_noise: float = 0.0
    ) -> None:
        # The pool the shipped model was pretrained on: every in-distribution question, both sides
        # of the RL split (as the text-to-image corpus holds every prompt).
        ds = make_vqa_dataset("train", n=pool, seed=seed, held_out="combinations")
        self.corpus = AnswerCorpus(rng, ds.to_list(), answer_noise)
        self.tokenizer = tokenizer

    def batch(self, n: int) -> Batch:
        draws = [self.corpus.draw() for _ in range(n)]
        return Batch(
            [ex["prompt"] for ex, _ in draws],
            torch.tensor([encode_answer(a, self.tokenizer) for _, a in draws], dtype=torch.long),
            [ex["scene_tokens"] for ex, _ in draws],
        )


def flow_matching_loss(
    model: DFMTransformer,
    tokenizer,
    batch: Batch,
    uncond_prob: float,
    gen: torch.Generator,
    t_power: float = 1.0,
) -> torch.Tensor:
    """Posterior cross-entropy on ``x_t ~ p_t(· | x1)``, ``t = u^t_power``, ``u ~ U[0, 1)`` per sample."""
    columns = {model.config.image_column: batch.scenes} if batch.scenes is not None else {}
    inputs = model.prepare_flow_inputs(batch.prompts, tokenizer, **columns)
    b = len(batch.prompts)
    t = torch.rand(b, 1, generator=gen, dtype=torch.float64) ** t_power
    x_t = model.get_probability_path().sample_conditional(batch.x1, t, generator=gen)
    drop = torch.rand(b, generator=gen) < uncond_prob
    ids = torch.where(drop[:, None], inputs.with_canvas(x_t, unconditional=True), inputs.with_canvas(x_t))
    time = {"flow_time": t.squeeze(1).float()} if model.wants_flow_time else {}
    logits = model(
        input_ids=ids, attention_mask=inputs.attention_mask, canvas_mask=inputs.canvas_mask, **time
    )
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.x1.reshape(-1))


def lr_factor(progress: float, warmup: float, floor: float) -> float:
    """Linear warmup over the first ``warmup`` of training, then cosine decay to ``floor``."""
    if progress < warmup:
        return progress / warmup
    span = (progress - warmup) / max(1e-8, 1 - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, span)))


def save(model: DFMTransformer, tokenizer, directory: Path) -> None:
    """Save the model (set to text-to-image, the default task) and its tokenizer."""
    model.set_task("t2i")
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def init_from(model: DFMTransformer, directory: Path) -> None:
    """Copy every parameter ``directory``'s model shares with ``model`` (name and shape)."""
    source = DFMTransformer.from_pretrained(directory).state_dict()
    own = model.state_dict()
    mismatched = [k for k in source if k in own and source[k].shape != own[k].shape]
    if mismatched:
        raise ValueError(
            f"--init-from {directory}: shapes differ for {mismatched[:3]}; use the same model sizes"
        )
    unknown = [k for k in source if k not in own]
    if unknown:
        raise ValueError(
            f"--init-from {directory}: this model has no {unknown[:3]}; drop the option that removed them"
        )
    model.load_state_dict(source, strict=False)
    fresh = sorted({k.split(".")[0] for k in own if k not in source})
    print(f"initialised from {directory}; fresh: {fresh or 'nothing'}")


def train(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    tokenizer = build_shapeworld_tokenizer()
    model = DFMTransformer(build_config(tokenizer, args))
    if args.init_from is not None:
        init_from(model, args.init_from)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"DFMTransformer: {n_params:,} parameters; canvas {CANVAS_LENGTH} image / {ANSWER_LENGTH} text tokens"
    )
    t2i, vqa = (
        T2ISource(rng, args.tag_power, args.caption_noise),
        VQASource(rng, tokenizer, args.vqa_pool, args.seed, args.answer_noise),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))

    start, step, history = time.monotonic(), 0, []
    budget = args.minutes * 60 if args.minutes else None
    warmup_frac = args.warmup_steps / args.steps if args.steps else min(0.1, args.warmup_steps / 1000)
    running = {"t2i": 0.0, "vqa": 0.0}
    model.train()
    while True:
        elapsed = time.monotonic() - start
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(progress, warmup_frac, args.min_lr_ratio)
        model.set_task("t2i")
        loss_img = flow_matching_loss(
            model, tokenizer, t2i.batch(args.batch_size), args.uncond_prob, gen, args.t_power
        )
        model.set_task("understanding")
        loss_txt = flow_matching_loss(model, tokenizer, vqa.batch(args.vqa_batch_size), 0.0, gen)
        opt.zero_grad(set_to_none=True)
        (loss_img + loss_txt).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        running["t2i"] += loss_img.item()
        running["vqa"] += loss_txt.item()
        if step % args.log_every == 0:
            row = {
                "step": step,
                "minutes": round((time.monotonic() - start) / 60, 2),
                "lr": opt.param_groups[0]["lr"],
                "loss_t2i": running["t2i"] / args.log_every,
                "loss_vqa": running["vqa"] / args.log_every,
            }
            history.append(row)
            running = {"t2i": 0.0, "vqa": 0.0}
            print(json.dumps(row), flush=True)
        if args.save_every and step % args.save_every == 0:
            save(model, tokenizer, args.output_dir / f"step-{step}")
            model.set_task("t2i")
            model.train()

    save(model, tokenizer, args.output_dir)
    summary = {
        "steps": step,
        "wall_minutes": round((time.monotonic() - start) / 60, 2),
        "parameters": n_params,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "history": history,
    }
    (args.output_dir / "training_log.json").write_text(json.dumps(summary, indent=1))
    print(f"saved to {args.output_dir} after {step} steps, {summary['wall_minutes']} min")
    return summary


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
