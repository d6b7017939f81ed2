//! Experiment results statistics: pure functions that turn per-variant aggregates into lifts,
//! intervals, p-values, Bayesian chances to win, sample-ratio-mismatch checks and
//! multiple-comparison corrections.
//!
//! The formulas are those of GrowthBook's stats engine, the `gbstats` Python package (0.8.0), so a
//! team moving from GrowthBook reads the same numbers; the test suite checks them against values
//! produced by `gbstats`, scipy and statsmodels themselves (`tools/stats-fixtures/`).
//!
//! # Inputs
//!
//! Each arm of an experiment is a [`Sample`]: its number of units (users, sessions…) and the
//! aggregates of one [`Metric`] over those units — a conversion count for a proportion metric, or
//! `Σx` and `Σx²` for a mean metric — optionally with a pre-period [`Covariate`] for CUPED.
//!
//! # Methods
//!
//! A [`Method`] (with all of its parameters) compares a treatment arm with the control arm:
//! - [`FixedHorizon`]: gbstats' `TwoSidedTTest`, a Welch t-test (Welch–Satterthwaite degrees of
//!   freedom) on the absolute and the relative lift, proportions using their Bernoulli variance;
//! - [`Sequential`]: gbstats' `SequentialTwoSidedTTest`, always-valid confidence sequences
//!   (Waudby-Smith et al.) tuned by the expected sample size, safe to peek at daily;
//! - [`Bayesian`]: gbstats' `EffectBayesianABTest`, a Gaussian model of the effect with a flat or a
//!   normal [`Prior`]: chance to win, expected loss (risk) of either decision, credible interval;
//! - [`TwoProportionZTest`]: the textbook pooled two-proportion z-test (statsmodels'
//!   `proportions_ztest`), with a Wald interval for the difference.
//!
//! Every comparison reports the absolute lift (`treatment − control`) and the relative lift
//! (`(treatment − control) / control`, its variance by the delta method), each either computed or
//! [`NotEnoughData`] with the reason; no NaN or infinity is ever returned. Invalid input (a
//! conversion count above the unit count, a NaN sum, arms measuring different kinds of metric,
//! alpha outside (0, 1)…) is a [`StatsError`].
//!
//! Across arms and metrics: [`srm_check`] (gbstats' `check_srm`) and [`adjust_p_values`] (Holm and
//! Benjamini–Hochberg, as statsmodels' `multipletests`), with GrowthBook's corrected intervals in
//! [`FrequentistEffect::adjusted_interval`].
//!
//! ```
//! use vexil_core::stats::{FixedHorizon, Sample};
//!
//! let control = Sample::proportion(1000, 100);
//! let treatment = Sample::proportion(1000, 120);
//! let result = FixedHorizon::default().compare(&control, &treatment).unwrap();
//! let relative = result.relative.unwrap();
//! assert!((relative.estimate - 0.2).abs() < 1e-12);
//! assert!(relative.p_value > 0.05);
//! ```

mod bayesian;
mod correction;
mod dist;
mod frequentist;
mod sample;
mod srm;

use serde::{Deserialize, Serialize};

pub use bayesian::{Bayesian, BayesianEffect, Prior, Risk};
pub use correction::{AdjustedInterval, Correction, adjust_p_values};
pub use frequentist::{FixedHorizon, FrequentistEffect, Sequential, TwoProportionZTest, ZTestComparison, ZTestEffect};
pub use sample::{AdjustedMoments, ArmSummary, Covariate, Cuped, Metric, Sample};
pub use srm::{DEFAULT_SRM_THRESHOLD, Srm, srm_check, srm_check_with_threshold};

/// The significance level gbstats (and GrowthBook) use by default.
pub const DEFAULT_ALPHA: f64 = 0.05;

/// gbstats' default `sequential_tuning_parameter`: the sample size at which the confidence
/// sequence is tightest.
pub const DEFAULT_SEQUENTIAL_TUNING: f64 = 5000.0;

/// A two-sided interval (confidence, credible or always-valid), on the scale of its estimate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// Lower bound.
    pub lower: f64,
    /// Upper bound.
    pub upper: f64,
}

impl Interval {
    /// `estimate ± half_width`.
    pub fn around(estimate: f64, half_width: f64) -> Interval {
        Interval {
            lower: estimate - half_width,
            upper: estimate + half_width,
        }
    }

    /// Whether `value` lies within the interval (bounds included).
    pub fn contains(&self, value: f64) -> bool {
        self.lower <= value && value <= self.upper
    }
}

/// Why a lift could not be estimated (gbstats answers these cases with a placeholder result and an
/// error message; Vexil says so instead of reporting made-up numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum NotEnoughData {
    /// An arm has no units (gbstats' `NO_UNITS_IN_VARIATION`).
    #[error("an arm has no units")]
    NoUnits,
    /// An arm's metric does not vary (a conversion rate of 0 or 1, a constant value, a single
    /// unit), so its standard error is zero (gbstats' `ZERO_NEGATIVE_VARIANCE`).
    #[error("an arm's metric has zero variance")]
    ZeroVariance,
    /// The control mean is zero, so a relative lift is undefined (gbstats'
    /// `ZERO_NEGATIVE_BASELINE_VARIATION`).
    #[error("the control mean is zero, so the relative lift is undefined")]
    ZeroControlMean,
    /// The inputs are so extreme that a result would overflow or be undefined.
    #[error("the result is not finite")]
    NonFinite,
}

