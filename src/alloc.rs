//! Fallible allocation of the buffers a call makes, and checked size arithmetic.
//!
//! Validation bounds every view by the memory behind it, so a copy of an input cannot overflow;
//! what can still be too large is a buffer whose size grows faster than the inputs (planning maps
//! `[B, Hkv, nseg, N]` are quadratic in L, AdaKV's pool is heads × entries, the oracle's f64
//! copies are twice the inputs). Those are reserved here with `try_reserve_exact`: a size that
//! overflows or that the allocator refuses is [`Error::Alloc`], never an abort.

use crate::error::{Error, Result};

/// `dims[0] · dims[1] · …`, or `Error::Alloc` naming `what` when the product overflows.
pub fn count(what: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| Error::Alloc {
        what,
        detail: format!(
            "{} elements overflow the address space",
            dims.iter().map(usize::to_string).collect::<Vec<_>>().join(" × ")
        ),
    })
}

/// An empty vector with room for `n` elements.
pub fn with_capacity<T>(what: &'static str, n: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|e| Error::Alloc {
        what,
        detail: format!("{n} elements of {} bytes: {e}", std::mem::size_of::<T>()),
    })?;
    Ok(v)
}

/// `vec![value; n]`, fallibly.
pub fn filled<T: Clone>(what: &'static str, n: usize, value: T) -> Result<Vec<T>> {
    let mut v = with_capacity(what, n)?;
    v.resize(n, value);
    Ok(v)
}

/// `vec![value; dims.product()]`, fallibly (the product checked).
pub fn grid<T: Clone>(what: &'static str, dims: &[usize], value: T) -> Result<Vec<T>> {
    filled(what, count(what, dims)?, value)
}

/// Checks that `count(dims)` elements of `T` could be allocated at once, for a structure that is
/// then built in pieces (rows of a nested vector): a size the allocator refuses fails here, with
/// a typed error, before any piece is made — not halfway through, in the out-of-memory killer.
pub fn probe<T>(what: &'static str, dims: &[usize]) -> Result<()> {
    with_capacity::<T>(what, count(what, dims)?).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_and_refusal_are_typed_errors() {
        assert!(matches!(count("x", &[usize::MAX, 2]), Err(Error::Alloc { what: "x", .. })));
        assert_eq!(count("x", &[3, 4, 5]).unwrap(), 60);
        assert!(matches!(filled("y", usize::MAX / 2, 0u64), Err(Error::Alloc { what: "y", .. })));
        assert_eq!(grid("z", &[2, 3], 7u8).unwrap(), vec![7; 6]);
    }
}
