#!/usr/bin/env python3
"""Test PyTorch's SDPA against reflex golden fixtures, reading them without reflex.

    reflex fixtures generate --out fixtures --mechanisms full        # once, where reflex is installed
    python examples/torch_consumer.py fixtures --export torch_outputs.npz

The fixture set is read with the standard library and NumPy only (``manifest.json`` + one ``.npz``
per case, see ``docs/fixtures.md``), as a project that does not depend on reflex would. Each case
of mechanism ``full`` is computed with ``torch.nn.functional.scaled_dot_product_attention`` in
float32 from the fixture inputs, the outputs are exported as one array per case id, and
``reflex fixtures check`` compares them with the fixtures at the float32 tolerance, printing a
per-case table; this script exits with its status (0 = every exported case passed).

reflex's conventions that a consumer maps onto SDPA: GQA query head h uses kv head h // (H/G)
(``repeat_interleave``), masks are True = attend, causal alignment is explicit ("top_left" is
SDPA's ``is_causal``; "bottom_right" allows j ≤ i + S − L) and a fully masked row outputs 0
(SDPA gives NaN there). SDPA has no softcap, so those cases are not exported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy
import torch
import torch.nn.functional as F


def expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """Key/value heads (..., G, S, D) → (..., G·group, S, D): query head h uses kv head h // group."""
    return x.repeat_interleave(group, dim=-3)


def sdpa(params: dict, arrays: dict, expand: Callable[[torch.Tensor, int], torch.Tensor] = expand_kv) -> torch.Tensor | None:
    """reflex's ``full`` case on SDPA in float32; None when SDPA cannot express it."""
    inputs = {name for name in arrays if name.startswith("input.")}
    if set(params) - {"causal", "scale"} or inputs - {"input.q", "input.k", "input.v", "input.mask", "input.bias"}:
        return None  # softcap and anything unknown: not expressible with SDPA
    q, k, v = (torch.from_numpy(arrays[f"input.{n}"]).to(torch.float32) for n in "qkv")
    length, key_length = q.shape[-2], k.shape[-2]
    allowed = torch.ones(length, key_length, dtype=torch.bool)
    causal = params.get("causal", False)
    if causal in (True, "top_left"):
        allowed = torch.tril(allowed)
    elif causal == "bottom_right":
        allowed = torch.tril(allowed, diagonal=key_length - length)
    if "input.mask" in arrays:
        allowed = allowed & torch.from_numpy(arrays["input.mask"])
    attn_mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, float("-inf"))
    if "input.bias" in arrays:
        attn_mask = attn_mask + torch.from_numpy(arrays["input.bias"]).to(torch.float32)
    group = q.shape[-3] // k.shape[-3]
    out = F.scaled_dot_product_attention(q, expand(k, group), expand(v, group), attn_mask=attn_mask,
                                         scale=params.get("scale"))
    return torch.where(allowed.any(dim=-1, keepdim=True), out, 0.0)  # reflex: fully masked row → 0


def export(fixtures: Path, out: Path, expand: Callable[[torch.Tensor, int], torch.Tensor] = expand_kv) -> int:
    """Compute every expressible ``full`` case and save them to ``out``; returns how many."""
    manifest = json.loads((fixtures / "manifest.json").read_text(encoding="utf-8"))
    results = {}
    for case in manifest["cases"]:
        if case["mechanism"] != "full":
            continue
        with numpy.load(fixtures / case["file"], allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        out_tensor = sdpa(case["params"], arrays, expand)
        if out_tensor is not None:
            results[case["id"]] = out_tensor.numpy()
    numpy.savez(out, **results)
    return len(results)


def reflex_check(fixtures: Path, out: Path) -> int:
    """``reflex fixtures check`` on the exported file (the installed command, else ``python -m``)."""
    command = [shutil.which("reflex")] if shutil.which("reflex") else [sys.executable, "-m", "reflex.cli"]
    return subprocess.call([*command, "fixtures", "check", str(fixtures), str(out)])


def main(argv: list[str] | None = None, expand: Callable[[torch.Tensor, int], torch.Tensor] = expand_kv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fixtures", type=Path, help="fixture folder written by `reflex fixtures generate`")
    parser.add_argument("--export", type=Path, default=Path("torch_outputs.npz"), help="where to save the outputs")
    args = parser.parse_args(argv)
    count = export(args.fixtures, args.export, expand)
    print(f"exported {count} cases computed with torch SDPA (float32) to {args.export}")
    return reflex_check(args.fixtures, args.export)


if __name__ == "__main__":
    raise SystemExit(main())
