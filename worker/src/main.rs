//! `ddit-worker`: local commands (generate, caption, vqa, batch, eval), the queue worker (serve)
//! and the fleet's clients (submit, fetch-model, push-model, probe). Every flag also reads
//! `DDIT_<FLAG>` from the environment. One module per subcommand under `cli/`.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match cli::run(cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
