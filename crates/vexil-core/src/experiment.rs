//! Experiment assignment: which units an experiment takes, and which of its variants each gets.
//!
//! Deterministic and sticky: a unit's assignment depends only on the experiment's salt, its
//! allocation and the unit id (MurmurHash3 x86_32, as flagd's `fractional`), never on time or on
//! other units. Three independent hashes of the unit decide:
//!
//! 1. **Layer** (optional): experiments that must not share units take disjoint slices of a
//!    layer's buckets, hashed with the layer's key, so one unit is in at most one of them.
//! 2. **Traffic**: the unit is in the experiment if its traffic bucket is below the traffic share.
//!    Ramping the share up only adds units: every unit in at 10 % is still in at 50 %.
//! 3. **Variant**: the unit's variant bucket falls in one variant's share of the weights. It is
//!    hashed apart from traffic, so ramping traffic never moves an exposed unit to another
//!    variant (which is why weights are locked while an experiment runs).
//!
//! Buckets are millionths ([`BUCKETS`]): shares are set to 1/1,000,000, finer than the 1/10,000
//! the platform promises.

use std::fmt;

use crate::targeting::fractional::murmur_bytes;

/// Buckets per whole: traffic shares, weights' boundaries and layer slices are in millionths.
pub const BUCKETS: u32 = 1_000_000;

/// How an experiment allocates units (what is locked while it runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    salt: String,
    traffic: u32,
    /// Each variant with the upper bound (exclusive) of its share of the variant buckets.
    variants: Vec<(String, u32)>,
    layer: Option<LayerSlice>,
}

/// An experiment's slice of a layer's buckets: `[start, end)` in millionths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSlice {
    /// The layer's key (its hash salt: every experiment of the layer hashes the unit alike).
    pub layer: String,
    /// First bucket of the slice.
    pub start: u32,
    /// One past the last bucket.
    pub end: u32,
}

/// Where a unit falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assignment<'a> {
    /// In the experiment, with this variant.
    Variant(&'a str),
    /// In the layer's part that belongs to other experiments.
    OutsideLayer,
    /// Outside the traffic share.
    OutsideTraffic,
}

/// Why an allocation is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    /// No variant has a weight.
    #[error("an experiment needs at least one variant with a positive weight")]
    NoWeight,
    /// A variant is named twice.
    #[error("variant `{0}` is weighted twice")]
    DuplicateVariant(String),
    /// The traffic share is more than everything.
    #[error("traffic {0} is more than {BUCKETS} millionths")]
    Traffic(u32),
    /// The layer slice is empty or goes past the end.
    #[error("layer slice [{start}, {end}) is not within [0, {BUCKETS}) or is empty")]
    Slice {
        /// First bucket.
        start: u32,
        /// One past the last.
        end: u32,
    },
    /// The salt contains a NUL byte (it separates the hashed parts).
    #[error("the salt must not contain a NUL byte")]
    Salt,
}

