//! Text to image: flow matching with classifier-free guidance, by Euler (the reference's) or
//! DPM-Solver++(2M), guided at every step or inside an interval of σ.

use ddit_schemas::Solver;

use super::rng::JobRng;
use crate::tensor::Tensor;

/// Sigmas (with the final 0) and timesteps of diffusers' `FlowMatchEulerDiscreteScheduler`
/// (static shift) for `steps` inference steps.
///
/// Follows diffusers exactly, including its float types: timesteps are
/// `linspace(T·σ_max, T·σ_min, n)` in f64, where σ_max = 1 and σ_min is the *shifted* σ of the
/// last training timestep computed in f32 (`shift·(1/T) / (1 + (shift−1)·(1/T))`); then σ = t/T is
/// shifted, cast to f32, and timestep = σ·T in f32. (`ddit-model.md` writes the grid as
/// `linspace(1, 1/T, n)`; diffusers' endpoint is the shifted 1/T, which differs for shift ≠ 1.
/// The reference pipeline uses diffusers, so this does too; the committed values in
/// `tests/fixtures/scheduler.json` come from diffusers itself.)
pub fn schedule(steps: usize, shift: f64, num_train_timesteps: usize) -> (Vec<f32>, Vec<f32>) {
    let t = num_train_timesteps as f64;
    let s1 = 1.0f32 / num_train_timesteps as f32;
    let shift32 = shift as f32;
    let sigma_min = f64::from((shift32 * s1) / (1.0 + (shift32 - 1.0) * s1));
    let (start, stop) = (t, sigma_min * t);
    let grid: Vec<f64> = if steps == 1 {
        vec![start]
    } else {
        let step = (stop - start) / (steps - 1) as f64;
        (0..steps)
            .map(|i| {
                if i == steps - 1 {
                    stop
                } else {
                    i as f64 * step + start
                }
            })
            .collect()
    };
    let mut sigmas: Vec<f32> = grid
        .iter()
        .map(|&ts| {
            let s = ts / t;
            (shift * s / (1.0 + (shift - 1.0) * s)) as f32
        })
        .collect();
    let timesteps = sigmas
        .iter()
        .map(|s| s * num_train_timesteps as f32)
        .collect();
    sigmas.push(0.0);
    (sigmas, timesteps)
}

/// Sigmas (with the final 0) and timesteps of diffusers' `DPMSolverMultistepScheduler` with
/// `use_flow_sigmas`, `flow_shift` = `shift` and `final_sigmas_type="zero"`, in its float types:
/// α = numpy's `linspace(1, 1/T, n + 1)` in f64, σ the shifted 1 − α reversed without its 0,
/// timestep = σ·T in f64 truncated (diffusers casts to int64), σ cast to f32, then 0 appended.
/// Its grid stops one step earlier than Euler's, which ends at the shifted 1/T.
pub fn dpm_schedule(steps: usize, shift: f64, num_train_timesteps: usize) -> (Vec<f32>, Vec<f32>) {
    let t = num_train_timesteps as f64;
    let n = steps.max(1);
    let step = (1.0 / t - 1.0) / n as f64;
    let alpha = |j: usize| {
        if j == n {
            1.0 / t
        } else {
            j as f64 * step + 1.0
        }
    };
    let grid: Vec<f64> = (0..n)
        .map(|i| {
            let s = 1.0 - alpha(n - i);
            shift * s / (1.0 + (shift - 1.0) * s)
        })
        .collect();
    let timesteps = grid.iter().map(|s| (s * t).trunc() as f32).collect();
    let mut sigmas: Vec<f32> = grid.iter().map(|&s| s as f32).collect();
    sigmas.push(0.0);
    (sigmas, timesteps)
}

/// One image being generated.
pub struct FlowState {
    /// `[1, C, h, w]` in model space.
    pub latents: Tensor,
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    step: usize,
    guidance: f32,
    solver: Solver,
    /// Guidance only while σ lies in `[low, high]`.
    interval: Option<[f32; 2]>,
    /// DPM-Solver++(2M)'s memory: the previous step's data prediction, its σ and its guidance
    /// scale.
    previous: Option<(Vec<f32>, f32, f32)>,
}

