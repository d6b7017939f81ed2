//! Multiple-comparison corrections across variants × metrics.
//!
//! gbstats 0.8.0 corrects nothing itself (GrowthBook's app does, in TypeScript); the adjusted
//! p-values here are those of statsmodels' `multipletests` (`"holm"`, `"fdr_bh"`), which GrowthBook's
//! `adjustPValuesHolmBonferroni` / `adjustPValuesBenjaminiHochberg` agree with, and the adjusted
//! intervals follow GrowthBook's `getAdjustedCI`.

use serde::{Deserialize, Serialize};

use super::dist::normal_quantile;
use super::{FrequentistEffect, Interval, StatsError};

/// A multiple-comparison correction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Correction {
    /// Holm–Bonferroni step-down: controls the family-wise error rate.
    Holm,
    /// Benjamini–Hochberg step-up: controls the false discovery rate (independent or positively
    /// dependent tests).
    BenjaminiHochberg,
}

/// Adjusts a family of p-values (one per variant × metric tested), returned in the input's order.
///
/// - Holm: with `p₍₁₎ ≤ … ≤ p₍ₘ₎`, `p̃₍ᵢ₎ = min(1, maxⱼ≤ᵢ (m − j + 1)·p₍ⱼ₎)`;
/// - Benjamini–Hochberg: `p̃₍ᵢ₎ = min(1, minⱼ≥ᵢ m·p₍ⱼ₎ / j)`.
///
/// Reject the hypotheses whose adjusted p-value is below alpha.
pub fn adjust_p_values(p_values: &[f64], correction: Correction) -> Result<Vec<f64>, StatsError> {
    if let Some(&bad) = p_values.iter().find(|p| !(0.0..=1.0).contains(*p)) {
        return Err(StatsError::InvalidPValue(bad));
    }
    let m = p_values.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p_values[a].total_cmp(&p_values[b]));
    let mut adjusted = vec![0.0; m];
    match correction {
        Correction::Holm => {
            let mut running_max = 0.0_f64;
            for (rank, &i) in order.iter().enumerate() {
                running_max = running_max.max((m - rank) as f64 * p_values[i]);
                adjusted[i] = running_max.min(1.0);
            }
        }
        Correction::BenjaminiHochberg => {
            let mut running_min = f64::INFINITY;
            for (rank, &i) in order.iter().enumerate().rev() {
                running_min = running_min.min(p_values[i] * m as f64 / (rank + 1) as f64);
                adjusted[i] = running_min.min(1.0);
            }
        }
    }
    Ok(adjusted)
}

/// A confidence interval widened for a multiple-comparison correction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AdjustedInterval {
    /// The adjusted interval.
    Bounded(Interval),
    /// The adjusted p-value is (almost) 1: the interval covers every value.
    Unbounded,
}

impl FrequentistEffect {
    /// The confidence interval matching an adjusted p-value, as GrowthBook shows it
    /// (`getAdjustedCI`): the standard error is backed out of the adjusted p-value,
    /// `se' = |Δ| / z_{1 − p̃/2}`, and the interval is `Δ ± z_{1−α/2}·se'` — kept only if it is
    /// wider than the unadjusted one on both sides. An adjusted p-value above 0.999999 gives
    /// [`AdjustedInterval::Unbounded`].
    pub fn adjusted_interval(&self, adjusted_p_value: f64, alpha: f64) -> AdjustedInterval {
        if adjusted_p_value > 0.999_999 {
            return AdjustedInterval::Unbounded;
        }
        let estimate = self.estimate;
        if estimate != 0.0 {
            let std_error = (estimate / normal_quantile(1.0 - adjusted_p_value / 2.0)).abs();
            let widened = Interval::around(estimate, normal_quantile(1.0 - alpha / 2.0) * std_error);
            if widened.lower < self.interval.lower && widened.upper > self.interval.upper {
                return AdjustedInterval::Bounded(widened);
            }
        }
        AdjustedInterval::Bounded(self.interval)
    }
}
