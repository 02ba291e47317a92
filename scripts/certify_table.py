#!/usr/bin/env python3
"""Write ``docs/precision.md``: every registered mechanism's float64 error, certified against higher precision.

``python scripts/certify_table.py [--out docs/precision.md] [--sizes tiny,small] [--seed 0]``

Runs :func:`reflex.certify.certify_registry` (tiny cases: mpmath where reflex has the formula, else
longdouble; larger sizes: longdouble), plus a stress sweep that scales q and k to widen the logit
range, and writes the tables with the text around them. Nothing in the output is typed by hand:
rerun the script after changing a mechanism. Exit 1 when a case is flagged (error above its bound,
longdouble not honoured) or a mechanism fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import numpy  # noqa: E402

import reflex  # noqa: E402
from reflex import registry  # noqa: E402
from reflex.certify import (UNIT_ROUNDOFF, CertificationError, certify, default_method,  # noqa: E402
                            longdouble_extends_float64)
from reflex.certify_cli import CaseCertificate, certify_registry  # noqa: E402

GOAL = 1e-14  # float64 error relative to the output scale on the registry cases

# Why a mechanism misses the goal or has cases no method certifies. Rendered only when it applies.
EXPLANATIONS = {
    "nystrom": "`exact` and `regularized` take the landmark kernel's pseudo-inverse or solve through "
               "`xp.linalg` (LAPACK), which has no long double, and reflex has no mpmath Nyström formula: "
               "those cases are not certified. The `iterative` cases (the Newton–Schulz pseudo-inverse of "
               "Xiong et al. 2021, §3) are certified; their error follows cond(landmark kernel)·u, which grows "
               "with the logit range (stress table).",
    "gaussian_prior": "the localness prior G_ij = −(j − P_i)²/(2σ_i²), σ = ρ·D, with windows D near 1 (σ near "
                      "0.5 key) puts logits of several hundred below the row max: logit ranges of ~10³, for which "
                      "BHH's softmax bound (n + 2 + 2·range)·u is ~10⁻¹³. The window gradient, through "
                      "∂G/∂D = (j − P)²/(ρ²D³), carries that conditioning; its error stays within it (about 100 u). "
                      "The outputs are at round-off.",
}

# (key, case variant at the stress size): q and k scaled by each factor widen the logit range.
STRESS = [("full", "mha"), ("performer", "softmax_pos"), ("nystrom", "iterative"), ("rfa", "gqa"),
          ("clustered", "assignment")]
STRESS_FACTORS = (1, 3, 6)
STRESS_SIZE = "small"


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.1e}"


def _worst(values: list[float]) -> float | None:
    return max(values) if values else None


def mechanism_rows(results: list[CaseCertificate]) -> tuple[list[str], dict[str, list[CaseCertificate]]]:
    by_key: dict[str, list[CaseCertificate]] = {}
    for r in results:
        by_key.setdefault(r.key, []).append(r)
    lines = ["| mechanism | family | cases certified | method | output | lse | gradients | within bounds | "
             "longdouble honoured | goal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for mechanism in registry.list_mechanisms():
        rows = by_key.get(mechanism.key, [])
        certs = [r.certificate for r in rows if r.certificate is not None]
        outputs = [e.max_rel for c in certs for e in c.outputs if e.name != "lse"]
        lse = [e.max_rel for c in certs for e in c.outputs if e.name == "lse"]
        grads = [e.max_rel for c in certs for e in c.gradients]
        honoured = [c.honoured for c in certs]
        if False in honoured:
            honoured_text = "**NO**"
        elif True in honoured:
            equal = honoured.count(None)
            honoured_text = "yes" + (f" ({equal} exact case{'s' * (equal != 1)})" if equal else "")
        else:
            honoured_text = "not shown (bitwise equal)" if certs else "—"
        worst = _worst(outputs + lse + grads)
        missing = len(rows) - len(certs)
        flagged = any(c.flagged for c in certs)
        if flagged:
            goal = "**flagged**"
        elif worst is not None and worst > GOAL:
            goal = "✗ (below)"
        else:
            goal = "✓" + (f", {missing} not certified (below)" if missing else "")
        gradients = _fmt(_worst(grads)) if mechanism.vjp is not None else "no VJP"
        methods = ", ".join(sorted({c.method for c in certs})) or "—"
        bounded = [c.within_bound for c in certs if c.within_bound is not None]
        within = "—" if not bounded else f"{sum(bounded)} / {len(bounded)}" if all(bounded) else f"**{sum(bounded)} / {len(bounded)}**"
        lines.append(f"| `{mechanism.key}` | {mechanism.family} | {len(certs)} / {len(rows)} | {methods} | "
                     f"{_fmt(_worst(outputs))} | {_fmt(_worst(lse))} | {gradients} | {within} | {honoured_text} | {goal} |")
    return lines, by_key


def full_rows(results: list[CaseCertificate]) -> list[str]:
    lines = ["| size | case | method | condition (max logit range) | softmax bound (Thm 4.3) | logit term | "
             "output error | output bound | lse error | lse bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r.certificate
        if r.key != "full" or c is None:
            continue
        named = {e.name: e for e in c.outputs}
        out, lse = named["out"], named.get("lse")
        lines.append(f"| {r.size} | {r.variant} | {c.method} | {c.condition:.3g} | {_fmt(c.softmax_bound)} | "
                     f"{_fmt(c.logit_term)} | {_fmt(out.max_abs)} | {_fmt(out.bound)} | "
                     f"{_fmt(lse.max_abs if lse else None)} | {_fmt(lse.bound if lse else None)} |")
    return lines


def cross_rows(results: list[CaseCertificate]) -> list[str]:
    lines = ["| mechanism | cases | float64 vs mpmath (worst, relative) | longdouble vs mpmath (worst, relative) |",
             "|---|---|---|---|"]
    keys = sorted({r.key for r in results if r.certificate is not None and r.certificate.method == "mpmath"})
    for key in keys:
        certs = [r.certificate for r in results if r.key == key and r.certificate is not None and r.certificate.method == "mpmath"]
        cross = [c.cross_check for c in certs if c.cross_check is not None]
        lines.append(f"| `{key}` | {len(certs)} | {_fmt(max(c.max_rel for c in certs))} | {_fmt(_worst(cross))} |")
    return lines


def stress_rows(seed: int) -> list[str]:
    header = " | ".join(f"× {f}: range / output / gradients" for f in STRESS_FACTORS)
    lines = [f"| mechanism | case | {header} |", "|---|---|" + "---|" * len(STRESS_FACTORS)]
    for key, variant in STRESS:
        mechanism = registry.get(key)
        case = next(c for c in mechanism.cases(STRESS_SIZE, seed) if c.variant == variant)
        cells = []
        for factor in STRESS_FACTORS:
            inputs = {name: (x * factor if name in ("q", "k") else x) for name, x in case.inputs.items()}
            try:
                c = certify(key, inputs, method=default_method(STRESS_SIZE), **dict(case.params))
            except CertificationError as err:
                cells.append(f"not certified ({err})")
                continue
            reference = certify("full", {n: inputs[n] for n in ("q", "k", "v")}, method=default_method(STRESS_SIZE))
            out = max(e.max_rel for e in c.outputs)
            grads = _fmt(max((e.max_rel for e in c.gradients), default=None))
            cells.append(f"{reference.condition:.3g} / {out:.1e} / {grads}")
        lines.append(f"| `{key}` | {variant} | " + " | ".join(cells) + " |")
    return lines


def render(results: list[CaseCertificate], sizes: list[str], seed: int) -> str:
    table, by_key = mechanism_rows(results)
    eps = float(numpy.finfo(numpy.longdouble).eps)
    certified = [r for r in results if r.certificate is not None]
    worst = max(certified, key=lambda r: r.certificate.max_rel)
    explained = []
    for key, rows in by_key.items():
        missing = [r for r in rows if r.certificate is None]
        above = [r for r in rows if r.certificate is not None and r.certificate.max_rel > GOAL]
        if not missing and not above:
            continue
        why = EXPLANATIONS.get(key)
        details = []
        for error in sorted({r.error for r in missing}):
            cases = ", ".join(f"{r.size} `{r.variant}`" for r in missing if r.error == error)
            details.append(f"not certified: {cases} ({error})")
        details += [f"{r.size} `{r.variant}`: {r.certificate.summary()}" for r in above]
        explained.append(f"- `{key}`: {why or 'no explanation recorded: investigate.'}\n  " + "; ".join(details))
    text = f"""# Precision: how right the float64 oracle is

