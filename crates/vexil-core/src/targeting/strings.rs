//! flagd's `starts_with` and `ends_with` operators: exactly two string arguments, case-sensitive,
//! no coercion; anything else yields `null`.

use datalogic_rs::bumpalo::Bump;
use datalogic_rs::operator::EvalContext;
use datalogic_rs::{ArenaExt, CustomOperator, DataValue};

/// Which end of the string to compare.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Affix {
    /// `starts_with`.
    Prefix,
    /// `ends_with`.
    Suffix,
}

impl CustomOperator for Affix {
    fn evaluate<'a>(
        &self,
        args: &[&'a DataValue<'a>],
        _ctx: &mut EvalContext<'_, 'a>,
        arena: &'a Bump,
    ) -> datalogic_rs::Result<&'a DataValue<'a>> {
        let [DataValue::String(subject), DataValue::String(affix)] = args else {
            return Ok(arena.null());
        };
        Ok(arena.bool(match self {
            Affix::Prefix => subject.starts_with(affix),
            Affix::Suffix => subject.ends_with(affix),
        }))
    }
}
