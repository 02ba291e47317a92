"""reflex: a framework-free, numerically exact reference implementation of attention mechanisms.

Every mechanism is written once against the Python array API (NumPy, CuPy, torch, ...), computes
in float64 by default and returns its result in the caller's array library and on its device.

>>> import reflex
>>> [m.key for m in reflex.list_mechanisms()]          # the registry
>>> out, lse = reflex.full_attention(q, k, v, causal="bottom_right", return_lse=True)

Every public function of every mechanism module (its ``__all__``) is available as ``reflex.<name>``.
"""

import importlib as _importlib

from reflex import mechanisms as _mechanisms
from reflex.certify import Certificate, certify  # reflex.certify names the function; import names from the module
from reflex.gradients import vjp
from reflex.registry import Case, Mechanism, get, list_mechanisms

__version__ = "0.1.0"

__all__ = ["get", "list_mechanisms", "vjp", "certify", "Certificate", "Mechanism", "Case", "__version__"]

for _module_name in _mechanisms.MODULES:
    _module = _importlib.import_module(f"reflex.mechanisms.{_module_name}")
    for _public in getattr(_module, "__all__", ()):
        if _public in globals():
            raise ImportError(f"reflex.{_public} is exported twice (again by reflex.mechanisms.{_module_name})")
        globals()[_public] = getattr(_module, _public)
        __all__.append(_public)