<!-- Generated by `python scripts/certify_table.py` (reflex {reflex.__version__}); do not edit by hand. -->

reflex computes in float64 and claims the answer is right to round-off. `reflex certify` measures
that claim case by case: it runs a mechanism in float64 and again, on the same inputs entered
exactly, in higher precision, and reports the float64 error against the higher-precision result.

```bash
reflex certify full linear --sizes tiny,small      # a table per case; exit 1 if a case is flagged
reflex certify --sizes tiny                        # every registered mechanism
```

```python
cert = reflex.certify("full", {{"q": q, "k": k, "v": v, "mask": mask}}, causal="bottom_right")
cert.outputs[0].max_rel, cert.outputs[0].bound, cert.condition, cert.flagged
```

## Methods

- **longdouble**: the mechanism itself with `compute_dtype=numpy.longdouble`. On x86-64 Linux with
  GCC/Clang that is the x87 80-bit format (64-bit significand, eps 2⁻⁶³ ≈ 1.1e-19; here eps =
  {eps:.3g}); on aarch64 Linux it is IEEE binary128 in software. With MSVC on Windows and on Apple
  arm64 `long double` *is* double: there `certify` refuses the longdouble method with a message
  and only mpmath remains. `float96`/`float128` name the storage, not the precision. CuPy has no
  long double: certification runs on the host. NumPy has no long-double BLAS, so longdouble
  matmuls are 80–90× slower than float64: fine for small cases. `numpy.linalg` (LAPACK) rejects
  long double, so mechanisms that solve or invert through it cannot be certified this way.
  Because a mechanism could silently compute float64 when asked for longdouble, each certificate
  checks that the longdouble result has dtype longdouble and differs from the float64 result at
  the ulp level ("longdouble honoured"; a case whose two results are bitwise equal — an exact
  case such as a self-only window — cannot tell, and says so). longdouble compares a mechanism
  with *itself* at higher precision: a defect that loses precision in both runs (a hard-coded
  float32 cast) is invisible to it. The independent mpmath formulas catch that
  (the tests plant exactly this defect).
