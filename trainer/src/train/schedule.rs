//! Learning-rate schedules with warmup, as Hugging Face's `get_*_schedule_with_warmup` define
//! them: the learning rate of optimizer step `s` (0-based) is `base * lambda(s)`, so a warmup
//! starts from 0.

use serde::{Deserialize, Serialize};

/// The shape of the schedule after warmup: the recipe's `train.schedule`.
pub use crate::recipe::Schedule as ScheduleKind;

/// A schedule over a known number of steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// The shape.
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub base_lr: f64,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// Total optimizer steps.
    pub total_steps: u64,
    /// Floor of the decay as a fraction of `base_lr` (0 = Hugging Face's schedules exactly).
    pub min_lr_ratio: f64,
}

impl Schedule {
    /// The multiplier of step `s`.
    pub fn lambda(&self, s: u64) -> f64 {
        let (s, w, total) = (s as f64, self.warmup_steps as f64, self.total_steps as f64);
        if s < w {
            return s / w.max(1.0);
        }
        let decay = match self.kind {
            ScheduleKind::Constant => return 1.0,
            ScheduleKind::Linear => ((total - s) / (total - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (s - w) / (total - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        };
        self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay
    }

    /// The learning rate of optimizer step `s` (0-based).
    pub fn lr(&self, s: u64) -> f64 {
        self.base_lr * self.lambda(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_lambdas() {
        let lin =
            Schedule { kind: ScheduleKind::Linear, base_lr: 1.0, warmup_steps: 3, total_steps: 10, min_lr_ratio: 0.0 };
        let got: Vec<f64> = (0..10).map(|s| lin.lambda(s)).collect();
        let want = [0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0, 6.0 / 7.0, 5.0 / 7.0, 4.0 / 7.0, 3.0 / 7.0, 2.0 / 7.0, 1.0 / 7.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
        let cos = Schedule { kind: ScheduleKind::Cosine, ..lin };
        assert!((cos.lambda(3) - 1.0).abs() < 1e-12);
        assert!((cos.lambda(10)).abs() < 1e-12);
        assert!((cos.lambda(6) - 0.5 * (1.0 + (std::f64::consts::PI * 3.0 / 7.0).cos())).abs() < 1e-12);
        let c = Schedule { kind: ScheduleKind::Constant, ..lin };
        assert_eq!((c.lambda(1), c.lambda(9)), (1.0 / 3.0, 1.0));
        let floor = Schedule { min_lr_ratio: 0.1, ..cos };
        assert!((floor.lambda(10) - 0.1).abs() < 1e-12 && (floor.lambda(3) - 1.0).abs() < 1e-12);
    }
}