/// One lift's result: the estimate, or why there is none.
pub type Estimate<T> = Result<T, NotEnoughData>;

/// Invalid input: the caller's data or configuration cannot describe an experiment.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StatsError {
    /// A sum, product, weight or parameter is NaN or infinite.
    #[error("{0} is not a finite number")]
    NonFinite(&'static str),
    /// More conversions than units.
    #[error("{conversions} conversions out of {units} units")]
    ConversionsExceedUnits {
        /// The conversion count.
        conversions: u64,
        /// The unit count.
        units: u64,
    },
    /// A sum of squares below zero.
    #[error("a sum of squares is negative ({0})")]
    NegativeSumOfSquares(f64),
    /// The arms measure different kinds of metric (a proportion against a mean).
    #[error("control and treatment measure different kinds of metric")]
    MetricKindMismatch,
    /// One arm has a CUPED covariate and the other none, or their covariates differ in kind.
    #[error("control and treatment must both have a CUPED covariate of the same kind, or neither")]
    CovariateMismatch,
    /// The method needs a proportion metric without covariate.
    #[error("the two-proportion z-test needs proportion metrics without a covariate")]
    NotAProportion,
    /// `alpha` outside (0, 1).
    #[error("alpha must lie in (0, 1), got {0}")]
    InvalidAlpha(f64),
    /// A sequential tuning parameter that is not positive.
    #[error("the sequential tuning parameter must be positive, got {0}")]
    InvalidTuningParameter(f64),
    /// A prior whose standard deviation is not positive.
    #[error("a normal prior needs a positive standard deviation, got {0}")]
    InvalidPrior(f64),
    /// An SRM check with fewer than two arms, or units and weights of different lengths.
    #[error("an SRM check needs one weight per arm and at least two arms ({units} units, {weights} weights)")]
    SrmShape {
        /// How many unit counts were given.
        units: usize,
        /// How many weights were given.
        weights: usize,
    },
    /// SRM weights that are negative, or that do not sum to a positive number.
    #[error("SRM weights must be non-negative with a positive sum")]
    InvalidWeights,
    /// A p-value outside [0, 1].
    #[error("p-values must lie in [0, 1], got {0}")]
    InvalidPValue(f64),
}

/// How a comparison is computed, with every parameter, so results can report their method.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Method {
    /// Fixed-horizon Welch t-test.
    FixedHorizon(FixedHorizon),
    /// Always-valid confidence sequences.
    Sequential(Sequential),
    /// Bayesian Gaussian effect model.
    Bayesian(Bayesian),
    /// Pooled two-proportion z-test.
    TwoProportionZ(TwoProportionZTest),
}

impl Method {
    /// Compares `treatment` with `control` by this method.
    pub fn compare(&self, control: &Sample, treatment: &Sample) -> Result<Analysis, StatsError> {
        Ok(match self {
            Method::FixedHorizon(m) => Analysis::Frequentist(m.compare(control, treatment)?),
            Method::Sequential(m) => Analysis::Frequentist(m.compare(control, treatment)?),
            Method::Bayesian(m) => Analysis::Bayesian(m.compare(control, treatment)?),
            Method::TwoProportionZ(m) => Analysis::TwoProportionZ(m.compare(control, treatment)?),
        })
    }
}

/// The result of [`Method::compare`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Analysis {
    /// From [`FixedHorizon`] or [`Sequential`].
    Frequentist(Comparison<FrequentistEffect>),
    /// From [`Bayesian`].
    Bayesian(Comparison<BayesianEffect>),
    /// From [`TwoProportionZTest`].
    TwoProportionZ(ZTestComparison),
}

/// A treatment arm compared with the control arm.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison<E> {
    /// The method and its parameters.
    pub method: Method,
    /// The control arm's statistics.
    pub control: ArmSummary,
    /// The treatment arm's statistics.
    pub treatment: ArmSummary,
    /// Whether CUPED was applied, and its θ.
    pub cuped: Cuped,
    /// `treatment − control` (of the CUPED-adjusted means when CUPED applies).
    pub absolute: Estimate<E>,
    /// `(treatment − control) / control`, the denominator being the unadjusted control mean.
    pub relative: Estimate<E>,
}

/// Which lift: gbstats' `difference_type` (`"scaled"` is not supported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scale {
    /// `treatment − control`.
    Absolute,
    /// `(treatment − control) / control`.
    Relative,
}

pub(crate) fn check_alpha(alpha: f64) -> Result<(), StatsError> {
    if alpha.is_finite() && alpha > 0.0 && alpha < 1.0 {
        Ok(())
    } else {
        Err(StatsError::InvalidAlpha(alpha))
    }
}

/// `Err(NonFinite)` unless every value is finite: the last guard against NaN or infinity leaking.
pub(crate) fn all_finite(values: &[f64]) -> Result<(), NotEnoughData> {
    if values.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(NotEnoughData::NonFinite)
    }
}
