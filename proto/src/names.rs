//! Validation of the names an operator or a node chooses (networks, namespaces, tags, nodes).
//! Each check returns the sentence that goes back to the caller.

/// Longest name of any kind.
pub const MAX_LEN: usize = 63;

/// Checks a network name: `[a-z0-9-]`, 1 to 63 characters, no leading or trailing `-`.
pub fn network(name: &str) -> Result<(), String> {
    label("network name", name, false)
}

/// Checks a namespace: same rule as a network name.
pub fn namespace(name: &str) -> Result<(), String> {
    label("namespace", name, false)
}

/// Checks a tag: same rule as a network name.
pub fn tag(name: &str) -> Result<(), String> {
    label("tag", name, false)
}

/// Checks a node name: `[A-Za-z0-9-]`, 1 to 63 characters, no leading or trailing `-`. Names
/// are compared ignoring case. Only ASCII is accepted, so two spellings that differ only in
/// Unicode normalisation (`Cafe\u{301}` and `Caf\u{e9}`) can never both be enrolled.
pub fn node(name: &str) -> Result<(), String> {
    label("node name", name, true)
}

/// Checks a trust domain (the host part of every SPIFFE ID): lowercase letters, digits, `-`
/// and `.`, 1 to 253 characters, no leading or trailing `.`.
pub fn trust_domain(td: &str) -> Result<(), String> {
    let ok = !td.is_empty()
        && td.len() <= 253
        && td
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !td.starts_with('.')
        && !td.ends_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "trust domain {td:?} is invalid: use lowercase letters, digits, '-' and '.'"
        ))
    }
}

fn label(what: &str, name: &str, upper: bool) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} is empty"));
    }
    let allowed = if upper {
        "letters, digits and '-'"
    } else {
        "lowercase letters, digits and '-'"
    };
    for (i, ch) in name.chars().enumerate() {
        let ok = ch.is_ascii_digit()
            || ch == '-'
            || ch.is_ascii_lowercase()
            || (upper && ch.is_ascii_uppercase());
        if !ok {
            return Err(format!(
                "{what} {name:?} has {ch:?} at position {}; use only {allowed}",
                i + 1
            ));
        }
    }
    if name.len() > MAX_LEN {
        return Err(format!(
            "{what} is {} characters long; at most {MAX_LEN} are allowed",
            name.len()
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!("{what} {name:?} may not start or end with '-'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_refuse_unicode_and_symbols() {
        assert!(node("web-1").is_ok());
        assert!(node("DB1").is_ok());
        let nfd = node("Cafe\u{301}").unwrap_err();
        assert!(nfd.contains("position 5"), "{nfd}");
        assert!(node("Caf\u{e9}").is_err());
        assert!(node("").is_err());
        assert!(node("-x").is_err());
        assert!(node("a.b").is_err());
        assert!(node(&"a".repeat(64)).is_err());
        assert!(node(&"a".repeat(63)).is_ok());
    }

    #[test]
    fn trust_domains_are_dns_like() {
        assert!(trust_domain("ztnet.local").is_ok());
        assert!(trust_domain("example-1.org").is_ok());
        assert!(trust_domain("").is_err());
        assert!(trust_domain("spiffe://x y").is_err());
        assert!(trust_domain(".x").is_err());
        assert!(trust_domain("x.").is_err());
        assert!(trust_domain("Upper.org").is_err());
        assert!(trust_domain(&"a".repeat(254)).is_err());
    }

    #[test]
    fn network_names_are_lowercase() {
        assert!(network("prod-vpc").is_ok());
        assert!(network("Prod").is_err());
        assert!(network("prod_vpc").is_err());
    }
}
