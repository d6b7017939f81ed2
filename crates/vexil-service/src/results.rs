//! Experiment results: an experiment's raw events, aggregated by the store, turned into per-variant
//! statistics and comparisons with the control, by the statistics of
//! [`vexil_core::stats`] (GrowthBook's gbstats).
//!
//! [`experiment_results`] reads the experiment, counts its exposed units per variant
//! ([`EventStore::exposure_counts`](vexil_store::EventStore::exposure_counts)) and each metric's
//! totals per variant ([`EventStore::metric_totals`](vexil_store::EventStore::metric_totals)) over
//! the experiment's window — from when it first started running (`started_at`; from the
//! beginning when it never ran) until it stopped (`stopped_at`; until `now_ms` while it has not) —
//! and compares every weighted variant other than the control with the control, metric by metric.
//!
//! # Defaults (those of gbstats and GrowthBook)
//!
//! - method: [`MethodChoice::Sequential`] (always-valid confidence sequences, tuning parameter
//!   [`DEFAULT_SEQUENTIAL_TUNING`](vexil_core::stats::DEFAULT_SEQUENTIAL_TUNING), safe to look at
//!   every day); [`MethodChoice::FixedHorizon`] is gbstats' Welch t-test (proportions through the
//!   same machinery with their Bernoulli variance), [`MethodChoice::Bayesian`] gbstats' Gaussian
//!   effect model with its default flat prior;
//! - alpha: [`DEFAULT_ALPHA`] (0.05);
//! - correction: [`CorrectionChoice::Holm`], across every (non-control variant × metric) p-value of
//!   the request at once (frequentist methods only);
//! - control: the experiment's first weighted variant;
//! - CUPED: off (`cuped_days` 0); GrowthBook's usual lookback is [`DEFAULT_CUPED_DAYS`].
//!
//! # Which lift decides
//!
//! Each comparison reports the absolute lift (`treatment − control`) and the relative lift
//! (`(treatment − control) / control`). The p-value, the chance to win and the risk are those of
//! the relative lift (GrowthBook's default), or of the absolute lift when the relative one cannot be
//! computed (a control mean of zero); [`VariantComparison::scale`] says which.
//!
//! - Frequentist: `significant` when the (corrected) p-value is below alpha.
//! - Bayesian: `significant` when the chance to win is above `1 − alpha/2` or below `alpha/2`, that
//!   is (with the flat prior) when the `1 − alpha` credible interval of the lift excludes 0. For a
//!   metric where lower is better the chance to win is that of a decrease, and the risk follows.
//!
//! [`VariantComparison::verdict`] then says whether the treatment is significantly better or worse
//! for the metric, taking `lower_is_better` into account.
//!
//! # Not enough data
//!
//! No number is ever NaN or infinite: a lift that cannot be estimated (an arm without units, a metric
//! that does not vary, a zero control mean) is left out and the comparison carries a `note` saying
//! why (it is then neither significant nor a winner). Aggregates the statistics refuse (which the
//! store should never produce: more conversions than units, a non-finite sum) give a comparison
//! with only a note too, rather than failing the whole request. Optional fields are left out of
//! the JSON when absent, so the serialized results contain no `null`.
//!
//! # Units
//!
//! A variant's units are the units exposed to it (and only to it) in the window. A metric's per-unit
//! values are the sums of its events at or after the unit's first exposure (a binomial metric reads
//! whether there was at least one). The metric's statistics use the units of the metric's totals,
//! which the store aggregates over the same exposed units (a variant exposed to some units but absent
//! from the totals counts those units, with no events).
//!
//! # CUPED
//!
//! With `cuped_days > 0` the metric over that many days before each unit's first exposure is the
//! covariate of a regression adjustment (gbstats' `RegressionAdjustedStatistic`, θ pooled over both
//! arms): the unit's pre-period sum for a mean metric, whether it converted in the pre-period for a
//! binomial one. [`VariantComparison::cuped`] says whether it was applied and with which θ.
//!
//! # Errors
//!
//! Status mapping (for the server's error table): [`ResultsError::Invalid`] → gRPC
//! `INVALID_ARGUMENT`, HTTP 400; [`ResultsError::Store`] → the store error's own status (an unknown
//! environment or experiment is [`StoreError::NotFound`] → `NOT_FOUND`, HTTP 404; an unreachable
//! database `UNAVAILABLE`, HTTP 503; …).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use vexil_core::stats::{
    AdjustedInterval, Bayesian, BayesianEffect, Comparison, Correction, Covariate, Cuped, DEFAULT_ALPHA, Estimate,
    FixedHorizon, FrequentistEffect, Method, Metric, NotEnoughData, Sample, Scale, Sequential, Srm, StatsError,
    adjust_p_values, srm_check,
};
use vexil_store::{ExperimentStatus, MetricKind, MetricQuery, MetricRole, Store, StoreError, VariantTotals};

/// GrowthBook's default CUPED lookback, in days, for callers that turn CUPED on.
pub const DEFAULT_CUPED_DAYS: u32 = 14;

const DAY: Duration = Duration::from_secs(86_400);

/// The statistical method of a results request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MethodChoice {
    /// Always-valid confidence sequences ([`Sequential`], gbstats' `SequentialTwoSidedTTest`).
    #[default]
    Sequential,
    /// The fixed-horizon Welch t-test ([`FixedHorizon`], gbstats' `TwoSidedTTest`).
    FixedHorizon,
    /// The Bayesian Gaussian effect model with a flat prior ([`Bayesian`], gbstats'
    /// `EffectBayesianABTest`).
    Bayesian,
}

impl MethodChoice {
    /// The method with its parameters: gbstats' defaults with this `alpha`.
    pub fn method(self, alpha: f64) -> Method {
        match self {
            MethodChoice::Sequential => Method::Sequential(Sequential {
                alpha,
                ..Sequential::default()
            }),
            MethodChoice::FixedHorizon => Method::FixedHorizon(FixedHorizon { alpha }),
            MethodChoice::Bayesian => Method::Bayesian(Bayesian {
                alpha,
                ..Bayesian::default()
            }),
        }
    }
}

/// The multiple-comparison correction of a results request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorrectionChoice {
    /// Holm–Bonferroni (family-wise error rate).
    #[default]
    Holm,
    /// Benjamini–Hochberg (false discovery rate).
    BenjaminiHochberg,
    /// No correction: the adjusted p-values are the p-values.
    None,
}

impl CorrectionChoice {
    fn correction(self) -> Option<Correction> {
        match self {
            CorrectionChoice::Holm => Some(Correction::Holm),
            CorrectionChoice::BenjaminiHochberg => Some(Correction::BenjaminiHochberg),
            CorrectionChoice::None => None,
        }
    }
}

