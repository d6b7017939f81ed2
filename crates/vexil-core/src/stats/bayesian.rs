//! Bayesian comparison: gbstats' `EffectBayesianABTest` (`gbstats/bayesian/tests.py`).

use serde::{Deserialize, Serialize};

use super::dist::{normal_cdf, normal_pdf, normal_quantile};
use super::frequentist::lift;
use super::sample::Pair;
use super::{
    Comparison, DEFAULT_ALPHA, Estimate, Interval, Method, NotEnoughData, Sample, Scale, StatsError, all_finite,
    check_alpha,
};

/// The prior on the effect (the lift).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Prior {
    /// An improper flat prior (gbstats' default, `proper=False`): the posterior is the data's
    /// normal likelihood.
    #[default]
    Flat,
    /// A normal prior `N(mean, std_dev²)` on the lift of the given scale; it is rescaled by the
    /// control mean for the other scale, as gbstats (`prior_type`). GrowthBook's proper prior is
    /// `N(0, 0.1²)` on the relative lift.
    Normal {
        /// Prior mean of the lift.
        mean: f64,
        /// Prior standard deviation of the lift.
        std_dev: f64,
        /// The lift the prior is about.
        scale: Scale,
    },
}

/// The Bayesian Gaussian effect model of gbstats' `EffectBayesianABTest`.
///
/// The data's lift estimate `Δ̂ ~ N(Δ, se²)` (the same estimate and delta-method variance as
/// [`FixedHorizon`](super::FixedHorizon)) is combined with the [`Prior`]; the posterior
/// `N(μ, σ²)` gives the chance to win `P(Δ > 0)`, the `1 − alpha` credible interval, and the
/// expected loss of shipping either arm.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Bayesian {
    /// The credible interval covers `1 − alpha` of the posterior.
    pub alpha: f64,
    /// The prior on the lift.
    pub prior: Prior,
    /// A metric for which lower is better (gbstats' `inverse`): the chance to win becomes
    /// `P(Δ < 0)` and the two risks swap.
    pub inverse: bool,
}

impl Default for Bayesian {
    fn default() -> Bayesian {
        Bayesian {
            alpha: DEFAULT_ALPHA,
            prior: Prior::Flat,
            inverse: false,
        }
    }
}

/// Expected losses (gbstats' `risk`), in units of the lift.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Risk {
    /// The expected loss of keeping the control: `E[max(Δ, 0)]` (`E[max(−Δ, 0)]` when inverse).
    pub control: f64,
    /// The expected loss of shipping the treatment: `E[max(−Δ, 0)]` (`E[max(Δ, 0)]` when inverse).
    pub treatment: f64,
}

/// The posterior of one lift.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BayesianEffect {
    /// Posterior mean of the lift.
    pub estimate: f64,
    /// Posterior standard deviation of the lift.
    pub std_error: f64,
    /// The equal-tailed `1 − alpha` credible interval.
    pub interval: Interval,
    /// Posterior probability that the treatment beats the control.
    pub chance_to_win: f64,
    /// Expected loss of either decision.
    pub risk: Risk,
}

impl Bayesian {
    /// Compares `treatment` with `control`.
    pub fn compare(&self, control: &Sample, treatment: &Sample) -> Result<Comparison<BayesianEffect>, StatsError> {
        check_alpha(self.alpha)?;
        if let Prior::Normal { mean, std_dev, .. } = self.prior {
            if !mean.is_finite() {
                return Err(StatsError::NonFinite("prior mean"));
            }
            if !(std_dev.is_finite() && std_dev > 0.0) {
                return Err(StatsError::InvalidPrior(std_dev));
            }
        }
        let pair = Pair::new(control, treatment)?;
        Ok(Comparison {
            method: Method::Bayesian(*self),
            control: pair.control_summary,
            treatment: pair.treatment_summary,
            cuped: pair.cuped,
            absolute: self.effect(&pair, Scale::Absolute),
            relative: self.effect(&pair, Scale::Relative),
        })
    }

    /// The prior's mean and variance on `scale`, or `None` for a flat prior.
    fn prior_on(&self, pair: &Pair, scale: Scale) -> Estimate<Option<(f64, f64)>> {
        let Prior::Normal {
            mean,
            std_dev,
            scale: prior_scale,
        } = self.prior
        else {
            return Ok(None);
        };
        let variance = std_dev * std_dev;
        let control = pair.control.unadjusted_mean;
        let (mean, variance) = match (prior_scale, scale) {
            (a, b) if a == b => (mean, variance),
            _ if control == 0.0 => return Err(NotEnoughData::ZeroControlMean),
            (Scale::Relative, _) => (mean * control.abs(), variance * control * control),
            (Scale::Absolute, _) => (mean / control.abs(), variance / (control * control)),
        };
        all_finite(&[mean, variance])?;
        if variance > 0.0 {
            Ok(Some((mean, variance)))
        } else {
            Err(NotEnoughData::NonFinite)
        }
    }

    fn effect(&self, pair: &Pair, scale: Scale) -> Estimate<BayesianEffect> {
        let (data_mean, data_variance) = lift(pair, scale)?;
        let (mean, variance) = match self.prior_on(pair, scale)? {
            None => (data_mean, data_variance),
            Some((prior_mean, prior_variance)) => {
                let precision = 1.0 / data_variance + 1.0 / prior_variance;
                (
                    (data_mean / data_variance + prior_mean / prior_variance) / precision,
                    1.0 / precision,
                )
            }
        };
        let sd = variance.sqrt();
        let z = mean / sd;
        let (phi, cdf, cdf_neg) = (normal_pdf(z), normal_cdf(z), normal_cdf(-z));
        // E[max(Δ, 0)] and E[max(−Δ, 0)] for Δ ~ N(mean, sd²), in closed form (gbstats multiplies
        // the probabilities by truncated-normal means, which is the same quantity).
        let gain = sd * (phi + z * cdf);
        let loss = sd * (phi - z * cdf_neg);
        let (chance_to_win, risk) = if self.inverse {
            (
                cdf_neg,
                Risk {
                    control: loss,
                    treatment: gain,
                },
            )
        } else {
            (
                cdf,
                Risk {
                    control: gain,
                    treatment: loss,
                },
            )
        };
        let interval = Interval::around(mean, sd * normal_quantile(1.0 - self.alpha / 2.0));
        all_finite(&[
            mean,
            sd,
            chance_to_win,
            risk.control,
            risk.treatment,
            interval.lower,
            interval.upper,
        ])?;
        Ok(BayesianEffect {
            estimate: mean,
            std_error: sd,
            interval,
            chance_to_win,
            // Cancellation far in a tail can leave a loss a hair below zero.
            risk: Risk {
                control: risk.control.max(0.0),
                treatment: risk.treatment.max(0.0),
            },
        })
    }
}
