//! Addresses, routes and link state of the TUN interface, set with `ip` (iproute2).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use anyhow::Context;
use ipnet::IpNet;

use crate::netconfig::DataplaneConfig;

/// Sets the MTU and brings the link up. The interface keeps its IPv6 addresses when it is
/// taken down (`keep_addr_on_down`): the kernel would otherwise drop them at `ip link set
/// down`, and nothing would put them back at the next `up`.
pub fn link_up(name: &str, mtu: u16) -> anyhow::Result<()> {
    if ipv6_enabled(name) {
        let path = format!("/proc/sys/net/ipv6/conf/{name}/keep_addr_on_down");
        if let Err(e) = std::fs::write(&path, "1") {
            tracing::warn!(interface = name, error = %e,
                "cannot set keep_addr_on_down; a link down and up loses the IPv6 addresses");
        }
    }
    ip(&["link", "set", "dev", name, "mtu", &mtu.to_string(), "up"])
}

/// The routing protocol number the node's routes carry (`ip route show proto 122`), so that
/// removing one of them can never remove a route of the kernel or the administrator with the
/// same prefix (the connected route of the interface's own address, say).
pub const ROUTE_PROTO: &str = "122";

/// Moves the interface from the addresses and routes of `old` to those of `new`: adds what is
/// new, removes what is gone, leaves the rest alone, and puts back any route of `new` that is
/// missing (a link taken down and up loses them; a reload restores them). A route never
/// replaces one the host already has for the same prefix (the underlay's own subnet, say), a
/// default route (`0.0.0.0/0`, `::/0`) is never installed (either would take the path to the
/// peers' endpoints into the tunnel), and only the node's own routes (protocol
/// [`ROUTE_PROTO`]) are ever removed. Returns the routes of `new` it left out, each with a
/// warning.
pub fn sync_addresses(
    name: &str,
    old: &DataplaneConfig,
    new: &DataplaneConfig,
) -> anyhow::Result<Vec<(IpNet, String)>> {
    let mut warnings = Vec::new();
    let old_addrs: BTreeSet<IpNet> = old.addresses.iter().copied().collect();
    let new_addrs: BTreeSet<IpNet> = new.addresses.iter().copied().collect();
    for a in new_addrs.difference(&old_addrs) {
        let family = if a.addr().is_ipv4() { "-4" } else { "-6" };
        let mut args = vec![family, "addr", "replace"];
        let text = a.to_string();
        args.push(&text);
        args.extend(["dev", name]);
        if a.addr().is_ipv6() {
            if !ipv6_enabled(name) {
                tracing::warn!(interface = name, address = %a, "IPv6 is disabled; address skipped");
                continue;
            }
            args.push("nodad");
        }
        ip(&args)?;
    }
    for a in old_addrs.difference(&new_addrs) {
        let text = a.to_string();
        ip(&["addr", "del", &text, "dev", name])?;
    }

    let old_routes: BTreeSet<IpNet> = old.routes.iter().map(IpNet::trunc).collect();
    let new_routes: BTreeSet<IpNet> = new.routes.iter().map(IpNet::trunc).collect();
    for r in old_routes.difference(&new_routes) {
        let text = r.to_string();
        // Only a route the node added goes; one that went away with its address, or that
        // was never installed (the host had its own), is not there, which is fine.
        let _ = ip(&["route", "del", &text, "dev", name, "proto", ROUTE_PROTO]);
    }
    // One listing per apply, so that a route already in place costs no `ip` call.
    let present = routes_via(name);
    for r in &new_routes {
        if present.contains(r) || r.addr().is_ipv6() && !ipv6_enabled(name) {
            continue;
        }
        let text = r.to_string();
        if r.prefix_len() == 0 {
            warnings.push((
                *r,
                format!(
                    "route {text} is not installed: it would replace the host's default route and \
                 send the tunnel's own traffic to the peers into the tunnel (full-tunnel \
                 routing is not supported); route narrower prefixes with `routes`"
                ),
            ));
            continue;
        }
        if let Some((peer, at)) = endpoint_inside(new, r) {
            warnings.push((
                *r,
                format!(
                    "route {text} is not installed: it holds peer {peer}'s endpoint {at}, and \
                     routing that into the tunnel would cut the tunnel itself (full-tunnel \
                     routing is not supported); route narrower prefixes with `routes`"
                ),
            ));
            continue;
        }
        let family = if r.addr().is_ipv4() { "-4" } else { "-6" };
        let args = [
            family,
            "route",
            "add",
            &text,
            "dev",
            name,
            "proto",
            ROUTE_PROTO,
        ];
        if let Err(e) = ip(&args) {
            match route_owner(family, &text) {
                // Ours from before, or the kernel's route of the interface's own address.
                Some(dev) if dev == name => {}
                Some(dev) => warnings.push((
                    *r,
                    format!(
                        "route {text} is not installed: the host already routes it (dev {dev}); \
                     that route stays"
                    ),
                )),
                // The link is down, say: the peers and the filter still change (a removed
                // peer must go whatever the routes do); the next apply tries again.
                None => warnings.push((*r, format!("route {text} is not installed: {e:#}"))),
            }
        }
    }
    Ok(warnings)
}

