//! `ztnet`, the operator's command-line tool: admin commands through the coordinator's HTTPS
//! API, `policy check`/`explain` offline, and `status` through a node's local socket.
//!
//! Results go to stdout through [`output`]; an error is one line on stderr, `error: ` and the
//! whole cause chain, and the exit code is 1 (2 for a bad command line).

mod args;
mod client;
mod cmd;
mod config;
mod output;

use std::process::ExitCode;

use clap::Parser;

use crate::args::Cli;
use crate::client::ApiFailure;
use crate::output::{note, noteln};

fn main() -> ExitCode {
    if let Some(code) = cmd::identity::run_if_identity() {
        return code;
    }
    let cli = Cli::parse();
    match cmd::run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            noteln!("error: {}", ztnet_proto::report::chain(e.as_ref()));
            if let Some(ApiFailure(api)) = e.downcast_ref::<ApiFailure>() {
                let file = std::path::Path::new("policy");
                note!(
                    "{}",
                    cmd::policy::render_diagnostics(file, None, &api.diagnostics)
                );
            }
            ExitCode::FAILURE
        }
    }
}
