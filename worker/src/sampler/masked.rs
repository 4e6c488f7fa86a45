//! Image to text and VQA: MDLM's "ddpm_cache" masked-diffusion sampler with the SUBS
//! parameterisation.
//!
//! Times `t_k = linspace(1, 1e-5, N+1)`. At step k (t = t_k, s = t_{k+1}) every still-masked
//! position stays masked with probability s/t, else takes a token drawn from
//! p = softmax(logits) with the mask token's logit at −∞. Unmasked tokens and the fixed prefix
//! never change. If a step changed nothing, the next step reuses the logits without a forward
//! pass. After the last step, one more forward pass fills any remaining masks by argmax.
//!
//! The draw is cheap: per masked position (ascending) one uniform decides "stays masked"
//! first; only a position that unmasks computes its distribution and takes the token where the
//! cumulative sum first exceeds a second uniform times the total. A step that unmasks m of M
//! positions costs m softmaxes, not M, and no random number per vocabulary entry.
//!
//! The draw is not exact. The weights `exp(x − max)` and their running sum are f32, and token i
//! is drawn for u in [C(i−1)/C(n), C(i)/C(n)) of those sums, so the distribution drawn from
//! differs from the true softmax (mask token removed) by the rounding of the f32 sum, which grows
//! with the vocabulary. At T5's 32 128 the total-variation distance was 1.1e-5 to 1.9e-4 on rows
//! of normal logits with standard deviation 1 to 8 (the issue that asked for this measured up to
//! 4.7e-4 on its rows); the test asserts below 1e-3. A token whose weight is below half an f32
//! ulp of the running sum when it is added can never be drawn: up to 13 901 of the 32 128 tokens
//! of those rows, together at most 6e-5 of probability (part of the distance above). Summing in
//! f64 would make the draw exact to about 1e-12 but would change seeded captions at large
//! vocabularies (with the same uniforms it picked another token in 97 of 2 000 draws at 32 128,
//! and in 1 of 2 000 000 at the demo model's 48), so the f32 sum stays and seeded jobs keep
//! their tokens.

use super::rng::JobRng;

/// The smallest time of the schedule.
pub const EPS: f64 = 1e-5;

/// The logits rows of the masked positions of one canvas, valid while the canvas is unchanged.
struct Cached {
    positions: Vec<usize>,
    /// `positions.len()` rows of `vocab` logits, in the order of `positions`.
    rows: Vec<f32>,
}

pub struct MaskedState {
    canvas: Vec<i64>,
    mask_id: i64,
    vocab: usize,
    times: Vec<f64>,
    step: usize,
    cache: Option<Cached>,
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

    /// The positions still masked, ascending: the rows [`set_logits`] takes.
    ///
    /// [`set_logits`]: MaskedState::set_logits
    pub fn masked_positions(&self) -> Vec<usize> {
        self.masked().collect()
    }

    fn in_final_pass(&self) -> bool {
        self.step + 1 >= self.times.len()
    }

    /// Whether the next [`MaskedState::advance`] needs logits for the current canvas.
    pub fn needs_forward(&self) -> bool {
        if self.finished {
            return false;
        }
        // Nothing masked: nothing to draw. An unchanged canvas keeps its cached logits.
        self.cache.is_none() && self.masked().next().is_some()
    }

    /// Takes the logits `[M, V]` of the masked positions of the current canvas, in the order of
    /// [`masked_positions`] (only when [`needs_forward`] said so). Nothing is normalised until a
    /// position unmasks.
    ///
    /// [`masked_positions`]: MaskedState::masked_positions
    /// [`needs_forward`]: MaskedState::needs_forward
    pub fn set_logits(&mut self, rows: &[f32]) {
        self.forwards += 1;
        let positions = self.masked_positions();
        debug_assert_eq!(rows.len(), positions.len() * self.vocab);
        self.cache = Some(Cached {
            positions,
            rows: rows.to_vec(),
        });
    }