impl Allocation {
    /// An allocation: `traffic` in millionths of the units (of the layer slice, if any),
    /// `weights` relative (`[("control", 1), ("treatment", 1)]` is an even split; a weight of 0
    /// gets no units).
    pub fn new(
        salt: impl Into<String>,
        traffic: u32,
        weights: &[(&str, u32)],
        layer: Option<LayerSlice>,
    ) -> Result<Allocation, AllocationError> {
        let salt = salt.into();
        if salt.contains('\0') {
            return Err(AllocationError::Salt);
        }
        if traffic > BUCKETS {
            return Err(AllocationError::Traffic(traffic));
        }
        if let Some(slice) = &layer
            && (slice.start >= slice.end || slice.end > BUCKETS || slice.layer.contains('\0'))
        {
            return Err(AllocationError::Slice {
                start: slice.start,
                end: slice.end,
            });
        }
        for (i, (name, _)) in weights.iter().enumerate() {
            if weights[..i].iter().any(|(other, _)| other == name) {
                return Err(AllocationError::DuplicateVariant((*name).to_owned()));
            }
        }
        let total: u64 = weights.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            return Err(AllocationError::NoWeight);
        }
        let mut cumulative = 0u64;
        let variants = weights
            .iter()
            .map(|(name, weight)| {
                cumulative += u64::from(*weight);
                let bound = u32::try_from(cumulative * u64::from(BUCKETS) / total).expect("at most BUCKETS");
                ((*name).to_owned(), bound)
            })
            .collect();
        Ok(Allocation {
            salt,
            traffic,
            variants,
            layer,
        })
    }

    /// The traffic share, in millionths.
    pub fn traffic(&self) -> u32 {
        self.traffic
    }

    /// The same allocation with another traffic share (ramping up or down); units in at both
    /// shares keep their variant.
    pub fn with_traffic(&self, traffic: u32) -> Result<Allocation, AllocationError> {
        if traffic > BUCKETS {
            return Err(AllocationError::Traffic(traffic));
        }
        Ok(Allocation {
            traffic,
            ..self.clone()
        })
    }

    /// Where `unit` falls.
    pub fn assign(&self, unit: &str) -> Assignment<'_> {
        if let Some(slice) = &self.layer {
            let at = bucket(&slice.layer, "layer", unit);
            if !(slice.start..slice.end).contains(&at) {
                return Assignment::OutsideLayer;
            }
        }
        if bucket(&self.salt, "traffic", unit) >= self.traffic {
            return Assignment::OutsideTraffic;
        }
        let at = bucket(&self.salt, "variant", unit);
        let variant = self
            .variants
            .iter()
            .find(|(_, bound)| at < *bound)
            .or(self.variants.last())
            .map(|(name, _)| name.as_str())
            .expect("an allocation has a variant");
        Assignment::Variant(variant)
    }
}

impl fmt::Display for Assignment<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Assignment::Variant(v) => write!(f, "variant {v}"),
            Assignment::OutsideLayer => f.write_str("outside the layer slice"),
            Assignment::OutsideTraffic => f.write_str("outside the traffic share"),
        }
    }
}

impl Allocation {
    /// The variants it allocates, in order.
    pub fn variants(&self) -> impl Iterator<Item = &str> {
        self.variants.iter().map(|(name, _)| name.as_str())
    }

    /// The salt its traffic and variant buckets are hashed with.
    pub fn salt(&self) -> &str {
        &self.salt
    }

    /// The layer slice, if the experiment is in a layer.
    pub fn layer(&self) -> Option<&LayerSlice> {
        self.layer.as_ref()
    }
}

/// Where an experiment is in its lifecycle, as far as evaluation cares: drafts and archived
/// experiments do not reach a flag set's document at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Allocating units: assigned evaluations answer `SPLIT`.
    Running,
    /// Not allocating: the flag evaluates as it would without the experiment (or serves the
    /// winner, when one is chosen).
    Paused,
    /// Over: the flag evaluates as without the experiment, or serves the chosen winner.
    Stopped,
}

impl Phase {
    /// `running`, `paused` or `stopped`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Stopped => "stopped",
        }
    }

    /// The phase a status names, if it is one evaluation sees.
    pub fn parse(s: &str) -> Option<Phase> {
        match s {
            "running" => Some(Phase::Running),
            "paused" => Some(Phase::Paused),
            "stopped" => Some(Phase::Stopped),
            _ => None,
        }
    }
}

/// An experiment attached to a flag, as evaluation uses it: from a flag set document's
/// `$experiments` (Vexil's extension of flagd's format; flagd's own sync payloads leave it out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagExperiment {
    /// The experiment's id (stable for its life; reported in evaluation metadata).
    pub id: String,
    /// The experiment's key in its environment.
    pub key: String,
    /// Running, paused or stopped.
    pub phase: Phase,
    /// Who is in and which variant each gets.
    pub allocation: Allocation,
    /// Who may enter (JsonLogic on the evaluation context, truthy: eligible); `None`: everyone
    /// with a `targetingKey`.
    pub audience: Option<crate::model::RuleText>,
    /// The variant served to everyone once the experiment is paused or stopped with a winner.
    pub winner: Option<String>,
}

