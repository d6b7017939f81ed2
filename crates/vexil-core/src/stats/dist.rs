//! The distribution functions the tests need, from `statrs`.

use statrs::distribution::{ChiSquared, Continuous, ContinuousCDF, Normal, StudentsT};

/// `x > 0`, false for NaN.
pub(crate) fn is_positive(x: f64) -> bool {
    x > 0.0
}

fn standard_normal() -> Normal {
    Normal::standard()
}

/// `Φ(x)`.
pub(crate) fn normal_cdf(x: f64) -> f64 {
    standard_normal().cdf(x)
}

/// `1 − Φ(x)`, without cancellation.
pub(crate) fn normal_sf(x: f64) -> f64 {
    standard_normal().sf(x)
}

/// `φ(x)`.
pub(crate) fn normal_pdf(x: f64) -> f64 {
    standard_normal().pdf(x)
}

/// `Φ⁻¹(p)` for `p` in [0, 1] (±∞ at the ends).
pub(crate) fn normal_quantile(p: f64) -> f64 {
    standard_normal().inverse_cdf(p)
}

fn students_t(dof: f64) -> Option<StudentsT> {
    StudentsT::new(0.0, 1.0, dof).ok()
}

/// From this many degrees of freedom on, the t tail comes from Hill's normalising transform:
/// `statrs` evaluates it through the incomplete beta function at `ν/(ν + t²)`, which rounds to 1
/// (its tail is off by 3e-7 at ν = 1e10, by 1e-3 at 1e12), and its quantile search loses accuracy
/// from ν ≈ 1e5 and never returns at 1e8. Below it, `statrs` agrees with scipy to ~1e-11.
const LARGE_DOF: f64 = 1e4;

/// `P(T > x)` for Student's t with `dof` degrees of freedom; `None` unless `dof > 0`.
pub(crate) fn t_sf(x: f64, dof: f64) -> Option<f64> {
    if !is_positive(dof) || x.is_nan() {
        return None;
    }
    if dof < LARGE_DOF {
        return students_t(dof).map(|t| t.sf(x));
    }
    // Hill (1970), ACM Algorithm 395: `z(t)` is a standard normal to O(ν⁻⁴), which gives the tail
    // to ~1e-13 relative for ν ≥ 1e4, t up to 37.
    let a = dof - 0.5;
    let b = 48.0 * a * a;
    let y = a * (x * x / dof).ln_1p();
    let z = (((((-0.4 * y - 3.3) * y - 24.0) * y - 85.5) / (0.8 * y * y + 100.0 + b) + y + 3.0) / b + 1.0) * y.sqrt();
    Some(if x >= 0.0 { normal_sf(z) } else { normal_cdf(z) })
}

/// The `x` with `P(T > x) = tail`, for Student's t with `dof` degrees of freedom and `tail` in
/// (0, 1/2) (the critical value of a two-sided test at `alpha = 2·tail`); `None` outside that.
///
/// A first guess — `statrs` for few degrees of freedom, else the Cornish–Fisher expansion
/// (Abramowitz & Stegun 26.7.5, which errs low by under 1e-7 from 30 degrees of freedom) — is
/// polished by Newton's method on [`t_sf`], so the quantile inverts the tail to rounding. The tail
/// is convex beyond 0, so the iteration converges monotonically.
pub(crate) fn t_upper_quantile(tail: f64, dof: f64) -> Option<f64> {
    let valid = dof > 0.0 && tail > 0.0 && tail < 0.5;
    if !valid {
        return None;
    }
    let t = students_t(dof)?;
    let mut x = if dof < 30.0 {
        t.inverse_cdf(1.0 - tail)
    } else {
        let z = -normal_quantile(tail);
        let z2 = z * z;
        let g1 = z * (z2 + 1.0) / 4.0;
        let g2 = z * ((5.0 * z2 + 16.0) * z2 + 3.0) / 96.0;
        let g3 = z * (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) / 384.0;
        let g4 = z * ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) / 92160.0;
        z + (g1 + (g2 + (g3 + g4 / dof) / dof) / dof) / dof
    };
    if !x.is_finite() {
        return None;
    }
    for _ in 0..100 {
        let density = t.pdf(x);
        let step = (t_sf(x, dof)? - tail) / density;
        if !step.is_finite() {
            break;
        }
        x += step;
        if step.abs() <= 1e-15 * x.abs() {
            break;
        }
    }
    x.is_finite().then_some(x)
}

/// `P(X > x)` for a chi-square with `dof` degrees of freedom; `None` unless `dof > 0`.
pub(crate) fn chi_square_sf(x: f64, dof: f64) -> Option<f64> {
    ChiSquared::new(dof).ok().map(|c| c.sf(x))
}
