//! A generate job's speed options: the solver, the guidance interval and the block cache, set
//! one by one or through the `speed` preset. All off by default, so a default job's output is the
//! reference sampler's; each is opt-in per job and its quality is measured in
//! `docs/fast-modes.md`.

use ddit_schemas::{GenerateParams, Manifest, Role, Solver, Speed};

use crate::error::{Result, WorkerError};

/// What a generate job's sampler does beyond plain Euler with guidance at every step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpeedOptions {
    pub solver: Solver,
    /// `[low, high]` in σ: guidance only inside it.
    pub guidance_interval: Option<[f32; 2]>,
    /// Relative L1 change of the first block's residual under which the other blocks are
    /// skipped; 0: never.
    pub block_cache: f32,
}

impl SpeedOptions {
    /// The reference's sampler.
    pub const EXACT: Self = Self {
        solver: Solver::Euler,
        guidance_interval: None,
        block_cache: 0.0,
    };

    /// `"speed": "fast"` (and its step count, used when the job sets none): of the combinations
    /// `tools/fastmodes/measure.py` measured, the fastest that keeps the demo model's ShapesEval
    /// generation score at 0.81 or more (0.817 against 0.820 exact, 1.78× the exact sampler;
    /// `docs/fast-modes.md`). Neither the guidance interval nor DPM-Solver++(2M) made that cut
    /// on the demo model.
    pub const FAST: Self = Self {
        solver: Solver::Euler,
        guidance_interval: None,
        block_cache: 0.1,
    };
    pub const FAST_STEPS: u32 = 16;

    /// Whether the first block's output is compared at every step.
    pub fn caches(&self) -> bool {
        self.block_cache > 0.0
    }

    /// The block cache needs the first joint block in a file of its own (`ddit-export` writes
    /// it so since the cache came in). On an older package (or a one-block model) a job that
    /// sets `block_cache` is refused, naming the field; the `fast` preset runs without it.
    pub fn fit(mut self, p: &GenerateParams, m: &Manifest) -> Result<Self> {
        let first = m.by_role(Role::JointBlocks).next().and_then(|s| s.blocks);
        if !self.caches() || first == Some([0, 1]) {
            return Ok(self);
        }
        if p.block_cache.is_none() {
            self.block_cache = 0.0;
            return Ok(self);
        }
        let holds = match first {
            Some([a, b]) => format!("holds blocks {a} to {}", b.saturating_sub(1)),
            None => "is missing (the model has one block)".into(),
        };
        Err(WorkerError::invalid(
            "params.block_cache",
            format!(
                "this package's first joint-block file {holds}, not block 0 alone; export it \
                 again with this ddit-export to use the block cache"
            ),
        ))
    }

    /// The job's options and its default step count, from the preset and the fields it sets.
    pub fn of(p: &GenerateParams, default_steps: u32) -> Result<(Self, u32)> {
        let (base, steps) = match p.speed {
            None | Some(Speed::Exact) => (Self::EXACT, default_steps),
            Some(Speed::Fast) => (Self::FAST, Self::FAST_STEPS),
        };
        let guidance_interval = match p.guidance_interval {
            None => base.guidance_interval,
            Some([lo, hi]) => {
                let unit = |x: f32| x.is_finite() && (0.0..=1.0).contains(&x);
                if !(unit(lo) && unit(hi) && lo <= hi) {
                    return Err(WorkerError::invalid(
                        "params.guidance_interval",
                        format!("[{lo}, {hi}] must be [low, high] with 0 <= low <= high <= 1"),
                    ));
                }
                Some([lo, hi])
            }
        };
        let block_cache = p.block_cache.unwrap_or(base.block_cache);
        if !block_cache.is_finite() || !(0.0..=1.0).contains(&block_cache) {
            return Err(WorkerError::invalid(
                "params.block_cache",
                format!("{block_cache} is outside the allowed range 0..=1"),
            ));
        }
        let opts = Self {
            solver: p.solver.unwrap_or(base.solver),
            guidance_interval,
            block_cache,
        };
        Ok((opts, steps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: serde_json::Value) -> GenerateParams {
        let mut v = v;
        v["prompt"] = "p".into();
        serde_json::from_value(v).expect("valid generate params")
    }

    #[test]
    fn absent_and_exact_are_the_reference_sampler() {
        for p in [
            params(serde_json::json!({})),
            params(serde_json::json!({"speed": "exact"})),
        ] {
            assert_eq!(
                SpeedOptions::of(&p, 28).ok(),
                Some((SpeedOptions::EXACT, 28))
            );
        }
    }

    #[test]
    fn fields_set_win_over_the_preset() {
        let p =
            params(serde_json::json!({"speed": "fast", "solver": "dpmpp2m", "block_cache": 0.0}));
        let (o, steps) = SpeedOptions::of(&p, 28).unwrap_or((SpeedOptions::EXACT, 0));
        assert_eq!(steps, SpeedOptions::FAST_STEPS);
        assert_eq!(o.solver, Solver::Dpmpp2m);
        assert!(!o.caches() && SpeedOptions::FAST.caches());
        assert_eq!(o.guidance_interval, SpeedOptions::FAST.guidance_interval);
        let p = params(serde_json::json!({"speed": "fast", "guidance_interval": [0.1, 0.9]}));
        let (o, _) = SpeedOptions::of(&p, 28).unwrap_or((SpeedOptions::EXACT, 0));
        assert_eq!(
            (o.guidance_interval, o.block_cache),
            (Some([0.1, 0.9]), 0.1)
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        for (v, field) in [
            (
                serde_json::json!({"guidance_interval": [0.8, 0.2]}),
                "params.guidance_interval",
            ),
            (
                serde_json::json!({"guidance_interval": [-0.1, 0.5]}),
                "params.guidance_interval",
            ),
            (
                serde_json::json!({"block_cache": 1.5}),
                "params.block_cache",
            ),
        ] {
            let err = SpeedOptions::of(&params(v), 28)
                .err()
                .map(|e| e.to_string());
            assert!(err.as_deref().is_some_and(|e| e.contains(field)), "{err:?}");
        }
    }
}
