//! Frequentist comparisons: gbstats' `TwoSidedTTest` and `SequentialTwoSidedTTest`
//! (`gbstats/frequentist/tests.py`), and the classical pooled two-proportion z-test.

use serde::{Deserialize, Serialize};

use super::dist::{is_positive, normal_quantile, normal_sf, t_sf, t_upper_quantile};
use super::sample::Pair;
use super::{
    ArmSummary, Comparison, DEFAULT_ALPHA, DEFAULT_SEQUENTIAL_TUNING, Estimate, Interval, Method, Metric,
    NotEnoughData, Sample, Scale, StatsError, all_finite, check_alpha,
};

/// A frequentist estimate of one lift.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FrequentistEffect {
    /// The lift.
    pub estimate: f64,
    /// Its standard error (delta method for the relative lift).
    pub std_error: f64,
    /// The two-sided `1 − alpha` confidence interval (always-valid for [`Sequential`]).
    pub interval: Interval,
    /// The two-sided p-value of "no difference" (always-valid for [`Sequential`]).
    pub p_value: f64,
    /// Welch–Satterthwaite degrees of freedom of the t-test ([`FixedHorizon`] only).
    pub degrees_of_freedom: Option<f64>,
}

impl FrequentistEffect {
    /// Whether the null hypothesis of no difference is rejected at level `alpha`.
    pub fn is_significant(&self, alpha: f64) -> bool {
        self.p_value < alpha
    }
}

/// The lift and the variance of its estimate, as gbstats' `frequentist_diff` and
/// `frequentist_variance` (delta method for the relative lift; the means in the variance are the
/// unadjusted ones, as gbstats), after gbstats' checks for degenerate inputs.
pub(crate) fn lift(pair: &Pair, scale: Scale) -> Estimate<(f64, f64)> {
    if scale == Scale::Relative {
        pair.check_control_mean()?;
    }
    pair.check_variance()?;
    let (c, t) = (&pair.control, &pair.treatment);
    let (estimate, variance) = match scale {
        Scale::Absolute => (t.mean - c.mean, t.variance_of_mean() + c.variance_of_mean()),
        Scale::Relative => {
            let mc = c.unadjusted_mean;
            let mt = t.unadjusted_mean;
            (
                (t.mean - c.mean) / mc,
                t.variance_of_mean() / (mc * mc) + c.variance_of_mean() * (mt * mt) / (mc * mc * mc * mc),
            )
        }
    };
    all_finite(&[estimate, variance])?;
    if variance > 0.0 {
        Ok((estimate, variance))
    } else {
        Err(NotEnoughData::ZeroVariance)
    }
}

/// Welch–Satterthwaite degrees of freedom of the arms' means.
fn welch_dof(pair: &Pair) -> f64 {
    let (c, t) = (&pair.control, &pair.treatment);
    let (vc, vt) = (c.variance_of_mean(), t.variance_of_mean());
    (vt + vc).powi(2) / (vt * vt / (t.n() - 1.0) + vc * vc / (c.n() - 1.0))
}

fn comparison<E>(method: Method, pair: &Pair, effect: impl Fn(Scale) -> Estimate<E>) -> Comparison<E> {
    Comparison {
        method,
        control: pair.control_summary,
        treatment: pair.treatment_summary,
        cuped: pair.cuped,
        absolute: effect(Scale::Absolute),
        relative: effect(Scale::Relative),
    }
}

/// The fixed-horizon two-sided Welch t-test of gbstats' `TwoSidedTTest`: read once, at the planned
/// sample size.
///
/// `p = 2·P(T_ν > |Δ/se|)` and `CI = Δ ± t_{ν, 1−α/2}·se`, with Welch–Satterthwaite `ν`. A
/// proportion metric goes through the same machinery with its Bernoulli variance `p(1 − p)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FixedHorizon {
    /// Significance level; the interval covers `1 − alpha`.
    pub alpha: f64,
}

impl Default for FixedHorizon {
    fn default() -> FixedHorizon {
        FixedHorizon { alpha: DEFAULT_ALPHA }
    }
}

