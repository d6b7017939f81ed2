#!/usr/bin/env python3
"""Writes the reference fixtures for `vexil_core::stats` (crates/vexil-core/tests/fixtures/stats/*.json).

Run (Python 3.11; the exact versions are pinned in requirements.txt beside this file: gbstats 0.8.0,
numpy 1.26.4, pandas 1.5.3, scipy 1.17.1, statsmodels 0.15.0):

    python3 -m venv /tmp/statsenv
    /tmp/statsenv/bin/pip install -r tools/stats-fixtures/requirements.txt
    /tmp/statsenv/bin/python tools/stats-fixtures/make_fixtures.py

then `cargo test -p vexil-core --test stats`. The output is deterministic (fixed seeds), and every
file records the package versions that produced it.

Every expected value comes from the reference packages themselves:
- gbstats (GrowthBook's stats engine): per-arm statistics and CUPED (`models.statistics`),
  `frequentist.tests.TwoSidedTTest`, `frequentist.tests.SequentialTwoSidedTTest`,
  `bayesian.tests.EffectBayesianABTest`, `utils.check_srm`;
- scipy: exact two-sided Welch p-values (`stats.t.sf`), `stats.ttest_ind_from_stats`,
  `stats.chisquare`, `stats.norm` (for GrowthBook's adjusted-CI formula, which lives in GrowthBook's
  TypeScript app, not in gbstats);
- statsmodels: `stats.proportion.proportions_ztest`, `stats.proportion.confint_proportions_2indep`
  (method="wald") and `stats.multitest.multipletests` ("holm", "fdr_bh"): gbstats 0.8.0 has no
  multiple-comparison correction.

Inputs are generated so that every sum is exactly representable with a short decimal (per-unit
values are multiples of 1/4), so JSON round-trips them bit for bit.
"""

import importlib.metadata
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import confint_proportions_2indep, proportions_ztest

from gbstats.bayesian.tests import EffectBayesianABTest, EffectBayesianConfig, GaussianPrior
from gbstats.frequentist.tests import (
    FrequentistConfig,
    SequentialConfig,
    SequentialTwoSidedTTest,
    TwoSidedTTest,
)
from gbstats.models.statistics import (
    ProportionStatistic,
    RegressionAdjustedStatistic,
    SampleMeanStatistic,
    compute_theta,
)
from gbstats.utils import check_srm

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/vexil-core/tests/fixtures/stats"


def versions():
    pkgs = ["gbstats", "numpy", "pandas", "scipy", "statsmodels"]
    return {
        "python": platform.python_version(),
        **{p: importlib.metadata.version(p) for p in pkgs},
    }


def header(description):
    return {
        "generated_by": "tools/stats-fixtures/make_fixtures.py",
        "description": description,
        "versions": versions(),
    }


# --------------------------------------------------------------------------------------------
# Inputs, in the serde shape of `vexil_core::stats::Sample`.
# --------------------------------------------------------------------------------------------


def q(values):
    """Rounds to multiples of 1/4 so that sums and sums of squares are exact dyadic numbers."""
    return np.round(np.asarray(values, dtype=float) * 4.0) / 4.0


def proportion(units, conversions):
    return {"units": int(units), "metric": {"kind": "proportion", "conversions": int(conversions)}}


def mean_metric(values):
    v = q(values)
    return {
        "kind": "mean",
        "sum": float(v.sum()),
        "sum_squares": float((v * v).sum()),
    }


def mean_sample(values):
    return {"units": int(len(values)), "metric": mean_metric(values)}


def with_covariate(post_sample, post_values, pre_values, pre_kind):
    post = q(post_values)
    pre = q(pre_values) if pre_kind == "mean" else np.asarray(pre_values, dtype=float)
    if pre_kind == "proportion":
        pre_metric = {"kind": "proportion", "conversions": int(pre.sum())}
    else:
        pre_metric = {"kind": "mean", "sum": float(pre.sum()), "sum_squares": float((pre * pre).sum())}
    s = dict(post_sample)
    s["covariate"] = {"pre": pre_metric, "sum_products": float((post * pre).sum())}
    return s


def binary_sample(values):
    v = np.asarray(values, dtype=int)
    return proportion(len(v), int(v.sum()))


