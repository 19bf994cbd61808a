//! See lib.rs (stub; filled in by its issue).

/// Arguments of coordinator mode.
#[derive(Debug, Clone)]
pub struct UpArgs {
    /// `HOST:PORT` of the coordinator; taken from the token when absent.
    pub coordinator: Option<String>,
    /// Join token, needed only for the first start.
    pub token: Option<String>,
    /// State directory (keys, certificate, last netmap).
    pub state_dir: std::path::PathBuf,
    /// Node name; defaults to the hostname.
    pub name: Option<String>,
    /// TUN interface name.
    pub interface: String,
    /// WireGuard listen port.
    pub listen_port: u16,
    /// TUN MTU.
    pub mtu: u16,
}

/// Runs coordinator mode until a signal: enroll if needed, start the data plane from the last
/// netmap on disk if there is one, keep the control channel up.
pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("coordinator mode is not built yet")
}