- **mpmath** (`pip install 'reflex-attention[certify]'`): an independent evaluation of the formula
  in arbitrary precision (default 40 digits, `--dps`), written in `reflex/certify.py` from the
  equations, not from the engine, as SciPy checks its special functions (inputs enter exactly
  through `mpf(float(x))`). Formulas: the engine's dense softmax attention (`full`: masks, bias,
  softcap, GQA, both causal alignments, fully masked rows, attention sinks, the `blhd` layout),
  linear attention (`linear`: elu + 1
  and relu feature maps, causal) and Performer (`performer` with an explicit projection: positive,
  trigonometric and relu features, causal; the unstabilised formula, which the mechanism's
  stabilisation must equal exactly). The other formula mechanisms (cosFormer, RFA, Nyström,
  low-rank and compressed memory, ...) are certified through longdouble only. mpmath is pure
  Python, so `reflex certify` uses it for tiny cases of those three and longdouble for
  everything else. Under mpmath the certificate also
  compares the mechanism's own longdouble result with mpmath ("cross-check" below): ≈ 1e-19 means
  longdouble is honoured end to end on that path.
- **Gradients**: where a mechanism has a VJP, its float64 gradients (`d_q`, `d_k`, ...) are
  compared with the VJP run under `compute_dtype=numpy.longdouble`, with a fixed cotangent. A
  gradient that is zero in exact arithmetic (a query that attends only itself; a key-projection
  bias, to which softmax is invariant) is a cancellation of O(1) terms: float64 leaves round-off
  there, so its error is measured against the case's largest gradient scale (the certificate's
  notes say so).

Errors are relative to the output scale: `max |float64 − reference| / max |reference|`, per
output (and gradient). The float64 unit roundoff is u = 2⁻⁵³ ≈ {UNIT_ROUNDOFF:.2e}.

## Bounds (softmax attention)

For the softmax formula the certificate puts the first-order bounds of Blanchard, Higham & Higham
(2021, IMA J. Numer. Anal. 41(4)) beside the measured error, with n the attended keys of a row and
x its scores:

- max-shifted softmax (Thm 4.3): `max|ĝ − g| / max|g| ≲ (n + 2 + 2·(max x − min x))·u`;
- shifted lse (Thm 4.2): `|ŷ − y| ≲ |y + n − min x|·u`;
- the logit term: computing `Z = scale·q·kᵀ` perturbs each logit by at most
  `γ_(D+1)·|scale|·Σ_d |q_d k_d|` (`γ_m = m·u / (1 − m·u)`; plus `u·|Z|` for a bias addition and
  `3u·|Z|` for a softcap), which changes P by a relative `2·max|ΔZ|`;
