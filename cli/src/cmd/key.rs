//! `ztnet key check`: the same key parser as the coordinator and the node, so a bad key is
//! refused where it is typed.

use std::io::Read;

use anyhow::{Context, Result, anyhow};
use ztnet_proto::WgKey;

use crate::output::write_stdout;

/// Checks one key; `-` reads it from stdin (one line, a single trailing newline allowed).
pub fn check(key: &str) -> Result<()> {
    let text = if key == "-" {
        let mut s = String::new();
        std::io::stdin()
            .take(4096)
            .read_to_string(&mut s)
            .context("reading the key from stdin")?;
        s.strip_suffix('\n').unwrap_or(&s).to_string()
    } else {
        key.to_string()
    };
    let k = WgKey::parse(&text).map_err(|e| anyhow!("invalid WireGuard key: {e}"))?;
    write_stdout(&format!("ok: {k} is a valid WireGuard public key\n"))
}
