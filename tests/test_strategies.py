"""The four strategies of `SPEC.md`, one by one and over whole models.

Unit tests call the pure functions of `keras_we.strategies` on tiny arrays
whose results are worked out by hand in the comments. End-to-end tests run
`keras_we.evolve` on small real Keras models and compare every tensor, the
counters and the report with `oracle_step`: a plain loop-based NumPy
reading of SPEC.md that shares no code with `keras_we`.

Every test runs on every backend (`KERAS_BACKEND`).
"""

import math

import keras
import numpy as np
import pytest
from keras import ops

import keras_we
from keras_we import crossovers, layouts, strategies
from keras_we.evolution import EvolutionOptions, Evolver, evolver_for
from keras_we.layers import Target, find_targets
from tests.utils import LayerStack

GROUPS = ("conv", "gamma", "beta")
MODES = ("paper", "reference")


# ================================================================ helpers


def tensor(x, dtype="float32"):
    return ops.convert_to_tensor(np.asarray(x, dtype=dtype))


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def scalar(x):
    """A count as a Python int, whether returned as an int, a 0-d or a 1-item tensor."""
    return int(np.asarray(numpy(x)).reshape(()))


def crossed(crossover, values, mapping, **kwargs):
    """`values` (filter layout or BN vector, NumPy) after `crossover` of each
    inferior item `j` with the dominant item `mapping[j]` (last axis). A
    `mode` names the crossover mode whose element formula is used."""
    inferior, dominant = list(mapping), list(mapping.values())
    if "mode" in kwargs:
        kwargs = {"element": crossovers.get(kwargs.pop("mode")).element, **kwargs}
    new = crossover(tensor(values[..., inferior]), tensor(values[..., dominant]), **kwargs)
    out = values.copy()
    out[..., inferior] = numpy(new)
    return out


def same_variables(found, expected):
    return len(found) == len(expected) and all(a is b for a, b in zip(found, expected))


def constant_schedule(epoch):
    """A schedule multiplier of 1, so that `r(e)` is the base ratio itself."""
    return 1.0


def stack(layers):
    model = LayerStack(layers)
    model.build((None, 1))
    return model


def built(layer, input_shape):
    layer.build(input_shape)
    return layer


# ============================================ independent oracle of SPEC.md
#
# `tensors` is a list of `(kind, array)` in traversal order, kind one of
# "conv" (Keras kernel `(*spatial, cin_per_group, cout)`), "depthwise"
# (`(*spatial, cin, depth_multiplier)`), "gamma", "beta". Everything is
# computed in float64 and written back in the tensor's own dtype.

GROUP_OF = {"conv": "conv", "depthwise": "conv", "gamma": "gamma", "beta": "beta"}
SPEC_DEFAULTS = {"conv_ratio": 0.2, "gamma_ratio": 0.05, "beta_ratio": 0.05,
                 "local_ratio": 0.1, "force_divisor": 2.0}


def oracle_ratio(base, epoch, schedule=None):
    """SPEC step 1: `ratio * factors[k] * sigmoid((e - m_k) / temperature)`."""
    if schedule is not None:
        return base * schedule(epoch)
    milestones, factors, temperature = (60, 120), (1.0, 0.4, 0.2), 15.0
    k = sum(m <= epoch for m in milestones)
    start = milestones[k - 1] if k else 0
    return base * factors[k] / (1.0 + math.exp(-(epoch - start) / temperature))


def oracle_filters(kind, shape):
    """Index of every item (SPEC 'Terms'); a filter reads `(*spatial, channels)`."""
    if kind == "depthwise":  # filter c*dm + m is kernel[..., c, m]
        return [(Ellipsis, c, slice(m, m + 1)) for c in range(shape[-2]) for m in range(shape[-1])]
    if kind == "conv":
        return [(Ellipsis, slice(None), o) for o in range(shape[-1])]
    return [(o,) for o in range(shape[0])]


def oracle_path(kind, shape, mode):
    if kind in ("gamma", "beta"):
        return "entry"
    spatial = shape[:-2]
    one_by_one = spatial[0] == 1 if mode == "reference" else math.prod(spatial) == 1
    return "filter" if one_by_one else "element"


def oracle_crossover(path, D, J, mode):
    """SPEC step 5 with the guards of step 6; D and J as read by `oracle_filters`."""
    D, J = np.asarray(D, np.float64), np.array(J, np.float64)
    if path in ("entry", "filter"):
        den = np.abs(J).sum() + np.abs(D).sum()
        if den == 0:
            return J
        a = np.abs(J).sum() / den
        new = a * J + (1 - a) * D
        return new if np.isfinite(new).all() else J
    for c in range(J.shape[-1]):
        P, Q = D[..., c].ravel(), J[..., c]  # Q is a view into J
        # SPEC's l and s; argmax/argmin take the first on ties, in row-major order
        large = P[np.argmax(np.abs(P))]
        small = Q.ravel()[np.argmin(np.abs(Q))]
        den = abs(small) + abs(large) if mode == "paper" else small + large
        if den == 0:
            continue
        if mode == "paper":
            a = abs(small) / den
            v = a * small + (1 - a) * large
        else:
            a = small / den
            v = large * a + small * (1 - a)
        if np.isfinite(v):
            Q[Q == small] = v  # signed comparison, as the public code does
    return J


def oracle_step(tensors, epoch, counters, hp, mode):
    """One evolution step after epoch `epoch`, following SPEC.md literally.

    Returns `(new_arrays, new_counters, evolved)`.
    """
    hp = {**SPEC_DEFAULTS, **hp}
    out = [np.array(w, np.float64) for _, w in tensors]
    counters, evolved = dict(counters), dict.fromkeys(GROUPS, 0)
    kernel_count = sum(GROUP_OF[kind] == "conv" for kind, _ in tensors)
    limit = kernel_count / hp["force_divisor"]
    for group in GROUPS:
        members = [i for i, (kind, w) in enumerate(tensors)
                   if GROUP_OF[kind] == group and np.isfinite(w).all()]  # guard: skip
        index = {i: oracle_filters(tensors[i][0], out[i].shape) for i in members}
        scores = {i: [np.abs(out[i][ix]).sum() / (out[i][ix].shape[-1] if group == "conv" else 1)
                      for ix in index[i]] for i in members}
        pool = sorted(x for i in members for x in scores[i])
        if not pool:
            continue
        r = oracle_ratio(hp[f"{group}_ratio"], epoch, hp.get("schedule"))
        t = pool[min(math.floor(len(pool) * r), len(pool) - 1)]
        for i in members:
            sc, n = scores[i], len(scores[i])
            g = sum(x >= t for x in sc)
            if g == n:
                continue
            weak = sum(x <= hp["local_ratio"] * max(sc) for x in sc)
            if weak == 0:
                counters[group] += 1
                if counters[group] >= limit:
                    weak, counters[group] = 1, 0
            else:
                counters[group] = 0
            k = min(weak, n - g)
            idx = sorted(range(n), key=lambda j: -sc[j])  # stable: ties in index order
            path = oracle_path(tensors[i][0], out[i].shape, mode)
            for d, j in zip(idx[: n - k], idx[n - k:]):  # min(k, n-k) pairs
                D, J = out[i][index[i][d]], out[i][index[i][j]]
                out[i][index[i][j]] = oracle_crossover(path, D, J, mode)
                evolved[group] += 1
    new = []
    for (_, old), value in zip(tensors, out):
        with np.errstate(over="ignore", invalid="ignore"):
            cast = value.astype(old.dtype)
        new.append(np.where(np.isfinite(cast), cast, old))  # guard: never write inf
    return new, counters, evolved


