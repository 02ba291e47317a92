"""Deterministic scatter-add: ``out[index[m]] += values[m]`` with duplicates summed in a fixed order.

The array API has no scatter-add, and the libraries' own (``torch.index_add_`` on CUDA,
``cupyx.scatter_add``) use atomics, whose summation order — hence the last bits — varies from run
to run. Here rows are grouped by a stable sort of ``index`` and each group is summed in its input
order (``numpy.add.reduceat``), on the host: same input → same bits on any library and machine.
"""

from __future__ import annotations

from typing import Any

import numpy

from reflex.backends import device as device_of
from reflex.backends import from_numpy, namespace, to_numpy

__all__ = ["scatter_add"]


def scatter_add(index: Any, values: Any, rows: int) -> Any:
    """``out (rows, F)`` with ``out[i] = Σ_{m : index[m] = i} values[m]`` (summed in increasing m).

    ``index`` integer ``(M,)`` in ``[0, rows)``; ``values (M, F)``. The result has the library,
    device and dtype of ``values``; rows no index names are 0.
    """
    xp = namespace(values)
    host_index = numpy.asarray(to_numpy(index), dtype=numpy.int64)
    host_values = numpy.asarray(to_numpy(values))
    out = numpy.zeros((rows, *host_values.shape[1:]), dtype=host_values.dtype)
    if host_index.size:
        order = numpy.argsort(host_index, kind="stable")
        sorted_index = host_index[order]
        starts = numpy.concatenate([[0], numpy.flatnonzero(numpy.diff(sorted_index)) + 1])
        out[sorted_index[starts]] = numpy.add.reduceat(host_values[order], starts, axis=0)
    return from_numpy(out, xp, device_of(values))
