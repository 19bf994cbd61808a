//! `ztnet api-key ...`: create (the key is printed once, alone on stdout), list and revoke the
//! coordinator's admin API keys.

use anyhow::Result;
use clap::{Args, Subcommand};
use ztnet_proto::admin::{ApiKeyCreated, ApiKeyInfo, CreateApiKey};

use super::admin::segment;
use crate::args::OutputFormat;
use crate::client::ApiClient;
use crate::output::{self, Table, emit, noteln, time};

/// `ztnet api-key ...`.
#[derive(Debug, Subcommand)]
pub enum ApiKeyCmd {
    /// Makes another admin API key; prints it alone on stdout, this once (the coordinator keeps
    /// only its hash).
    #[command(after_help = "\
Example:
  (umask 077; ztnet api-key create ci-deploy > ci-deploy.key)")]
    Create(ApiKeyName),
    /// Lists the keys: name, who made it and when, and whether it was revoked.
    #[command(after_help = "Example:\n  ztnet api-key list")]
    List,
    /// Revokes a key: every request with it gets 401 from then on. The last live key cannot
    /// be revoked.
    #[command(after_help = "Example:\n  ztnet api-key revoke ci-deploy")]
    Revoke(ApiKeyName),
}

/// A key's name.
#[derive(Debug, Args)]
pub struct ApiKeyName {
    /// The key's name: letters, digits, '.', '_' and '-'.
    pub name: String,
}

/// Runs `ztnet api-key ...`.
pub fn run(client: &ApiClient, fmt: OutputFormat, cmd: &ApiKeyCmd) -> Result<()> {
    match cmd {
        ApiKeyCmd::Create(a) => {
            let created: ApiKeyCreated = client.post(
                "/v1/api-keys",
                &CreateApiKey {
                    name: a.name.clone(),
                },
            )?;
            if fmt == OutputFormat::Json {
                return emit(fmt, &created, |_| String::new());
            }
            noteln!(
                "API key {} created; it is shown this once, keep it secret",
                created.info.name
            );
            output::write_stdout(&format!("{}\n", created.key))
        }
        ApiKeyCmd::List => {
            let keys: Vec<ApiKeyInfo> = client.get("/v1/api-keys")?;
            emit(fmt, &keys, |keys| {
                let mut t = Table::new(&["NAME", "CREATED", "CREATED BY", "STATE"]);
                for k in keys {
                    t.row(vec![
                        k.name.clone(),
                        time(k.created_at),
                        k.created_by.clone(),
                        state(k),
                    ]);
                }
                t.render("no API keys")
            })
        }
        ApiKeyCmd::Revoke(a) => {
            let path = format!("/v1/api-keys/{}", segment(&a.name)?);
            let info: ApiKeyInfo = client.delete(&path)?;
            emit(fmt, &info, |k| format!("revoked API key {}\n", k.name))
        }
    }
}

fn state(k: &ApiKeyInfo) -> String {
    match k.revoked_at {
        Some(at) => format!(
            "revoked {} by {}",
            time(at),
            k.revoked_by.as_deref().unwrap_or("-")
        ),
        None => "live".into(),
    }
}
