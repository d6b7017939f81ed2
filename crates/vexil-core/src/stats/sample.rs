//! Per-arm inputs and the per-arm statistics gbstats derives from them
//! (`gbstats/models/statistics.py`: `ProportionStatistic`, `SampleMeanStatistic`,
//! `RegressionAdjustedStatistic`, `compute_theta`).

use serde::{Deserialize, Serialize};

use super::{NotEnoughData, StatsError};

/// One metric aggregated over an arm's units.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Metric {
    /// A binary metric: how many of the arm's units converted. Its per-unit variance is the
    /// Bernoulli `p(1 − p)`, as gbstats' `ProportionStatistic`.
    Proportion {
        /// Units that converted (at most the arm's units).
        conversions: u64,
    },
    /// A numeric metric: the sum and the sum of squares of the per-unit values (a unit without a
    /// value counts as 0). Its per-unit variance is the sample variance (`n − 1` denominator), as
    /// gbstats' `SampleMeanStatistic`.
    Mean {
        /// `Σ xᵢ`.
        sum: f64,
        /// `Σ xᵢ²`.
        sum_squares: f64,
    },
}

impl Metric {
    /// `Σ xᵢ` (the conversion count for a proportion).
    fn sum(&self) -> f64 {
        match *self {
            Metric::Proportion { conversions } => conversions as f64,
            Metric::Mean { sum, .. } => sum,
        }
    }

    fn same_kind(&self, other: &Metric) -> bool {
        matches!(
            (self, other),
            (Metric::Proportion { .. }, Metric::Proportion { .. }) | (Metric::Mean { .. }, Metric::Mean { .. })
        )
    }

    /// The mean over `units` (0 without units, as gbstats).
    fn mean(&self, units: u64) -> f64 {
        if units == 0 { 0.0 } else { self.sum() / units as f64 }
    }

    /// gbstats' per-unit variance: `p(1 − p)` for a proportion, the sample variance for a mean
    /// (0 with fewer than two units).
    fn variance(&self, units: u64) -> f64 {
        match *self {
            Metric::Proportion { .. } => {
                let p = self.mean(units);
                p * (1.0 - p)
            }
            Metric::Mean { sum, sum_squares } => {
                if units <= 1 {
                    return 0.0;
                }
                let n = units as f64;
                (sum_squares - sum * sum / n) / (n - 1.0)
            }
        }
    }

    /// The metric of two arms pooled (gbstats' `create_joint_statistic`).
    fn joint(&self, other: &Metric) -> Metric {
        match (*self, *other) {
            (Metric::Proportion { conversions: a }, Metric::Proportion { conversions: b }) => {
                Metric::Proportion { conversions: a + b }
            }
            _ => Metric::Mean {
                sum: self.sum() + other.sum(),
                sum_squares: self.sum_squares() + other.sum_squares(),
            },
        }
    }

    fn sum_squares(&self) -> f64 {
        match *self {
            Metric::Proportion { conversions } => conversions as f64,
            Metric::Mean { sum_squares, .. } => sum_squares,
        }
    }

    fn validate(&self, units: u64) -> Result<(), StatsError> {
        match *self {
            Metric::Proportion { conversions } if conversions > units => {
                Err(StatsError::ConversionsExceedUnits { conversions, units })
            }
            Metric::Proportion { .. } => Ok(()),
            Metric::Mean { sum, sum_squares } => {
                if !sum.is_finite() {
                    return Err(StatsError::NonFinite("sum"));
                }
                if !sum_squares.is_finite() {
                    return Err(StatsError::NonFinite("sum_squares"));
                }
                if sum_squares < 0.0 {
                    return Err(StatsError::NegativeSumOfSquares(sum_squares));
                }
                Ok(())
            }
        }
    }
}