impl FixedHorizon {
    /// Compares `treatment` with `control`.
    pub fn compare(&self, control: &Sample, treatment: &Sample) -> Result<Comparison<FrequentistEffect>, StatsError> {
        check_alpha(self.alpha)?;
        let pair = Pair::new(control, treatment)?;
        Ok(comparison(Method::FixedHorizon(*self), &pair, |scale| {
            self.effect(&pair, scale)
        }))
    }

    fn effect(&self, pair: &Pair, scale: Scale) -> Estimate<FrequentistEffect> {
        let (estimate, variance) = lift(pair, scale)?;
        let std_error = variance.sqrt();
        let dof = welch_dof(pair);
        all_finite(&[dof])?;
        // gbstats computes `2 * (1 - cdf(|t|))`; the survival function gives the same value without
        // losing the small p-values to cancellation.
        let p_value = (2.0 * t_sf((estimate / std_error).abs(), dof).ok_or(NotEnoughData::NonFinite)?).min(1.0);
        let quantile = t_upper_quantile(self.alpha / 2.0, dof).ok_or(NotEnoughData::NonFinite)?;
        let interval = Interval::around(estimate, quantile * std_error);
        all_finite(&[std_error, p_value, interval.lower, interval.upper])?;
        Ok(FrequentistEffect {
            estimate,
            std_error,
            interval,
            p_value,
            degrees_of_freedom: Some(dof),
        })
    }
}

/// Always-valid inference of gbstats' `SequentialTwoSidedTTest`: an asymptotic confidence sequence
/// (Waudby-Smith et al. 2023, arXiv:2103.06476, eq. 9) and its p-value (eq. 155), valid however
/// often the results are looked at.
///
/// With `N` units in both arms, `ρ² = (−2 ln α + ln(1 − 2 ln α)) / tuning_parameter`,
/// the interval is `Δ ± se·√(2(Nρ² + 1)·ln(√(Nρ² + 1)/α) / (Nρ²))`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sequential {
    /// Significance level; the sequence covers `1 − alpha` at all times simultaneously.
    pub alpha: f64,
    /// gbstats' `sequential_tuning_parameter`: the total sample size at which the sequence is
    /// tightest (GrowthBook's default, 5000).
    pub tuning_parameter: f64,
}

impl Default for Sequential {
    fn default() -> Sequential {
        Sequential {
            alpha: DEFAULT_ALPHA,
            tuning_parameter: DEFAULT_SEQUENTIAL_TUNING,
        }
    }
}

impl Sequential {
    /// Compares `treatment` with `control`.
    pub fn compare(&self, control: &Sample, treatment: &Sample) -> Result<Comparison<FrequentistEffect>, StatsError> {
        check_alpha(self.alpha)?;
        if !(self.tuning_parameter.is_finite() && self.tuning_parameter > 0.0) {
            return Err(StatsError::InvalidTuningParameter(self.tuning_parameter));
        }
        let pair = Pair::new(control, treatment)?;
        Ok(comparison(Method::Sequential(*self), &pair, |scale| {
            self.effect(&pair, scale)
        }))
    }

    /// `ρ²` (eq. 161 of the paper).
    fn rho_squared(&self) -> f64 {
        let l = -2.0 * self.alpha.ln();
        (l + (l + 1.0).ln()) / self.tuning_parameter
    }

    fn effect(&self, pair: &Pair, scale: Scale) -> Estimate<FrequentistEffect> {
        let (estimate, variance) = lift(pair, scale)?;
        let std_error = variance.sqrt();
        let n = pair.control.n() + pair.treatment.n();
        let rho2 = self.rho_squared();
        let nr2p1 = n * rho2 + 1.0;
        // Eq. 9 with s² = variance·N: the N cancels into the `N ρ²` below.
        let half_width = std_error * (2.0 * nr2p1 * (nr2p1.sqrt() / self.alpha).ln() / (n * rho2)).sqrt();
        let interval = Interval::around(estimate, half_width);
        // Eq. 155, in logs: the e-value `exp(ρ²·N·Δ²/(2·var·(Nρ² + 1))) / √(Nρ² + 1)` overflows for
        // large effects where its reciprocal just underflows to a p-value of 0.
        let log_e_value = rho2 * n * estimate * estimate / variance / (2.0 * nr2p1) - 0.5 * nr2p1.ln();
        let p_value = (-log_e_value).exp().min(1.0);
        all_finite(&[std_error, p_value, interval.lower, interval.upper])?;
        Ok(FrequentistEffect {
            estimate,
            std_error,
            interval,
            p_value,
            degrees_of_freedom: None,
        })
    }
}