impl FlowState {
    /// Starts from latents ~ N(0, I) drawn from `rng`.
    pub fn new(shape: [usize; 3], rng: &mut JobRng, steps: usize, s: &Sampling) -> Self {
        let n = shape.iter().product();
        let data = (0..n).map(|_| rng.normal()).collect();
        let (sigmas, timesteps) = match s.solver {
            Solver::Euler => schedule(steps, s.shift, s.num_train_timesteps),
            Solver::Dpmpp2m => dpm_schedule(steps, s.shift, s.num_train_timesteps),
        };
        Self {
            latents: Tensor {
                shape: vec![1, shape[0], shape[1], shape[2]],
                data,
            },
            sigmas,
            timesteps,
            step: 0,
            guidance: s.guidance,
            solver: s.solver,
            interval: s.guidance_interval,
            previous: None,
        }
    }

    pub fn done(&self) -> bool {
        self.step >= self.timesteps.len()
    }

    pub fn steps_taken(&self) -> usize {
        self.step
    }

    pub fn total_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The timestep of the current step.
    pub fn timestep(&self) -> f32 {
        self.timesteps[self.step.min(self.timesteps.len() - 1)]
    }

    /// The guidance scale of the current step: the job's inside its guidance interval, 1
    /// (the conditional velocity alone) outside it.
    fn scale(&self) -> f32 {
        let sigma = self.sigmas[self.step.min(self.sigmas.len() - 1)];
        match self.interval {
            Some([lo, hi]) if !(lo..=hi).contains(&sigma) => 1.0,
            _ => self.guidance,
        }
    }

    /// Which velocities the step needs, `[unconditional, conditional]`: both, except at w = 1
    /// (v = v_c) and w = 0 (v = v_u), where the other row would be multiplied by zero.
    pub fn halves(&self) -> [bool; 2] {
        let w = self.scale();
        [w != 1.0, w != 0.0]
    }

    /// `v = v_u + w·(v_c − v_u)`, then one solver step from σ_i to σ_{i+1}. A half that
    /// [`halves`] says is not needed is passed as the other one, which gives v exactly.
    ///
    /// [`halves`]: FlowState::halves
    pub fn apply(&mut self, v_uncond: &[f32], v_cond: &[f32]) {
        let (s, t) = (self.sigmas[self.step], self.sigmas[self.step + 1]);
        let w = self.scale();
        let guided = v_uncond.iter().zip(v_cond).map(|(u, c)| u + w * (c - u));
        match self.solver {
            Solver::Euler => {
                let dt = t - s;
                for (x, v) in self.latents.data.iter_mut().zip(guided) {
                    *x += dt * v;
                }
            }
            Solver::Dpmpp2m => {
                let x0: Vec<f32> = self
                    .latents
                    .data
                    .iter()
                    .zip(guided)
                    .map(|(x, v)| x - s * v)
                    .collect();
                // Second order from the previous data prediction, unless the guidance scale
                // changed at the edge of the guidance interval: x₀ under another scale is not
                // a point of the same trajectory to extrapolate from.
                let prev = self.previous.as_ref().filter(|p| p.2 == w);
                let [a, b, c] = dpmpp_2m(prev.map(|p| p.1), s, t);
                let prev = prev.map(|p| p.0.as_slice());
                for (i, x) in self.latents.data.iter_mut().enumerate() {
                    let p = prev.map_or(0.0, |p| c * p[i]);
                    *x = a * *x + b * x0[i] + p;
                }
                self.previous = Some((x0, s, w));
            }
        }
        self.step += 1;
    }
}

/// The coefficients `[a, b, c]` of DPM-Solver++(2M)'s step from σ = `s` to `t` for flow
/// matching (α = 1 − σ, x₀ = x − σ·v): `x_t = a·x + b·x₀ + c·x₀_prev`, where `x₀_prev` was
/// predicted at σ = `prev`. First order (DDIM in data prediction) on the first step, on the
/// last one (to σ = 0, where it returns x₀) and wherever the previous σ was 1 (λ = −∞).
pub fn dpmpp_2m(prev: Option<f32>, s: f32, t: f32) -> [f32; 3] {
    let (s, t) = (f64::from(s), f64::from(t));
    if t <= 0.0 {
        return [0.0, 1.0, 0.0];
    }
    let lambda = |sigma: f64| ((1.0 - sigma) / sigma).ln();
    let a = t / s;
    // e^{−h} with h = λ_t − λ_s, computed without λ_s (−∞ at σ = 1).
    let e = ((1.0 - s) * t) / (s * (1.0 - t));
    let first = (1.0 - t) * (1.0 - e);
    match prev.map(f64::from) {
        Some(p) if p < 1.0 && s < 1.0 => {
            let h = lambda(t) - lambda(s);
            let r = (lambda(s) - lambda(p)) / h;
            let d = first / (2.0 * r);
            [a as f32, (first + d) as f32, (-d) as f32]
        }
        _ => [a as f32, first as f32, 0.0],
    }
}

