//! One module per noun; [`run`] dispatches.

pub mod admin;
pub mod apikey;
pub mod ca;
pub mod identity;
pub mod key;
pub mod policy;
pub mod status;
pub mod workload;

use anyhow::Result;

use crate::args::{Cli, Command, KeyCmd, PolicyCmd};
use crate::client::ApiClient;
use crate::config;

/// Runs a parsed command line.
pub fn run(cli: &Cli) -> Result<()> {
    let fmt = cli.global.output;

    // Offline commands first: they need no coordinator settings.
    match &cli.command {
        Command::Login(a) => return admin::login(&cli.global, a),
        Command::Status(a) => return status::run(fmt, a),
        Command::Key(KeyCmd::Check(a)) => return key::check(&a.key),
        Command::Identity(_) => {
            anyhow::bail!("put `identity` first, before any option: ztnet identity fetch ...")
        }
        Command::Policy(PolicyCmd::Check(a)) => return policy::check(fmt, &a.file),
        Command::Policy(PolicyCmd::Explain(a)) => return policy::explain(fmt, a),
        _ => {}
    }

    let resolved = config::resolve(&cli.global)?;
    let client = ApiClient::new(&resolved)?;
    match &cli.command {
        Command::Network(c) => admin::network(&client, fmt, c),
        Command::Token(c) => admin::token(&client, fmt, c),
        Command::Node(c) => admin::node(&client, fmt, c),
        Command::Policy(c) => policy::online(&client, fmt, c),
        Command::Audit(a) => admin::audit(&client, fmt, &a.network),
        Command::Workload(c) => workload::run(&client, fmt, c),
        Command::Ca(c) => ca::run(&client, fmt, c),
        Command::ApiKey(c) => apikey::run(&client, fmt, c),
        Command::Login(_) | Command::Status(_) | Command::Key(_) | Command::Identity(_) => {
            unreachable!("handled above without a client")
        }
    }
}