# --------------------------------------------------------------------------------------------
# gbstats statistic objects from those inputs (fresh objects each time: gbstats mutates theta).
# --------------------------------------------------------------------------------------------


def gb_base(units, metric):
    if metric["kind"] == "proportion":
        return ProportionStatistic(n=units, sum=metric["conversions"])
    return SampleMeanStatistic(n=units, sum=metric["sum"], sum_squares=metric["sum_squares"])


def gb_stat(sample):
    post = gb_base(sample["units"], sample["metric"])
    cov = sample.get("covariate")
    if cov is None:
        return post
    return RegressionAdjustedStatistic(
        n=sample["units"],
        post_statistic=post,
        pre_statistic=gb_base(sample["units"], cov["pre"]),
        post_pre_sum_of_products=cov["sum_products"],
        theta=0,
    )


def finite(x):
    x = float(x)
    assert math.isfinite(x), x
    return x


def freq_result(test):
    try:
        res = test.compute_result()
    except ZeroDivisionError as e:  # pragma: no cover - recorded, not hidden
        return {"error": f"EXCEPTION: {e}"}
    if res.error_message:
        return {"error": res.error_message}
    out = {
        "estimate": finite(res.expected),
        "std_error": finite(res.uplift.stddev),
        "ci": [finite(res.ci[0]), finite(res.ci[1])],
        "p_value": finite(res.p_value),
    }
    if isinstance(test, TwoSidedTTest) and not isinstance(test, SequentialTwoSidedTTest):
        out["dof"] = finite(test.dof)
        # gbstats computes 2 * (1 - cdf), which loses all relative precision below ~1e-16; this is
        # the same quantity from scipy's survival function, to check small p-values tightly.
        t_stat = test.point_estimate / math.sqrt(test.variance)
        out["p_value_exact"] = finite(2.0 * sps.t.sf(abs(t_stat), test.dof))
    return out


def bayes_result(test):
    try:
        res = test.compute_result()
    except ZeroDivisionError as e:
        return {"error": f"EXCEPTION: {e}"}
    if res.error_message:
        return {"error": res.error_message}
    return {
        "estimate": finite(res.expected),
        "std_error": finite(res.uplift.stddev),
        "ci": [finite(res.ci[0]), finite(res.ci[1])],
        "chance_to_win": finite(res.chance_to_win),
        "risk": [finite(res.risk[0]), finite(res.risk[1])],
        "risk_type": res.risk_type,
    }


def arm_summary(stat):
    if isinstance(stat, RegressionAdjustedStatistic):
        return {
            "mean": finite(stat.unadjusted_mean),
            "variance": finite(stat.post_statistic.variance),
            "adjusted_mean": finite(stat.mean),
            "adjusted_variance": finite(stat.variance),
        }
    return {
        "mean": finite(stat.unadjusted_mean),
        "variance": finite(stat.variance),
        "adjusted_mean": None,
        "adjusted_variance": None,
    }


PRIORS = [
    ({"kind": "flat"}, False),
    # GrowthBook's default proper prior: N(0, 0.1^2) on the relative lift.
    ({"kind": "normal", "mean": 0.0, "std_dev": 0.1, "scale": "relative"}, False),
    ({"kind": "normal", "mean": 0.02, "std_dev": 0.05, "scale": "relative"}, True),
    ({"kind": "normal", "mean": 0.5, "std_dev": 2.0, "scale": "absolute"}, False),
]


def gb_prior(prior):
    if prior["kind"] == "flat":
        return GaussianPrior(), "relative"
    return (
        GaussianPrior(mean=prior["mean"], variance=prior["std_dev"] ** 2, proper=True),
        prior["scale"],
    )