/// The sampler settings shared by a job's images.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    pub shift: f64,
    pub num_train_timesteps: usize,
    pub guidance: f32,
    pub solver: Solver,
    pub guidance_interval: Option<[f32; 2]>,
}

impl Sampling {
    /// The reference's sampler: Euler, guidance at every step.
    pub fn euler(shift: f64, num_train_timesteps: usize, guidance: f32) -> Self {
        Self {
            shift,
            num_train_timesteps,
            guidance,
            solver: Solver::Euler,
            guidance_interval: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_endpoints() {
        let (s, t) = schedule(28, 3.0, 1000);
        assert_eq!(s.len(), 29);
        assert_eq!(t.len(), 28);
        assert_eq!(s[0], 1.0);
        assert_eq!(*s.last().unwrap_or(&1.0), 0.0);
        assert_eq!(t[0], 1000.0);
        assert!(s.windows(2).all(|w| w[1] < w[0]));
        let (s1, _) = schedule(1, 3.0, 1000);
        assert_eq!(s1, vec![1.0, 0.0]);
    }

    #[test]
    fn dpm_schedule_is_diffusers() {
        // DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
        // flow_shift=3.0, final_sigmas_type="zero").set_timesteps(3) in diffusers 0.42.1.
        let (s, t) = dpm_schedule(3, 3.0, 1000);
        let want = [0.999_666_45, 0.856_775_3, 0.599_639_83, 0.0];
        assert!(
            s.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
            "{s:?}"
        );
        assert_eq!(t, vec![999.0, 856.0, 599.0]);
        let (s, _) = dpm_schedule(14, 3.0, 1000);
        assert!((s[12] - 0.333_074).abs() < 1e-6 && (s[13] - 0.187_335_92).abs() < 1e-6);
        // Timesteps truncated from f64 as diffusers does (float rounding decides some): their
        // sums at 28 and 333 steps, one that an f32 σ would floor to 899, and shift 1.
        let sum = |n| dpm_schedule(n, 3.0, 1000).1.iter().sum::<f32>();
        assert_eq!((sum(28), sum(333)), (19398.0, 225_342.0));
        assert_eq!(dpm_schedule(333, 3.0, 1000).1[83], 900.0);
        assert_eq!(dpm_schedule(3, 1.0, 1000).1, vec![999.0, 666.0, 332.0]);
    }

    /// Samples 1-D data ~ N(mu, sd²) with its exact velocity (E[x₀ | x_σ] is linear), from
    /// noise `eps`; the flow ODE's exact answer is mu + sd·eps.
    fn sample_gaussian(solver: Solver, steps: usize, eps: f32) -> f32 {
        let (mu, sd) = (0.7f32, 0.3f32);
        let s = Sampling {
            solver,
            ..Sampling::euler(3.0, 1000, 1.0)
        };
        let mut st = FlowState::new([1, 1, 1], &mut JobRng::new(0), steps, &s);
        st.latents.data[0] = eps;
        while !st.done() {
            let sigma = st.sigmas[st.step];
            let x = st.latents.data[0];
            let a = 1.0 - sigma;
            let x0 = mu + a * sd * sd / (a * a * sd * sd + sigma * sigma) * (x - a * mu);
            let v = (x - x0) / sigma;
            st.apply(&[v], &[v]);
        }
        st.latents.data[0]
    }

    #[test]
    fn dpmpp_2m_follows_diffusers_and_both_solvers_reach_the_exact_flow() {
        // diffusers 0.42.1's DPMSolverMultistepScheduler (flow sigmas, shift 3, final σ 0) on the
        // same exact velocity, from eps = -1.5, 0.2 and 2.0.
        let diffusers = [
            (8, [0.448_422_35, 0.733_499_3, 1.035_345_5]),
            (14, [0.350_225_33, 0.746_575, 1.166_239_3]),
        ];
        for (steps, want) in diffusers {
            for (eps, w) in [-1.5f32, 0.2, 2.0].into_iter().zip(want) {
                let got = sample_gaussian(Solver::Dpmpp2m, steps, eps);
                assert!(
                    (got - w).abs() < 1e-4,
                    "{steps} steps, eps {eps}: {got} != {w}"
                );
            }
        }
        for eps in [-1.5f32, 0.2, 2.0] {
            let exact = 0.7 + 0.3 * eps;
            let err = |solver| (sample_gaussian(solver, 200, eps) - exact).abs();
            // Both converge; at 200 steps the second-order one is the closer.
            let (e, d) = (err(Solver::Euler), err(Solver::Dpmpp2m));
            assert!(e < 2e-2 && d < 3e-3 && d < e, "euler {e}, dpm++2m {d}");
        }
    }

    #[test]
    fn dpmpp_2m_is_first_order_at_the_ends_and_exact_for_a_constant_prediction() {
        assert_eq!(dpmpp_2m(Some(0.5), 0.3, 0.0), [0.0, 1.0, 0.0]);
        assert_eq!(dpmpp_2m(Some(1.0), 0.9, 0.8)[2], 0.0);
        assert_eq!(dpmpp_2m(None, 1.0, 0.8)[2], 0.0);
        // With x₀ the same at every step, x = (1 − σ)·x₀ + σ·ε stays on its line: a + b + c = 1
        // on x₀ and a·σ_s = σ_t on ε.
        let [a, b, c] = dpmpp_2m(Some(0.8), 0.6, 0.4);
        assert!((a * 0.6 - 0.4).abs() < 1e-6 && (a * 0.4 + b + c - 0.6).abs() < 1e-6);
        // And the split between the two predictions, by hand: h = λ(0.4) − λ(0.6),
        // r = (λ(0.6) − λ(0.8)) / h, d = α_t(1 − e^{−h}) / 2r.
        let want = [0.666_666_7, 0.471_130_04, -0.137_796_7];
        assert!(
            [a, b, c]
                .iter()
                .zip(want)
                .all(|(x, w)| (x - w).abs() < 1e-6),
            "{a} {b} {c}"
        );
    }

    #[test]
    fn dpmpp_2m_steps_first_order_where_the_guidance_scale_changes() {
        let s = Sampling {
            solver: Solver::Dpmpp2m,
            guidance_interval: Some([0.0, 0.5]),
            ..Sampling::euler(1.0, 1000, 5.0)
        };
        let mut st = FlowState::new([1, 1, 1], &mut JobRng::new(0), 8, &s);
        let mut crossed = 0;
        while !st.done() {
            let (sigma, next) = (st.sigmas[st.step], st.sigmas[st.step + 1]);
            let before = st.previous.as_ref().map(|p| p.2);
            let x = st.latents.data[0];
            st.apply(&[0.0], &[1.0]);
            let w = st.previous.as_ref().map_or(0.0, |p| p.2);
            if before.is_some_and(|b| b != w) {
                crossed += 1;
                // First order (DDIM in data prediction) from x₀ = x − σ·v with v = 5.
                let [a, b, _] = dpmpp_2m(None, sigma, next);
                let want = a * x + b * (x - sigma * 5.0);
                assert!((st.latents.data[0] - want).abs() < 1e-6, "σ {sigma}");
            }
        }
        assert_eq!(crossed, 1);
    }

    #[test]
    fn outside_the_guidance_interval_only_the_conditional_row_runs() {
        let s = Sampling {
            guidance_interval: Some([0.2, 0.6]),
            ..Sampling::euler(1.0, 1000, 5.0)
        };
        let mut st = FlowState::new([1, 1, 1], &mut JobRng::new(0), 10, &s);
        let mut seen = vec![];
        while !st.done() {
            let sigma = st.sigmas[st.step];
            seen.push((sigma, st.halves()));
            let x = st.latents.data[0];
            // Guidance 5 on (u, c) = (0, 1) gives 5; the conditional row alone gives 1.
            st.apply(&[0.0], &[1.0]);
            let dt = st.sigmas[st.step] - sigma;
            let v = (st.latents.data[0] - x) / dt;
            let want = if (0.2..=0.6).contains(&sigma) {
                5.0
            } else {
                1.0
            };
            assert!((v - want).abs() < 1e-3, "σ {sigma}: v {v}");
        }
        assert!(seen.iter().any(|(_, h)| *h == [true, true]));
        assert!(seen.iter().any(|(_, h)| *h == [false, true]));
    }
}
