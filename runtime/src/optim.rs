//! AdamW (Loshchilov & Hutter, decoupled weight decay), the optimiser at both BiDoRA levels.
//! State lives in f32 host arrays; updates are elementwise and deterministic.

use std::collections::HashMap;

use ndarray::{ArrayD, Zip};

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// The released BiDoRA code's settings: betas 0.9/0.98, eps 1e-6 (docs/design.md, "Schedule and optimiser").
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.0,
        }
    }
}

/// Per-parameter moment arrays by name.
pub type Moments = HashMap<String, ArrayD<f32>>;

#[derive(Default)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    step: u32,
    m: HashMap<String, ArrayD<f32>>,
    v: HashMap<String, ArrayD<f32>>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> AdamW {
        AdamW {
            cfg,
            ..Default::default()
        }
    }

    /// One update of every parameter with its gradient, at learning rate `lr` (a schedule may
    /// vary it per step).
    pub fn step(
        &mut self,
        params: &mut [(String, ArrayD<f32>)],
        grads: &HashMap<String, ArrayD<f32>>,
        lr: f32,
    ) {
        let (bc1, bc2) = self.begin_step();
        let c = self.cfg;
        for (name, p) in params.iter_mut() {
            let Some(g) = grads.get(name) else { continue };
            let m = self
                .m
                .entry(name.clone())
                .or_insert_with(|| ArrayD::zeros(p.raw_dim()));
            let v = self
                .v
                .entry(name.clone())
                .or_insert_with(|| ArrayD::zeros(p.raw_dim()));
            Zip::from(p).and(m).and(v).and(g).for_each(|p, m, v, &g| {
                *m = c.beta1 * *m + (1.0 - c.beta1) * g;
                *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
                let update = (*m / bc1) / ((*v / bc2).sqrt() + c.eps);
                *p -= lr * (update + c.weight_decay * *p);
            });
        }
    }
}

impl AdamW {
    /// Counts a step and returns its bias corrections `(1 − β1ᵗ, 1 − β2ᵗ)`.
    pub fn begin_step(&mut self) -> (f32, f32) {
        self.step += 1;
        let c = self.cfg;
        (
            1.0 - c.beta1.powi(self.step as i32),
            1.0 - c.beta2.powi(self.step as i32),
        )
    }

    /// The scalar inputs of `bidora_compiler::optim`'s AdamW program for the next step at
    /// learning rate `lr`, computed in f32 as [`AdamW::step`] computes them.
    pub fn program_scalars(&mut self, lr: f32) -> Vec<(&'static str, f32)> {
        let (bc1, bc2) = self.begin_step();
        let c = self.cfg;
        vec![
            ("lr", lr),
            ("beta1", c.beta1),
            ("one_minus_beta1", 1.0 - c.beta1),
            ("beta2", c.beta2),
            ("one_minus_beta2", 1.0 - c.beta2),
            ("eps", c.eps),
            ("weight_decay", c.weight_decay),
            ("bc1", bc1),
            ("bc2", bc2),
        ]
    }

    /// Steps taken (for bias correction); saved in checkpoints.
    pub fn steps(&self) -> u32 {
        self.step
    }

    /// The first and second moments by parameter name; saved in checkpoints.
    pub fn moments(&self) -> (&Moments, &Moments) {
        (&self.m, &self.v)
    }

    /// Restores the state [`AdamW::steps`] and [`AdamW::moments`] saved, so a resumed run
    /// continues bit for bit.
    pub fn restore(&mut self, step: u32, m: Moments, v: Moments) {
        self.step = step;
        self.m = m;
        self.v = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        // After one step m̂ = g and v̂ = g², so the update is g/(|g| + eps) ≈ sign(g).
        let mut opt = AdamW::new(AdamWConfig {
            lr: 0.1,
            ..Default::default()
        });
        let mut params = vec![(
            "w".to_string(),
            ArrayD::from_shape_vec(vec![3], vec![1.0, 1.0, 1.0]).unwrap(),
        )];
        let grads = HashMap::from([(
            "w".to_string(),
            ArrayD::from_shape_vec(vec![3], vec![2.0, -0.5, 0.0]).unwrap(),
        )]);
        opt.step(&mut params, &grads, 0.1);
        let p = &params[0].1;
        assert!(
            (p[0] - 0.9).abs() < 1e-5 && (p[1] - 1.1).abs() < 1e-5 && (p[2] - 1.0).abs() < 1e-6,
            "{p:?}"
        );
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let mut opt = AdamW::new(AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        });
        let mut params = vec![(
            "w".to_string(),
            ArrayD::from_shape_vec(vec![1], vec![2.0]).unwrap(),
        )];
        let grads = HashMap::from([(
            "w".to_string(),
            ArrayD::from_shape_vec(vec![1], vec![0.0]).unwrap(),
        )]);
        opt.step(&mut params, &grads, 0.1);
        // Zero gradient: only the decay acts, p -= lr·wd·p.
        assert!((params[0].1[0] - (2.0 - 0.1 * 0.5 * 2.0)).abs() < 1e-6);
    }
}