def analyse(case):
    c, t = case["control"], case["treatment"]
    alpha, tuning = case["alpha"], case["tuning"]
    exp = {}

    # Per-arm statistics and theta, as gbstats' tests see them.
    probe = TwoSidedTTest(gb_stat(c), gb_stat(t), FrequentistConfig(alpha=alpha))
    exp["arms"] = {"control": arm_summary(probe.stat_a), "treatment": arm_summary(probe.stat_b)}
    if "covariate" in c:
        exp["theta"] = finite(compute_theta(gb_stat(c), gb_stat(t)))
    else:
        exp["theta"] = None

    for key, cls, cfg in [
        ("fixed_horizon", TwoSidedTTest, lambda d: FrequentistConfig(alpha=alpha, difference_type=d)),
        (
            "sequential",
            SequentialTwoSidedTTest,
            lambda d: SequentialConfig(alpha=alpha, difference_type=d, sequential_tuning_parameter=tuning),
        ),
    ]:
        exp[key] = {d: freq_result(cls(gb_stat(c), gb_stat(t), cfg(d))) for d in ("relative", "absolute")}

    # Independent check of the absolute Welch test on plain mean metrics.
    if c["metric"]["kind"] == "mean" and "covariate" not in c and c["units"] > 1 and t["units"] > 1:
        a, b = gb_stat(c), gb_stat(t)
        if a.variance > 0 and b.variance > 0:
            r = sps.ttest_ind_from_stats(
                b.mean, math.sqrt(b.variance), b.n, a.mean, math.sqrt(a.variance), a.n, equal_var=False
            )
            exp["welch_scipy"] = {"statistic": finite(r.statistic), "p_value": finite(r.pvalue)}

    bayes = []
    for prior, inverse in PRIORS:
        gp, scale = gb_prior(prior)
        entry = {"prior": prior, "inverse": inverse}
        for d in ("relative", "absolute"):
            cfg = EffectBayesianConfig(
                alpha=alpha, difference_type=d, inverse=inverse, prior_effect=gp, prior_type=scale
            )
            try:
                test = EffectBayesianABTest(gb_stat(c), gb_stat(t), cfg)
            except ZeroDivisionError as e:
                entry[d] = {"error": f"EXCEPTION: {e}"}
                continue
            entry[d] = bayes_result(test)
        bayes.append(entry)
    exp["bayesian"] = bayes
    return exp


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def comparison_cases():
    rng = np.random.default_rng(20240611)
    cases = []

    def add(name, control, treatment, alpha=0.05, tuning=5000.0):
        cases.append(
            {"name": name, "alpha": alpha, "tuning": float(tuning), "control": control, "treatment": treatment}
        )

    # Proportions.
    add("prop_typical", proportion(1000, 100), proportion(1000, 120))
    add("prop_small_n", proportion(10, 3), proportion(12, 7))
    add("prop_two_units", proportion(2, 1), proportion(2, 1))
    add("prop_large_n", proportion(5_000_000, 250_000), proportion(5_000_000, 251_500), tuning=20000)
    add("prop_near_zero", proportion(20_000, 3), proportion(20_000, 9))
    add("prop_near_one", proportion(10_000, 9_990), proportion(10_000, 9_995))
    add("prop_negative_effect", proportion(5_000, 600), proportion(5_200, 540), tuning=1000)
    add("prop_unequal_n", proportion(300, 45), proportion(3_000, 480))
    add("prop_huge_effect", proportion(2_000, 100), proportion(2_000, 900))
    add("prop_alpha_010", proportion(1_500, 210), proportion(1_480, 236), alpha=0.10)
    add("prop_alpha_001", proportion(40_000, 4_000), proportion(40_000, 4_230), alpha=0.01)

    # Means.
    add("mean_equal_var", mean_sample(rng.normal(10, 3, 500)), mean_sample(rng.normal(10.5, 3, 520)))
    add("mean_unequal_var", mean_sample(rng.normal(10, 2, 800)), mean_sample(rng.normal(10.4, 8, 750)))
    rev_c = np.where(rng.random(3000) < 0.05, rng.exponential(40, 3000), 0)
    rev_t = np.where(rng.random(3100) < 0.055, rng.exponential(42, 3100), 0)
    add("mean_skewed_revenue", mean_sample(rev_c), mean_sample(rev_t))
    add(
        "mean_large_n_negative",
        mean_sample(rng.normal(35.2, 60, 200_000)),
        mean_sample(rng.normal(34.9, 59, 201_000)),
        tuning=20000,
    )
    add("mean_tiny_n", mean_sample([1.5, 2.25]), mean_sample([3, 4, 2.5]))
    add("mean_negative_control", mean_sample(rng.normal(-5, 3, 400)), mean_sample(rng.normal(-4.5, 3, 410)))
    add(
        "mean_zero_control_mean",
        mean_sample(np.tile([-1.0, 1.0], 50)),
        mean_sample(rng.normal(0.3, 0.8, 120)),
    )
    add("mean_counts", mean_sample(rng.poisson(2.0, 1500)), mean_sample(rng.poisson(2.1, 1500)), alpha=0.1)

    # CUPED (regression adjustment).
    def cuped_mean(name, n_c, n_t, slope, noise, lift, pre_sd=10.0, alpha=0.05):
        pre_c = q(rng.normal(50, pre_sd, n_c))
        pre_t = q(rng.normal(50, pre_sd, n_t))
        post_c = q(5 + slope * pre_c + rng.normal(0, noise, n_c))
        post_t = q(5 + lift + slope * pre_t + rng.normal(0, noise, n_t))
        add(
            name,
            with_covariate(mean_sample(post_c), post_c, pre_c, "mean"),
            with_covariate(mean_sample(post_t), post_t, pre_t, "mean"),
            alpha=alpha,
        )

    cuped_mean("cuped_mean_strong", 1000, 1000, 0.9, 4.0, 1.0)
    cuped_mean("cuped_mean_weak", 800, 820, 0.1, 8.0, 0.8)
    cuped_mean("cuped_mean_negative_corr", 1200, 1150, -0.7, 5.0, -0.6)
    cuped_mean("cuped_mean_large_n", 100_000, 100_000, 0.5, 10.0, 0.15, alpha=0.1)
    cuped_mean("cuped_small_n", 3, 4, 0.8, 1.0, 0.5)

    pre_c = (rng.random(4000) < 0.3).astype(int)
    pre_t = (rng.random(4100) < 0.3).astype(int)
    post_c = (rng.random(4000) < 0.10 + 0.30 * pre_c).astype(int)
    post_t = (rng.random(4100) < 0.12 + 0.30 * pre_t).astype(int)
    add(
        "cuped_proportion_binary_pre",
        with_covariate(binary_sample(post_c), post_c, pre_c, "proportion"),
        with_covariate(binary_sample(post_t), post_t, pre_t, "proportion"),
    )

    pre_c = rng.poisson(3.0, 2500)
    pre_t = rng.poisson(3.0, 2400)
    post_c = (rng.random(2500) < np.clip(0.05 + 0.04 * pre_c, 0, 1)).astype(int)
    post_t = (rng.random(2400) < np.clip(0.06 + 0.04 * pre_t, 0, 1)).astype(int)
    add(
        "cuped_proportion_count_pre",
        with_covariate(binary_sample(post_c), post_c, pre_c, "mean"),
        with_covariate(binary_sample(post_t), post_t, pre_t, "mean"),
    )

    post_c = q(rng.normal(20, 5, 600))
    post_t = q(rng.normal(21, 5, 610))
    add(
        "cuped_constant_pre",
        with_covariate(mean_sample(post_c), post_c, np.ones(600), "mean"),
        with_covariate(mean_sample(post_t), post_t, np.ones(610), "mean"),
    )

    # Degenerate inputs.
    add("deg_control_no_units", proportion(0, 0), proportion(100, 10))
    add("deg_treatment_no_units", proportion(100, 10), proportion(0, 0))
    add("deg_both_no_units", proportion(0, 0), proportion(0, 0))
    add("deg_zero_conversions_both", proportion(1000, 0), proportion(1000, 0))
    add("deg_zero_conversions_control", proportion(1000, 0), proportion(1000, 5))
    add("deg_all_converted_treatment", proportion(1000, 500), proportion(1000, 1000))
    add("deg_mean_constant", mean_sample(np.full(50, 5.0)), mean_sample(np.full(60, 5.0)))
    add("deg_single_unit", mean_sample([3.0]), mean_sample([4.5]))
    add("deg_mean_no_units", mean_sample([]), mean_sample([1.0, 2.0, 3.0]))
    empty = {"units": 0, "metric": {"kind": "mean", "sum": 0.0, "sum_squares": 0.0},
             "covariate": {"pre": {"kind": "mean", "sum": 0.0, "sum_squares": 0.0}, "sum_products": 0.0}}
    post = q(rng.normal(10, 2, 50))
    pre = q(rng.normal(10, 2, 50))
    add("deg_cuped_no_units", empty, with_covariate(mean_sample(post), post, pre, "mean"))
    return cases