/// How to compute an experiment's results; [`Default`] gives GrowthBook's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ResultsOptions {
    /// The method (default: sequential).
    pub method: MethodChoice,
    /// The significance level, in (0, 1) (default: [`DEFAULT_ALPHA`], 0.05).
    pub alpha: Option<f64>,
    /// The multiple-comparison correction (default: Holm); frequentist methods only.
    pub correction: CorrectionChoice,
    /// The control variant (default: the experiment's first weighted variant).
    pub control: Option<String>,
    /// CUPED's pre-exposure lookback in days (0, the default: no CUPED).
    pub cuped_days: u32,
}

/// Why results could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    /// Reading the experiment or its events failed (an unknown environment or experiment is
    /// [`StoreError::NotFound`]). Mapped as the store error is.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request's options are invalid (alpha outside (0, 1), a control that is not one of the
    /// experiment's weighted variants). gRPC `INVALID_ARGUMENT`, HTTP 400.
    #[error("invalid results request: {0}")]
    Invalid(String),
}

/// An experiment's results.
#[derive(Debug, Clone, Serialize)]
pub struct ExperimentResults {
    /// The environment.
    pub environment: String,
    /// The experiment's key.
    pub experiment: String,
    /// Its lifecycle status.
    pub status: ExperimentStatus,
    /// The events read.
    pub window: Window,
    /// The control variant.
    pub control: String,
    /// The method with all its parameters (`{"method": "sequential", "alpha": …,
    /// "tuning_parameter": …}`). A Bayesian metric where lower is better is compared with
    /// `inverse` set.
    pub method: Method,
    /// The correction applied to the p-values (`none` for the Bayesian method).
    pub correction: CorrectionChoice,
    /// CUPED's lookback in days (0: no CUPED).
    pub cuped_days: u32,
    /// Units exposed to the weighted variants.
    pub total_units: u64,
    /// Units exposed (only) to a variant that is not weighted in the experiment: left out.
    pub other_units: u64,
    /// Exposed units per weighted variant, in the experiment's order.
    pub exposures: Vec<VariantExposure>,
    /// The sample-ratio-mismatch check of the units against the weights; absent unless at least
    /// two variants have units.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub srm: Option<Srm>,
    /// One entry per metric of the experiment, in its order.
    pub metrics: Vec<MetricResult>,
}

/// The time range of the events read (ms since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Window {
    /// From (the experiment's first start; absent: from the beginning).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_ms: Option<i64>,
    /// Until, excluded (when it stopped, or now).
    pub until_ms: i64,
}

/// One weighted variant's exposures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariantExposure {
    /// The variant.
    pub variant: String,
    /// Its configured weight.
    pub weight: u32,
    /// Units exposed to it (and only to it).
    pub units: u64,
    /// Its share of the weights.
    pub expected_share: f64,
    /// Its share of the weighted variants' units (0 without units).
    pub observed_share: f64,
}

/// One metric's results.
#[derive(Debug, Clone, Serialize)]
pub struct MetricResult {
    /// The metric's key.
    pub key: String,
    /// Rate or mean.
    pub kind: MetricKind,
    /// Primary, secondary or guardrail.
    pub role: MetricRole,
    /// Whether a decrease is the improvement.
    pub lower_is_better: bool,
    /// Something about the whole metric, when there is something to say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// One entry per weighted variant, in the experiment's order.
    pub variants: Vec<VariantMetric>,
}

/// One variant's statistics for one metric.
#[derive(Debug, Clone, Serialize)]
pub struct VariantMetric {
    /// The variant.
    pub variant: String,
    /// Its units.
    pub units: u64,
    /// Units with at least one event of the metric after exposure (a binomial metric's
    /// conversions).
    pub conversions: u64,
    /// Sum over units of the unit's value (events without a value count 1).
    pub sum: f64,
    /// Sum over units of the unit's value squared.
    pub sum_squares: f64,
    /// The conversion rate (`conversions / units`) of a binomial metric, the mean value
    /// (`sum / units`) of a mean metric; 0 without units.
    pub mean: f64,
    /// The comparison with the control (absent for the control).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comparison: Option<VariantComparison>,
}

/// A lift and its interval (confidence, always-valid or credible, per the method).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Effect {
    /// The lift.
    pub estimate: f64,
    /// Lower bound of its `1 − alpha` interval.
    pub lower: f64,
    /// Upper bound.
    pub upper: f64,
}

/// What a comparison says about the treatment, for the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Significantly better than the control (`lower_is_better` accounted for).
    Better,
    /// Significantly worse.
    Worse,
    /// Not significant, or not enough data.
    Inconclusive,
}