/// A pre-experiment covariate of the same units, for CUPED (regression adjustment): typically the
/// same metric measured before the units were exposed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Covariate {
    /// The pre-period metric's aggregates over the arm's units.
    pub pre: Metric,
    /// `Σ xᵢ·yᵢ`: the per-unit products of the experiment metric `x` and the pre-period metric `y`.
    pub sum_products: f64,
}

/// One arm of an experiment: its units and one metric aggregated over them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Units (users, sessions…) assigned to the arm.
    pub units: u64,
    /// The metric over those units.
    pub metric: Metric,
    /// A pre-period covariate for CUPED; both arms need one (of the same kind) or neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covariate: Option<Covariate>,
}

impl Sample {
    /// `conversions` out of `units` converted.
    pub fn proportion(units: u64, conversions: u64) -> Sample {
        Sample {
            units,
            metric: Metric::Proportion { conversions },
            covariate: None,
        }
    }

    /// A numeric metric with per-unit values summing to `sum`, their squares to `sum_squares`.
    pub fn mean(units: u64, sum: f64, sum_squares: f64) -> Sample {
        Sample {
            units,
            metric: Metric::Mean { sum, sum_squares },
            covariate: None,
        }
    }

    /// This sample with a CUPED covariate.
    #[must_use]
    pub fn with_covariate(self, covariate: Covariate) -> Sample {
        Sample {
            covariate: Some(covariate),
            ..self
        }
    }

    fn validate(&self) -> Result<(), StatsError> {
        self.metric.validate(self.units)?;
        if let Some(c) = &self.covariate {
            c.pre.validate(self.units)?;
            if !c.sum_products.is_finite() {
                return Err(StatsError::NonFinite("sum_products"));
            }
        }
        Ok(())
    }
}

/// A CUPED-adjusted mean and variance.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AdjustedMoments {
    /// `mean − θ·pre_mean`.
    pub mean: f64,
    /// `variance + θ²·pre_variance − 2θ·covariance` (per unit).
    pub variance: f64,
}

/// One arm's statistics, as reported with a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ArmSummary {
    /// Units in the arm.
    pub units: u64,
    /// The metric's mean (conversion rate), unadjusted.
    pub mean: f64,
    /// The metric's per-unit variance, unadjusted (`p(1 − p)` for a proportion).
    pub variance: f64,
    /// The CUPED-adjusted mean and variance, when CUPED is applied.
    pub adjusted: Option<AdjustedMoments>,
}

/// Whether CUPED was applied to a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Cuped {
    /// The samples carry no covariate.
    NotRequested,
    /// The samples carry covariates, but the pooled pre-period or experiment metric does not vary
    /// (θ would be 0 or undefined), so, as gbstats, the unadjusted metric is used.
    Skipped,
    /// Regression adjustment with `θ = cov(x, y) / var(y)` over both arms pooled.
    Applied {
        /// The regression coefficient of the metric on its covariate.
        theta: f64,
    },
}

/// What a test needs of one arm (gbstats' `TestStatistic` interface).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ArmStat {
    pub units: u64,
    /// The mean compared (CUPED-adjusted when CUPED applies).
    pub mean: f64,
    /// The unadjusted mean: the relative lift's denominator and the delta method's means.
    pub unadjusted_mean: f64,
    /// The per-unit variance (CUPED-adjusted when CUPED applies).
    pub variance: f64,
}

impl ArmStat {
    pub fn n(&self) -> f64 {
        self.units as f64
    }

    /// `variance / n`: the variance of the arm's mean.
    pub fn variance_of_mean(&self) -> f64 {
        self.variance / self.n()
    }
}

/// Both arms, validated and reduced to what the tests need.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pair {
    pub control: ArmStat,
    pub treatment: ArmStat,
    pub control_summary: ArmSummary,
    pub treatment_summary: ArmSummary,
    pub cuped: Cuped,
}

