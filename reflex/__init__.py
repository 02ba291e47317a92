"""reflex: a framework-free, numerically exact reference implementation of attention mechanisms.

Every mechanism is written once against the Python array API (NumPy, CuPy, torch, ...), computes
in float64 by default and returns its result in the caller's array library and device.

>>> import reflex
>>> reflex.list_mechanisms()          # the registry
>>> reflex.full_attention(q, k, v, causal="bottom_right", return_lse=True)
"""

from reflex import mechanisms as _mechanisms  # noqa: F401  (registers every mechanism)
from reflex.mechanisms.full import full_attention
from reflex.registry import Case, Mechanism, get, list_mechanisms

__version__ = "0.1.0"

__all__ = ["full_attention", "get", "list_mechanisms", "Mechanism", "Case", "__version__"]