    /// One step of the sampler (or the final argmax fill). Needs the cache to be set.
    pub fn advance(&mut self) {
        if self.finished {
            return;
        }
        let Some(cache) = self.cache.take() else {
            if self.in_final_pass() {
                self.finished = true;
            } else if self.masked().next().is_none() {
                // Everything unmasked before the last step: the remaining steps draw nothing.
                self.step += 1;
            }
            return;
        };
        let (v, mask) = (self.vocab, self.mask_id as usize);
        let rows = cache.positions.iter().zip(cache.rows.chunks_exact(v));
        if self.in_final_pass() {
            for (&i, row) in rows {
                self.canvas[i] = subs_argmax(row, mask) as i64;
            }
            self.finished = true;
            return;
        }
        let stay = self.times[self.step + 1] / self.times[self.step];
        let mut changed = false;
        for (&i, row) in rows {
            if self.rng.uniform() < stay {
                continue;
            }
            self.canvas[i] = subs_draw(row, mask, self.rng.uniform()) as i64;
            changed = true;
        }
        self.step += 1;
        if !changed {
            // Same canvas, same logits: the next step needs no forward pass.
            self.cache = Some(cache);
        }
    }
}

/// The SUBS weight of one logit (unnormalised): `exp(x − max)`, 0 for the mask token and for a
/// non-finite logit.
fn subs_weight(i: usize, x: f32, mask: usize, max: f32) -> f32 {
    if i == mask || !x.is_finite() {
        0.0
    } else {
        (x - max).exp()
    }
}

/// (token, running f32 sum of the weights up to and including it) for every token with a
/// weight, ascending. The last sum is the total.
fn subs_cumulative(row: &[f32], mask: usize) -> impl Iterator<Item = (usize, f32)> + '_ {
    let max = subs_max(row, mask);
    row.iter()
        .enumerate()
        .scan(0.0f32, move |cum, (i, &x)| {
            let w = subs_weight(i, x, mask, max);
            *cum += w;
            Some((i, w, *cum))
        })
        .filter(|&(_, w, _)| w > 0.0)
        .map(|(i, _, cum)| (i, cum))
}

