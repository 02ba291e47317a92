"""The engine's facade: re-exports :mod:`reflex.mechanisms._engine` (dense, tiled and gather softmax
attention, their backward passes, and the input checks) under the name the mechanisms import.

The conventions (scores, masks and biases as terms, GQA, fully masked rows) are documented in the
:mod:`reflex.mechanisms._engine` package docstring.
"""

from __future__ import annotations

from reflex.mechanisms._engine import *  # noqa: F401,F403
from reflex.mechanisms._engine import __all__  # noqa: F401
