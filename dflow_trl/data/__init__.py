"""Tasks and datasets. ShapeWorld, the project's synthetic text-to-image and understanding task,
lives in ``shapeworld`` (the public API) and the modules it gathers."""

from .shapeworld import *  # noqa: F403
from .shapeworld import __all__  # noqa: F401
