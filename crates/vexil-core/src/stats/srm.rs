//! Sample-ratio mismatch: gbstats' `check_srm` (`gbstats/utils.py`).

use serde::Serialize;

use super::dist::{chi_square_sf, is_positive};
use super::{StatsError, check_alpha};

/// GrowthBook's SRM threshold: a p-value below it flags a mismatch.
pub const DEFAULT_SRM_THRESHOLD: f64 = 0.001;

/// The result of an SRM check.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Srm {
    /// Pearson's `Σ (observed − expected)² / expected` over the arms with a positive weight.
    pub chi_square: f64,
    /// Arms − 1.
    pub degrees_of_freedom: usize,
    /// `P(χ²_df > chi_square)`: 1 when no unit was assigned.
    pub p_value: f64,
    /// The threshold the p-value was compared with.
    pub threshold: f64,
    /// Whether the observed split is implausible under the configured weights
    /// (`p_value < threshold`): the assignment or the tracking is likely broken.
    pub mismatch: bool,
}

/// Checks the units assigned to each arm against the arms' configured weights (any positive scale;
/// they are normalised), flagging a mismatch below [`DEFAULT_SRM_THRESHOLD`].
pub fn srm_check(units: &[u64], weights: &[f64]) -> Result<Srm, StatsError> {
    srm_check_with_threshold(units, weights, DEFAULT_SRM_THRESHOLD)
}

/// [`srm_check`] with another threshold.
///
/// As gbstats, an arm with weight 0 adds nothing to the statistic but still counts in the degrees
/// of freedom.
pub fn srm_check_with_threshold(units: &[u64], weights: &[f64], threshold: f64) -> Result<Srm, StatsError> {
    check_alpha(threshold)?;
    if units.len() != weights.len() || units.len() < 2 {
        return Err(StatsError::SrmShape {
            units: units.len(),
            weights: weights.len(),
        });
    }
    if weights.iter().any(|w| !w.is_finite()) {
        return Err(StatsError::NonFinite("weight"));
    }
    let total_weight: f64 = weights.iter().sum();
    if weights.iter().any(|&w| w < 0.0) || !is_positive(total_weight) {
        return Err(StatsError::InvalidWeights);
    }
    let degrees_of_freedom = units.len() - 1;
    let total: u64 = units.iter().sum();
    if total == 0 {
        return Ok(Srm {
            chi_square: 0.0,
            degrees_of_freedom,
            p_value: 1.0,
            threshold,
            mismatch: false,
        });
    }
    let chi_square: f64 = units
        .iter()
        .zip(weights)
        .filter(|&(_, &w)| w > 0.0)
        .map(|(&observed, &w)| {
            let expected = w / total_weight * total as f64;
            (observed as f64 - expected).powi(2) / expected
        })
        .sum();
    // Always `Some`: the degrees of freedom are at least 1.
    let p_value = chi_square_sf(chi_square, degrees_of_freedom as f64).unwrap_or(1.0);
    Ok(Srm {
        chi_square,
        degrees_of_freedom,
        p_value,
        threshold,
        mismatch: p_value < threshold,
    })
}
