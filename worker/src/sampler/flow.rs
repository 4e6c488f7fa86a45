//! Text to image: flow-matching Euler with classifier-free guidance.

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

/// One image being generated.
pub struct FlowState {
    /// `[1, C, h, w]` in model space.
    pub latents: Tensor,
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    step: usize,
    guidance: f32,
}

impl FlowState {
    /// Starts from latents ~ N(0, I) drawn from `rng`.
    pub fn new(
        shape: [usize; 3],
        rng: &mut JobRng,
        steps: usize,
        shift: f64,
        num_train_timesteps: usize,
        guidance: f32,
    ) -> Self {
        let n = shape.iter().product();
        let data = (0..n).map(|_| rng.normal()).collect();
        let (sigmas, timesteps) = schedule(steps, shift, num_train_timesteps);
        Self {
            latents: Tensor {
                shape: vec![1, shape[0], shape[1], shape[2]],
                data,
            },
            sigmas,
            timesteps,
            step: 0,
            guidance,
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

    /// Which velocities the step needs, `[unconditional, conditional]`: both, except at w = 1
    /// (v = v_c) and w = 0 (v = v_u), where the other row would be multiplied by zero.
    pub fn halves(&self) -> [bool; 2] {
        [self.guidance != 1.0, self.guidance != 0.0]
    }

    /// `v = v_u + w·(v_c − v_u)`; `x ← x + (σ_{i+1} − σ_i)·v`. A half that [`halves`] says is
    /// not needed is passed as the other one, which gives v exactly.
    ///
    /// [`halves`]: FlowState::halves
    pub fn apply(&mut self, v_uncond: &[f32], v_cond: &[f32]) {
        let dt = self.sigmas[self.step + 1] - self.sigmas[self.step];
        let w = self.guidance;
        for ((x, u), c) in self.latents.data.iter_mut().zip(v_uncond).zip(v_cond) {
            let v = u + w * (c - u);
            *x += dt * v;
        }
        self.step += 1;
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
}
