"""Run-level statistics of a method against the baseline over paired training runs (pure functions on numbers).

A fold is one draw of labelled subjects (a budget and a split seed); a repeat is one training seed, used for the
method and the baseline alike. d_{f,r} is the difference (method − baseline) of the paired runs of fold f and repeat
r, D_f the mean of fold f's d_{f,r} over its repeats. The unit of the tests and intervals is the fold (D_f), or every
(fold, repeat) pair where the folds hold the same subjects (budget "all"): repeats within a fold make its mean less
noisy but are not independent draws of labelled subjects.
"""

import itertools
import math
from typing import Dict, Sequence, Tuple

import numpy as np

from nnunet_ssp.errors import SSPError

NAN = float("nan")
ALPHA = 0.05
POWER = 0.8
#: the exact sign-flip test enumerates 2^S sums in two halves of 2^(S/2) each
MAX_SIGN_FLIP_UNITS = 40
#: the most units units_needed looks at
MAX_UNITS = 1000


def _finite(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    return v[np.isfinite(v)]


def unit_values(folds: Sequence[Sequence[float]], pooled: bool = False) -> np.ndarray:
    """The units of a design: each fold's mean over its repeats (D_f), or every value when ``pooled``; NaNs and
    folds without a finite value are left out."""
    folds = [_finite(f) for f in folds]
    if pooled:
        return np.concatenate(folds) if folds else np.zeros(0)
    return np.array([f.mean() for f in folds if f.size])


def _signed_sums(values: np.ndarray) -> np.ndarray:
    """Σ s·v for every sign vector s in {±1}^n (2^n sums)."""
    sums = np.zeros(1)
    for v in values:
        sums = np.concatenate((sums + v, sums - v))
    return sums


def sign_flip_p(units: Sequence[float]) -> float:
    """Exact two-sided sign-flip (permutation) test of a zero mean over S paired units D:
    p = #{s in {±1}^S : |mean(s·D)| ≥ |mean(D)|} / 2^S, with a relative tolerance of 1e-9 of Σ|D| so that sign
    vectors giving the same magnitude count despite rounding. Enumerated exactly (sums of the two halves of D
    combined by sorting); NaN without units."""
    d = _finite(units)
    if not d.size:
        return NAN
    if d.size > MAX_SIGN_FLIP_UNITS:
        raise SSPError(f"the exact sign-flip test takes at most {MAX_SIGN_FLIP_UNITS} units, not {d.size}")
    threshold = abs(d.sum()) - 1e-9 * np.abs(d).sum()
    if threshold <= 0:
        return 1.0
    left, right = _signed_sums(d[: d.size // 2]), np.sort(_signed_sums(d[d.size // 2 :]))
    # |l + r| ≥ threshold  <=>  r ≥ threshold − l  or  r ≤ −threshold − l (disjoint as threshold > 0)
    hits = (right.size - np.searchsorted(right, threshold - left, side="left")).sum() + np.searchsorted(
        right, -threshold - left, side="right"
    ).sum()
    return float(hits) / 2.0**d.size


def wilcoxon_p(units: Sequence[float]) -> float:
    """Two-sided exact Wilcoxon signed-rank test over the units, ``scipy.stats.wilcoxon(units, method="exact")``
    (zero differences dropped, scipy's default); NaN when scipy cannot compute it."""
    from scipy.stats import wilcoxon

    d = _finite(units)
    if not d.size:
        return NAN
    try:
        return float(wilcoxon(d, method="exact").pvalue)
    except ValueError:
        return NAN


def smallest_p(n_units: int) -> float:
    """The smallest two-sided p an exact sign-flip test over ``n_units`` can reach: 2 / 2^S (capped at 1; NaN for
    none). 0.25 with 3 units, 0.0625 with 5, 0.03125 with 6."""
    return min(1.0, 2.0 ** (1 - n_units)) if n_units else NAN


def fewest_units(comparisons: int = 1, alpha: float = ALPHA) -> int:
    """The fewest units whose exact sign-flip test can reach p < ``alpha`` after Holm's correction over
    ``comparisons``: the smallest S with comparisons · 2 / 2^S < alpha (6 for one comparison at 0.05, 8 for four,
    10 for sixteen)."""
    return next(n for n in itertools.count(1) if comparisons * smallest_p(n) < alpha)


def t_interval(values: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
    """(mean, low, high): Student t interval of the mean, mean ± t_{(1+level)/2, S−1}·sd/√S with sd of ddof=1;
    NaN bounds below two values, all NaN without values."""
    from scipy.stats import t

    v = _finite(values)
    if not v.size:
        return NAN, NAN, NAN
    mean = float(v.mean())
    if v.size < 2:
        return mean, NAN, NAN
    half = float(t.ppf((1 + level) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


def probability_of_improvement(differences: Sequence[float]) -> float:
    """Share of paired runs where the method is ahead, P(d > 0) + ½·P(d = 0) over the d_{f,r}; NaN without any."""
    d = _finite(differences)
    return float(np.mean((d > 0) + 0.5 * (d == 0))) if d.size else NAN


def variance_components(folds: Sequence[Sequence[float]]) -> Tuple[float, float]:
    """(within, between) of the one-way random-effects model d_{f,r} = μ + b_f + e_{f,r} by the method of moments:
    within = Σ_f Σ_r (d_{f,r} − D_f)² / Σ_f (R_f − 1), the pooled variance of a run around its fold's mean (NaN
    when no fold has two repeats); between = max(0, var(D_f) − within·mean_f(1/R_f)) with var of ddof=1, as
    E[var(D_f)] = between + within·mean(1/R_f) (within/R for R repeats everywhere); NaN below two folds or
    without a within."""
    folds = [f for f in (_finite(f) for f in folds) if f.size]
    dof = sum(f.size - 1 for f in folds)
    within = float(sum(((f - f.mean()) ** 2).sum() for f in folds) / dof) if dof else NAN
    if len(folds) < 2 or not math.isfinite(within):
        return within, NAN
    means = np.array([f.mean() for f in folds])
    return within, max(0.0, float(means.var(ddof=1)) - within * float(np.mean([1 / f.size for f in folds])))


def unit_sd(within: float, between: float, repeats: int) -> float:
    """The sd of a fold mean over ``repeats`` runs under the random-effects model: sqrt(between + within/R)."""
    return math.sqrt(between + within / repeats)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment of m p-values: the j-th smallest becomes max_{i≤j} min(1, (m − i + 1)·p_(i))
    (monotone, capped at 1); NaNs stay NaN and do not count in m."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, NAN)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    adjusted[order] = np.maximum.accumulate(np.minimum(1.0, (order.size - np.arange(order.size)) * p[order]))
    return adjusted


def detectable_difference(sd: float, n_units: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference that S units detect with probability ``power`` at two-sided level
    ``alpha``: the paired t approximation δ = (t_{1−α/2,S−1} + t_{power,S−1})·sd/√S (central t quantiles in
    place of the noncentral t; the sign-flip test has about the t test's power for roughly normal unit means).
    Infinite where the sign-flip test cannot reach ``alpha`` (2 / 2^S ≥ α: S ≤ 5 at 0.05); NaN below two units or
    without an sd."""
    from scipy.stats import t

    if n_units < 2 or not math.isfinite(sd):
        return NAN
    if smallest_p(n_units) >= alpha:
        return math.inf
    return float((t.ppf(1 - alpha / 2, n_units - 1) + t.ppf(power, n_units - 1)) * sd / math.sqrt(n_units))


def units_needed(claim: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The fewest units S whose :func:`detectable_difference` is at most ``claim`` (hence 2 / 2^S < α too); NaN
    without an sd or beyond MAX_UNITS."""
    if not math.isfinite(sd):
        return NAN
    return next((n for n in range(2, MAX_UNITS + 1) if detectable_difference(sd, n, alpha, power) <= claim), NAN)


def paired_design(folds: Sequence[Sequence[float]], pooled: bool = False) -> Dict[str, float]:
    """The run-level comparison from the d_{f,r} (``folds[f]``: fold f's differences, one per repeat), units as
    :func:`unit_values` makes them: the mean difference and its 95% t interval over the units, the sign-flip
    (primary) and Wilcoxon p over the units, the design's smallest p, the probability of improvement over the
    d_{f,r}, the variance components, the sd of a unit and the difference detectable at 80% power."""
    units = unit_values(folds, pooled)
    mean, low, high = t_interval(units)
    within, between = variance_components(folds)
    sd = float(units.std(ddof=1)) if units.size > 1 else NAN
    return {
        "n_units": units.size,
        "mean_diff": mean,
        "ci_low": low,
        "ci_high": high,
        "p_signflip": sign_flip_p(units),
        "p_wilcoxon": wilcoxon_p(units),
        "min_p": smallest_p(units.size),
        "prob_improvement": probability_of_improvement(list(itertools.chain.from_iterable(folds))),
        "var_within": within,
        "var_between": between,
        "sd_unit": sd,
        "mde_80": detectable_difference(sd, units.size),
    }