/// The largest finite logit other than the mask token's (−∞ when there is none).
fn subs_max(row: &[f32], mask: usize) -> f32 {
    row.iter()
        .enumerate()
        .filter(|&(i, x)| i != mask && x.is_finite())
        .map(|(_, &x)| x)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Draws a token from `softmax(row)` without the mask token, with one uniform `u` in [0, 1):
/// the first token whose cumulative weight (f32, [`subs_cumulative`]) exceeds `u` times the
/// total.
pub fn subs_draw(row: &[f32], mask: usize, u: f64) -> usize {
    let total = subs_cumulative(row, mask)
        .last()
        .map_or(0.0, |(_, cum)| cum);
    let target = u * f64::from(total);
    let mut last = 0;
    for (i, cum) in subs_cumulative(row, mask) {
        last = i;
        if f64::from(cum) > target {
            return i;
        }
    }
    // Only when rounding put `target` at the total: the last token with weight.
    last
}

/// The most likely token other than the mask token (the first on a tie).
fn subs_argmax(row: &[f32], mask: usize) -> usize {
    let mut best = (f32::NEG_INFINITY, 0);
    for (i, &x) in row.iter().enumerate() {
        if i != mask && x.is_finite() && x > best.0 {
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
                let v = l.len() / state.canvas().len();
                let rows: Vec<f32> = state
                    .masked_positions()
                    .iter()
                    .flat_map(|&i| l[i * v..(i + 1) * v].iter().copied())
                    .collect();
                state.set_logits(&rows);
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

    /// Pearson's chi-square of observed counts against expected probabilities (categories with
    /// p = 0 must have no counts).
    fn chi_square(counts: &[u64], p: &[f64]) -> f64 {
        let n: u64 = counts.iter().sum();
        counts
            .iter()
            .zip(p)
            .map(|(&c, &pi)| {
                if pi == 0.0 {
                    assert_eq!(c, 0, "a token with probability 0 was drawn");
                    0.0
                } else {
                    let e = pi * n as f64;
                    (c as f64 - e).powi(2) / e
                }
            })
            .sum()
    }

    /// The exact SUBS distribution in f64.
    fn exact(row: &[f32], mask: usize) -> Vec<f64> {
        let w: Vec<f64> = row
            .iter()
            .enumerate()
            .map(|(i, &x)| if i == mask { 0.0 } else { f64::from(x).exp() })
            .collect();
        let z: f64 = w.iter().sum();
        w.into_iter().map(|x| x / z).collect()
    }

    /// The sampler this one replaced: an f64 softmax, then Gumbel-max as an exponential race
    /// (argmax p_i / E_i with one Exp(1) per vocabulary entry).
    fn exponential_race(row: &[f32], mask: usize, rng: &mut JobRng) -> usize {
        let p = exact(row, mask);
        let mut best = (f64::NEG_INFINITY, 0);
        for (i, &pi) in p.iter().enumerate() {
            let score = pi / rng.exponential();
            if score > best.0 {
                best = (score, i);
            }
        }
        best.1
    }

    // 99.9 % quantiles of chi-square (df 10 and 15).
    const CHI2_DF10: f64 = 29.59;
    const CHI2_DF15: f64 = 37.70;

    #[test]
    fn one_uniform_draw_matches_the_exponential_race_and_the_exact_distribution() {
        let mask = 4;
        let row: Vec<f32> = vec![
            0.3, -1.2, 2.0, 0.0, 9.0, 1.1, -0.4, 0.7, -3.0, 1.6, 0.2, -0.9,
        ];
        let p = exact(&row, mask);
        let n = 200_000;
        let (mut fast, mut race) = (vec![0u64; row.len()], vec![0u64; row.len()]);
        let mut rng = JobRng::new(1);
        for _ in 0..n {
            fast[subs_draw(&row, mask, rng.uniform())] += 1;
            race[exponential_race(&row, mask, &mut rng)] += 1;
        }
        // 11 tokens can be drawn: 10 degrees of freedom.
        let (cf, cr) = (chi_square(&fast, &p), chi_square(&race, &p));
        assert!(cf < CHI2_DF10, "new sampler vs exact: chi2 {cf}");
        assert!(cr < CHI2_DF10, "reference vs exact: chi2 {cr}");
        // The two samplers against each other (two-sample chi-square, same df).
        let two: f64 = fast
            .iter()
            .zip(&race)
            .filter(|(a, b)| **a + **b > 0)
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2) / (a + b) as f64)
            .sum();
        assert!(two < CHI2_DF10, "new vs reference: chi2 {two}");
    }

    #[test]
    fn the_draw_never_picks_the_mask_or_a_non_finite_logit() {
        let row = [f32::NAN, 1.0, f32::NEG_INFINITY, 80.0, 2.0];
        for u in [0.0, 0.5, 0.999_999, 1.0 - f64::EPSILON] {
            let t = subs_draw(&row, 3, u);
            assert!(t == 1 || t == 4, "u {u}: token {t}");
        }
        assert_eq!(subs_draw(&[1.0, 2.0, 100.0], 2, 0.999_999_999), 1);
        assert_eq!(subs_argmax(&[1.0, 2.0, 100.0], 2), 1);
    }

    /// The distribution a cumulative sum draws from with one uniform: token i for u in
    /// [C(i−1)/C(n), C(i)/C(n)).
    fn drawn_from(cum: impl Iterator<Item = (usize, f64)>, vocab: usize) -> Vec<f64> {
        let cum: Vec<(usize, f64)> = cum.collect();
        let total = cum.last().map_or(0.0, |c| c.1);
        let mut q = vec![0.0; vocab];
        let mut before = 0.0;
        for (i, c) in cum {
            q[i] = (c - before) / total;
            before = c;
        }
        q
    }

    /// The same running sum in f64 (f64 weights): how far the measurement itself is off.
    fn f64_cumulative(row: &[f32], mask: usize) -> impl Iterator<Item = (usize, f64)> + '_ {
        let max = f64::from(subs_max(row, mask));
        row.iter()
            .enumerate()
            .filter(move |&(i, x)| i != mask && x.is_finite())
            .scan(0.0f64, move |cum, (i, &x)| {
                *cum += (f64::from(x) - max).exp();
                Some((i, *cum))
            })
    }

    /// Total-variation distance, and the tokens with probability above 1e-15 in `p` that have
    /// none in `q` (can never be drawn): how many, and their probability in `p`.
    fn distance(p: &[f64], q: &[f64]) -> (f64, usize, f64) {
        let tv = p.iter().zip(q).map(|(a, b)| (a - b).abs()).sum::<f64>() / 2.0;
        let lost: Vec<f64> = p
            .iter()
            .zip(q)
            .filter(|&(&a, &b)| a > 1e-15 && b == 0.0)
            .map(|(&a, _)| a)
            .collect();
        (tv, lost.len(), lost.iter().fold(0.0, |a, b| a + b))
    }

    /// The bound in the module docs: measured 1.1e-5 to 1.9e-4 on the rows below (the issue
    /// that asked for it: up to 4.7e-4 on its rows); 1e-3 is twice the largest either saw.
    const DRAW_TV: f64 = 1e-3;

    /// At T5's vocabulary, the distribution the f32 running sum draws from against the f64
    /// softmax: the documented bound on total variation and on the probability of the tokens it
    /// can never draw. The same measurement on an f64 running sum gives about 1e-12, so it
    /// measures the draw, not itself.
    #[test]
    fn the_draw_is_within_its_documented_distance_at_a_real_vocabulary() {
        let (vocab, mask) = (32_128, 32_099);
        let mut rng = JobRng::new(7);
        for scale in [1.0f32, 2.0, 4.0, 8.0] {
            let row: Vec<f32> = (0..vocab).map(|_| rng.normal() * scale).collect();
            let p = exact(&row, mask);
            let drawn = subs_cumulative(&row, mask).map(|(i, c)| (i, f64::from(c)));
            let (tv, lost, lost_p) = distance(&p, &drawn_from(drawn, vocab));
            let (tv64, lost64, _) = distance(&p, &drawn_from(f64_cumulative(&row, mask), vocab));
            println!(
                "logit sd {scale}: TV {tv:.2e}, {lost} tokens never drawn (p {lost_p:.1e}); \
                 f64 sum: TV {tv64:.1e}, {lost64} never drawn"
            );
            assert!(tv < DRAW_TV, "logit sd {scale}: TV {tv:.2e}");
            assert!(lost_p <= tv, "logit sd {scale}: lost p {lost_p:.2e}");
            assert!(tv64 < 1e-11 && lost64 == 0, "f64: {tv64:.2e} {lost64}");
        }
    }

    /// Whole runs over many seeds with canvas-independent logits: every position's final token
    /// follows p, and the step at which it unmasks is uniform over the steps (the linear schedule
    /// gives each step the same share of the probability to unmask).
    #[test]
    fn whole_runs_over_many_seeds_follow_the_schedule_and_p() {
        let (vocab, mask, len, steps) = (12usize, 11i64, 6usize, 16usize);
        let logits = |c: &[i64]| -> Vec<f32> {
            (0..c.len() * vocab)
                .map(|k| ((k % vocab) as f32 * 0.37).sin() * 1.5)
                .collect()
        };
        let p = exact(&logits(&[0])[..vocab], mask as usize);
        let (mut tokens, mut when) = (vec![0u64; vocab], vec![0u64; steps]);
        for seed in 0..3000 {
            let mut s = MaskedState::new(&[], len, mask, vocab, steps, JobRng::new(seed));
            let hist = run(&mut s, logits);
            for pos in 0..len {
                let k = hist.iter().position(|c| c[pos] != mask).expect("filled");
                // hist[k] is the canvas after step k-1 (the final pass is step `steps`, and
                // reaching it has probability 1e-5 per position).
                when[(k - 1).min(steps - 1)] += 1;
                tokens[s.canvas()[pos] as usize] += 1;
            }
        }
        let c = chi_square(&tokens, &p);
        assert!(c < CHI2_DF10, "tokens: chi2 {c} {tokens:?}");
        let c = chi_square(&when, &vec![1.0 / steps as f64; steps]);
        assert!(c < CHI2_DF15, "unmask steps: chi2 {c} {when:?}");
    }
}
