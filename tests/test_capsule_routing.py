"""capsule_routing_attention: uniform first round, coefficients sum to 1, == host loops (dynamic and EM)."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs


def votes_host(o, w):
    return numpy.einsum("...hle,hmef->...lhmf", o, w)


def squash(s):
    n2 = (s * s).sum(-1, keepdims=True)
    return n2 / (1 + n2) * s / numpy.sqrt(n2)


def dynamic_host(o, w, iterations):
    u = votes_host(o, w)
    b = numpy.zeros(u.shape[:-1])
    for r in range(iterations):
        c = numpy.exp(b) / numpy.exp(b).sum(-1, keepdims=True)
        v = squash((c[..., None] * u).sum(-3))
        b = b + (u * v[..., None, :, :]).sum(-1)
    return v.reshape(*v.shape[:-2], -1), c


def em_host(o, w, a, iterations, beta_a, beta_v, lam, eps):
    u = votes_host(o, w)
    a = numpy.moveaxis(a, -2, -1)[..., None]
    r = numpy.full(u.shape[:-1], 1 / u.shape[-2])
    for t in range(iterations):
        rp = r * a
        mass = rp.sum(-2)[..., None]
        mu = (rp[..., None] * u).sum(-3) / mass
        var = (rp[..., None] * (u - mu[..., None, :, :]) ** 2).sum(-3) / mass + eps
        cost = ((beta_v + 0.5 * numpy.log(var)) * mass).sum(-1)
        act = 1 / (1 + numpy.exp(-lam * (beta_a - cost)))
        if t < iterations - 1:
            logp = numpy.log(numpy.prod(numpy.exp(-(u - mu[..., None, :, :]) ** 2 / (2 * var[..., None, :, :]))
                                        / numpy.sqrt(2 * numpy.pi * var[..., None, :, :]), axis=-1))
            z = numpy.log(act)[..., None, :] + logp
            r = numpy.exp(z - z.max(-1, keepdims=True))
            r = r / r.sum(-1, keepdims=True)
    return mu.reshape(*mu.shape[:-2], -1), r


@pytest.mark.parametrize("iterations", [1, 2, 4])
def test_dynamic_matches_host_and_coefficients_sum_to_one(backend, iterations):
    o, w = random.normal((2, 4, 3, 5), seed=0), random.normal((4, 3, 5, 2), seed=1)
    out, c = reflex.capsule_routing_attention(backend.asarray(o), backend.asarray(w), iterations=iterations,
                                              return_coefficients=True)
    ref_out, ref_c = dynamic_host(o, w, iterations)
    c = backend.to_numpy(c)
    assert out.shape == (2, 3, 6) and c.shape == (2, 3, 4, 3)
    assert max_abs(backend.to_numpy(out), ref_out) <= 1e-13 and max_abs(c, ref_c) <= 1e-14
    assert max_abs(c.sum(-1), numpy.ones((2, 3, 4))) <= 1e-15


def test_one_round_is_uniform_aggregation():
    o, w = random.normal((4, 6, 3), seed=2), random.normal((4, 2, 3, 3), seed=3)
    out, c = reflex.capsule_routing_attention(o, w, iterations=1, return_coefficients=True)
    assert numpy.all(c == 0.5)
    uniform = squash(votes_host(o, w).sum(-3) / 2)
    assert max_abs(out, uniform.reshape(6, 6)) <= 1e-15
    em = reflex.capsule_routing_attention(o, w, iterations=1, variant="em")
    assert max_abs(em, votes_host(o, w).mean(-3).reshape(6, 6)) <= 1e-15


def test_em_matches_host(backend):
    o, w = random.normal((2, 3, 4, 5), seed=4), random.normal((3, 2, 5, 3), seed=5)
    a = random.uniform((2, 3, 4), seed=6, low=0.1)
    got, r = reflex.capsule_routing_attention(backend.asarray(o), backend.asarray(w), variant="em", iterations=3,
                                              activations=backend.asarray(a), beta_a=0.5, beta_v=0.2,
                                              inverse_temperature=0.7, return_coefficients=True)
    ref, ref_r = em_host(o, w, a, 3, 0.5, 0.2, 0.7, 1e-9)
    assert max_abs(backend.to_numpy(got), ref) <= 1e-12
    r = backend.to_numpy(r)
    assert max_abs(r, ref_r) <= 1e-13 and max_abs(r.sum(-1), numpy.ones(r.shape[:-1])) <= 1e-15


def test_em_large_cost_stays_finite():
    """A cost far above β_a makes sigmoid(λ(β_a − cost)) underflow to 0; log a_m must stay finite (no NaN)."""
    o, w = random.normal((1, 4, 3, 5), seed=7), random.normal((4, 2, 5, 3), seed=8)
    a = random.uniform((1, 4, 3), seed=9, low=0.1)
    got, r = reflex.capsule_routing_attention(o, w, variant="em", iterations=3, activations=a, beta_a=-2000.0,
                                              return_coefficients=True)
    assert numpy.all(numpy.isfinite(got)) and numpy.all(numpy.isfinite(r))
    # log a_m = λ(β_a − cost) − log(1 + e^{λ(β_a − cost)}) = λ(β_a − cost) there: a common shift per m
    # relative to β_a = −1000, which routes identically (the shift −1000·λ is the same for every m)
    ref = reflex.capsule_routing_attention(o, w, variant="em", iterations=3, activations=a, beta_a=-1000.0)
    assert max_abs(got, ref) <= 1e-13


def test_zero_votes_and_errors():
    o = numpy.zeros((2, 1, 3))
    out = reflex.capsule_routing_attention(o, numpy.ones((2, 2, 3, 2)), iterations=3)
    assert numpy.all(out == 0)
    with pytest.raises(ValueError, match="variant must be"):
        reflex.capsule_routing_attention(o, numpy.ones((2, 2, 3, 2)), variant="kmeans")
    with pytest.raises(ValueError, match="iterations must be"):
        reflex.capsule_routing_attention(o, numpy.ones((2, 2, 3, 2)), iterations=0)
    with pytest.raises(ValueError, match="transforms must have shape"):
        reflex.capsule_routing_attention(o, numpy.ones((3, 2, 3, 2)))
