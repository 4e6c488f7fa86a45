//! `ddit-worker eval shapes|shapes-images`: ShapesEval on a package, or on images made elsewhere.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use ddit_shapes_eval::{score_generated, write_predictions, write_sheet};
use ddit_worker::eval;

use super::engine::EngineArgs;

#[derive(Subcommand)]
pub enum EvalCmd {
    /// ShapesEval: caption exact match and attributes, VQA accuracy, generation (scene checker).
    Shapes(Box<ShapesArgs>),
    /// Scores images generated elsewhere (`{images}/gen_{id:04}.png`, e.g. by the PyTorch
    /// reference sampler) with the same scene checker as `eval shapes`.
    ShapesImages {
        #[arg(long, env = "DDIT_SET")]
        set: PathBuf,
        #[arg(long, env = "DDIT_IMAGES")]
        images: PathBuf,
        #[arg(long, env = "DDIT_LIMIT")]
        limit: Option<usize>,
    },
}

#[derive(Args)]
pub struct ShapesArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// The set folder (scenes.jsonl and PNGs), e.g. models/shapes-eval.
    #[arg(long, env = "DDIT_SET")]
    set: PathBuf,
    /// Only the first N scenes.
    #[arg(long, env = "DDIT_LIMIT")]
    limit: Option<usize>,
    /// Where the contact sheet of generated images and predictions.jsonl (every scene's
    /// caption, answers and generation verdict next to the references) go.
    #[arg(long, default_value = ".ddit/eval", env = "DDIT_OUT")]
    out: PathBuf,
    #[arg(long, default_value_t = 16, env = "DDIT_MAX_BATCH")]
    max_batch: usize,
    /// Base seed (scene i uses seed + i).
    #[arg(long, default_value_t = 0, env = "DDIT_SEED")]
    seed: u64,
}

pub fn run(cmd: EvalCmd) -> anyhow::Result<()> {
    match cmd {
        EvalCmd::Shapes(a) => shapes(*a),
        EvalCmd::ShapesImages { set, images, limit } => {
            let sc = score_generated(&set, &images, limit)?;
            println!(
                "generation on {} scenes: all {:.3} count {:.3} colour {:.3} shape {:.3} position {:.3}",
                sc.scenes, sc.generation, sc.gen_count, sc.gen_colour, sc.gen_shape, sc.gen_position
            );
            println!("generation={:.3}", sc.generation);
            Ok(())
        }
    }
}

fn shapes(a: ShapesArgs) -> anyhow::Result<()> {
    let (mut engines, codec) = a.engine.load(a.max_batch, None)?;
    let start = std::time::Instant::now();
    let opts = eval::EvalOptions {
        limit: a.limit,
        runner: a.engine.runner(a.max_batch),
        seed: a.seed,
    };
    let report = eval::run(&mut engines, &codec, &a.set, opts)?;
    let (sheet, legend) = write_sheet(&a.out, &report.images)?;
    let preds = write_predictions(&a.out, &report.predictions)?;
    eprintln!(
        "evaluated in {:.1}s; contact sheet {} (prompts in {}); predictions {}",
        start.elapsed().as_secs_f64(),
        sheet.display(),
        legend.display(),
        preds.display()
    );
    print!("{}", report.scores.table());
    Ok(())
}