def check_step(model, targets, epoch, state, mode, hp, rtol=1e-5, atol=1e-6):
    """Runs `keras_we.evolve` once and compares everything with the oracle."""
    before = [(kind, numpy(v).copy()) for v, kind in targets]
    counters = {g: 0 for g in GROUPS} if state is None else {
        g: state[f"{g}_counter"] for g in GROUPS}
    want, want_counters, want_evolved = oracle_step(before, epoch, counters, hp, mode)
    report, state = keras_we.evolve(model, epoch, state, crossover=mode, **hp)
    got = [numpy(v) for v, _ in targets]
    for (variable, kind), g, w, (_, b) in zip(targets, got, want, before):
        assert g.dtype == b.dtype, variable.path
        np.testing.assert_allclose(
            g, w, rtol=rtol, atol=atol, err_msg=f"{mode} epoch {epoch} {variable.path}")
    assert state == {f"{g}_counter": want_counters[g] for g in GROUPS}
    for group in GROUPS:
        assert getattr(report, f"{group}_evolved") == want_evolved[group], group
    changed = sum(int(np.sum(g != b)) for g, (_, b) in zip(got, before)
                  if np.isfinite(b).all())
    assert report.changed_elements == changed
    return report, state, [not np.array_equal(g, b, equal_nan=True)
                           for g, (_, b) in zip(got, before)]


