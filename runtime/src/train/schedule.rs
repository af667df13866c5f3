//! Learning-rate schedule: linear warmup from 0, then linear decay to 0 at the last step, as
//! transformers' `get_linear_schedule_with_warmup` (the released BiDoRA code's choice).

/// The multiplier of the base learning rate at step `t` (0-based) of `total` steps.
pub fn linear_warmup_decay(t: usize, total: usize, warmup_ratio: f64) -> f32 {
    let warm = (warmup_ratio * total as f64).ceil() as usize;
    if t < warm {
        return t as f32 / warm as f32;
    }
    let rest = total.saturating_sub(warm).max(1);
    (total.saturating_sub(t) as f32 / rest as f32).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_to_zero() {
        // 100 steps, 10 of warmup.
        assert_eq!(linear_warmup_decay(0, 100, 0.1), 0.0);
        assert_eq!(linear_warmup_decay(5, 100, 0.1), 0.5);
        assert_eq!(linear_warmup_decay(10, 100, 0.1), 1.0);
        assert!((linear_warmup_decay(55, 100, 0.1) - 0.5).abs() < 1e-6);
        assert!((linear_warmup_decay(99, 100, 0.1) - 1.0 / 90.0).abs() < 1e-6);
        // No warmup: full rate at the first step.
        assert_eq!(linear_warmup_decay(0, 10, 0.0), 1.0);
    }
}
