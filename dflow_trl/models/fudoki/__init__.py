"""FUDOKI: the model on transformers' Janus classes (``modeling``), reading its published checkpoint
(``checkpoint``), and its sequence layouts for text-to-image and understanding (``layout``).

``checkpoint`` and ``layout`` import no Janus class; ``FudokiForFlow`` (which does) is imported
when first asked for.
"""

from .checkpoint import FudokiCheckpointError, is_fudoki_checkpoint, load_path_embedding, load_tokenizer


def __getattr__(name: str):
    if name == "FudokiForFlow":
        from .modeling import FudokiForFlow

        return FudokiForFlow
    raise AttributeError(name)


__all__ = [
    "FudokiCheckpointError",
    "FudokiForFlow",
    "is_fudoki_checkpoint",
    "load_path_embedding",
    "load_tokenizer",
]