def random_values(targets, seed, plain=()):
    """Random tensors with some weak (x0.01) and dead (all-zero, tied) items,
    except the tensors numbered in `plain`: scaled by .3 and with usually no
    weak item, so they are starved and exercise the counters and forcing."""
    rng = np.random.default_rng(seed)
    values = []
    for i, (variable, kind) in enumerate(targets):
        w = rng.normal(size=variable.shape).astype("float32")
        values.append(w)
        if i in plain:
            w *= 0.3
            continue
        index = oracle_filters(kind, w.shape)
        order = rng.permutation(len(index))
        for o in order[: max(1, len(index) // 3)]:
            w[index[o]] *= 0.01
        for o in order[len(index) // 3: len(index) // 3 + (2 if len(index) >= 6 else 0)]:
            w[index[o]] = 0.0
    return values


# ============================================ oracle self-check (hand numbers)


def test_oracle_agrees_with_hand_numbers():
    # Gamma A = [1, 1/16, 1/2, 1/32], r = 0.25 over N = 4 -> t = sorted[1] = 1/16.
    # g = 3, L = #(<= 0.1) = 2, k = min(2, 1) = 1: entry 3 pairs with entry 0:
    # a = (1/32) / (33/32) = 1/33 -> 1/33 * 1/32 + 32/33 * 1 = 1025/1056.
    new, counters, evolved = oracle_step(
        [("gamma", np.array([1.0, 0.0625, 0.5, 0.03125], "float32"))], 0,
        dict.fromkeys(GROUPS, 0), {"gamma_ratio": 0.25, "schedule": constant_schedule}, "paper")
    np.testing.assert_allclose(new[0], [1.0, 0.0625, 0.5, 1025 / 1056], rtol=1e-7)
    assert evolved["gamma"] == 1 and counters["gamma"] == 0


# ====================================================== global selection


@pytest.mark.parametrize(
    "count, ratio, position",
    [
        (10, 0.2, 2),  # 10 * 0.2 = 2.0 exactly in float64
        (8, 0.25, 2),
        (10, 0.0, 0),  # threshold is the minimum
        (10, 0.05, 0),  # 0.5 floors to 0
        (10, 0.29, 2),
        (10, 0.95, 9),
        (10, 1.0, 9),  # floor(10) = 10 >= N: clamped to N - 1
        (5, 0.99, 4),
        (1, 0.5, 0),
        (3, 1 / 3, 1),  # 3 * (1/3) == 1.0 in float64
        (100, 0.29, 28),  # 100 * 0.29 = 28.999999999999996 in float64 (Python's int())
    ],
)
def test_threshold_position(count, ratio, position):
    assert strategies.threshold_position(count, ratio) == position


@pytest.mark.parametrize(
    "position, threshold", [(0, 0.125), (1, 0.25), (2, 0.25), (3, 0.5), (5, 1.0)]
)
def test_global_threshold(position, threshold):
    # sorted ascending: [0.125, 0.25, 0.25, 0.5, 0.75, 1.0]
    scores = tensor([0.5, 0.25, 1.0, 0.125, 0.75, 0.25])
    assert float(numpy(strategies.global_threshold(scores, position))) == threshold


# ======================================================= local selection


@pytest.mark.parametrize(
    "scores, threshold, local_ratio, important, weak",
    [
        # >= t counts the item equal to t; <= ratio*max counts the item equal to it
        ([0.0, 0.25, 0.5, 2.0], 0.5, 0.125, 2, 2),
        ([0.0, 0.25, 0.5, 2.0], 0.5000001, 0.125, 1, 2),
        ([0.0, 0.25, 0.5, 2.0], 0.0, 0.1, 4, 1),  # 0.1 * 2 = 0.2: only the 0
        ([0.5, 0.5, 0.5], 0.5, 0.1, 3, 0),  # uniform: important, not weak
        ([0.0, 0.0, 0.0], 0.0, 0.1, 3, 3),  # all zero: 0 <= 0.1 * 0
        ([1.0, 0.0, 0.0, 0.0625], 1.0, 0.0625, 1, 3),
    ],
)
def test_local_counts(scores, threshold, local_ratio, important, weak):
    got = strategies.local_counts(tensor(scores), tensor(threshold), local_ratio)
    assert (scalar(got[0]), scalar(got[1])) == (important, weak)


def test_local_counts_per_layer():
    # Two layers scored together: [0, 1/4, 1/2, 2] and [1, 1/16, 1/8], t = 1/2, ratio 1/8.
    # important: 2 (1/2, 2) and 1 (1); weak: <= 1/4 -> 2, <= 1/8 -> 2.
    scores = tensor([0.0, 0.25, 0.5, 2.0, 1.0, 0.0625, 0.125])
    layer_ids = tensor([0, 0, 0, 0, 1, 1, 1], "int32")
    important, weak = strategies.local_counts(scores, tensor(0.5), 0.125, layer_ids, 2)
    assert numpy(important).tolist() == [2, 1] and numpy(weak).tolist() == [2, 2]


@pytest.mark.parametrize(
    "size, important, weak, counter, limit, count, new_counter",
    [
        (4, 4, 0, 5, 3, 0, 5),  # g == n: nothing, counter untouched
        (4, 4, 2, 1, 3, 0, 1),  # g == n even with weak items
        (4, 1, 0, 0, 3, 0, 1),  # starved: counter + 1
        (4, 1, 0, 1, 3, 0, 2),
        (4, 1, 0, 2, 3, 1, 0),  # reaches the limit: forced L = 1, k = min(1, 3)
        (4, 1, 0, 7, 3, 1, 0),  # already past the limit (carried state)
        (4, 3, 0, 2, 3, 1, 0),  # forced with n - g = 1
        (4, 1, 2, 2, 3, 2, 0),  # L > 0 resets, k = min(2, 3)
        (4, 3, 3, 0, 3, 1, 0),  # k = min(L, n - g) = min(3, 1)
        (4, 0, 4, 9, 3, 4, 0),  # every item inferior
        (6, 0, 0, 27, 29, 0, 28),  # K = 57, divisor 2: 28.5 -> ceil 29; 28 < 28.5
        (6, 0, 0, 28, 29, 1, 0),  # 29 >= 28.5: forced
    ],
)
def test_inferior_count(size, important, weak, counter, limit, count, new_counter):
    k, c = strategies.inferior_count(
        size, tensor(important, "int32"), tensor(weak, "int32"), tensor(counter, "int32"), limit
    )
    assert (scalar(k), scalar(c)) == (count, new_counter)


# ====================================================== forward matching


@pytest.mark.parametrize(
    "scores, count, pairs",
    [
        # descending order: 1 (.9), 4 (.7), 3 (.5), 0 (.3), 5 (.2), 2 (.1)
        ([0.3, 0.9, 0.1, 0.5, 0.7, 0.2], 2, {5: 1, 2: 4}),  # best dominant, best inferior
        ([0.3, 0.9, 0.1, 0.5, 0.7, 0.2], 4, {3: 1, 0: 4}),  # min(4, 2) = 2 pairs
        ([0.3, 0.9, 0.1, 0.5, 0.7, 0.2], 3, {0: 1, 5: 4, 2: 3}),
        ([0.3, 0.9, 0.1, 0.5, 0.7, 0.2], 0, {}),
        ([0.3, 0.9, 0.1, 0.5, 0.7, 0.2], 6, {}),  # no dominant left
        ([0.3, 0.9, 0.1, 0.5, 0.7, 0.2], 7, {}),  # more than the layer: none either
        # ties in index order: [0, 3, 1, 2, 4, 5]; inferior [2, 4, 5]
        ([0.5, 0.0, 0.0, 0.5, 0.0, 0.0], 3, {2: 0, 4: 3, 5: 1}),
        ([0.0, 0.0, 0.0, 0.0], 2, {2: 0, 3: 1}),  # dead filters
        ([0.0, 0.0, 0.0, 0.0, 0.0], 3, {2: 0, 3: 1}),  # min(3, 2) pairs
    ],
)
def test_forward_pairs(scores, count, pairs):
    partner, paired = strategies.forward_pairs(tensor(scores), tensor(count, "int32"))
    partner, paired = numpy(partner), numpy(paired)
    assert {j: int(partner[j]) for j in np.flatnonzero(paired)} == pairs


def test_forward_pairs_per_layer():
    # Layer 0 (items 0-5) as above with k = 2: 5 <- 1, 2 <- 4.
    # Layer 1 (items 6-10) = [0, 0, .5, 0, .25], k = 2: order [8, 10, 6, 7, 9]
    #   (zeros in index order), inferior [7, 9]: 7 <- 8, 9 <- 10.
    # Layer 2 (items 11-12), k = 0: nothing. Partners never cross layers.
    scores = tensor([0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.0, 0.0, 0.5, 0.0, 0.25, 1.0, 2.0])
    layer_ids = tensor([0] * 6 + [1] * 5 + [2] * 2, "int32")
    partner, paired = strategies.forward_pairs(
        scores, tensor([2, 2, 0], "int32"), layer_ids, (6, 5, 2))
    partner, paired = numpy(partner), numpy(paired)
    assert {j: int(partner[j]) for j in np.flatnonzero(paired)} == {5: 1, 2: 4, 7: 8, 9: 10}


@pytest.mark.parametrize("seed", range(5))
def test_forward_pairs_matches_the_definition_on_random_layers(seed):
    """Against the definition, layer by layer: rank by descending score,
    ties in index order (scores drawn from a few values, so ties abound,
    dead items included), rank `n - k + i` takes rank `i`."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 12, size=6).tolist()
    counts = [int(rng.integers(0, n + 1)) for n in sizes]
    counts[0] = sizes[0] // 2  # at least one pair
    scores = rng.choice([0.0, 0.25, 0.5, 1.0, np.inf], size=sum(sizes)).astype("float32")
    layer_ids = np.repeat(np.arange(len(sizes)), sizes)
    partner, paired = strategies.forward_pairs(tensor(scores), tensor(counts, "int32"),
                                               tensor(layer_ids, "int32"), sizes)
    assert isinstance(partner, np.ndarray) and paired.dtype == bool
    want, start = {}, 0
    for n, k in zip(sizes, counts):
        ranked = sorted(range(start, start + n), key=lambda j: (-scores[j], j))
        want.update({ranked[n - k + i]: ranked[i] for i in range(min(k, n - k))})
        start += n
    assert {j: int(partner[j]) for j in np.flatnonzero(paired)} == want
    assert int(paired.sum()) == sum(min(k, n - k) for n, k in zip(sizes, counts))


# ============================================================= crossover


def test_entry_crossover_hand_numbers():
    # 1 <- 0: a = .5/2.5 = .2; .2*(-.5) + .8*2 = 1.5
    # 3 <- 2: both 0, denominator 0: unchanged
    # 5 <- 4: J = 0, a = 0 -> J = D = 1
    # 7 <- 6: a = 1/5; .2*1 + .8*(-4) = -3
    values = np.array([2.0, -0.5, 0.0, 0.0, 1.0, 0.0, -4.0, 1.0], "float32")
    new = crossed(strategies.entry_crossover, values, {1: 0, 3: 2, 5: 4, 7: 6})
    np.testing.assert_allclose(new, [2.0, 1.5, 0.0, 0.0, 1.0, 1.0, -4.0, -3.0], rtol=1e-6)


def test_filter_crossover_hand_numbers():
    # layout (S=1, C=2, O=5): f0 = [1, -2] (L1 3), f1 = [.5, .5] (L1 1), f2..f4 = 0
    filters = np.zeros((1, 2, 5), "float32")
    filters[0, :, 0] = [1.0, -2.0]
    filters[0, :, 1] = [0.5, 0.5]
    new = crossed(strategies.filter_crossover, filters, {1: 0, 2: 0, 3: 4})
    want = filters.copy()
    # f1: a = 1/4 -> .25*[.5, .5] + .75*[1, -2] = [.875, -1.375]
    want[0, :, 1] = [0.875, -1.375]
    # f2 = 0 with D = f0: a = 0 -> f2 = f0; f3 <- f4: 0/0, unchanged
    want[0, :, 2] = [1.0, -2.0]
    np.testing.assert_allclose(new, want, rtol=1e-6)


def test_filter_crossover_by_parts_with_whole_norms():
    # Each input channel crossed over on its own, given its whole filter's
    # norms, is the whole-filter crossover.
    rng = np.random.default_rng(3)
    filters = rng.normal(size=(1, 3, 4)).astype("float32")
    mapping = {2: 0, 3: 1}
    whole = crossed(strategies.filter_crossover, filters, mapping)
    norms = np.abs(filters).sum(axis=(0, 1))
    parts = filters.copy()
    for c in range(3):
        parts[:, c:c + 1] = crossed(
            strategies.filter_crossover, filters[:, c:c + 1], mapping,
            inferior_norms=tensor(norms[[2, 3]]), dominant_norms=tensor(norms[[0, 1]]))
    assert not np.array_equal(whole, filters)
    np.testing.assert_allclose(parts, whole, rtol=1e-6)


@pytest.mark.parametrize(
    "small, large, mode, expected",
    [
        # paper: v = (s|s| + l|l|) / (|s| + |l|)
        (0.04, 3.1, "paper", 9.6116 / 3.14),  # 3.061019...
        (0.01, 4.5, "paper", 4.4900),
        (0.02, 2.8, "paper", 2.7803),
        # reference: v = 2sl / (s + l)
        (0.04, 3.1, "reference", 0.0790),
    ],
)
def test_element_crossover_paper_figure(small, large, mode, expected):
    # layout (S=2, C=1, O=2): D = [l, 1], J = [s, .5]
    filters = np.array([[[large, small]], [[1.0, 0.5]]], "float32")
    new = crossed(strategies.element_crossover, filters, {1: 0}, mode=mode)
    assert round(float(new[0, 0, 1]), 4) == round(expected, 4)
    np.testing.assert_array_equal(new[:, :, 0], filters[:, :, 0])  # dominant unchanged
    assert new[1, 0, 1] == 0.5
    if (small, large, mode) == (0.04, 3.1, "paper"):
        # SPEC quotes the figure as 3.0611; the formula gives 3.061019 (3.0610 to
        # 4 decimals), which is within one unit of the figure's last digit.
        assert abs(float(new[0, 0, 1]) - 3.0611) < 1e-4


@pytest.mark.parametrize(
    "mode, channel0, channel1",
    [
        # channel 0: l = -2, s = .25 (positions 1 and 3)
        #   paper a = .25/2.25 = 1/9: (.25 - 16)/9 = -1.75; reference 2sl/(s+l) = 4/7
        # channel 1: l = 4 (first of 4, -4), s = -.5 (positions 0 and 3; +.5 at 2 stays)
        #   paper a = 1/9: (-.5 + 32)/9 = 3.5; reference 2sl/(s+l) = -4/3.5 = -8/7
        ("paper", [0.5, -1.75, -1.0, -1.75], [3.5, 2.0, 0.5, 3.5]),
        ("reference", [0.5, 4 / 7, -1.0, 4 / 7], [-8 / 7, 2.0, 0.5, -8 / 7]),
    ],
)
def test_element_crossover_per_channel_signed_ties(mode, channel0, channel1):
    filters = np.zeros((4, 2, 2), "float32")
    filters[:, 0, 0] = [1.0, -2.0, 0.5, 0.0]
    filters[:, 1, 0] = [0.0, 4.0, -4.0, 1.0]
    filters[:, 0, 1] = [0.5, 0.25, -1.0, 0.25]
    filters[:, 1, 1] = [-0.5, 2.0, 0.5, -0.5]
    new = crossed(strategies.element_crossover, filters, {1: 0}, mode=mode)
    np.testing.assert_array_equal(new[..., 0], filters[..., 0])
    np.testing.assert_allclose(new[:, 0, 1], channel0, rtol=1e-6)
    np.testing.assert_allclose(new[:, 1, 1], channel1, rtol=1e-6)


@pytest.mark.parametrize("mode, value", [("paper", -2.75), ("reference", 6 / 11)])
def test_element_crossover_row_major_ties_in_kernel(mode, value):
    # Keras kernel (2, 2, 1, 2). D = [[1, -3], [3, 0]]: row-major first |3| is
    # -3 at (0, 1) (column-major would give +3). J = [[.5, .25], [-.25, 1]]:
    # row-major first |.25| is +.25 at (0, 1); -.25 at (1, 0) is not s.
    # paper a = .25/3.25 = 1/13: (.25 - 36)/13 = -2.75; reference 2sl/(s+l) = 6/11.
    kernel = np.zeros((2, 2, 1, 2), "float32")
    kernel[..., 0, 0] = [[1.0, -3.0], [3.0, 0.0]]
    kernel[..., 0, 1] = [[0.5, 0.25], [-0.25, 1.0]]
    layout = numpy(layouts.REGULAR_KERNEL.filters(tensor(kernel)))
    new = crossed(strategies.element_crossover, layout, {1: 0}, mode=mode).reshape(kernel.shape)
    np.testing.assert_allclose(new[..., 0, 1], [[0.5, value], [-0.25, 1.0]], rtol=1e-6)
    np.testing.assert_array_equal(new[..., 0], kernel[..., 0])


@pytest.mark.parametrize(
    "mode, want",
    [
        # 1 <- 0: s = 0, l = 0: denominator 0 both modes, unchanged
        # 3 <- 2: s = 0, l = -3: paper a = 0 -> v = l; reference v = 2*0*l/l = 0
        # 5 <- 4: s = .5, l = -.5: paper a = 1/2 -> 0; reference s + l = 0, unchanged
        ("paper", {1: [0.0, 0.5], 3: [-3.0, 1.0], 5: [0.0, 1.0]}),
        ("reference", {1: [0.0, 0.5], 3: [0.0, 1.0], 5: [0.5, 1.0]}),
    ],
)
def test_element_crossover_zero_denominators(mode, want):
    filters = np.zeros((2, 1, 6), "float32")
    filters[:, 0, 1] = [0.0, 0.5]
    filters[:, 0, 2] = [2.0, -3.0]
    filters[:, 0, 3] = [0.0, 1.0]
    filters[:, 0, 4] = [-0.5, 0.25]
    filters[:, 0, 5] = [0.5, 1.0]
    new = crossed(strategies.element_crossover, filters, {1: 0, 3: 2, 5: 4}, mode=mode)
    assert np.isfinite(new).all()
    for j, values in want.items():
        np.testing.assert_array_equal(new[:, 0, j], values)
    np.testing.assert_array_equal(new[:, :, ::2], filters[:, :, ::2])


@pytest.mark.parametrize("mode", MODES)
def test_crossovers_match_oracle_and_stay_finite(mode):
    # Values from {-2, -1, -.5, 0, .5, 1, 2}: ties, zeros and s + l == 0 everywhere;
    # plus one pair near the float32 limit whose reference result overflows.
    rng = np.random.default_rng(7)
    for trial in range(6):
        filters = rng.choice([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], size=(4, 3, 8))
        filters = filters.astype("float32")
        if trial == 0:
            filters[:, :, 0], filters[:, :, 1] = 3e38, -2.9e38
        mapping = dict(zip(*np.split(rng.permutation(8), 2)))
        mapping = {int(j): int(d) for j, d in mapping.items()}
        if trial == 0:
            mapping = {1: 0}
        for path in ("element", "filter"):
            if path == "element":
                new = crossed(strategies.element_crossover, filters, mapping, mode=mode)
            else:
                new = crossed(strategies.filter_crossover, filters, mapping)
            want = filters.astype(np.float64)
            for j, d in mapping.items():
                want[:, :, j] = oracle_crossover(path, filters[:, :, d], filters[:, :, j], mode)
            assert np.isfinite(new).all()
            if trial == 0 and path == "element" and mode == "reference":
                np.testing.assert_array_equal(new, filters)  # inf result: unchanged
            elif trial:
                np.testing.assert_allclose(new, want, rtol=1e-6, atol=1e-7)


# ================================================================ layouts


def test_filter_layout_depthwise():
    # kernel (2, 1, 2, 2) = arange: kernel[h, 0, c, m] = 4h + 2c + m
    kernel = np.arange(8, dtype="float32").reshape(2, 1, 2, 2)
    layout = numpy(layouts.DEPTHWISE_KERNEL.filters(tensor(kernel)))
    assert layout.shape == (2, 1, 4)
    # filter c*dm + m: 0 = (c0, m0), 1 = (c0, m1), 2 = (c1, m0), 3 = (c1, m1)
    np.testing.assert_array_equal(layout[:, 0, :], [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(layout[:, 0, 2], kernel[:, 0, 1, 0])


@pytest.mark.parametrize("shape", [(3, 3, 2, 6), (3, 2, 4), (1, 1, 1, 3, 4), (2, 3, 5, 2)])
def test_filter_layout_regular_and_grouped(shape):
    # A grouped Conv2D(6, 3, groups=2) on 4 channels holds (3, 3, 2, 6):
    # 6 filters of cin_per_group = 2 channels, like any regular kernel.
    kernel = np.arange(math.prod(shape), dtype="float32").reshape(shape)
    layout = numpy(layouts.REGULAR_KERNEL.filters(tensor(kernel)))
    spatial = math.prod(shape[:-2])
    assert layout.shape == (spatial, shape[-2], shape[-1])
    for o in range(shape[-1]):
        np.testing.assert_array_equal(layout[:, :, o], kernel[..., o].reshape(spatial, -1))


@pytest.mark.parametrize(
    "shape, paper, reference",
    [
        ((1, 1, 8, 4), True, True),  # 1x1
        ((1, 3, 8, 4), False, True),  # 1x3: the public code looks at kh only
        ((3, 1, 8, 4), False, False),
        ((3, 3, 8, 4), False, False),
        ((1, 8, 4), True, True),  # Conv1D kernel size 1
        ((3, 8, 4), False, False),
        ((1, 1, 1, 8, 4), True, True),  # Conv3D 1x1x1
        ((1, 3, 3, 8, 4), False, True),
        ((3, 1, 1, 8, 4), False, False),
    ],
)
def test_which_kernels_take_whole_filter_crossover(shape, paper, reference):
    for mode, expected in (("paper", paper), ("reference", reference)):
        rule = crossovers.get(mode).rule(layouts.REGULAR_KERNEL, shape)
        assert (rule is crossovers.WHOLE_FILTER) is expected
        assert rule.name == ("filter" if expected else f"element ({mode})")
    assert crossovers.get("paper").rule(layouts.GAMMA, (4,)) is crossovers.ENTRY


# ============================================ one step on bare variables


def bn_items():
    # A = [1, 1/16, 1/2, 1/32], B = [3/4, 5/8, 7/8, 1/2]
    return [tensor([1.0, 0.0625, 0.5, 0.03125]), tensor([0.75, 0.625, 0.875, 0.5])]


def run_entry_group(values, ratio, counter):
    """One step over BatchNorm gammas `values`, next to a conv kernel that
    a zero conv ratio leaves alone (a step needs one); eager, as it runs once."""
    kernel = keras.Variable(np.ones((1, 1, 1, 2), "float32"))
    gammas = [keras.Variable(numpy(v)) for v in values]
    targets = [Target(kernel, layouts.REGULAR_KERNEL)] + [Target(g, layouts.GAMMA) for g in gammas]
    options = EvolutionOptions(conv_ratio=0.0, gamma_ratio=ratio, schedule=constant_schedule)
    report, state = Evolver(targets, options, run_eagerly=True)(
        0, {"conv_counter": 0, "gamma_counter": counter, "beta_counter": 0})
    assert report.conv_evolved == 0 and state["conv_counter"] == 0
    skipped = [next(i for i, g in enumerate(gammas) if g.path == path) for path in report.skipped]
    return ([numpy(g) for g in gammas], state["gamma_counter"], report.gamma_evolved,
            report.changed_elements, skipped)


def test_entry_step_hand_numbers():
    # The NaN vector is skipped and left out of the pool, so N = 8 and
    # r = .25 -> position 2 of [1/32, 1/16, 1/2, 1/2, 5/8, 3/4, 7/8, 1] -> t = 1/2.
    # B first: g = 4 = n, skipped, counter untouched (5).
    # A: g = 2, L = #(<= .1) = 2 -> counter 0, k = min(2, 2) = 2.
    #    order [0, 2, 1, 3]: 1 <- 0 and 3 <- 2, both with a = 1/17:
    #    1/17 * 1/16 + 16/17 * 1 = 16.0625/17; 1/17 * 1/32 + 16/17 * 1/2 = 8.03125/17
    a, b = bn_items()
    bad = tensor([0.5, np.nan, 0.0, 2.0])
    with pytest.warns(RuntimeWarning, match="skipped variables holding NaN or inf"):
        new, counter, evolved, changed, skipped = run_entry_group([b, a, bad], 0.25, 5)
    np.testing.assert_array_equal(new[0], numpy(b))
    np.testing.assert_allclose(new[1], [1.0, 16.0625 / 17, 0.5, 8.03125 / 17], rtol=1e-6)
    np.testing.assert_array_equal(new[2], numpy(bad))
    assert (counter, evolved, changed, list(skipped)) == (0, 2, 2, [2])


def test_entry_step_zero_ratio_evolves_nothing():
    # r = 0: t = min score, every item is globally important: no change, counter untouched.
    a, b = bn_items()
    new, counter, evolved, changed, skipped = run_entry_group([a, b], 0.0, 2)
    for got, old in zip(new, (a, b)):
        np.testing.assert_array_equal(got, numpy(old))
    assert (counter, evolved, changed, list(skipped)) == (2, 0, 0, [])


# ================================================ end-to-end on real models


def case_conv1d():
    a = built(keras.layers.Conv1D(6, 3), (None, 8, 4))
    b = built(keras.layers.Conv1D(5, 1, use_bias=False), (None, 8, 6))
    return [a, b], [(a.kernel, "conv"), (b.kernel, "conv")], [a.bias]


def case_conv3d():
    a = built(keras.layers.Conv3D(6, (2, 2, 2), use_bias=False), (None, 4, 4, 4, 3))
    b = built(keras.layers.Conv3D(5, 1, use_bias=False), (None, 4, 4, 4, 6))
    return [a, b], [(a.kernel, "conv"), (b.kernel, "conv")], []


def case_depthwise1d():
    a = built(keras.layers.DepthwiseConv1D(3, depth_multiplier=2, use_bias=False), (None, 8, 3))
    b = built(keras.layers.DepthwiseConv1D(1, use_bias=False), (None, 8, 6))
    return [a, b], [(a.kernel, "depthwise"), (b.kernel, "depthwise")], []


def case_depthwise2d():
    a = built(keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (None, 6, 6, 3))
    b = built(keras.layers.DepthwiseConv2D((1, 3), use_bias=False), (None, 6, 6, 6))
    return [a, b], [(a.kernel, "depthwise"), (b.kernel, "depthwise")], [a.bias]


def case_grouped():
    a = built(keras.layers.Conv2D(6, 3, groups=2, use_bias=False), (None, 6, 6, 4))
    b = built(keras.layers.Conv2D(4, (3, 1), groups=2, use_bias=False), (None, 6, 6, 6))
    return [a, b], [(a.kernel, "conv"), (b.kernel, "conv")], []


def case_separable():
    a = built(keras.layers.SeparableConv2D(5, 3, depth_multiplier=2), (None, 6, 6, 3))
    b = built(keras.layers.SeparableConv1D(6, 3, use_bias=False), (None, 8, 5))
    targets = [(a.depthwise_kernel, "depthwise"), (a.pointwise_kernel, "conv"),
               (b.depthwise_kernel, "depthwise"), (b.pointwise_kernel, "conv")]
    return [a, b], targets, [a.bias]


def case_batchnorm():
    conv = built(keras.layers.Conv2D(6, (1, 3)), (None, 6, 6, 3))
    no_scale = built(keras.layers.BatchNormalization(scale=False), (None, 6, 6, 6))
    no_center = built(keras.layers.BatchNormalization(center=False), (None, 6, 6, 7))
    both = built(keras.layers.BatchNormalization(), (None, 6, 6, 5))
    dense = built(keras.layers.Dense(3), (None, 4))
    transposed = built(keras.layers.Conv2DTranspose(3, 3), (None, 6, 6, 2))
    targets = [(conv.kernel, "conv"), (no_scale.beta, "beta"), (no_center.gamma, "gamma"),
               (both.gamma, "gamma"), (both.beta, "beta")]
    untouched = [conv.bias, dense.kernel, transposed.kernel] + [
        v for bn in (no_scale, no_center, both) for v in (bn.moving_mean, bn.moving_variance)]
    return [conv, no_scale, no_center, both, dense, transposed], targets, untouched


def case_lora():
    # Keras freezes a LoRA layer's base kernel: it is not evolved (only
    # trainable variables are), and neither are the LoRA factors.
    a = built(keras.layers.Conv2D(6, 3), (None, 6, 6, 3))
    a.enable_lora(2)
    b = built(keras.layers.Conv2D(5, 1, use_bias=False), (None, 6, 6, 4))
    return [a, b], [(b.kernel, "conv")], [a._kernel, a.lora_kernel_a, a.lora_kernel_b]


def case_same_shapes():
    # Same-shaped layers, which an implementation may evolve in one batched
    # call: partners and counts must still stay within each layer.
    convs = [built(keras.layers.Conv2D(6, 3, use_bias=False), (None, 6, 6, 4)) for _ in range(3)]
    dws = [built(keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False),
                 (None, 6, 6, 3)) for _ in range(2)]
    bns = [built(keras.layers.BatchNormalization(), (None, 6, 6, 6)) for _ in range(2)]
    layers = [convs[0], bns[0], dws[0], convs[1], dws[1], bns[1], convs[2]]
    targets = [(convs[0].kernel, "conv"), (bns[0].gamma, "gamma"), (bns[0].beta, "beta"),
               (dws[0].kernel, "depthwise"), (convs[1].kernel, "conv"),
               (dws[1].kernel, "depthwise"), (bns[1].gamma, "gamma"), (bns[1].beta, "beta"),
               (convs[2].kernel, "conv")]
    return layers, targets, []


def case_mixed_channels():
    # 3x3 kernels of 3, 6, 1 (depthwise) and 8 input channels, which an
    # implementation may lay side by side: partners and counts must still
    # stay within each layer and channel.
    a = built(keras.layers.Conv2D(6, 3, use_bias=False), (None, 6, 6, 3))
    b = built(keras.layers.Conv2D(4, 3, use_bias=False), (None, 6, 6, 6))
    c = built(keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False), (None, 6, 6, 4))
    d = built(keras.layers.Conv2D(5, 3, use_bias=False), (None, 6, 6, 8))
    targets = [(a.kernel, "conv"), (b.kernel, "conv"), (c.kernel, "depthwise"), (d.kernel, "conv")]
    return [a, b, c, d], targets, []


CASES = {
    "conv1d": case_conv1d,
    "conv3d": case_conv3d,
    "depthwise1d": case_depthwise1d,
    "depthwise2d_multiplier2": case_depthwise2d,
    "grouped_conv2d": case_grouped,
    "separable": case_separable,
    "batchnorm_scale_center": case_batchnorm,
    "lora_conv2d": case_lora,
    "same_shapes": case_same_shapes,
    "mixed_channels": case_mixed_channels,
}
E2E_HP = {"conv_ratio": 1.0, "gamma_ratio": 1.0, "beta_ratio": 1.0}


@pytest.mark.parametrize("name", list(CASES))
def test_evolve_matches_oracle(name):
    layers, targets, untouched = CASES[name]()
    model = stack(layers)
    assert same_variables([t.variable for t in find_targets(model)], [v for v, _ in targets])
    rng = np.random.default_rng(1)
    for variable in untouched:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    frozen = [numpy(v).copy() for v in untouched]
    # Tensors 1 and 3 have no weak item, so they are usually starved and, with
    # K = 2 (limit 1), forced. Separable (K = 4) keeps weak items everywhere so
    # that both its kernels evolve (mixed_channels too); same_shapes starves one
    # BN vector of each kind.
    plain = {"separable": (), "mixed_channels": (), "same_shapes": (2, 6)}.get(name, (1, 3))
    initial = random_values(targets, seed=sum(map(ord, name)), plain=plain)
    ever_changed = np.zeros(len(targets), bool)
    for mode in MODES:
        for (variable, _), value in zip(targets, initial):
            variable.assign(value)
        state = None
        # r(0) = .5; r(61) = .4 * sigmoid(1/15); r(130) = .2 * sigmoid(10/15)
        for epoch in (0, 61, 130):
            _, state, changed = check_step(model, targets, epoch, state, mode, E2E_HP)
            ever_changed |= changed
    assert ever_changed.all(), [v.path for (v, _), c in zip(targets, ever_changed) if not c]
    for variable, value in zip(untouched, frozen):
        np.testing.assert_array_equal(numpy(variable), value, err_msg=variable.path)


def test_nested_model_traversal_order():
    inner_conv = keras.layers.Conv2D(6, 1, use_bias=False)
    inner_bn = keras.layers.BatchNormalization()
    inner_dw = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)
    inner = keras.Sequential([inner_conv, inner_bn, inner_dw])
    first = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)
    last = keras.layers.Conv2D(5, 3, padding="same", use_bias=False)
    last_bn = keras.layers.BatchNormalization()
    inputs = keras.Input((6, 6, 3))
    model = keras.Model(inputs, last_bn(last(inner(first(inputs)))))
    targets = [(first.kernel, "conv"), (inner_conv.kernel, "conv"), (inner_bn.gamma, "gamma"),
               (inner_bn.beta, "beta"), (inner_dw.kernel, "depthwise"), (last.kernel, "conv"),
               (last_bn.gamma, "gamma"), (last_bn.beta, "beta")]
    assert same_variables([t.variable for t in find_targets(model)], [v for v, _ in targets])
    for (variable, _), value in zip(targets, random_values(targets, seed=3)):
        variable.assign(value)
    _, _, changed = check_step(model, targets, 0, None, "paper", E2E_HP)
    assert sum(changed) >= 4


# ----------------------------------------------------- starvation counters


def uniform_kernel(scale):
    """(3, 3, 2, 4): filter o is roll(1..18, o)/64 * scale, so all filters have
    L1 171/64 * scale exactly (score 171/128 * scale) but distinct elements."""
    base = np.arange(1, 19, dtype="float32") / 64
    kernel = np.stack([np.roll(base, o).reshape(3, 3, 2) for o in range(4)], axis=-1)
    return kernel * scale


@pytest.mark.parametrize(
    "mode, channel0, channel1",
    [
        # Forced pair: J = filter 3, D = filter 0 (uniform scores rank in index order).
        # J channel 0 = [16, 18, 2, 4, ...]/64 -> s = 2/64 at flat 4 = (0, 2, 0),
        #   D channel 0 = odd 1..17 -> l = 17/64;
        # J channel 1 = [17, 1, 3, ...]/64 -> s = 1/64 at flat 3 = (0, 1, 1), l = 18/64.
        # paper (s^2 + l^2)/(s + l): 293/19/64 and 325/19/64
        # reference 2sl/(s + l): 68/19/64 and 36/19/64
        ("paper", 293 / 19 / 64, 325 / 19 / 64),
        ("reference", 68 / 19 / 64, 36 / 19 / 64),
    ],
)
def test_starvation_across_layers_and_epochs(mode, channel0, channel1):
    # Five conv kernels with uniform scores S, 2S, 3S, 4S, 5S (4 filters each):
    # r = .5, N = 20, t = sorted[10] = 3S. Kernels 0 and 1 are evolvable (g = 0)
    # but starved (L = 0); kernels 2-4 have g = n and leave the counter alone.
    # K = 5, divisor 2: limit 2.5, so the third starved layer in a row is forced.
    #   epoch 0: 1, 2            -> conv_counter 2 (2 < 2.5: not forced)
    #   epoch 1: 3 forced at kernel 0 (counter 0), then 1   -> 1
    #   epoch 2: 2, 3 forced at kernel 1                     -> 0
    #   epoch 3: 1, 2                                        -> 2
    # Gamma: BN0 = [1, 3/4, 1/2, 1/4] (L = 0), BN1 = [2]*4; N = 8, t = sorted[4] = 2:
    # BN0 starved (1, 2, then 3 >= 2.5 forced at epoch 2: entry 3 <- entry 0,
    # a = .25/1.25: .2*.25 + .8*1 = .85), then 1. The limit is K/2 = 2.5 for gamma too.
    # Beta: all .5, so t = .5 and g = n everywhere: the counter stays at its 1.
    convs = [built(keras.layers.Conv2D(4, 3, use_bias=False), (None, 6, 6, 2)) for _ in range(5)]
    bns = [built(keras.layers.BatchNormalization(), (None, 6, 6, 4)) for _ in range(2)]
    model = stack([convs[0], bns[0], convs[1], convs[2], bns[1], convs[3], convs[4]])
    for i, conv in enumerate(convs):
        conv.kernel.assign(uniform_kernel(i + 1))
    bns[0].gamma.assign(np.array([1.0, 0.75, 0.5, 0.25], "float32"))
    bns[1].gamma.assign(np.full(4, 2.0, "float32"))
    for bn in bns:
        bn.beta.assign(np.full(4, 0.5, "float32"))
    targets = [(convs[0].kernel, "conv"), (bns[0].gamma, "gamma"), (bns[0].beta, "beta"),
               (convs[1].kernel, "conv"), (convs[2].kernel, "conv"), (bns[1].gamma, "gamma"),
               (bns[1].beta, "beta"), (convs[3].kernel, "conv"), (convs[4].kernel, "conv")]
    hp = {"conv_ratio": 0.5, "gamma_ratio": 0.5, "beta_ratio": 0.5, "schedule": constant_schedule}
    state = {"conv_counter": 0, "gamma_counter": 0, "beta_counter": 1}
    expected = [  # (conv, gamma, beta counters), conv evolved, gamma evolved, changed
        ((2, 1, 1), 0, 0, 0),
        ((1, 2, 1), 1, 0, 2),
        ((0, 0, 1), 1, 1, 3),
        ((2, 1, 1), 0, 0, 0),
    ]
    for epoch, (counters, conv_evolved, gamma_evolved, changed) in enumerate(expected):
        before = [numpy(c.kernel).copy() for c in convs]
        report, state, _ = check_step(model, targets, epoch, state, mode, hp)
        assert state == dict(zip(("conv_counter", "gamma_counter", "beta_counter"), counters))
        assert (report.conv_evolved, report.gamma_evolved, report.beta_evolved) == (
            conv_evolved, gamma_evolved, 0)
        assert report.changed_elements == changed
        forced = {1: 0, 2: 1}.get(epoch)
        for i, conv in enumerate(convs):
            after = numpy(conv.kernel)
            if i != forced:
                np.testing.assert_array_equal(after, before[i], err_msg=f"epoch {epoch} {i}")
                continue
            want = before[i].copy()
            want[0, 2, 0, 3] = channel0 * (i + 1)
            want[0, 1, 1, 3] = channel1 * (i + 1)
            np.testing.assert_allclose(after, want, rtol=1e-6)
    np.testing.assert_allclose(numpy(bns[0].gamma), [1.0, 0.75, 0.5, 0.85], rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_a_weak_layer_resets_the_counter_and_a_tie_at_the_local_threshold_is_weak(mode):
    # Five 1x1 kernels (filter path), 4 filters of 2 input channels each;
    # score = L1 / 2. Kernels 0, 1, 3, 4: filters [1, 3], [3, 1], [2, 2],
    # [.5, 3.5], all score 2. Kernel 2: [6, 10], [10, 6], [1, 3], [3, 1],
    # scores 8, 8, 2, 2. r = .9, N = 20: t = sorted[18] = 8.
    # Local threshold .25 * max: 0.5 in the uniform kernels (L = 0: starved),
    # exactly 2 in kernel 2, so its two filters of score 2 are weak (`<=`).
    # K = 5, divisor 2: limit 2.5. Epoch 0, counters 1, 2, then 0 (kernel 2
    # is weak: L = 2 resets it), 1, 2: nothing forced; kernel 2 evolves
    # filter 2 <- 0 and 3 <- 1 with a = 4 / (4 + 16) = .2:
    # [.2 + 4.8, .6 + 8] = [5, 8.6] and [8.6, 5].
    # A counter that a weak layer does not reset would reach 3 at kernel 3
    # and force it; `<` instead of `<=` would starve kernel 2 (counter 3)
    # and force one filter there instead of two.
    # Epoch 1 (counter 2): kernel 0 is forced (3 >= 2.5; filter 3 <- 0),
    # kernel 1 -> 1; kernel 2 (scores 8, 8, 6.8, 6.8: no weak filter) -> 2;
    # kernel 3 forced; kernel 4 -> 1.
    convs = [built(keras.layers.Conv2D(4, 1, use_bias=False), (None, 3, 3, 2)) for _ in range(5)]
    uniform = np.array([[1, 3], [3, 1], [2, 2], [0.5, 3.5]], "float32").T.reshape(1, 1, 2, 4)
    tied = np.array([[6, 10], [10, 6], [1, 3], [3, 1]], "float32").T.reshape(1, 1, 2, 4)
    for i, conv in enumerate(convs):
        conv.kernel.assign(tied if i == 2 else uniform)
    model = stack(convs)
    targets = [(conv.kernel, "conv") for conv in convs]
    hp = {"conv_ratio": 0.9, "local_ratio": 0.25, "schedule": constant_schedule}

    report, state, changed = check_step(model, targets, 0, None, mode, hp)
    assert state == {"conv_counter": 2, "gamma_counter": 0, "beta_counter": 0}
    assert report.conv_evolved == 2 and changed == [False, False, True, False, False]
    np.testing.assert_allclose(numpy(convs[2].kernel)[0, 0].T, [[6, 10], [10, 6], [5, 8.6], [8.6, 5]],
                               rtol=1e-6)

    report, state, changed = check_step(model, targets, 1, state, mode, hp)
    assert state["conv_counter"] == 1
    assert report.conv_evolved == 2 and changed == [True, False, False, True, False]


@pytest.mark.parametrize(
    "kernels, divisor, limit", [(57, 2, 29), (57, 3, 19), (6, 4, 2), (5, 2, 3)]
)
def test_starvation_limit_is_ceiling(kernels, divisor, limit):
    # counter >= K / divisor with an integer counter: 28.5 -> 29, 19 -> 19, 1.5 -> 2, 2.5 -> 3
    layers = [
        built(keras.layers.Conv1D(1, 1, use_bias=False), (None, 2, 1)) for _ in range(kernels)
    ]
    evolver = evolver_for(stack(layers), EvolutionOptions(force_divisor=divisor))
    assert evolver.kernel_count == kernels
    assert evolver.starvation_limit == limit


# ================================================================= guards


@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_tensors_are_skipped_and_reported(mode):
    # The NaN kernel has the shape of a finite one, and the inf gamma the size
    # of another gamma: an implementation that evolves same-shaped layers in
    # one batched call must keep the NaN/inf out of its neighbours' selection
    # and crossover.
    # Regression: a NaN kernel sharing a bucket with evolving ones once
    # sent an out-of-range index to TensorFlow's gather.
    convs = [built(keras.layers.Conv2D(6, 3, use_bias=False), (None, 6, 6, 2)) for _ in range(2)]
    pointwise = built(keras.layers.Conv2D(5, 1, use_bias=False), (None, 6, 6, 3))
    bns = [built(keras.layers.BatchNormalization(), (None, 6, 6, 6)) for _ in range(2)]
    model = stack([convs[0], convs[1], bns[0], pointwise, bns[1]])
    targets = [(convs[0].kernel, "conv"), (convs[1].kernel, "conv"), (bns[0].gamma, "gamma"),
               (bns[0].beta, "beta"), (pointwise.kernel, "conv"), (bns[1].gamma, "gamma"),
               (bns[1].beta, "beta")]
    values = random_values(targets, seed=11)
    values[1][1, 2, 0, 3] = np.nan
    values[2][4] = np.inf
    for (variable, _), value in zip(targets, values):
        variable.assign(value)
    hp = {"conv_ratio": 1.0, "gamma_ratio": 1.0, "beta_ratio": 1.0, "local_ratio": 0.3,
          "force_divisor": 1.5}
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        report, _, changed = check_step(model, targets, 0, None, mode, hp)
    assert sorted(report.skipped) == sorted([convs[1].kernel.path, bns[0].gamma.path])
    assert changed == [True, False, False, True, True, True, True]
    np.testing.assert_array_equal(numpy(convs[1].kernel), values[1])  # NaN kept, not spread
    np.testing.assert_array_equal(numpy(bns[0].gamma), values[2])
    for i in (0, 3, 4, 5, 6):
        assert np.isfinite(numpy(targets[i][0])).all()


@pytest.mark.parametrize(
    "mode, channel0, channel1",
    [
        # D channels: -30000 and 60000 everywhere; J: 29984 and 1 everywhere.
        # L1(D) = 810000 overflows float16 (max 65504): scores must not be float16.
        # paper: c0 (29984^2 - 30000^2)/59984 = -16; c1 (1 + 60000^2)/60001 = 59999 -> 60000
        # reference: c0 2sl/(s+l) = 2*29984*(-30000)/(-16) = 1.1e8: inf in float16, kept;
        #            c1 2*60000/60001 = 1.99997 -> 2
        ("paper", -16.0, 60000.0),
        ("reference", 29984.0, 2.0),
    ],
)
def test_float16_kernels(mode, channel0, channel1):
    # One kernel (K = 1, limit .5): r(0) = .5 -> t = score of D, J is evolvable
    # (g = 1) but not weak (134932 > .1 * 405000), so it is forced: J <- D.
    conv = built(keras.layers.Conv2D(2, 3, use_bias=False, dtype="float16"), (None, 6, 6, 2))
    kernel = np.zeros((3, 3, 2, 2), "float16")
    kernel[..., 0, 0], kernel[..., 1, 0] = -30000, 60000
    kernel[..., 0, 1], kernel[..., 1, 1] = 29984, 1
    conv.kernel.assign(kernel)
    targets = [(conv.kernel, "conv")]
    model = stack([conv])
    report, state, _ = check_step(
        model, targets, 0, None, mode, {"conv_ratio": 1.0}, rtol=1e-3, atol=0)
    new = numpy(conv.kernel)
    assert new.dtype == np.float16 and np.isfinite(new).all()
    np.testing.assert_array_equal(new[..., 0], kernel[..., 0])
    np.testing.assert_array_equal(new[..., 0, 1], np.full((3, 3), channel0, "float16"))
    np.testing.assert_array_equal(new[..., 1, 1], np.full((3, 3), channel1, "float16"))
    assert report.conv_evolved == 1 and state["conv_counter"] == 0


# Regression: `evolve` on a bare conv layer once ignored the layer itself.
def test_evolve_on_a_bare_conv_layer():
    conv = built(keras.layers.Conv2D(6, 3, use_bias=False), (None, 6, 6, 3))
    targets = [(conv.kernel, "conv")]
    conv.kernel.assign(random_values(targets, seed=5)[0])
    assert same_variables([t.variable for t in find_targets(conv)], [conv.kernel])
    _, _, changed = check_step(conv, targets, 0, None, "paper", E2E_HP)
    assert changed == [True]


@pytest.mark.parametrize("compiled", [False, True])
def test_blend_is_invalid_exactly_where_the_denominator_is_zero_or_the_result_not_finite(compiled):
    """Every combination of zeros, signs, infinities and NaN, eagerly and
    compiled (XLA on TensorFlow and JAX): a zero denominator or a
    non-finite blend is invalid, any other blend valid and equal to
    `a * x + (1 - a) * y` computed in NumPy."""
    values = np.array([0.0, -0.0, 1.0, -1.0, 2.5, -3e38, 3e38, np.inf, -np.inf, np.nan], "float32")
    x, y, wx, wy = (a.ravel() for a in np.meshgrid(values, values, values, values, indexing="ij"))
    blend = strategies.blend
    if compiled and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        blend = tf.function(blend, jit_compile=True)
    elif compiled and keras.backend.backend() == "jax":
        import jax

        blend = jax.jit(blend)
    elif compiled:
        pytest.skip("PyTorch runs the step eagerly")
    mixed, valid = (numpy(v) for v in blend(*(tensor(v) for v in (x, y, wx, wy))))
    with np.errstate(all="ignore"):
        total = wx + wy
        a = wx / total
        want_mixed = a * x + (1 - a) * y
    want_valid = (total != 0) & np.isfinite(want_mixed)
    # Never valid without a denominator, never valid and not finite.
    assert not valid[total == 0].any()
    assert np.isfinite(mixed[valid]).all()
    # Valid wherever NumPy's blend is; elsewhere only where NumPy overflows
    # in a product that a compiled fused multiply-add keeps in range.
    assert valid[want_valid].all()
    overflow = np.isfinite(np.stack([x, y, wx, wy])).all(0) & ~np.isfinite(want_mixed)
    assert (want_valid | overflow)[valid].all()
    # Values where `a` is not subnormal (XLA and TensorFlow flush those to
    # 0), to float32 rounding of the operands (a compiled multiply-add
    # rounds once where NumPy rounds twice).
    normal = want_valid & ((a == 0) | (np.abs(a) >= np.finfo("float32").tiny))
    scale = np.maximum(np.abs(x), np.abs(y))[normal]
    assert (np.abs(mixed[normal] - want_mixed[normal]) <= 3e-7 * scale).all()
    assert want_valid.sum() > 1000 and (~want_valid).sum() > 1000
