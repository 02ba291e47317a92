"""Numba-jitted CPU kernels: the only place reflex imports numba.

A package rather than one file so that each kernel family stays readable (``window`` for banded
softmax, ``bucketing`` for hashing and sorting, ...). It is imported lazily through
:func:`reflex.backends.numba_kernels` — only when a plain NumPy float input takes a Numba path.

House rules for every kernel here: float64 arithmetic, ``cache=True``, never ``fastmath``,
``prange`` only over independent work (heads, query tiles), and an array-API twin elsewhere in
reflex that the tests compare against (indices identical, outputs to ≤ 1e-13).
"""