def ztest_cases():
    cases = []
    for name, nc, xc, nt, xt, alpha in [
        ("typical", 1000, 100, 1000, 120, 0.05),
        ("small_n", 10, 3, 12, 7, 0.05),
        ("large_n", 5_000_000, 250_000, 5_000_000, 251_500, 0.05),
        ("near_zero", 20_000, 3, 20_000, 9, 0.05),
        ("near_one", 10_000, 9_990, 10_000, 9_995, 0.05),
        ("negative_effect", 5_000, 600, 5_200, 540, 0.10),
        ("unequal_n", 300, 45, 3_000, 480, 0.01),
        ("huge_effect", 2_000, 100, 2_000, 900, 0.05),
        ("one_arm_zero", 1_000, 0, 1_000, 8, 0.05),
        ("extremes", 100, 0, 100, 100, 0.05),
    ]:
        z, p = proportions_ztest(count=[xt, xc], nobs=[nt, nc])
        low, upp = confint_proportions_2indep(xt, nt, xc, nc, method="wald", compare="diff", alpha=alpha)
        cases.append(
            {
                "name": name,
                "alpha": alpha,
                "control": proportion(nc, xc),
                "treatment": proportion(nt, xt),
                "expected": {
                    "difference": finite(xt / nt - xc / nc),
                    "z_statistic": finite(z),
                    "p_value": finite(p),
                    "ci": [finite(low), finite(upp)],
                },
            }
        )
    # Degenerate: statsmodels answers NaN here (0/0), vexil reports "not enough data".
    for name, nc, xc, nt, xt in [("no_conversions", 1000, 0, 1000, 0), ("all_converted", 50, 50, 60, 60)]:
        with np.errstate(all="ignore"):
            z, p = proportions_ztest(count=[xt, xc], nobs=[nt, nc])
        assert not math.isfinite(z) or not math.isfinite(p)
        cases.append(
            {
                "name": name,
                "alpha": 0.05,
                "control": proportion(nc, xc),
                "treatment": proportion(nt, xt),
                "expected": {"error": "statsmodels returns a non-finite statistic"},
            }
        )
    return cases


