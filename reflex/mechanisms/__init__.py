"""Mechanisms: one module per mechanism (or tight family); importing a module registers it.

Every public module here (name not starting with ``_``) is imported in sorted order; each calls
:func:`reflex.registry.register` for its mechanisms and lists its public functions in ``__all__``,
which :mod:`reflex` re-exports. Adding a mechanism is adding a file.
"""

import importlib
import pkgutil

MODULES = tuple(sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")))

for _name in MODULES:
    importlib.import_module(f"{__name__}.{_name}")
