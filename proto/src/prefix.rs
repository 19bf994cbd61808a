//! IP prefixes as operators type them (`10.90.0.1/16`, `fd00:90::/64`), parsed with an error
//! that says which part is wrong: `ipnet`'s own parser answers "invalid IP address syntax"
//! for every fault, a prefix length of 40 on an IPv4 address included.

use std::net::IpAddr;

use ipnet::IpNet;

/// Parses `ADDRESS/LENGTH`. Host bits may be set (an interface address such as `10.90.0.1/16`
/// keeps them; callers that want the network call [`IpNet::trunc`]).
pub fn parse(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    let Some((addr, len)) = text.split_once('/') else {
        let hint = match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => format!(" (`{text}/32` for this one address)"),
            Ok(IpAddr::V6(_)) => format!(" (`{text}/128` for this one address)"),
            Err(_) => String::new(),
        };
        return Err(format!(
            "`{text}` needs a prefix length, as in ADDRESS/LENGTH{hint}"
        ));
    };
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("`{addr}` in `{text}` is not an IPv4 or IPv6 address"))?;
    let max: u8 = if ip.is_ipv4() { 32 } else { 128 };
    let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let bits = match len.parse::<u16>() {
        Ok(n) if n <= u16::from(max) => n as u8,
        Ok(_) => {
            return Err(format!(
                "prefix length {len} in `{text}` is longer than an {family} address \
                 (0-{max})"
            ));
        }
        Err(_) if len.is_empty() => {
            return Err(format!(
                "`{text}` has no prefix length after the '/' (0-{max})"
            ));
        }
        Err(_) => {
            return Err(format!(
                "`{len}` after the '/' in `{text}` is not a prefix length (0-{max})"
            ));
        }
    };
    IpNet::new(ip, bits).map_err(|_| format!("`{text}` is not a valid prefix"))
}

/// For `#[serde(deserialize_with)]` on a single prefix.
pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
    let text = <String as serde::Deserialize>::deserialize(d)?;
    parse(&text).map_err(serde::de::Error::custom)
}

/// A prefix that deserializes through [`parse`], for lists and `toml::Spanned`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix(pub IpNet);

impl<'de> serde::Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Prefix, D::Error> {
        deserialize(d).map(Prefix)
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_fault_is_named() {
        for (text, want) in [
            (
                "10.0.0.0/40",
                "prefix length 40 in `10.0.0.0/40` is longer than an IPv4",
            ),
            ("fd00::/129", "longer than an IPv6 address (0-128)"),
            ("10.0.0.1", "`10.0.0.1/32` for this one address"),
            ("fd00::1", "`fd00::1/128` for this one address"),
            (
                "10.0.0/8",
                "`10.0.0` in `10.0.0/8` is not an IPv4 or IPv6 address",
            ),
            ("10.0.0.0/x", "`x` after the '/'"),
            (
                "10.0.0.0/",
                "`10.0.0.0/` has no prefix length after the '/' (0-32)",
            ),
            ("10.0.0.0/-1", "`-1` after the '/'"),
            ("", "needs a prefix length"),
        ] {
            let e = parse(text).expect_err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn good_prefixes_keep_their_host_bits() {
        let net = parse("10.90.0.1/16").expect("parses");
        assert_eq!(net.to_string(), "10.90.0.1/16");
        assert_eq!(net.trunc().to_string(), "10.90.0.0/16");
        assert_eq!(
            parse(" fd00:90::/64 ").expect("v6").to_string(),
            "fd00:90::/64"
        );
        assert_eq!(parse("0.0.0.0/0").expect("default").prefix_len(), 0);
    }
}