/// The classical pooled two-proportion z-test (as statsmodels' `proportions_ztest`), with a Wald
/// interval for the difference of rates (statsmodels' `confint_proportions_2indep`,
/// `method="wald"`). Not part of gbstats: GrowthBook tests proportions with [`FixedHorizon`].
///
/// `z = (p_t − p_c) / √(p̄(1 − p̄)(1/n_c + 1/n_t))` with the pooled rate `p̄`, `p = 2·(1 − Φ(|z|))`;
/// `CI = p_t − p_c ± z_{1−α/2}·√(p_t(1 − p_t)/n_t + p_c(1 − p_c)/n_c)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TwoProportionZTest {
    /// Significance level of the interval.
    pub alpha: f64,
}

impl Default for TwoProportionZTest {
    fn default() -> TwoProportionZTest {
        TwoProportionZTest { alpha: DEFAULT_ALPHA }
    }
}

/// The result of a [`TwoProportionZTest`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ZTestComparison {
    /// The method and its parameters.
    pub method: Method,
    /// The control arm's statistics.
    pub control: ArmSummary,
    /// The treatment arm's statistics.
    pub treatment: ArmSummary,
    /// The difference of rates, `p_t − p_c`.
    pub difference: Estimate<ZTestEffect>,
}

/// The z-test of the difference of two rates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ZTestEffect {
    /// `p_t − p_c`.
    pub estimate: f64,
    /// The z statistic (pooled standard error).
    pub z_statistic: f64,
    /// The two-sided p-value.
    pub p_value: f64,
    /// The unpooled standard error of the difference.
    pub std_error: f64,
    /// The Wald `1 − alpha` interval (unpooled standard error).
    pub interval: Interval,
}

impl TwoProportionZTest {
    /// Compares `treatment` with `control`; both must be proportion metrics without covariate.
    pub fn compare(&self, control: &Sample, treatment: &Sample) -> Result<ZTestComparison, StatsError> {
        check_alpha(self.alpha)?;
        let (Metric::Proportion { conversions: xc }, Metric::Proportion { conversions: xt }) =
            (control.metric, treatment.metric)
        else {
            return Err(StatsError::NotAProportion);
        };
        if control.covariate.is_some() || treatment.covariate.is_some() {
            return Err(StatsError::NotAProportion);
        }
        let pair = Pair::new(control, treatment)?;
        let difference = self.effect(control.units, xc, treatment.units, xt);
        Ok(ZTestComparison {
            method: Method::TwoProportionZ(*self),
            control: pair.control_summary,
            treatment: pair.treatment_summary,
            difference,
        })
    }

    fn effect(&self, nc: u64, xc: u64, nt: u64, xt: u64) -> Estimate<ZTestEffect> {
        if nc == 0 || nt == 0 {
            return Err(NotEnoughData::NoUnits);
        }
        let (nc, xc, nt, xt) = (nc as f64, xc as f64, nt as f64, xt as f64);
        let (pc, pt) = (xc / nc, xt / nt);
        let pooled = (xc + xt) / (nc + nt);
        let pooled_variance = pooled * (1.0 - pooled) * (1.0 / nc + 1.0 / nt);
        if !is_positive(pooled_variance) {
            return Err(NotEnoughData::ZeroVariance);
        }
        let estimate = pt - pc;
        let z_statistic = estimate / pooled_variance.sqrt();
        let p_value = (2.0 * normal_sf(z_statistic.abs())).min(1.0);
        let std_error = (pt * (1.0 - pt) / nt + pc * (1.0 - pc) / nc).sqrt();
        let interval = Interval::around(estimate, normal_quantile(1.0 - self.alpha / 2.0) * std_error);
        all_finite(&[z_statistic, p_value, std_error, interval.lower, interval.upper])?;
        Ok(ZTestEffect {
            estimate,
            z_statistic,
            p_value,
            std_error,
            interval,
        })
    }
}