/// A variant compared with the control on one metric.
#[derive(Debug, Clone, Serialize)]
pub struct VariantComparison {
    /// Whether CUPED was applied, and its θ.
    pub cuped: Cuped,
    /// `treatment − control`, when it can be estimated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub absolute: Option<Effect>,
    /// `(treatment − control) / control`, when it can be estimated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relative: Option<Effect>,
    /// The lift the p-value, the chance to win and the risk are of (relative unless it could not be
    /// estimated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<Scale>,
    /// The two-sided p-value of no difference (frequentist; always-valid for the sequential
    /// method).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p_value: Option<f64>,
    /// The p-value corrected across the request's variants × metrics (frequentist; the p-value
    /// itself without correction).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adjusted_p_value: Option<f64>,
    /// The interval matching the adjusted p-value (GrowthBook's `getAdjustedCI`; frequentist
    /// with a correction).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adjusted_interval: Option<AdjustedInterval>,
    /// The posterior probability that the treatment is better (Bayesian).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chance_to_win: Option<f64>,
    /// The expected loss of choosing the treatment, in units of the lift (Bayesian).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub risk: Option<f64>,
    /// Frequentist: the adjusted p-value is below alpha. Bayesian: the chance to win is above
    /// `1 − alpha/2` or below `alpha/2`.
    pub significant: bool,
    /// Better, worse or inconclusive.
    pub verdict: Verdict,
    /// Why a lift is missing (not enough data), or why the arms could not be compared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Computes an experiment's results (see the module documentation).
///
/// # Errors
///
/// [`ResultsError::Invalid`] for invalid options, [`ResultsError::Store`] when the experiment
/// does not exist or the store fails.
pub async fn experiment_results(
    store: &dyn Store,
    environment: &str,
    key: &str,
    options: &ResultsOptions,
    now_ms: i64,
) -> Result<ExperimentResults, ResultsError> {
    let alpha = options.alpha.unwrap_or(DEFAULT_ALPHA);
    if !(alpha.is_finite() && alpha > 0.0 && alpha < 1.0) {
        return Err(ResultsError::Invalid(format!("alpha must lie in (0, 1), got {alpha}")));
    }
    let method = options.method.method(alpha);
    let correction = match method {
        Method::Bayesian(_) => CorrectionChoice::None,
        _ => options.correction,
    };

    let record = store.get_experiment(environment.to_owned(), key.to_owned()).await?;
    let definition = &record.definition;
    let weights = &definition.input.weights;
    let control = match &options.control {
        Some(control) if weights.iter().any(|w| &w.variant == control) => control.clone(),
        Some(control) => {
            let known: Vec<&str> = weights.iter().map(|w| w.variant.as_str()).collect();
            return Err(ResultsError::Invalid(format!(
                "the control `{control}` is not one of the experiment's variants ({})",
                known.join(", ")
            )));
        }
        None => match weights.first() {
            Some(w) => w.variant.clone(),
            None => {
                return Err(ResultsError::Invalid(
                    "the experiment has no weighted variant to compare".into(),
                ));
            }
        },
    };

    // In the weights: checked or taken from them above.
    let control_index = weights.iter().position(|w| w.variant == control).unwrap_or(0);

    let window = Window {
        from_ms: definition.started_at,
        until_ms: definition.stopped_at.unwrap_or(now_ms),
    };
    let covariate_window = (options.cuped_days > 0).then(|| DAY * options.cuped_days);
    let counts = store
        .exposure_counts(
            environment.to_owned(),
            key.to_owned(),
            window.from_ms,
            Some(window.until_ms),
        )
        .await?;
    // One metric after the other: each is a scan of the metric's events, and running them at once
    // would take as many of the pool's connections from the request path's writers.
    let mut metric_totals = Vec::with_capacity(definition.input.metrics.len());
    for metric in &definition.input.metrics {
        metric_totals.push(
            store
                .metric_totals(MetricQuery {
                    environment: environment.to_owned(),
                    experiment: key.to_owned(),
                    metric: metric.key.clone(),
                    from_ms: window.from_ms,
                    until_ms: Some(window.until_ms),
                    covariate_window,
                })
                .await?,
        );
    }

    // Exposures and the SRM check.
    let units: Vec<u64> = weights
        .iter()
        .map(|w| counts.iter().find(|c| c.variant == w.variant).map_or(0, |c| c.units))
        .collect();
    let total_units: u64 = units.iter().sum();
    let other_units = counts
        .iter()
        .filter(|c| !weights.iter().any(|w| w.variant == c.variant))
        .map(|c| c.units)
        .sum();
    let total_weight: f64 = weights.iter().map(|w| f64::from(w.weight)).sum();
    let exposures = weights
        .iter()
        .zip(&units)
        .map(|(w, &units)| VariantExposure {
            variant: w.variant.clone(),
            weight: w.weight,
            units,
            expected_share: share(f64::from(w.weight), total_weight),
            observed_share: share(units as f64, total_units as f64),
        })
        .collect();
    let srm = if units.iter().filter(|&&u| u > 0).count() >= 2 {
        let weights: Vec<f64> = weights.iter().map(|w| f64::from(w.weight)).collect();
        srm_check(&units, &weights).ok()
    } else {
        None
    };

    // Each metric, each variant against the control.
    let mut metrics = Vec::with_capacity(definition.input.metrics.len());
    let mut tested: Vec<Tested> = Vec::new();
    for (m, (spec, totals)) in definition.input.metrics.iter().zip(&metric_totals).enumerate() {
        let cuped = covariate_window.is_some();
        let note: Option<String> = None;
        let arms: Vec<Arm> = weights
            .iter()
            .zip(&units)
            .map(|(w, &exposed)| Arm::new(spec.kind, cuped, &w.variant, exposed, totals))
            .collect();
        let control_arm = arms[control_index].sample;
        let mut variants = Vec::with_capacity(arms.len());
        for (v, arm) in arms.iter().enumerate() {
            let comparison = (v != control_index).then(|| {
                let (comparison, decision) = compare(method, spec.lower_is_better, alpha, &control_arm, &arm.sample);
                if let Some(effect) = decision {
                    tested.push(Tested {
                        metric: m,
                        variant: v,
                        effect,
                        lower_is_better: spec.lower_is_better,
                    });
                }
                comparison
            });
            variants.push(VariantMetric {
                variant: arm.variant.clone(),
                units: arm.sample.units,
                conversions: arm.conversions,
                sum: arm.sum,
                sum_squares: arm.sum_squares,
                mean: arm.mean,
                comparison,
            });
        }
        metrics.push(MetricResult {
            key: spec.key.clone(),
            kind: spec.kind,
            role: spec.role,
            lower_is_better: spec.lower_is_better,
            note,
            variants,
        });
    }

    // The frequentist p-values, corrected together.
    let p_values: Vec<f64> = tested.iter().map(|t| t.effect.p_value).collect();
    let adjusted = match correction.correction() {
        Some(c) => adjust_p_values(&p_values, c).unwrap_or_else(|_| p_values.clone()),
        None => p_values.clone(),
    };
    for (t, adjusted) in tested.iter().zip(adjusted) {
        let Some(comparison) = metrics[t.metric].variants[t.variant].comparison.as_mut() else {
            continue;
        };
        comparison.adjusted_p_value = Some(adjusted);
        if correction.correction().is_some() {
            comparison.adjusted_interval = Some(t.effect.adjusted_interval(adjusted, alpha));
        }
        comparison.significant = adjusted < alpha;
        comparison.verdict = if !comparison.significant || t.effect.estimate == 0.0 {
            Verdict::Inconclusive
        } else if (t.effect.estimate > 0.0) != t.lower_is_better {
            Verdict::Better
        } else {
            Verdict::Worse
        };
    }

    Ok(ExperimentResults {
        environment: environment.to_owned(),
        experiment: key.to_owned(),
        status: definition.status,
        window,
        control,
        method,
        correction,
        cuped_days: options.cuped_days,
        total_units,
        other_units,
        exposures,
        srm,
        metrics,
    })
}

/// `part / whole`, 0 when the whole is 0.
fn share(part: f64, whole: f64) -> f64 {
    if whole > 0.0 { part / whole } else { 0.0 }
}

/// A frequentist comparison awaiting its corrected p-value.
struct Tested {
    metric: usize,
    variant: usize,
    /// The deciding lift.
    effect: FrequentistEffect,
    lower_is_better: bool,
}

/// One variant's aggregates for one metric.
struct Arm {
    variant: String,
    sample: Sample,
    conversions: u64,
    sum: f64,
    sum_squares: f64,
    mean: f64,
}

impl Arm {
    /// The variant's totals for the metric, or its exposed units without events when the store has
    /// none for it.
    fn new(kind: MetricKind, cuped: bool, variant: &str, exposed: u64, totals: &[VariantTotals]) -> Arm {
        let totals = totals
            .iter()
            .find(|t| t.variant == variant)
            .cloned()
            .unwrap_or_else(|| VariantTotals {
                variant: variant.to_owned(),
                units: exposed,
                ..VariantTotals::default()
            });
        let units = totals.units;
        let mut sample = match kind {
            MetricKind::Binomial => Sample::proportion(units, totals.converted),
            MetricKind::Mean => Sample::mean(units, totals.sum, totals.sum_squares),
        };
        if cuped {
            // The pre-period covariate of a rate is whether the unit converted before exposure
            // (gbstats: a ProportionStatistic before and after); of a mean, its pre-period sum.
            let covariate = match kind {
                MetricKind::Binomial => Covariate {
                    pre: Metric::Proportion {
                        conversions: totals.pre_converted,
                    },
                    sum_products: totals.both_converted as f64,
                },
                MetricKind::Mean => Covariate {
                    pre: Metric::Mean {
                        sum: totals.covariate_sum,
                        sum_squares: totals.covariate_sum_squares,
                    },
                    sum_products: totals.cross_sum,
                },
            };
            sample = sample.with_covariate(covariate);
        }
        let numerator = match kind {
            MetricKind::Binomial => totals.converted as f64,
            MetricKind::Mean => totals.sum,
        };
        Arm {
            variant: totals.variant,
            sample,
            conversions: totals.converted,
            sum: totals.sum,
            sum_squares: totals.sum_squares,
            mean: finite_or_zero(share(numerator, units as f64)),
        }
    }
}

fn finite_or_zero(x: f64) -> f64 {
    if x.is_finite() { x } else { 0.0 }
}

/// Compares one treatment with the control: the comparison (its significance still to be decided
/// for a frequentist method, after the correction) and the frequentist effect that decides it.
fn compare(
    method: Method,
    lower_is_better: bool,
    alpha: f64,
    control: &Sample,
    treatment: &Sample,
) -> (VariantComparison, Option<FrequentistEffect>) {
    let compared = match method {
        Method::FixedHorizon(m) => m.compare(control, treatment).map(frequentist),
        Method::Sequential(m) => m.compare(control, treatment).map(frequentist),
        Method::Bayesian(m) => Bayesian {
            inverse: lower_is_better,
            ..m
        }
        .compare(control, treatment)
        .map(|c| (bayesian(c, alpha), None)),
        // Not offered by `MethodChoice`; compared as a fixed-horizon test would be.
        Method::TwoProportionZ(m) => FixedHorizon { alpha: m.alpha }
            .compare(control, treatment)
            .map(frequentist),
    };
    compared.unwrap_or_else(|e| (not_compared(&e), None))
}

fn not_compared(e: &StatsError) -> VariantComparison {
    VariantComparison {
        cuped: Cuped::NotRequested,
        absolute: None,
        relative: None,
        scale: None,
        p_value: None,
        adjusted_p_value: None,
        adjusted_interval: None,
        chance_to_win: None,
        risk: None,
        significant: false,
        verdict: Verdict::Inconclusive,
        note: Some(format!("the variants cannot be compared: {e}")),
    }
}

fn frequentist(c: Comparison<FrequentistEffect>) -> (VariantComparison, Option<FrequentistEffect>) {
    let absolute = usable(c.absolute);
    let relative = usable(c.relative);
    let decision = decide(&absolute, &relative);
    let comparison = VariantComparison {
        cuped: c.cuped,
        absolute: absolute.as_ref().ok().map(Lift::effect),
        relative: relative.as_ref().ok().map(Lift::effect),
        scale: decision.map(|(scale, _)| scale),
        p_value: decision.map(|(_, e)| e.p_value),
        adjusted_p_value: None,
        adjusted_interval: None,
        chance_to_win: None,
        risk: None,
        significant: false,
        verdict: Verdict::Inconclusive,
        note: note(&absolute, &relative),
    };
    (comparison, decision.map(|(_, e)| e))
}

fn bayesian(c: Comparison<BayesianEffect>, alpha: f64) -> VariantComparison {
    let absolute = usable(c.absolute);
    let relative = usable(c.relative);
    let decision = decide(&absolute, &relative);
    let chance_to_win = decision.map(|(_, e)| e.chance_to_win);
    let (significant, verdict) = match chance_to_win {
        Some(p) if p > 1.0 - alpha / 2.0 => (true, Verdict::Better),
        Some(p) if p < alpha / 2.0 => (true, Verdict::Worse),
        _ => (false, Verdict::Inconclusive),
    };
    VariantComparison {
        cuped: c.cuped,
        absolute: absolute.as_ref().ok().map(Lift::effect),
        relative: relative.as_ref().ok().map(Lift::effect),
        scale: decision.map(|(scale, _)| scale),
        p_value: None,
        adjusted_p_value: None,
        adjusted_interval: None,
        chance_to_win,
        risk: decision.map(|(_, e)| e.risk.treatment),
        significant,
        verdict,
        note: note(&absolute, &relative),
    }
}

/// An effect whose numbers are all finite (the core guarantees it; checked again so that no NaN
/// can reach a response).
fn usable<E: Lift>(estimate: Estimate<E>) -> Estimate<E> {
    let e = estimate?;
    if e.numbers().iter().all(|x| x.is_finite()) {
        Ok(e)
    } else {
        Err(NotEnoughData::NonFinite)
    }
}

/// The lift that decides: the relative one, else the absolute one.
fn decide<E: Copy>(absolute: &Estimate<E>, relative: &Estimate<E>) -> Option<(Scale, E)> {
    match (relative, absolute) {
        (Ok(e), _) => Some((Scale::Relative, *e)),
        (Err(_), Ok(e)) => Some((Scale::Absolute, *e)),
        (Err(_), Err(_)) => None,
    }
}

/// What the results take of the core's effects.
trait Lift {
    fn effect(&self) -> Effect;
    /// Every number reported from it.
    fn numbers(&self) -> Vec<f64>;
}

impl Lift for FrequentistEffect {
    fn effect(&self) -> Effect {
        Effect {
            estimate: self.estimate,
            lower: self.interval.lower,
            upper: self.interval.upper,
        }
    }

