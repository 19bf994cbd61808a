//! Where the CLI finds its coordinator, API key and CA certificate: flags, environment, then
//! the config file that `ztnet login` writes. Reads files; no network.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::args::GlobalArgs;
use crate::output::noteln;

/// Environment variable holding the API key itself.
pub const API_KEY_ENV: &str = "ZTNET_API_KEY";
/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "ZTNET_CONFIG";

/// What the config file holds. Paths only: the key stays in its own file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Coordinator address, HOST:PORT.
    pub coordinator: Option<String>,
    /// Absolute path of the API key file.
    pub api_key_file: Option<PathBuf>,
    /// Absolute path of the CA certificate.
    pub ca_cert: Option<PathBuf>,
}

/// Everything needed to talk to the coordinator.
pub struct Resolved {
    /// HOST:PORT.
    pub coordinator: String,
    /// The API key; never printed.
    pub api_key: Zeroizing<String>,
    /// PEM of the CA certificate.
    pub ca_pem: Vec<u8>,
    /// Where the CA came from, for error messages.
    pub ca_path: PathBuf,
}

/// The config file's path: `$ZTNET_CONFIG`, else `$XDG_CONFIG_HOME/ztnet/config.toml`, else
/// `~/.config/ztnet/config.toml`.
pub fn config_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(x).join("ztnet/config.toml"));
    }
    let home = std::env::var_os("HOME")
        .filter(|p| !p.is_empty())
        .context("cannot find the config file: neither ZTNET_CONFIG nor HOME is set")?;
    Ok(PathBuf::from(home).join(".config/ztnet/config.toml"))
}

/// Reads the config file; a missing file is an empty config.
pub fn load_file(path: &Path) -> Result<ConfigFile> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
        Err(e) => return Err(e).with_context(|| format!("reading config {}", path.display())),
    };
    toml::from_str(&text).with_context(|| format!("config file {} is invalid", path.display()))
}

/// Writes the config file with mode 0600 (its directory 0700), replacing it atomically.
pub fn save_file(path: &Path, config: &ConfigFile) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = toml::to_string(config).context("encoding the config")?;
    let tmp = path.with_extension("toml.tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// Combines flags and environment (already merged by clap) with the config file.
pub fn resolve(global: &GlobalArgs) -> Result<Resolved> {
    let path = config_path()?;
    let file = load_file(&path)?;

    let coordinator = global.coordinator.clone().or(file.coordinator).context(
        "no coordinator address: pass --coordinator HOST:PORT, set ZTNET_COORDINATOR, \
             or run `ztnet login`",
    )?;
    check_address(&coordinator)?;

    let api_key = if let Some(f) = &global.api_key_file {
        read_api_key_file(f)?
    } else if let Some(k) = std::env::var_os(API_KEY_ENV) {
        let k = k
            .into_string()
            .ok()
            .context("ZTNET_API_KEY is not valid UTF-8")?;
        let k = Zeroizing::new(k);
        check_api_key(&k).context("ZTNET_API_KEY is not a valid API key")?;
        k
    } else if let Some(f) = &file.api_key_file {
        read_api_key_file(f)?
    } else {
        bail!(
            "no API key: pass --api-key-file FILE, set ZTNET_API_KEY or ZTNET_API_KEY_FILE, \
             or run `ztnet login`"
        );
    };

    let ca_path = global.ca_cert.clone().or(file.ca_cert).context(
        "no CA certificate: pass --ca-cert FILE (the coordinator's ca.pem), set ZTNET_CA_CERT, \
         or run `ztnet login`",
    )?;
    let ca_pem = fs::read(&ca_path)
        .with_context(|| format!("reading CA certificate {}", ca_path.display()))?;

    Ok(Resolved {
        coordinator,
        api_key,
        ca_pem,
        ca_path,
    })
}

/// Checks the HOST:PORT form before anything is dialled.
pub fn check_address(addr: &str) -> Result<()> {
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("coordinator address {addr:?} is not HOST:PORT"))?;
    if host.is_empty() || host.contains('/') {
        bail!("coordinator address {addr:?} has no usable host");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => bail!("coordinator address {addr:?} has an invalid port {port:?}"),
    }
}

/// Reads an API key file: one line, a single trailing newline allowed.
pub fn read_api_key_file(path: &Path) -> Result<Zeroizing<String>> {
    let text = Zeroizing::new(
        fs::read_to_string(path)
            .with_context(|| format!("reading API key file {}", path.display()))?,
    );
    let line = text.strip_suffix('\n').unwrap_or(&text);
    let key = Zeroizing::new(line.to_string());
    check_api_key(&key).with_context(|| format!("API key file {} is invalid", path.display()))?;
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            noteln!(
                "warning: API key file {} is readable by others (mode {mode:o}); \
                 run chmod 600 {}",
                path.display(),
                path.display()
            );
        }
    }
    Ok(key)
}

/// Checks the API key form `ztkey_` + 64 lowercase hex digits, saying what is wrong. The same
/// rules as for WireGuard keys: no quotes, no whitespace or line breaks, exact length.
pub fn check_api_key(key: &str) -> Result<()> {
    const PREFIX: &str = "ztkey_";
    if key.is_empty() {
        bail!("API key is empty");
    }
    if key.starts_with(['"', '\'']) || key.ends_with(['"', '\'']) {
        bail!("API key is wrapped in quotes; remove them");
    }
    if let Some(pos) = key.chars().position(char::is_whitespace) {
        bail!(
            "API key contains whitespace or a line break at position {}",
            pos + 1
        );
    }
    let Some(hexpart) = key.strip_prefix(PREFIX) else {
        bail!("API key must start with {PREFIX:?}");
    };
    if let Some((i, ch)) = hexpart
        .chars()
        .enumerate()
        .find(|(_, c)| !matches!(c, '0'..='9' | 'a'..='f'))
    {
        bail!(
            "API key has an invalid character {ch:?} at position {}; expected lowercase hex",
            i + PREFIX.len() + 1
        );
    }
    if hexpart.len() != 64 {
        bail!(
            "API key has {} characters; expected {} ({PREFIX} and 64 hex digits)",
            key.chars().count(),
            PREFIX.len() + 64
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_form_is_checked_with_a_reason() {
        let good = format!("ztkey_{}", "ab".repeat(32));
        assert!(check_api_key(&good).is_ok());
        let err = |k: &str| check_api_key(k).unwrap_err().to_string();
        assert!(err("").contains("empty"));
        assert!(err(&format!("\"{good}\"")).contains("quotes"));
        assert!(err(&format!("{good}\r\n")).contains("position 71"));
        assert!(err(&good[..69]).contains("69 characters"));
        assert!(err(&format!("{good}0")).contains("71 characters"));
        assert!(err(&good.replace("ztkey_", "ztkex_")).contains("start with"));
        assert!(err(&good.to_uppercase().replace("ZTKEY_", "ztkey_")).contains("position 7"));
    }

    #[test]
    fn addresses_are_checked() {
        assert!(check_address("127.0.0.1:7443").is_ok());
        assert!(check_address("[::1]:7443").is_ok());
        assert!(check_address("coord.example:7443").is_ok());
        assert!(check_address("127.0.0.1").is_err());
        assert!(check_address("127.0.0.1:0").is_err());
        assert!(check_address(":7443").is_err());
        assert!(check_address("https://x:1").is_err());
    }
}