def srm_cases():
    out = []
    for name, users, weights in [
        ("balanced", [5000, 5000], [0.5, 0.5]),
        ("slight_imbalance", [5050, 4950], [0.5, 0.5]),
        ("mismatch", [5200, 4800], [0.5, 0.5]),
        ("three_unequal_weights", [10_080, 4_990, 4_930], [0.5, 0.25, 0.25]),
        ("three_thirds", [3330, 3340, 3330], [1 / 3, 1 / 3, 1 / 3]),
        ("four_unnormalised", [1000, 1100, 950, 1020], [1.0, 1.0, 1.0, 1.0]),
        ("no_users", [0, 0], [0.5, 0.5]),
        ("zero_weight_arm", [100, 5, 100], [0.5, 0.0, 0.5]),
        ("large", [1_000_000, 1_003_000], [0.5, 0.5]),
        ("tiny", [10, 30], [0.5, 0.5]),
        ("one_arm_empty", [500, 0], [0.5, 0.5]),
        ("uneven_split", [50_500, 49_500], [0.505, 0.495]),
        ("five_arms", [2010, 1985, 2040, 1930, 2035], [0.2, 0.2, 0.2, 0.2, 0.2]),
    ]:
        p = check_srm(users, weights)
        exp = {"p_value": finite(p)}
        total = sum(users)
        if total > 0 and all(w > 0 for w in weights):
            tw = sum(weights)
            f_exp = [w / tw * total for w in weights]
            r = sps.chisquare(users, f_exp)
            exp["scipy_chi_square"] = finite(r.statistic)
            exp["scipy_p_value"] = finite(r.pvalue)
        out.append({"name": name, "units": users, "weights": weights, "expected": exp})
    return out