    fn numbers(&self) -> Vec<f64> {
        vec![self.estimate, self.interval.lower, self.interval.upper, self.p_value]
    }
}

impl Lift for BayesianEffect {
    fn effect(&self) -> Effect {
        Effect {
            estimate: self.estimate,
            lower: self.interval.lower,
            upper: self.interval.upper,
        }
    }

    fn numbers(&self) -> Vec<f64> {
        vec![
            self.estimate,
            self.interval.lower,
            self.interval.upper,
            self.chance_to_win,
            self.risk.treatment,
        ]
    }
}

/// Why a lift is missing, if one is.
fn note<E>(absolute: &Estimate<E>, relative: &Estimate<E>) -> Option<String> {
    match (absolute, relative) {
        (Ok(_), Ok(_)) => None,
        (Err(a), Err(r)) if a == r => Some(format!("not enough data: {a}")),
        (Err(a), Err(r)) => Some(format!("not enough data: absolute lift: {a}; relative lift: {r}")),
        (Ok(_), Err(r)) => Some(format!("no relative lift: {r}")),
        (Err(a), Ok(_)) => Some(format!("no absolute lift: {a}")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use serde_json::{Map, json};
    use vexil_core::stats::{Bayesian, FixedHorizon, Sample, Scale};
    use vexil_store::{
        Actor, EnvironmentInput, EventKind, EventStore, ExperimentInput, ExperimentStatus, FlagInput, FlagSetInput,
        MetricKind, MetricRole, MetricSpec, NewEvent, Precondition, SqlStore, Store, VariantWeight,
    };

    use super::*;

    const HOUR: i64 = 3_600_000;
    const DAY_MS: i64 = 86_400_000;

    /// A SQLite store with environment `prod`, flag set `web`, flag `checkout-flag` (variants
    /// `control`, `treatment`) and the running experiment `checkout` on it.
    struct Fixture {
        store: SqlStore,
        _file: vexil_testkit::TestSqlite,
        /// When the experiment started.
        started: i64,
    }

    impl Fixture {
        /// "Now" for the results: a day after the start.
        fn now(&self) -> i64 {
            self.started + DAY_MS
        }

        async fn insert(&self, events: Vec<NewEvent>) {
            self.store.insert_events(events).await.expect("insert events");
        }

        async fn results(&self, options: &ResultsOptions) -> ExperimentResults {
            experiment_results(&self.store, "prod", "checkout", options, self.now())
                .await
                .expect("results")
        }
    }

    fn actor() -> Actor {
        Actor::new("test")
    }

    fn metric(key: &str, kind: MetricKind, lower_is_better: bool) -> MetricSpec {
        MetricSpec {
            key: key.into(),
            kind,
            role: MetricRole::Primary,
            lower_is_better,
        }
    }

    async fn fixture(metrics: Vec<MetricSpec>) -> Fixture {
        let file = vexil_testkit::sqlite();
        let store = SqlStore::open(file.url()).await.expect("open sqlite store");
        store
            .create_environment(actor(), "prod".into(), EnvironmentInput::default())
            .await
            .unwrap();
        store
            .put_flag_set(
                actor(),
                "prod".into(),
                "web".into(),
                FlagSetInput::default(),
                Precondition::Absent,
            )
            .await
            .unwrap();
        let flag = json!({
            "state": "ENABLED",
            "variants": {"control": false, "treatment": true},
            "defaultVariant": "control"
        });
        store
            .put_flag(
                actor(),
                "prod".into(),
                "web".into(),
                "checkout-flag".into(),
                FlagInput::new(flag),
                Precondition::Any,
            )
            .await
            .unwrap();
        let input = ExperimentInput {
            flag: "checkout-flag".into(),
            name: "Checkout".into(),
            description: String::new(),
            hypothesis: String::new(),
            audience: None,
            traffic_percent: 100.0,
            weights: vec![
                VariantWeight {
                    variant: "control".into(),
                    weight: 1,
                },
                VariantWeight {
                    variant: "treatment".into(),
                    weight: 1,
                },
            ],
            metrics,
            salt: None,
            layer: None,
        };
        store
            .put_experiment(
                actor(),
                "prod".into(),
                "web".into(),
                "checkout".into(),
                input,
                Precondition::Any,
            )
            .await
            .unwrap();
        let running = store
            .transition_experiment(
                actor(),
                "prod".into(),
                "checkout".into(),
                ExperimentStatus::Running,
                None,
                Precondition::Any,
            )
            .await
            .unwrap();
        let started = running
            .value
            .definition
            .started_at
            .expect("a running experiment has started");
        Fixture {
            store,
            _file: file,
            started,
        }
    }

    fn next_id() -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        format!("ev-{}", NEXT.fetch_add(1, Ordering::Relaxed))
    }

    fn event(kind: EventKind, unit: &str, at: i64) -> NewEvent {
        NewEvent {
            environment: "prod".into(),
            event_id: next_id(),
            kind,
            unit: unit.into(),
            flag: None,
            experiment: None,
            variant: None,
            metric: None,
            value: None,
            properties: Map::new(),
            client_time_ms: None,
            server_time_ms: at,
        }
    }

    fn exposure(unit: &str, variant: &str, at: i64) -> NewEvent {
        NewEvent {
            flag: Some("checkout-flag".into()),
            experiment: Some("checkout".into()),
            variant: Some(variant.into()),
            ..event(EventKind::Exposure, unit, at)
        }
    }

    fn conversion(unit: &str, metric: &str, value: Option<f64>, at: i64) -> NewEvent {
        NewEvent {
            metric: Some(metric.into()),
            value,
            ..event(EventKind::Conversion, unit, at)
        }
    }

    /// `units` units of `variant` exposed 10 ms after the start; those for which `converts` holds
    /// convert on `metric` 10 ms later.
    fn arm(f: &Fixture, variant: &str, units: usize, metric: &str, converts: impl Fn(usize) -> bool) -> Vec<NewEvent> {
        let mut events = Vec::new();
        for i in 0..units {
            let unit = format!("{variant}-{i}");
            events.push(exposure(&unit, variant, f.started + 10));
            if converts(i) {
                events.push(conversion(&unit, metric, None, f.started + 20));
            }
        }
        events
    }

    /// 4,000 units per arm: control converts 10 % (every 10th unit), treatment 14 % (7 of every
    /// 50).
    async fn planted(f: &Fixture, metric: &str) {
        f.insert(arm(f, "control", 4000, metric, |i| i % 10 == 0)).await;
        f.insert(arm(f, "treatment", 4000, metric, |i| i % 50 < 7)).await;
    }

    fn comparison<'a>(results: &'a ExperimentResults, metric: usize, variant: &str) -> &'a VariantComparison {
        results.metrics[metric]
            .variants
            .iter()
            .find(|v| v.variant == variant)
            .and_then(|v| v.comparison.as_ref())
            .unwrap_or_else(|| panic!("no comparison for {variant}"))
    }

