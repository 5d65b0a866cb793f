//! Next-token selection with Hugging Face's semantics and order: repetition penalty, then
//! temperature, top-k, top-p, then a draw (or the arg-max when greedy).

use serde::{Deserialize, Serialize};

use super::rng::Rng;

/// Sampling settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (`0` = off).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (`1` = off).
    pub top_p: f64,
    /// Penalty for tokens already in the context (`1` = off): positive logits are divided by it,
    /// negative ones multiplied.
    pub repetition_penalty: f64,
}

/// Settings given on a command line or in a request, each replacing the model's default when set.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingOverrides {
    /// Replaces [`SamplingParams::temperature`].
    pub temperature: Option<f64>,
    /// Replaces [`SamplingParams::top_k`].
    pub top_k: Option<usize>,
    /// Replaces [`SamplingParams::top_p`].
    pub top_p: Option<f64>,
    /// Replaces [`SamplingParams::repetition_penalty`].
    pub repetition_penalty: Option<f64>,
}

impl SamplingParams {
    /// These settings with every value `overrides` sets replacing its own.
    pub fn overridden(self, overrides: SamplingOverrides) -> Self {
        SamplingParams {
            temperature: overrides.temperature.unwrap_or(self.temperature),
            top_k: overrides.top_k.unwrap_or(self.top_k),
            top_p: overrides.top_p.unwrap_or(self.top_p),
            repetition_penalty: overrides.repetition_penalty.unwrap_or(self.repetition_penalty),
        }
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0 }
    }
}

impl SamplingParams {
    /// Checks the ranges, naming the offending setting.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }

    /// Whether decoding is greedy.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Chooses the next token from `logits` (one row, f32), given the ids already in the context.
pub fn sample(logits: &mut [f32], context: &[u32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    if params.repetition_penalty != 1.0 {
        let penalty = params.repetition_penalty as f32;
        let mut seen = vec![false; logits.len()];
        for &id in context {
            if let Some(flag) = seen.get_mut(id as usize) {
                if !*flag {
                    *flag = true;
                    let l = &mut logits[id as usize];
                    *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
                }
            }
        }
    }
    if params.is_greedy() {
        return argmax(logits);
    }
    let inv_t = 1.0 / params.temperature as f32;
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    if params.top_k > 0 {
        order.truncate(params.top_k.max(1));
    }
    let max = logits[order[0] as usize] * inv_t;
    let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i as usize] * inv_t - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative >= params.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut draw = rng.next_f64() * total;
    for (i, p) in probs.iter().enumerate() {
        if draw < *p {
            return order[i];
        }
        draw -= p;
    }
    order[probs.len() - 1]
}

/// Index of the largest value (the first one on ties, like `torch.argmax`).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_k: usize, top_p: f64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, repetition_penalty: 1.0 }
    }

    #[test]
    fn greedy_is_argmax() {
        let mut l = vec![0.1, 2.0, -1.0, 2.0];
        assert_eq!(sample(&mut l, &[], &SamplingParams::default(), &mut Rng::new(0)), 1);
    }

    #[test]
    fn repetition_penalty_follows_hf() {
        let mut l = vec![2.0, -2.0, 1.9];
        let p = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::default() };
        assert_eq!(sample(&mut l, &[0, 1, 0], &p, &mut Rng::new(0)), 2);
        assert_eq!(l, vec![1.0, -4.0, 1.9]);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let mut rng = Rng::new(3);
        let base = vec![3.0, 2.9, 0.0, -1.0, 2.8];
        for _ in 0..500 {
            let id = sample(&mut base.clone(), &[], &params(1.0, 2, 1.0), &mut rng);
            assert!(id == 0 || id == 1);
            // p(0) ~ 0.35, p(0)+p(1) ~ 0.67 >= 0.5: top_p 0.5 keeps exactly two tokens.
            let id = sample(&mut base.clone(), &[], &params(1.0, 0, 0.5), &mut rng);
            assert!(id == 0 || id == 1);
        }
    }

    #[test]
    fn sampling_matches_the_distribution() {
        let mut rng = Rng::new(11);
        let base = vec![0.0f32, (2.0f32).ln(), (5.0f32).ln()]; // probabilities 1/8, 2/8, 5/8
        let mut counts = [0usize; 3];
        let n = 40_000;
        for _ in 0..n {
            counts[sample(&mut base.clone(), &[], &params(1.0, 0, 1.0), &mut rng) as usize] += 1;
        }
        for (c, expected) in counts.iter().zip([0.125, 0.25, 0.625]) {
            assert!((*c as f64 / n as f64 - expected).abs() < 0.01, "{counts:?}");
        }
    }

    #[test]
    fn overrides_replace_only_what_they_set() {
        let base = SamplingParams { temperature: 0.7, top_k: 50, top_p: 0.9, repetition_penalty: 1.1 };
        assert_eq!(base.clone().overridden(SamplingOverrides::default()), base);
        let o = SamplingOverrides { temperature: Some(0.0), top_p: Some(1.0), ..Default::default() };
        assert_eq!(
            base.clone().overridden(o),
            SamplingParams { temperature: 0.0, top_k: 50, top_p: 1.0, repetition_penalty: 1.1 }
        );
        let all = SamplingOverrides {
            temperature: Some(1.5),
            top_k: Some(3),
            top_p: Some(0.5),
            repetition_penalty: Some(1.3),
        };
        assert_eq!(
            base.overridden(all),
            SamplingParams { temperature: 1.5, top_k: 3, top_p: 0.5, repetition_penalty: 1.3 }
        );
    }

    #[test]
    fn validation_names_the_setting() {
        assert!(params(-1.0, 0, 1.0).validate().unwrap_err().contains("temperature"));
        assert!(params(1.0, 0, 0.0).validate().unwrap_err().contains("top_p"));
    }
}
