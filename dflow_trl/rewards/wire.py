"""The reward server's JSON wire format: images travel as base64 PNG, never as pickles.

Request body::

    {"prompts": [...], "completions": [{"image": "<base64 PNG>"} | {"text": "..."} | {"messages": [...]}],
     "completion_ids": [[int, ...], ...] | null, "columns": {"name": [one JSON value per sample], ...}}

Response body: ``{"rewards": [float | null, ...]}`` or, on failure, ``{"error": "..."}``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

from PIL import Image

from ._inputs import TRL_EXTRA_KWARGS, to_pil_images

DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024


class PayloadError(ValueError):
    """A request body that does not follow the wire format."""


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and tensors
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def encode_image(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _encode_completion(completion: Any) -> dict[str, Any]:
    if isinstance(completion, str):
        return {"text": completion}
    if isinstance(completion, list) and all(isinstance(m, dict) for m in completion):
        return {"messages": completion}
    return {"image": encode_image(to_pil_images([completion])[0])}


def encode_request(
    prompts: list, completions: list, completion_ids: Any = None, columns: dict[str, list] | None = None
) -> bytes:
    """Serialise one reward call; every dataset column must be JSON-serialisable."""
    body: dict[str, Any] = {
        "prompts": list(prompts),
        "completions": [_encode_completion(c) for c in completions],
        "completion_ids": completion_ids,
        "columns": {},
    }
    for name, values in (columns or {}).items():
        if name in TRL_EXTRA_KWARGS:
            continue
        try:
            json.dumps(values, default=_jsonable)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"dataset column {name!r} cannot be sent to the reward server ({error}); "
                "pass columns=[...] to RemoteReward to send only the columns the remote reward needs"
            ) from error
        body["columns"][name] = values
    try:
        return json.dumps(body, default=_jsonable).encode("utf-8")
    except (TypeError, ValueError) as error:
        raise TypeError(f"prompts or completion_ids cannot be sent as JSON: {error}") from error


def decode_image(data: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, TypeError, ValueError) as error:
        raise PayloadError(f"image is not valid base64: {error}") from error
    try:
        image = Image.open(io.BytesIO(raw))
    except Exception as error:
        raise PayloadError(f"image cannot be decoded: {error}") from error
    if image.format != "PNG":
        raise PayloadError(f"images must be PNG, got {image.format}")
    # Checked before decoding pixels, so a small file that claims a huge canvas costs nothing.
    if image.width * image.height > max_pixels:
        raise PayloadError(
            f"image of {image.width}x{image.height} exceeds the server's {max_pixels} pixel limit"
        )
    try:
        image.load()
    except Exception as error:
        raise PayloadError(f"image cannot be decoded: {error}") from error
    return image.convert("RGB")


def decode_request(body: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict[str, Any]:
    """Parse and validate a request body into reward-call keyword arguments."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PayloadError(f"request body is not JSON: {error}") from error
    if not isinstance(payload, dict):
        raise PayloadError("request body must be a JSON object with 'prompts' and 'completions'")
    prompts, raw_completions = payload.get("prompts"), payload.get("completions")
    if not isinstance(prompts, list) or not isinstance(raw_completions, list):
        raise PayloadError("'prompts' and 'completions' must both be lists")
    if len(prompts) != len(raw_completions):
        raise PayloadError(f"{len(prompts)} prompts for {len(raw_completions)} completions")
    n = len(raw_completions)
    completions: list[Any] = []
    for index, item in enumerate(raw_completions):
        if (
            not isinstance(item, dict)
            or len(item) != 1
            or next(iter(item)) not in ("image", "text", "messages")
        ):
            raise PayloadError(
                f"completion {index} must be one of {{'image': ...}}, {{'text': ...}}, {{'messages': ...}}"
            )
        kind, value = next(iter(item.items()))
        try:
            completions.append(decode_image(value, max_pixels) if kind == "image" else value)
        except PayloadError as error:
            raise PayloadError(f"completion {index}: {error}") from error
    columns = payload.get("columns") or {}
    if not isinstance(columns, dict):
        raise PayloadError("'columns' must be an object mapping column names to lists")
    for name, values in columns.items():
        if name in ("prompts", "completions", "completion_ids") or name in TRL_EXTRA_KWARGS:
            raise PayloadError(f"column name {name!r} is reserved")
        if not isinstance(values, list) or len(values) != n:
            raise PayloadError(f"column {name!r} must be a list with one value per completion ({n})")
    completion_ids = payload.get("completion_ids")
    if completion_ids is not None and (not isinstance(completion_ids, list) or len(completion_ids) != n):
        raise PayloadError(f"'completion_ids' must be null or a list with one entry per completion ({n})")
    return {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