    fn variant<'a>(results: &'a ExperimentResults, metric: usize, variant: &str) -> &'a VariantMetric {
        results.metrics[metric]
            .variants
            .iter()
            .find(|v| v.variant == variant)
            .unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    /// The serialized results: never NaN (serde_json writes it as `null`), never `null`.
    fn json_of(results: &ExperimentResults) -> String {
        let json = serde_json::to_string(results).unwrap();
        assert!(!json.contains("null"), "{json}");
        assert!(!json.contains("NaN") && !json.contains("inf"), "{json}");
        json
    }

    #[tokio::test]
    async fn a_planted_effect_is_found() {
        let f = fixture(vec![metric("purchase", MetricKind::Binomial, false)]).await;
        planted(&f, "purchase").await;
        let results = f.results(&ResultsOptions::default()).await;
        json_of(&results);
        assert_eq!(results.control, "control");
        assert_eq!(results.status, ExperimentStatus::Running);
        assert_eq!(results.window.from_ms, Some(f.started));
        assert_eq!(results.window.until_ms, f.now());
        assert_eq!(results.total_units, 8000);
        assert_eq!(results.other_units, 0);
        for e in &results.exposures {
            assert_eq!(e.units, 4000);
            assert!(close(e.expected_share, 0.5) && close(e.observed_share, 0.5), "{e:?}");
        }
        assert!(!results.srm.unwrap().mismatch);

        let control = variant(&results, 0, "control");
        assert!(control.comparison.is_none(), "the control has no comparison");
        assert_eq!((control.units, control.conversions), (4000, 400));
        assert!(close(control.mean, 0.1));
        let treatment = variant(&results, 0, "treatment");
        assert_eq!((treatment.units, treatment.conversions), (4000, 560));
        assert!(close(treatment.mean, 0.14));

        let c = comparison(&results, 0, "treatment");
        let relative = c.relative.unwrap();
        assert!(close(relative.estimate, 0.4), "{relative:?}");
        assert!(
            relative.lower > 0.0 && relative.upper > relative.estimate,
            "{relative:?}"
        );
        let absolute = c.absolute.unwrap();
        assert!(close(absolute.estimate, 0.04), "{absolute:?}");
        assert!(absolute.lower > 0.0);
        assert_eq!(c.scale, Some(Scale::Relative));
        let p = c.p_value.unwrap();
        assert!(p < 0.001, "{p}");
        // One test in the family: Holm leaves it as is.
        assert_eq!(c.adjusted_p_value, Some(p));
        assert!(c.significant);
        assert_eq!(c.verdict, Verdict::Better);
        assert_eq!(c.cuped, Cuped::NotRequested);
        assert!(c.note.is_none() && c.chance_to_win.is_none() && c.risk.is_none());

        // The other way round: the treatment as control.
        let reversed = f
            .results(&ResultsOptions {
                control: Some("treatment".into()),
                ..ResultsOptions::default()
            })
            .await;
        assert_eq!(reversed.control, "treatment");
        assert!(variant(&reversed, 0, "treatment").comparison.is_none());
        let c = comparison(&reversed, 0, "control");
        assert!(close(c.relative.unwrap().estimate, 0.1 / 0.14 - 1.0));
        assert!(c.relative.unwrap().upper < 0.0);
        assert_eq!(c.verdict, Verdict::Worse);
    }

    #[tokio::test]
    async fn an_a_a_test_is_not_significant() {
        let f = fixture(vec![metric("purchase", MetricKind::Binomial, false)]).await;
        f.insert(arm(&f, "control", 4000, "purchase", |i| i % 10 == 0)).await;
        f.insert(arm(&f, "treatment", 4000, "purchase", |i| i % 10 == 3)).await;
        for method in [
            MethodChoice::Sequential,
            MethodChoice::FixedHorizon,
            MethodChoice::Bayesian,
        ] {
            let results = f
                .results(&ResultsOptions {
                    method,
                    ..ResultsOptions::default()
                })
                .await;
            json_of(&results);
            let c = comparison(&results, 0, "treatment");
            let relative = c.relative.unwrap();
            assert!(close(relative.estimate, 0.0), "{method:?}: {relative:?}");
            assert!(relative.lower < 0.0 && relative.upper > 0.0, "{method:?}: {relative:?}");
            assert!(!c.significant, "{method:?}");
            assert_eq!(c.verdict, Verdict::Inconclusive);
            if method == MethodChoice::Bayesian {
                assert!(close(c.chance_to_win.unwrap(), 0.5));
            } else {
                assert!(c.p_value.unwrap() > 0.99, "{method:?}: {c:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_mean_metric_reads_exact_sums() {
        let f = fixture(vec![metric("revenue", MetricKind::Mean, false)]).await;
        let s = f.started;
        let mut events = Vec::new();
        for i in 0..10 {
            events.push(exposure(&format!("c{i}"), "control", s + 100));
            events.push(exposure(&format!("t{i}"), "treatment", s + 100));
        }
        let buys: [(&str, f64); 8] = [
            ("c0", 10.0),
            ("c1", 20.0),
            ("c1", 5.0), // c1's value is 25
            ("c2", 30.0),
            ("t0", 40.0),
            ("t1", 15.0),
            ("t2", 15.0),
            ("t3", 30.0),
        ];
        for (unit, value) in buys {
            events.push(conversion(unit, "revenue", Some(value), s + 200));
        }
        // Before the unit's exposure, and after the window: not counted.
        events.push(conversion("c3", "revenue", Some(1000.0), s + 50));
        events.push(conversion("t4", "revenue", Some(1000.0), f.now() + 1));
        // Another metric.
        events.push(conversion("t5", "other", Some(1000.0), s + 200));
        f.insert(events).await;

        let options = ResultsOptions {
            method: MethodChoice::FixedHorizon,
            ..ResultsOptions::default()
        };
        let results = f.results(&options).await;
        json_of(&results);
        let control = variant(&results, 0, "control");
        assert_eq!((control.units, control.conversions), (10, 3));
        assert!(close(control.sum, 65.0) && close(control.sum_squares, 1625.0));
        assert!(close(control.mean, 6.5));
        let treatment = variant(&results, 0, "treatment");
        assert_eq!((treatment.units, treatment.conversions), (10, 4));
        assert!(close(treatment.sum, 100.0) && close(treatment.sum_squares, 2950.0));
        assert!(close(treatment.mean, 10.0));

        let c = comparison(&results, 0, "treatment");
        let absolute = c.absolute.unwrap();
        assert!(close(absolute.estimate, 3.5), "{absolute:?}");
        assert!(close(c.relative.unwrap().estimate, 3.5 / 6.5));
        // The interval and p-value are the core's on the hand-computed sums.
        let expected = FixedHorizon::default()
            .compare(&Sample::mean(10, 65.0, 1625.0), &Sample::mean(10, 100.0, 2950.0))
            .unwrap();
        let by_hand = expected.absolute.unwrap();
        assert!(close(absolute.lower, by_hand.interval.lower) && close(absolute.upper, by_hand.interval.upper));
        assert!(close(c.p_value.unwrap(), expected.relative.unwrap().p_value));
        assert!(!c.significant);
    }

    #[tokio::test]
    async fn p_values_are_corrected_across_variants_and_metrics() {
        let f = fixture(vec![
            metric("purchase", MetricKind::Binomial, false),
            metric("clicks", MetricKind::Binomial, false),
        ])
        .await;
        planted(&f, "purchase").await;
        let s = f.started;
        let mut clicks = Vec::new();
        for i in 0..4000 {
            if i % 10 == 0 {
                clicks.push(conversion(&format!("control-{i}"), "clicks", None, s + 30));
            }
            if i % 100 < 11 {
                clicks.push(conversion(&format!("treatment-{i}"), "clicks", None, s + 30));
            }
        }
        f.insert(clicks).await;
        for (choice, correction) in [
            (CorrectionChoice::Holm, Some(Correction::Holm)),
            (CorrectionChoice::BenjaminiHochberg, Some(Correction::BenjaminiHochberg)),
            (CorrectionChoice::None, None),
        ] {
            let results = f
                .results(&ResultsOptions {
                    method: MethodChoice::FixedHorizon,
                    correction: choice,
                    ..ResultsOptions::default()
                })
                .await;
            json_of(&results);
            assert_eq!(results.correction, choice);
            let family = [
                comparison(&results, 0, "treatment"),
                comparison(&results, 1, "treatment"),
            ];
            let raw: Vec<f64> = family.iter().map(|c| c.p_value.unwrap()).collect();
            let expected = match correction {
                Some(c) => adjust_p_values(&raw, c).unwrap(),
                None => raw.clone(),
            };
            for (c, expected) in family.iter().zip(expected) {
                assert_eq!(c.adjusted_p_value, Some(expected), "{choice:?}");
                assert_eq!(c.significant, expected < DEFAULT_ALPHA);
                assert_eq!(c.adjusted_interval.is_some(), correction.is_some());
            }
            assert!(family[0].significant);
            assert!(!family[1].significant);
            if correction.is_some() {
                // The smaller of two p-values is doubled by either correction.
                assert!(close(
                    family[0].adjusted_p_value.unwrap(),
                    2.0 * family[0].p_value.unwrap()
                ));
            }
        }
    }

    #[tokio::test]
    async fn a_sample_ratio_mismatch_is_flagged() {
        for (control, treatment, mismatch) in [(5000, 4000, true), (5000, 5010, false)] {
            let f = fixture(vec![metric("purchase", MetricKind::Binomial, false)]).await;
            f.insert(arm(&f, "control", control, "purchase", |_| false)).await;
            f.insert(arm(&f, "treatment", treatment, "purchase", |_| false)).await;
            let results = f.results(&ResultsOptions::default()).await;
            json_of(&results);
            let srm = results.srm.unwrap();
            assert_eq!(srm.mismatch, mismatch, "{control} vs {treatment}: {srm:?}");
            let total = (control + treatment) as f64;
            assert!(close(results.exposures[0].observed_share, control as f64 / total));
            assert!(close(results.exposures[1].expected_share, 0.5));
        }
    }

    #[tokio::test]
    async fn not_enough_data_gives_notes_and_no_nan() {
        let f = fixture(vec![
            metric("purchase", MetricKind::Binomial, false),
            metric("revenue", MetricKind::Mean, false),
        ])
        .await;
        // No events at all.
        let results = f.results(&ResultsOptions::default()).await;
        let json = json_of(&results);
        assert!(json.contains("\"note\""), "{json}");
        assert!(results.srm.is_none());
        assert_eq!(results.total_units, 0);
        for e in &results.exposures {
            assert_eq!((e.units, e.observed_share), (0, 0.0));
        }
        for m in 0..2 {
            let v = variant(&results, m, "treatment");
            assert_eq!((v.units, v.mean), (0, 0.0));
            let c = comparison(&results, m, "treatment");
            assert!(c.note.as_deref().unwrap().contains("no units"), "{c:?}");
            assert!(c.absolute.is_none() && c.relative.is_none() && c.p_value.is_none());
            assert!(!c.significant);
            assert_eq!(c.verdict, Verdict::Inconclusive);
        }

        // One arm only: no SRM result.
        f.insert(arm(&f, "control", 3, "purchase", |_| true)).await;
        let results = f.results(&ResultsOptions::default()).await;
        json_of(&results);
        assert!(results.srm.is_none());

        // Units on both sides but nothing varies.
        f.insert(arm(&f, "treatment", 3, "purchase", |_| false)).await;
        for method in [
            MethodChoice::Sequential,
            MethodChoice::FixedHorizon,
            MethodChoice::Bayesian,
        ] {
            let results = f
                .results(&ResultsOptions {
                    method,
                    cuped_days: 7,
                    ..ResultsOptions::default()
                })
                .await;
            json_of(&results);
            assert!(!results.srm.unwrap().mismatch);
            for m in 0..2 {
                assert_eq!(variant(&results, m, "treatment").units, 3);
                let c = comparison(&results, m, "treatment");
                assert!(c.note.as_deref().unwrap().contains("not enough data"), "{c:?}");
                assert!(c.p_value.is_none() && c.chance_to_win.is_none());
                assert!(!c.significant);
            }
        }
    }

    #[tokio::test]
    async fn invalid_options_are_refused() {
        let f = fixture(vec![metric("purchase", MetricKind::Binomial, false)]).await;
        for alpha in [1.5, 0.0, 1.0, -0.1, f64::NAN] {
            let options = ResultsOptions {
                alpha: Some(alpha),
                ..ResultsOptions::default()
            };
            let e = experiment_results(&f.store, "prod", "checkout", &options, f.now()).await;
            assert!(matches!(e, Err(ResultsError::Invalid(_))), "{alpha}: {e:?}");
        }
        let options = ResultsOptions {
            control: Some("nope".into()),
            ..ResultsOptions::default()
        };
        let e = experiment_results(&f.store, "prod", "checkout", &options, f.now()).await;
        assert!(
            matches!(&e, Err(ResultsError::Invalid(m)) if m.contains("nope")),
            "{e:?}"
        );
        let e = experiment_results(&f.store, "prod", "nope", &ResultsOptions::default(), f.now()).await;
        assert!(matches!(e, Err(ResultsError::Store(StoreError::NotFound(_)))), "{e:?}");
    }

    #[tokio::test]
    async fn the_bayesian_method_gives_chances_to_win() {
        let f = fixture(vec![
            metric("purchase", MetricKind::Binomial, false),
            metric("errors", MetricKind::Binomial, true),
        ])
        .await;
        planted(&f, "purchase").await;
        let s = f.started;
        let errors = (0..4000)
            .filter(|i| i % 50 < 7)
            .map(|i| conversion(&format!("treatment-{i}"), "errors", None, s + 30))
            .chain(
                (0..4000)
                    .filter(|i| i % 10 == 0)
                    .map(|i| conversion(&format!("control-{i}"), "errors", None, s + 30)),
            );
        f.insert(errors.collect()).await;
        let results = f
            .results(&ResultsOptions {
                method: MethodChoice::Bayesian,
                ..ResultsOptions::default()
            })
            .await;
        let json = json_of(&results);
        assert!(json.contains("\"method\":\"bayesian\""), "{json}");
        assert_eq!(results.method, Method::Bayesian(Bayesian::default()));
        assert_eq!(results.correction, CorrectionChoice::None);

        let c = comparison(&results, 0, "treatment");
        assert!(c.chance_to_win.unwrap() > 0.999, "{c:?}");
        assert!(c.risk.unwrap() < 1e-4, "{c:?}");
        assert!(close(c.relative.unwrap().estimate, 0.4));
        assert!(c.relative.unwrap().lower > 0.0);
        assert!(c.p_value.is_none() && c.adjusted_p_value.is_none());
        assert!(c.significant);
        assert_eq!(c.verdict, Verdict::Better);

        // More errors is worse.
        let c = comparison(&results, 1, "treatment");
        assert!(c.chance_to_win.unwrap() < 0.001, "{c:?}");
        assert!(c.risk.unwrap() > 0.2, "{c:?}");
        assert!(c.significant);
        assert_eq!(c.verdict, Verdict::Worse);
    }

    #[tokio::test]
    async fn the_method_and_its_parameters_are_reported() {
        let f = fixture(vec![metric("purchase", MetricKind::Binomial, false)]).await;
        let results = f.results(&ResultsOptions::default()).await;
        let json = json_of(&results);
        assert!(json.contains("\"method\":\"sequential\""), "{json}");
        assert!(json.contains("\"tuning_parameter\":5000"), "{json}");
        assert!(json.contains("\"alpha\":0.05"), "{json}");
        assert!(json.contains("\"correction\":\"holm\""), "{json}");
        assert_eq!(results.method, Method::Sequential(Sequential::default()));

        let results = f
            .results(&ResultsOptions {
                method: MethodChoice::FixedHorizon,
                alpha: Some(0.1),
                ..ResultsOptions::default()
            })
            .await;
        let json = json_of(&results);
        assert!(
            json.contains("\"method\":{\"method\":\"fixed_horizon\",\"alpha\":0.1}"),
            "{json}"
        );
    }

    #[tokio::test]
    async fn cuped_adjusts_mean_metrics() {
        let f = fixture(vec![
            metric("revenue", MetricKind::Mean, false),
            metric("purchase", MetricKind::Binomial, false),
        ])
        .await;
        let s = f.started;
        let mut events = Vec::new();
        for (variant, bump) in [("control", 0.0), ("treatment", 1.0)] {
            for i in 0..200 {
                let unit = format!("{variant}-{i}");
                let pre = (i % 10) as f64 + 1.0;
                // Before the start, within the lookback.
                events.push(conversion(&unit, "revenue", Some(pre), s - 2 * HOUR));
                events.push(exposure(&unit, variant, s + 10));
                let noise = (i % 3) as f64;
                events.push(conversion(&unit, "revenue", Some(pre + bump + noise), s + 20));
            }
        }
        f.insert(events).await;

        let plain = f.results(&ResultsOptions::default()).await;
        let cuped = f
            .results(&ResultsOptions {
                cuped_days: DEFAULT_CUPED_DAYS,
                ..ResultsOptions::default()
            })
            .await;
        json_of(&cuped);
        assert_eq!(cuped.cuped_days, DEFAULT_CUPED_DAYS);
        let before = comparison(&plain, 0, "treatment");
        let after = comparison(&cuped, 0, "treatment");
        assert_eq!(before.cuped, Cuped::NotRequested);
        let Cuped::Applied { theta } = after.cuped else {
            panic!("CUPED not applied: {after:?}");
        };
        assert!(theta > 0.5, "{theta}");
        // The unadjusted means are reported; the adjusted interval is narrower.
        assert!(close(
            variant(&plain, 0, "treatment").mean,
            variant(&cuped, 0, "treatment").mean
        ));
        let width = |e: Effect| e.upper - e.lower;
        assert!(width(after.absolute.unwrap()) < width(before.absolute.unwrap()) / 2.0);
        assert!(after.significant);

        assert!(cuped.metrics[1].note.is_none());
    }

    #[tokio::test]
    async fn cuped_adjusts_binomial_metrics_by_pre_period_conversion() {
        let f = fixture(vec![metric("purchase", MetricKind::Binomial, false)]).await;
        let s = f.started;
        let mut events = Vec::new();
        for variant in ["control", "treatment"] {
            for i in 0..2_000 {
                let unit = format!("{variant}-{i}");
                // Units that bought before exposure mostly buy again; the treatment converts a
                // few more of the others.
                let bought_before = i % 4 == 0;
                if bought_before {
                    events.push(conversion(&unit, "purchase", None, s - 2 * HOUR));
                }
                events.push(exposure(&unit, variant, s + 10));
                let lift = variant == "treatment" && i % 10 == 1;
                if (bought_before && i % 8 != 4) || lift || i % 25 == 3 {
                    events.push(conversion(&unit, "purchase", None, s + 20));
                }
            }
        }
        f.insert(events).await;
        let plain = f.results(&ResultsOptions::default()).await;
        let cuped = f
            .results(&ResultsOptions {
                cuped_days: DEFAULT_CUPED_DAYS,
                ..ResultsOptions::default()
            })
            .await;
        let before = comparison(&plain, 0, "treatment");
        let after = comparison(&cuped, 0, "treatment");
        let Cuped::Applied { theta } = after.cuped else {
            panic!("CUPED not applied: {after:?}");
        };
        // θ = cov(after, before) / var(before) over both arms: about 0.41 here.
        assert!((0.3..0.6).contains(&theta), "{theta}");
        let width = |e: Effect| e.upper - e.lower;
        assert!(
            width(after.absolute.unwrap()) < width(before.absolute.unwrap()) * 0.95,
            "{after:?} vs {before:?}"
        );
        assert!(after.absolute.unwrap().estimate > 0.0);
        // The rates reported are the unadjusted ones.
        assert!(close(
            variant(&plain, 0, "treatment").mean,
            variant(&cuped, 0, "treatment").mean
        ));
    }
}