/// A peer of `config` whose configured endpoint lies inside `route`, with that endpoint.
fn endpoint_inside(config: &DataplaneConfig, route: &IpNet) -> Option<(String, SocketAddr)> {
    config.peers.iter().find_map(|p| {
        p.endpoint
            .iter()
            .chain(&p.endpoints)
            .find(|e| route.contains(&e.ip().to_canonical()))
            .map(|e| (p.name.clone(), *e))
    })
}

/// The prefixes the main table routes through `name`, both families, the node's and the
/// kernel's alike (`ip -j route show dev NAME`; a host route is listed without its length).
fn routes_via(name: &str) -> BTreeSet<IpNet> {
    let mut routes = BTreeSet::new();
    for family in ["-4", "-6"] {
        let Ok(out) = Command::new("ip")
            .args([family, "-j", "route", "show", "dev", name])
            .output()
        else {
            continue;
        };
        let Ok(list) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            continue;
        };
        for dst in list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["dst"].as_str())
        {
            let net = dst
                .parse::<IpNet>()
                .or_else(|_| dst.parse::<IpAddr>().map(IpNet::from));
            if let Ok(net) = net {
                routes.insert(net.trunc());
            }
        }
    }
    routes
}

/// The device of the main table's route for exactly `prefix`, if there is one.
fn route_owner(family: &str, prefix: &str) -> Option<String> {
    let out = Command::new("ip")
        .args([family, "-j", "route", "show", "exact", prefix])
        .output()
        .ok()?;
    let routes: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let first = routes.as_array()?.first()?;
    Some(first["dev"].as_str().unwrap_or("?").to_string())
}

/// The host's global addresses outside the TUN interface, for endpoint reports.
pub fn local_addresses(exclude: &str) -> Vec<IpAddr> {
    let Ok(out) = Command::new("ip").args(["-j", "addr", "show"]).output() else {
        return Vec::new();
    };
    let Ok(links) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return Vec::new();
    };
    endpoint_addresses(&links, exclude)
}

/// The global addresses in `ip -j addr show` output, leaving out `exclude` and every interface
/// with no link layer (`link_type` "none": TUN devices, kernel WireGuard, other overlays): a
/// peer can reach this node through another overlay only if it is in that overlay too, and an
/// address there would be tried first and time out.
fn endpoint_addresses(links: &serde_json::Value, exclude: &str) -> Vec<IpAddr> {
    let mut addrs = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        if link["ifname"].as_str() == Some(exclude) || link["link_type"].as_str() == Some("none") {
            continue;
        }
        for info in link["addr_info"].as_array().into_iter().flatten() {
            let scope = info["scope"].as_str().unwrap_or_default();
            let Some(Ok(ip)) = info["local"].as_str().map(str::parse::<IpAddr>) else {
                continue;
            };
            if scope == "global" && !ip.is_loopback() {
                addrs.push(ip);
            }
        }
    }
    addrs
}

/// Whether the kernel lets the interface have IPv6 addresses.
fn ipv6_enabled(name: &str) -> bool {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "0")
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        anyhow::bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_leave_out_this_and_other_overlays() {
        let links = serde_json::json!([
            {"ifname": "lo", "link_type": "loopback",
             "addr_info": [{"local": "127.0.0.1", "scope": "host"}]},
            {"ifname": "eth0", "link_type": "ether",
             "addr_info": [{"local": "198.51.100.11", "scope": "global"},
                           {"local": "fe80::1", "scope": "link"}]},
            {"ifname": "ztnet0", "link_type": "none",
             "addr_info": [{"local": "100.64.0.1", "scope": "global"}]},
            {"ifname": "other0", "link_type": "none",
             "addr_info": [{"local": "100.70.0.1", "scope": "global"}]},
            {"ifname": "wg0", "link_type": "none",
             "addr_info": [{"local": "10.8.0.1", "scope": "global"}]}
        ]);
        let got = endpoint_addresses(&links, "ztnet0");
        assert_eq!(got, vec!["198.51.100.11".parse::<IpAddr>().unwrap()]);
    }
}