/// The bucket (`0..BUCKETS`) of `unit` for one purpose of one salt: MurmurHash3 x86_32 (seed 0)
/// of the deterministic CBOR text of `salt NUL purpose NUL unit`, scaled to [`BUCKETS`] — exactly
/// what flagd's `fractional` (v3) computes for that string with weights summing to [`BUCKETS`], so
/// an in-process flagd provider given [`FlagExperiment::targeting`] allocates every unit alike.
pub fn bucket(salt: &str, purpose: &str, unit: &str) -> u32 {
    /// Keys up to this long are built on the stack (ids, purposes and unit keys are short).
    const STACK: usize = 192;
    let parts = [salt.as_bytes(), b"\0", purpose.as_bytes(), b"\0", unit.as_bytes()];
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let (head, head_len) = crate::targeting::cbor::text_head(len);
    let write = |key: &mut [u8]| {
        key[..head_len].copy_from_slice(&head[..head_len]);
        let mut at = head_len;
        for part in parts {
            key[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        murmur_bytes(key)
    };
    let hash = if head_len + len <= STACK {
        write(&mut [0u8; STACK][..head_len + len])
    } else {
        write(&mut vec![0u8; head_len + len])
    };
    u32::try_from((u64::from(hash) * u64::from(BUCKETS)) >> 32).expect("below BUCKETS")
}

impl Allocation {
    /// Each variant with its share in millionths (the widths of its bucket range; they sum to
    /// [`BUCKETS`]).
    fn shares(&self) -> Vec<(&str, u32)> {
        let mut start = 0;
        self.variants
            .iter()
            .map(|(name, end)| {
                let share = end - start;
                start = *end;
                (name.as_str(), share)
            })
            .collect()
    }
}

impl FlagExperiment {
    /// The experiment as a flagd targeting rule that allocates every unit as [`Allocation::assign`]
    /// does, for in-process providers (flagd's `fractional`, v3, over the same strings and bucket
    /// ranges), wrapped around the flag's own rule (`original`) for the units it does not take.
    /// `None` when evaluation ignores the experiment (paused or stopped: the flag's rule or the
    /// winner, which a provider gets as the default variant).
    pub fn targeting(&self, original: Option<&serde_json::Value>) -> Option<serde_json::Value> {
        use serde_json::{Value, json};
        if self.phase != Phase::Running {
            return None;
        }
        let fallback = original.cloned().unwrap_or(Value::Null);
        let unit = json!({"var": "targetingKey"});
        let hashed = |salt: &str, purpose: &str| json!({"cat": [salt, format!("\0{purpose}\0"), unit]});
        let a = &self.allocation;
        let variants: Vec<Value> = a
            .shares()
            .into_iter()
            .map(|(name, share)| json!([name, share]))
            .collect();
        let mut variant = json!({"fractional": [hashed(&a.salt, "variant")]});
        variant["fractional"].as_array_mut().expect("an array").extend(variants);
        let traffic = json!({"fractional": [
            hashed(&a.salt, "traffic"), ["in", a.traffic], ["out", BUCKETS - a.traffic]
        ]});
        let mut rule = json!({"if": [{"==": [traffic, "in"]}, variant, fallback.clone()]});
        if let Some(slice) = &a.layer {
            let layer = json!({"fractional": [
                hashed(&slice.layer, "layer"),
                ["before", slice.start], ["in", slice.end - slice.start], ["after", BUCKETS - slice.end]
            ]});
            rule = json!({"if": [{"==": [layer, "in"]}, rule, fallback.clone()]});
        }
        let mut admitted = vec![unit.clone()];
        if let Some(audience) = &self.audience {
            admitted.push(audience.to_value());
        }
        Some(json!({"if": [{"and": admitted}, rule, fallback]}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn even() -> Allocation {
        Allocation::new("exp-1", BUCKETS, &[("control", 1), ("treatment", 1)], None).unwrap()
    }

    fn units(n: usize) -> impl Iterator<Item = String> {
        (0..n).map(|i| format!("user-{i}"))
    }

    #[test]
    fn buckets_are_murmur3_of_the_parts_scaled_to_a_million() {
        // murmur3_32 of the CBOR text "s\0p\0u" (0x65 and the 5 bytes) from the reference
        // implementation (PyPI mmh3 5.2.0): mmh3.hash(b"\x65s\x00p\x00u", 0, signed=False).
        assert_eq!(bucket("s", "p", "u"), ((2_590_279_701u64 * 1_000_000) >> 32) as u32);
        assert_eq!(bucket("s", "p", "u"), bucket("s", "p", "u"));
        assert_ne!(bucket("s", "traffic", "u"), bucket("s", "variant", "u"));
    }

    /// The key as it was first written: the whole string, then its CBOR text.
    fn bucket_of_the_cbor_text(salt: &str, purpose: &str, unit: &str) -> u32 {
        let text = [salt, "\0", purpose, "\0", unit].concat();
        let mut key = Vec::new();
        crate::targeting::cbor::encode_text(&text, &mut key);
        u32::try_from((u64::from(murmur_bytes(&key)) * u64::from(BUCKETS)) >> 32).unwrap()
    }

    #[test]
    fn keys_on_the_stack_and_on_the_heap_hash_as_the_cbor_text() {
        // Every head length of CBOR text (1, 2 and 3 bytes) and both sides of the stack limit.
        for unit_len in [0, 5, 17, 18, 100, 160, 170, 171, 172, 173, 200, 240, 300, 70_000] {
            let unit: String = (0..unit_len).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
            assert_eq!(
                bucket("x0123456789abcdef", "variant", &unit),
                bucket_of_the_cbor_text("x0123456789abcdef", "variant", &unit),
                "a unit of {unit_len} bytes"
            );
        }
        assert_eq!(bucket("", "", ""), bucket_of_the_cbor_text("", "", ""));
        assert_eq!(bucket("sé", "p", "ü"), bucket_of_the_cbor_text("sé", "p", "ü"));
    }

    #[test]
    fn an_even_split_is_even_and_sticky() {
        let allocation = even();
        let mut treated = 0;
        for unit in units(100_000) {
            let first = allocation.assign(&unit);
            assert_eq!(first, allocation.assign(&unit), "the same unit, the same variant");
            if first == Assignment::Variant("treatment") {
                treated += 1;
            }
        }
        // 50 % ± 5 standard deviations (σ = √(n p (1-p)) ≈ 158).
        assert!((49_200..=50_800).contains(&treated), "{treated}");
    }

    #[test]
    fn weights_and_traffic_shares_are_honoured() {
        let allocation = Allocation::new("exp-2", 200_000, &[("a", 1), ("b", 3)], None).unwrap();
        let (mut a, mut b, mut out) = (0, 0, 0);
        for unit in units(100_000) {
            match allocation.assign(&unit) {
                Assignment::Variant("a") => a += 1,
                Assignment::Variant("b") => b += 1,
                Assignment::OutsideTraffic => out += 1,
                other => panic!("{other}"),
            }
        }
        // 20 % in the experiment, split 1:3 (5 % and 15 % of all units).
        assert!((79_400..=80_600).contains(&out), "{out}");
        assert!((4_650..=5_350).contains(&a), "{a}");
        assert!((14_400..=15_600).contains(&b), "{b}");
        let none = Allocation::new("exp-2", 0, &[("a", 1)], None).unwrap();
        assert!(units(1000).all(|u| none.assign(&u) == Assignment::OutsideTraffic));
        let zero_weight = Allocation::new("exp-2", BUCKETS, &[("a", 0), ("b", 1)], None).unwrap();
        assert!(units(1000).all(|u| zero_weight.assign(&u) == Assignment::Variant("b")));
    }

    #[test]
    fn ramping_traffic_up_only_adds_units_and_never_moves_one() {
        let small = Allocation::new("ramp", 100_000, &[("control", 1), ("treatment", 1)], None).unwrap();
        let large = small.with_traffic(500_000).unwrap();
        let mut added = 0;
        for unit in units(50_000) {
            match (small.assign(&unit), large.assign(&unit)) {
                (Assignment::Variant(before), after) => assert_eq!(after, Assignment::Variant(before), "{unit}"),
                (Assignment::OutsideTraffic, Assignment::Variant(_)) => added += 1,
                (Assignment::OutsideTraffic, Assignment::OutsideTraffic) => {}
                other => panic!("{other:?}"),
            }
        }
        assert!(added > 15_000, "ramping to 50 % brings about 40 % more units: {added}");
    }

    #[test]
    fn different_salts_allocate_independently() {
        let other = Allocation::new("exp-other", BUCKETS, &[("control", 1), ("treatment", 1)], None).unwrap();
        let allocation = even();
        let same = units(20_000)
            .filter(|u| allocation.assign(u) == other.assign(u))
            .count();
        // Independent: about half agree.
        assert!((9_500..=10_500).contains(&same), "{same}");
    }

    #[test]
    fn experiments_of_one_layer_never_share_a_unit() {
        let slice = |start, end| {
            Some(LayerSlice {
                layer: "checkout".into(),
                start,
                end,
            })
        };
        let first = Allocation::new("x1", BUCKETS, &[("a", 1), ("b", 1)], slice(0, 300_000)).unwrap();
        let second = Allocation::new("x2", BUCKETS, &[("a", 1), ("b", 1)], slice(300_000, 1_000_000)).unwrap();
        let (mut in_first, mut in_second) = (0, 0);
        for unit in units(50_000) {
            let (one, two) = (first.assign(&unit), second.assign(&unit));
            let (one_in, two_in) = (
                matches!(one, Assignment::Variant(_)),
                matches!(two, Assignment::Variant(_)),
            );
            assert!(!(one_in && two_in), "{unit} is in both");
            assert!(one_in || two_in, "the slices cover the layer: {unit}");
            in_first += usize::from(one_in);
            in_second += usize::from(two_in);
        }
        assert!((14_300..=15_700).contains(&in_first), "{in_first}");
        assert!((34_300..=35_700).contains(&in_second), "{in_second}");
    }

    #[test]
    fn invalid_allocations_are_refused() {
        let refused = |r: Result<Allocation, AllocationError>| r.unwrap_err();
        assert_eq!(
            refused(Allocation::new("s", BUCKETS, &[], None)),
            AllocationError::NoWeight
        );
        assert_eq!(
            refused(Allocation::new("s", BUCKETS, &[("a", 0)], None)),
            AllocationError::NoWeight
        );
        assert_eq!(
            refused(Allocation::new("s", BUCKETS, &[("a", 1), ("a", 2)], None)),
            AllocationError::DuplicateVariant("a".into())
        );
        assert_eq!(
            refused(Allocation::new("s", BUCKETS + 1, &[("a", 1)], None)),
            AllocationError::Traffic(BUCKETS + 1)
        );
        assert_eq!(
            refused(Allocation::new("s\0", BUCKETS, &[("a", 1)], None)),
            AllocationError::Salt
        );
        let slice = LayerSlice {
            layer: "l".into(),
            start: 5,
            end: 5,
        };
        assert_eq!(
            refused(Allocation::new("s", BUCKETS, &[("a", 1)], Some(slice))),
            AllocationError::Slice { start: 5, end: 5 }
        );
        assert!(even().with_traffic(BUCKETS + 1).is_err());
    }
}
