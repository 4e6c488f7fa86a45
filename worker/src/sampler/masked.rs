//! Image to text and VQA: MDLM's "ddpm_cache" masked-diffusion sampler with the SUBS
//! parameterisation.
//!
//! Times `t_k = linspace(1, 1e-5, N+1)`. At step k (t = t_k, s = t_{k+1}) every still-masked
//! position stays masked with probability s/t, else takes a token drawn from
//! p = softmax(logits) with the mask token's logit at −∞ (Gumbel-max in its exponential-race
//! form: argmax_i p_i / E_i, E_i ~ Exp(1)). Unmasked tokens and the fixed prefix never change.
//! If a step changed nothing, the next step reuses p without a forward pass. After the last
//! step, one more forward pass fills any remaining masks by argmax.

use std::collections::BTreeMap;

use super::rng::JobRng;

/// The smallest time of the schedule.
pub const EPS: f64 = 1e-5;

pub struct MaskedState {
    canvas: Vec<i64>,
    mask_id: i64,
    vocab: usize,
    times: Vec<f64>,
    step: usize,
    /// SUBS probabilities of the masked positions, valid while the canvas is unchanged.
    cache: Option<BTreeMap<usize, Vec<f32>>>,
    finished: bool,
    forwards: u32,
    rng: JobRng,
}

impl MaskedState {
    /// `prefix` is fixed at the start of a canvas of `length` tokens; the rest is masked.
    pub fn new(
        prefix: &[i64],
        length: usize,
        mask_id: i64,
        vocab: usize,
        steps: usize,
        rng: JobRng,
    ) -> Self {
        let mut canvas = vec![mask_id; length.max(prefix.len())];
        canvas[..prefix.len()].copy_from_slice(prefix);
        let n = steps.max(1);
        let times = (0..=n)
            .map(|k| 1.0 + (EPS - 1.0) * k as f64 / n as f64)
            .collect();
        Self {
            canvas,
            mask_id,
            vocab,
            times,
            step: 0,
            cache: None,
            finished: false,
            forwards: 0,
            rng,
        }
    }

    pub fn canvas(&self) -> &[i64] {
        &self.canvas
    }

    pub fn done(&self) -> bool {
        self.finished
    }

    /// Forward passes this job has needed so far.
    pub fn forwards(&self) -> u32 {
        self.forwards
    }

    pub fn steps_taken(&self) -> usize {
        self.step
    }

    fn masked(&self) -> impl Iterator<Item = usize> + '_ {
        self.canvas
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == self.mask_id)
            .map(|(i, _)| i)
    }

    fn in_final_pass(&self) -> bool {
        self.step + 1 >= self.times.len()
    }

    /// Whether the next [`MaskedState::advance`] needs logits for the current canvas.
    pub fn needs_forward(&self) -> bool {
        if self.finished {
            return false;
        }
        if self.in_final_pass() {
            // An unchanged canvas keeps its cached logits: the final argmax needs no new pass.
            return self.masked().next().is_some() && self.cache.is_none();
        }
        self.cache.is_none()
    }

    /// Takes the logits `[L, V]` of the current canvas (only when [`needs_forward`] said so).
    ///
    /// [`needs_forward`]: MaskedState::needs_forward
    pub fn set_logits(&mut self, logits: &[f32]) {
        self.forwards += 1;
        let v = self.vocab;
        let mut probs = BTreeMap::new();
        let positions: Vec<usize> = self.masked().collect();
        for i in positions {
            let row = &logits[i * v..(i + 1) * v];
            probs.insert(i, subs_probs(row, self.mask_id as usize));
        }
        self.cache = Some(probs);
    }

    /// One step of the sampler (or the final argmax fill). Needs the cache to be set.
    pub fn advance(&mut self) {
        if self.finished {
            return;
        }
        if self.in_final_pass() {
            if let Some(cache) = self.cache.take() {
                for (i, p) in cache {
                    if self.canvas[i] == self.mask_id {
                        self.canvas[i] = argmax(&p) as i64;
                    }
                }
            }
            self.finished = true;
            return;
        }
        let Some(cache) = self.cache.take() else {
            return;
        };
        let (t, s) = (self.times[self.step], self.times[self.step + 1]);
        let stay = s / t;
        let mut changed = false;
        for (&i, p) in &cache {
            if self.rng.uniform() < stay {
                continue;
            }
            let mut best = (f64::NEG_INFINITY, 0usize);
            for (tok, &pi) in p.iter().enumerate() {
                let e = self.rng.exponential();
                let score = f64::from(pi) / e;
                if score > best.0 {
                    best = (score, tok);
                }
            }
            self.canvas[i] = best.1 as i64;
            changed = true;
        }
        self.step += 1;
        if !changed {
            // Same canvas, same p: the next step needs no forward pass.
            self.cache = Some(cache);
        }
    }
}