def experiment_p_values():
    """A 4-arm experiment with 3 metrics: gbstats fixed-horizon p-values to correct."""
    rng = np.random.default_rng(7)
    arms = []
    for lift in (0.0, 0.01, 0.03, -0.02):
        arms.append(
            [
                proportion(20_000, int(rng.binomial(20_000, 0.10 * (1 + lift)))),
                mean_sample(rng.normal(30 * (1 + lift), 25, 4_000)),
                proportion(8_000, int(rng.binomial(8_000, 0.5))),
            ]
        )
    entries = []
    for metric in range(3):
        for v in range(1, 4):
            c, t = arms[0][metric], arms[v][metric]
            res = freq_result(
                TwoSidedTTest(gb_stat(c), gb_stat(t), FrequentistConfig(alpha=0.05, difference_type="relative"))
            )
            entries.append({"estimate": res["estimate"], "ci": res["ci"], "p_value": res["p_value"]})
    return entries


def growthbook_adjusted_ci(p_adjusted, lift, alpha, ci):
    """GrowthBook app's `getAdjustedCI` (front-end TypeScript; not part of gbstats), with scipy."""
    if p_adjusted > 0.999999:
        return None  # (-inf, inf)
    if not lift:
        adj = [0.0, 0.0]
    else:
        z = sps.norm.ppf(1 - alpha / 2)
        adj_sd = abs(lift / sps.norm.ppf(1 - p_adjusted / 2))
        adj = [lift - z * adj_sd, lift + z * adj_sd]
    if adj[0] < ci[0] and adj[1] > ci[1]:
        return [finite(adj[0]), finite(adj[1])]
    return [finite(ci[0]), finite(ci[1])]


def correction_cases():
    rng = np.random.default_rng(99)
    lists = [
        ("mixed", [0.01, 0.04, 0.03, 0.005, 0.2]),
        ("ties", [0.02, 0.02, 0.02, 0.5]),
        ("ones", [1.0, 0.9, 0.5, 1.0]),
        ("single", [0.03]),
        ("zeros", [0.0, 0.0, 0.01]),
        ("random_20", [float(x) for x in np.concatenate([rng.uniform(0, 1, 16), [1e-8, 3e-6, 0.0004, 0.002]])]),
    ]
    cases = []
    for name, ps in lists:
        cases.append(
            {
                "name": name,
                "p_values": ps,
                "holm": [finite(x) for x in multipletests(ps, method="holm")[1]],
                "benjamini_hochberg": [finite(x) for x in multipletests(ps, method="fdr_bh")[1]],
            }
        )
    exp = experiment_p_values()
    ps = [e["p_value"] for e in exp]
    case = {
        "name": "experiment_4_arms_3_metrics",
        "p_values": ps,
        "holm": [finite(x) for x in multipletests(ps, method="holm")[1]],
        "benjamini_hochberg": [finite(x) for x in multipletests(ps, method="fdr_bh")[1]],
        "alpha": 0.05,
        "effects": exp,
    }
    for key in ("holm", "benjamini_hochberg"):
        case[f"{key}_adjusted_ci"] = [
            growthbook_adjusted_ci(padj, e["estimate"], 0.05, e["ci"]) for padj, e in zip(case[key], exp)
        ]
    cases.append(case)
    return cases


def write(name, payload):
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    path.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)


def main():
    cases = comparison_cases()
    for case in cases:
        case["expected"] = analyse(case)
    write(
        "comparisons.json",
        {
            **header(
                "Two-arm comparisons: gbstats per-arm statistics and CUPED theta, TwoSidedTTest, "
                "SequentialTwoSidedTTest and EffectBayesianABTest (relative and absolute), plus scipy "
                "Welch checks."
            ),
            "bayesian_priors": [{"prior": p, "inverse": i} for p, i in PRIORS],
            "cases": cases,
        },
    )
    write(
        "ztest.json",
        {
            **header(
                "Classical pooled two-proportion z-test (statsmodels proportions_ztest) and the Wald "
                "interval for the difference (statsmodels confint_proportions_2indep, method='wald')."
            ),
            "cases": ztest_cases(),
        },
    )
    write(
        "srm.json",
        {
            **header("Sample-ratio mismatch: gbstats utils.check_srm, and scipy.stats.chisquare."),
            "cases": srm_cases(),
        },
    )
    write(
        "corrections.json",
        {
            **header(
                "Multiple-comparison corrections: statsmodels multipletests 'holm' and 'fdr_bh'; "
                "adjusted CIs by GrowthBook's app formula (getAdjustedCI) evaluated with scipy.stats.norm."
            ),
            "cases": correction_cases(),
        },
    )


if __name__ == "__main__":
    main()
