"""Mechanisms: one module per mechanism (or tight family); importing a module registers it.

Add a module to ``_MODULES`` to register its mechanisms.
"""

import importlib

_MODULES = (
    "full",
)

for _name in _MODULES:
    importlib.import_module(f"{__name__}.{_name}")