/// Softmax of one logits row with the mask token excluded.
pub fn subs_probs(row: &[f32], mask: usize) -> Vec<f32> {
    let max = row
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != mask)
        .map(|(_, &x)| x)
        .fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f64> = row
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            if i == mask || !x.is_finite() {
                0.0
            } else {
                f64::from(x - max).exp()
            }
        })
        .collect();
    let z: f64 = p.iter().sum();
    if z > 0.0 {
        p.iter_mut().for_each(|x| *x /= z);
    }
    p.into_iter().map(|x| x as f32).collect()
}

fn argmax(p: &[f32]) -> usize {
    let mut best = (f32::NEG_INFINITY, 0);
    for (i, &x) in p.iter().enumerate() {
        if x > best.0 {
            best = (x, i);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a state to the end against a fixed logits function; returns (canvas history, forwards).
    fn run(state: &mut MaskedState, logits: impl Fn(&[i64]) -> Vec<f32>) -> Vec<Vec<i64>> {
        let mut history = vec![state.canvas().to_vec()];
        let mut guard = 0;
        while !state.done() {
            if state.needs_forward() {
                let l = logits(state.canvas());
                state.set_logits(&l);
            }
            state.advance();
            history.push(state.canvas().to_vec());
            guard += 1;
            assert!(guard < 10_000);
        }
        history
    }

    fn peaked(vocab: usize, mask: usize) -> impl Fn(&[i64]) -> Vec<f32> {
        move |canvas: &[i64]| {
            let mut l = vec![0.0f32; canvas.len() * vocab];
            for i in 0..canvas.len() {
                // Favour token (i % (vocab-1)), and make the mask token the most likely: SUBS must
                // still never choose it.
                l[i * vocab + i % (vocab - 1)] = 3.0;
                l[i * vocab + mask] = 50.0;
            }
            l
        }
    }

    #[test]
    fn prefix_fixed_unmasked_never_change_nothing_left_masked() {
        let (vocab, mask) = (7usize, 6i64);
        for seed in 0..20 {
            let prefix = [4i64, 2, 5];
            let mut s = MaskedState::new(&prefix, 12, mask, vocab, 16, JobRng::new(seed));
            let hist = run(&mut s, peaked(vocab, mask as usize));
            for w in hist.windows(2) {
                assert_eq!(&w[1][..3], &prefix, "prefix changed");
                for (a, b) in w[0].iter().zip(&w[1]) {
                    if *a != mask {
                        assert_eq!(a, b, "an unmasked token changed");
                    }
                }
            }
            assert!(
                s.canvas().iter().all(|&t| t != mask),
                "masks left: {:?}",
                s.canvas()
            );
        }
    }

    #[test]
    fn cache_skips_forward_passes_when_nothing_changed() {
        let (vocab, mask) = (5usize, 4i64);
        let mut s = MaskedState::new(&[], 4, mask, vocab, 200, JobRng::new(3));
        run(&mut s, peaked(vocab, mask as usize));
        // At most one forward per change (4 positions) plus the first and the final pass.
        assert!(s.forwards() <= 6, "{} forwards for 200 steps", s.forwards());
        assert_eq!(s.steps_taken(), 200);
    }

    #[test]
    fn same_seed_same_tokens() {
        let (vocab, mask) = (9usize, 8i64);
        let flat = |c: &[i64]| vec![0.0f32; c.len() * vocab];
        let a = run(
            &mut MaskedState::new(&[1], 10, mask, vocab, 8, JobRng::new(11)),
            flat,
        );
        let b = run(
            &mut MaskedState::new(&[1], 10, mask, vocab, 8, JobRng::new(11)),
            flat,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn subs_excludes_the_mask_token() {
        let p = subs_probs(&[1.0, 2.0, 100.0], 2);
        assert_eq!(p[2], 0.0);
        assert!((p[0] + p[1] - 1.0).abs() < 1e-6);
    }
}
