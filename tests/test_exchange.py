"""The measured exchange (``measure.exchange``) on synthetic damage and cost: never more damaged, never
over the limit, within its prune budget, and on a separable convex problem with equal step costs it
reaches the optimum a brute force finds."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from onnxprune.measure.exchange import exchange

SIZES = {0: 8, 1: 8, 2: 8, 3: 8}
ALLOWED = {g: list(range(n, 1, -1)) for g, n in SIZES.items()}


def share(costs):
    full = sum(costs[g] * n for g, n in SIZES.items())
    return lambda c: sum(costs[g] * c.get(g, SIZES[g]) for g in SIZES) / full


def convex(weights):
    return lambda c: sum(w * (SIZES[g] - c[g]) ** 2 for g, w in weights.items())


def test_reaches_the_brute_force_optimum_on_a_separable_convex_problem():
    weights = {0: 5.0, 1: 1.0, 2: 0.2, 3: 3.0}
    predict, damage = share({g: 1.0 for g in SIZES}), convex(weights)
    start = {g: 5 for g in SIZES}  # uniform: 20 of 32 units, share 0.625
    limit = predict(start)
    best = min((damage(dict(zip(SIZES, ks, strict=True))), ks)
               for ks in itertools.product(*(ALLOWED[g] for g in SIZES))
               if predict(dict(zip(SIZES, ks, strict=True))) <= limit + 1e-12)
    ex = exchange(start, ALLOWED, damage, predict, limit, evals=500)
    assert ex.damage == best[0] < damage(start)
    assert ex.damage == damage(ex.counts)
    assert predict(ex.counts) <= limit + 1e-12
    assert ex.moves and ex.start_damage == damage(start)
    # the most sensitive group widened, the least narrowed
    assert ex.counts[0] > start[0] and ex.counts[2] < start[2]


def test_a_start_already_optimal_is_returned_as_it_is():
    predict, damage = share({g: 1.0 for g in SIZES}), convex({g: 1.0 for g in SIZES})
    start = {g: 5 for g in SIZES}
    ex = exchange(start, ALLOWED, damage, predict, predict(start), evals=100)
    assert ex.counts == start and not ex.moves and ex.damage == damage(start)


def test_prune_budget_is_kept():
    calls = []
    predict, base = share({g: 1.0 for g in SIZES}), convex({0: 5.0, 1: 1.0, 2: 0.2, 3: 3.0})

    def damage(c):
        calls.append(dict(c))
        return base(c)

    start = {g: 5 for g in SIZES}
    ex = exchange(start, ALLOWED, damage, predict, predict(start), evals=6)
    assert ex.evals <= 6 and len(calls) <= 7  # the start plan's own damage is not counted
    assert exchange(start, ALLOWED, damage, predict, predict(start), evals=0).counts == start


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.1, 4.0), min_size=4, max_size=4), st.lists(st.floats(0.0, 3.0), min_size=4, max_size=4),
       st.lists(st.integers(2, 8), min_size=4, max_size=4), st.floats(-1.0, 1.0), st.integers(0, 60))
def test_never_more_damaged_nor_over_the_limit(costs, weights, start, coupling, evals):
    """Any costs, non-separable damage (a coupling between groups 0 and 1), any start and prune budget."""
    predict = share(dict(enumerate(costs)))
    sep = convex(dict(enumerate(weights)))

    def damage(c):
        return sep(c) + coupling * (SIZES[0] - c[0]) * (SIZES[1] - c[1])

    counts = dict(enumerate(start))
    limit = predict(counts)
    ex = exchange(counts, ALLOWED, damage, predict, limit * 0.9, evals=evals)
    assert ex.damage <= damage(counts) + 1e-12
    assert ex.damage == damage(ex.counts)
    assert predict(ex.counts) <= limit * (1 + 1e-9)  # the start's own cost is the limit when higher
    assert all(ex.counts[g] in ALLOWED[g] for g in SIZES)
    assert ex.evals <= evals
