//! Symbolic dimensions: an integer times a product of named symbols (`2*batch*sequence`).
//!
//! Monomials are closed under the operations shape computations in exported transformers use
//! (products in Reshape/Flatten, exact division for `-1`, equality for broadcasting). Sums
//! (Concat along a symbolic axis, `sequence + past`) are not monomials: inference gives them a
//! fresh opaque symbol, which keeps the rank and dtype right and marks the size as unknown.

use std::collections::BTreeMap;
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DimExpr {
    coef: i64,
    /// Symbol name → power.
    syms: BTreeMap<String, u32>,
}

impl DimExpr {
    pub fn known(v: i64) -> DimExpr {
        DimExpr {
            coef: v,
            syms: BTreeMap::new(),
        }
    }

    pub fn sym(name: &str) -> DimExpr {
        DimExpr {
            coef: 1,
            syms: BTreeMap::from([(name.to_string(), 1)]),
        }
    }

    /// The integer value, when the expression has no symbols.
    pub fn as_known(&self) -> Option<i64> {
        self.syms.is_empty().then_some(self.coef)
    }

    /// The value with every symbol bound by `bind`; `None` when a symbol is unbound.
    pub fn eval(&self, bind: &dyn Fn(&str) -> Option<i64>) -> Option<i64> {
        let mut v = self.coef;
        for (s, &p) in &self.syms {
            let x = bind(s)?;
            for _ in 0..p {
                v = v.checked_mul(x)?;
            }
        }
        Some(v)
    }

    pub fn is_symbolic(&self) -> bool {
        !self.syms.is_empty()
    }

    /// The names of the symbols in the expression.
    pub fn symbols(&self) -> impl Iterator<Item = &str> {
        self.syms.keys().map(String::as_str)
    }

    pub fn mul(&self, o: &DimExpr) -> DimExpr {
        let mut syms = self.syms.clone();
        for (s, p) in &o.syms {
            *syms.entry(s.clone()).or_default() += p;
        }
        let coef = self.coef.saturating_mul(o.coef);
        if coef == 0 {
            return DimExpr::known(0);
        }
        DimExpr { coef, syms }
    }

    /// Exact division; `None` when `o` does not divide `self` as a monomial.
    pub fn div(&self, o: &DimExpr) -> Option<DimExpr> {
        // checked_rem: `i64::MIN % -1` overflows (and 0 divides nothing).
        if self.coef.checked_rem(o.coef)? != 0 {
            return None;
        }
        let mut syms = self.syms.clone();
        for (s, p) in &o.syms {
            let have = syms.get_mut(s)?;
            if *have < *p {
                return None;
            }
            *have -= p;
            if *have == 0 {
                syms.remove(s);
            }
        }
        Some(DimExpr {
            coef: self.coef.checked_div(o.coef)?,
            syms,
        })
    }

    pub fn add(&self, o: &DimExpr) -> Option<DimExpr> {
        if self.syms == o.syms {
            let coef = self.coef.checked_add(o.coef)?;
            return Some(if coef == 0 {
                DimExpr::known(0)
            } else {
                DimExpr {
                    coef,
                    syms: self.syms.clone(),
                }
            });
        }
        match (self.as_known(), o.as_known()) {
            (Some(0), _) => Some(o.clone()),
            (_, Some(0)) => Some(self.clone()),
            _ => None,
        }
    }

    /// `-self`; saturates at `i64::MIN` rather than overflow (no real dim comes near it).
    pub fn neg(&self) -> DimExpr {
        DimExpr {
            coef: self.coef.saturating_neg(),
            syms: self.syms.clone(),
        }
    }

    /// `self - o` when it is a monomial (same symbols, or either side 0), without overflow.
    pub fn sub(&self, o: &DimExpr) -> Option<DimExpr> {
        self.add(&DimExpr {
            coef: o.coef.checked_neg()?,
            syms: o.syms.clone(),
        })
    }
}

impl fmt::Display for DimExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.syms.is_empty() {
            return write!(f, "{}", self.coef);
        }
        let mut parts: Vec<String> = vec![];
        if self.coef != 1 {
            parts.push(self.coef.to_string());
        }
        for (s, p) in &self.syms {
            for _ in 0..*p {
                parts.push(s.clone());
            }
        }
        f.write_str(&parts.join("*"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monomial_arithmetic() {
        let b = DimExpr::sym("batch");
        let s = DimExpr::sym("sequence");
        let bs = b.mul(&s);
        assert_eq!(bs.to_string(), "batch*sequence");
        let x = bs.mul(&DimExpr::known(64));
        assert_eq!(x.to_string(), "64*batch*sequence");
        assert_eq!(x.div(&DimExpr::known(64)), Some(bs.clone()));
        assert_eq!(x.div(&b.mul(&DimExpr::known(64))), Some(s.clone()));
        assert_eq!(b.div(&s), None);
        assert_eq!(DimExpr::known(7).div(&DimExpr::known(2)), None);
        assert_eq!(b.add(&b).unwrap().to_string(), "2*batch");
        assert_eq!(b.add(&s), None);
        assert_eq!(DimExpr::known(0).add(&s), Some(s.clone()));
        assert_eq!(s.add(&s.neg()), Some(DimExpr::known(0)));
        assert_eq!(
            b.mul(&DimExpr::known(3)).sub(&b).unwrap().to_string(),
            "2*batch"
        );
        assert_eq!(b.sub(&s), None);
    }

    #[test]
    fn overflowing_arithmetic_gives_none_not_a_panic() {
        let min = DimExpr::known(i64::MIN);
        assert_eq!(min.div(&DimExpr::known(-1)), None);
        assert_eq!(min.div(&DimExpr::known(0)), None);
        assert_eq!(DimExpr::known(0).sub(&min), None);
        assert_eq!(DimExpr::known(i64::MAX).add(&DimExpr::known(1)), None);
        assert_eq!(min.neg(), DimExpr::known(i64::MAX));
    }
}
