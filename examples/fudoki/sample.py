"""Sample from FUDOKI (optionally with a trained LoRA adapter) with the Euler-jump sampler.

Text-to-image, writing an image grid (one row per prompt)::

    python examples/fudoki/sample.py --model checkpoints/FUDOKI --prompts "a red fox in the snow" \
        "a blue vase of sunflowers" --images-per-prompt 4 --steps 20 --cfg-scale 5 --out grid.png

Understanding (answer about an image)::

    python examples/fudoki/sample.py --model checkpoints/FUDOKI --task understanding \
        --image photo.jpg --prompts "What sport is shown in the image?" --steps 32

``--adapter`` loads a PEFT adapter saved by ``DFlowGRPOTrainer`` on top of the base model.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def make_grid(images: Sequence[Any], columns: int, pad: int = 2) -> Any:
    """Tile equally sized PIL images row by row, ``columns`` per row."""
    from PIL import Image

    if not images:
        raise ValueError("no images to tile")
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, img in enumerate(images):
        grid.paste(img, (pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)))
    return grid


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="FUDOKI checkpoint folder (original or saved layout)")
    p.add_argument("--adapter", default=None, help="optional LoRA adapter folder")
    p.add_argument("--task", choices=["t2i", "understanding"], default="t2i")
    p.add_argument("--prompts", nargs="+", required=True, help="image descriptions, or questions")
    p.add_argument("--image", default=None, help="image file for --task understanding")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument(
        "--steps", type=int, default=20, help="Euler steps K (FUDOKI demos: 50; dFlowGRPO eval: 20)"
    )
    p.add_argument(
        "--cfg-scale", type=float, default=None, help="CFG w (default: 5 for t2i, 0 for understanding)"
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8, help="rollouts per forward pass")
    p.add_argument("--seed", type=int, default=999)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--out", default="fudoki_samples.png", help="grid image (t2i) or text file (understanding)"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Any]:
    from dflow_trl.models.fudoki import FudokiForFlow
    from dflow_trl.rollout import generate

    args = parse_args(argv)
    if args.task == "understanding" and args.image is None:
        raise SystemExit("--task understanding needs --image")
    dtype = getattr(torch, args.dtype)
    model = FudokiForFlow.from_pretrained(args.model, task=args.task, dtype=dtype).to(args.device).eval()
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
    cfg = args.cfg_scale if args.cfg_scale is not None else (5.0 if args.task == "t2i" else 0.0)
    n = args.images_per_prompt if args.task == "t2i" else 1
    prompts = [p for p in args.prompts for _ in range(n)]
    columns = {"input_image": [args.image] * len(prompts)} if args.task == "understanding" else {}
    _, outputs = generate(
        model,
        prompts,
        num_steps=args.steps,
        cfg_scale=cfg,
        temperature=args.temperature,
        seed=args.seed,
        chunk_size=args.batch_size,
        **columns,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.task == "t2i":
        make_grid(outputs, columns=n).save(out)
        print(f"wrote {len(outputs)} images to {out}")
    else:
        out.write_text(
            "\n\n".join(f"Q: {q}\nA: {a}" for q, a in zip(prompts, outputs)) + "\n", encoding="utf-8"
        )
        for q, a in zip(prompts, outputs):
            print(f"Q: {q}\nA: {a}")
    return outputs


if __name__ == "__main__":
    main()