impl Pair {
    pub fn new(control: &Sample, treatment: &Sample) -> Result<Pair, StatsError> {
        control.validate()?;
        treatment.validate()?;
        if !control.metric.same_kind(&treatment.metric) {
            return Err(StatsError::MetricKindMismatch);
        }
        let theta = match (&control.covariate, &treatment.covariate) {
            (None, None) => None,
            (Some(a), Some(b)) if a.pre.same_kind(&b.pre) => Some(theta(control, a, treatment, b)),
            _ => return Err(StatsError::CovariateMismatch),
        };
        let cuped = match theta {
            None => Cuped::NotRequested,
            Some(t) if t == 0.0 || !t.is_finite() => Cuped::Skipped,
            Some(theta) => Cuped::Applied { theta },
        };
        let (control, control_summary) = arm(control, cuped);
        let (treatment, treatment_summary) = arm(treatment, cuped);
        Ok(Pair {
            control,
            treatment,
            control_summary,
            treatment_summary,
            cuped,
        })
    }

    /// gbstats' `_has_zero_variance` (either arm), and arms without units.
    pub fn check_variance(&self) -> Result<(), NotEnoughData> {
        if self.control.units == 0 || self.treatment.units == 0 {
            return Err(NotEnoughData::NoUnits);
        }
        let variances = [self.control.variance, self.treatment.variance];
        if variances.iter().any(|v| !v.is_finite()) {
            return Err(NotEnoughData::NonFinite);
        }
        if variances.iter().any(|&v| v <= 0.0) {
            return Err(NotEnoughData::ZeroVariance);
        }
        Ok(())
    }

    /// Whether the relative lift is defined: gbstats refuses a zero control mean, adjusted or not.
    pub fn check_control_mean(&self) -> Result<(), NotEnoughData> {
        if self.control.mean == 0.0 || self.control.unadjusted_mean == 0.0 {
            Err(NotEnoughData::ZeroControlMean)
        } else {
            Ok(())
        }
    }
}

/// Sample covariance of a metric and its covariate (0 with fewer than two units).
fn covariance(units: u64, post: &Metric, pre: &Metric, sum_products: f64) -> f64 {
    if units <= 1 {
        return 0.0;
    }
    let n = units as f64;
    (sum_products - post.sum() * pre.sum() / n) / (n - 1.0)
}

/// gbstats' `compute_theta`: the slope of the metric on its covariate over both arms pooled, or 0
/// when either pooled metric has no variance.
fn theta(control: &Sample, a: &Covariate, treatment: &Sample, b: &Covariate) -> f64 {
    let units = control.units + treatment.units;
    let post = control.metric.joint(&treatment.metric);
    let pre = a.pre.joint(&b.pre);
    let pre_variance = pre.variance(units);
    if pre_variance == 0.0 || post.variance(units) == 0.0 {
        return 0.0;
    }
    covariance(units, &post, &pre, a.sum_products + b.sum_products) / pre_variance
}

fn arm(sample: &Sample, cuped: Cuped) -> (ArmStat, ArmSummary) {
    let units = sample.units;
    let mean = sample.metric.mean(units);
    let variance = sample.metric.variance(units);
    let adjusted = match (cuped, &sample.covariate) {
        (Cuped::Applied { theta }, Some(c)) => {
            let adjusted_variance = if units <= 1 {
                0.0
            } else {
                variance + theta * theta * c.pre.variance(units)
                    - 2.0 * theta * covariance(units, &sample.metric, &c.pre, c.sum_products)
            };
            Some(AdjustedMoments {
                mean: mean - theta * c.pre.mean(units),
                variance: adjusted_variance,
            })
        }
        _ => None,
    };
    let stat = ArmStat {
        units,
        mean: adjusted.map_or(mean, |a| a.mean),
        unadjusted_mean: mean,
        variance: adjusted.map_or(variance, |a| a.variance),
    };
    (
        stat,
        ArmSummary {
            units,
            mean,
            variance,
            adjusted,
        },
    )
}