- output bound per element: `σ·max_j P_ij·Σ_j |v_j| + (2·ΔZ_i + γ_(n+1))·Σ_j P_ij·|v_j|`, σ the
  softmax bound of the row; lse bound: the Thm 4.2 term plus `ΔZ_i`.

The **condition** of a case is its largest logit range `max x − min x` over the attended keys of a
row. Worst-case bounds sit far above observed errors; an error *above* its bound means a defect:
the tests plant a float32 cast inside the softmax and an unshifted softmax at large logits, and
`certify` flags both (errors 10⁶× the bound, and infinite).

## Every mechanism, sizes {", ".join(sizes)}

Worst relative error over the mechanism's registry cases (seed {seed}); goal ≤ {GOAL:.0e}. Worst
overall: {worst.certificate.max_rel:.1e} (`{worst.key}` {worst.size} `{worst.variant}`).

{chr(10).join(table)}

### Where the goal is not met, or a case is not certified

{chr(10).join(explained) if explained else "Every registry case is certified and within the goal."}

"Within bounds": cases whose every output element is within its first-order bound (below), of
the cases that have one: `full` (the softmax formula) and the restricted-softmax mechanisms whose
longdouble output equals softmax over their explicit pattern (`Mechanism.pattern`, multiplicities
counted) to 1e-17 — the bounds are then computed over the keys each query attends. Mechanisms that
do more than attend a pattern (projections, mixing, several softmaxes) have no bound here.

## `full`: errors beside their bounds

Absolute errors and bounds (the output scale of these cases is about 1).

{chr(10).join(full_rows(results))}

## Cross-check: longdouble against mpmath

{chr(10).join(cross_rows(results))}

## Conditioning beyond the registry cases

The registry cases draw q, k, v from N(0, 1). Scaling q and k widens the logit range (the
condition, ×9 and ×36 for factors 3 and 6) and shows how each family's float64 error grows
({STRESS_SIZE} case, longdouble reference; range / worst output error / worst gradient error):

{chr(10).join(stress_rows(seed))}

- Softmax attention: the logit term γ_(D+1)·scale·Σ|q||k| grows with the norms of q and k, and the
  softmax bound with the logit range; at large logits they dominate. Measured against mpmath
  (dps 40, one head, 4 queries, D = 64, S = 1024): 7.5 ulp of max|O| at unit variance (3.2 of them
  from the logits), 37 ulp with q, k × 3 (logit range 69, nearly all from the logits).
- Performer (positive random features, Choromanski et al. 2021, §2.3): φ(x) = exp(wᵀx − |x|²/2)/√m
  evaluates exponentials of O(|x|·|w|) arguments; their relative error grows with the argument,
  and at large norms features underflow or overflow (the estimator itself, not float64, is then
  the limit).
- Nyström (Xiong et al. 2021, §3): the iterative pseudo-inverse is a fixed number of Newton–Schulz
  steps; its float64 error follows the landmark kernel's condition number, which grows with the
  logit range — gradients first.
- Clustered and routing mechanisms select keys by comparisons (k-means, argmax); a selection that
  flips between float64 and longdouble (a near-tie) shows up as a large error, which would be a
  branch change, not round-off: none occurs on the registry cases.
"""
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "precision.md"), help="output file (default docs/precision.md)")
    parser.add_argument("--sizes", default="tiny,small", help="comma-separated sizes (default tiny,small)")
    parser.add_argument("--seed", type=int, default=0, help="case seed (default 0)")
    args = parser.parse_args(argv)
    if not longdouble_extends_float64():
        print("certify_table: numpy.longdouble is float64 on this platform; run on x86-64 Linux", file=sys.stderr)
        return 2
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    start = time.perf_counter()
    results = certify_registry(None, sizes, seed=args.seed, progress=True)
    text = render(results, sizes, args.seed)
    Path(args.out).write_text(text, encoding="utf-8")
    flagged = [r for r in results if r.certificate is not None and r.certificate.flagged]
    failed = [r for r in results if r.error and r.error.startswith("the mechanism failed")]
    print(f"wrote {args.out}: {len(results)} cases of {len({r.key for r in results})} mechanisms in "
          f"{time.perf_counter() - start:.1f} s; {len(flagged)} flagged, {len(failed)} failed")
    for r in flagged + failed:
        print(f"  {r.key} {r.size} {r.variant}: {r.error or r.certificate.summary()}", file=sys.stderr)
    return 1 if flagged or failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
