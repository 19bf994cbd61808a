//! Renders an error and its causes as one line, each cause once. Many error types (ours and
//! those of sqlx, std and quinn) put their cause in their own message and also return it from
//! `source()`; printing both repeats it. Pure text work, no I/O.

use std::error::Error;

/// Joins an error's messages with `": "`, dropping from each message the tail that the next
/// cause's message already says, so that every cause appears once.
pub fn chain(err: &(dyn Error + 'static)) -> String {
    let mut messages = vec![err.to_string()];
    let mut cause = err.source();
    while let Some(e) = cause {
        messages.push(e.to_string());
        cause = e.source();
    }

    let mut parts: Vec<&str> = Vec::with_capacity(messages.len());
    for (i, message) in messages.iter().enumerate() {
        let own = match messages.get(i + 1) {
            Some(next) => own_part(message, next),
            None => message.as_str(),
        };
        if !own.is_empty() {
            parts.push(own);
        }
    }
    parts.join(": ")
}

/// The part of `message` before its longest `": "`-separated tail that `next` ends with.
fn own_part<'a>(message: &'a str, next: &str) -> &'a str {
    if message == next {
        return "";
    }
    let mut search = 0;
    while let Some(at) = message[search..].find(": ") {
        let cut = search + at;
        let tail = &message[cut + 2..];
        if !tail.is_empty() && (next == tail || next.ends_with(&format!(": {tail}"))) {
            return &message[..cut];
        }
        search = cut + 2;
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{context}: {source}")]
    struct Wrapped {
        context: String,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("database: {0}")]
    struct Outer(#[from] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("error returned from database: {0}")]
    struct Middle(#[source] Leaf);

    #[derive(Debug, thiserror::Error)]
    #[error("file is not a database")]
    struct Leaf;

    #[test]
    fn a_cause_embedded_in_its_parent_appears_once() {
        let e = Wrapped {
            context: "binding the UDP socket".into(),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };

        let text = chain(&e);

        assert_eq!(text.matches("address in use").count(), 1, "{text}");
        assert!(text.starts_with("binding the UDP socket: "), "{text}");
    }

    #[test]
    fn a_three_level_repeat_is_said_once() {
        let e = Outer(Middle(Leaf));

        let text = chain(&e);

        assert_eq!(
            text,
            "database: error returned from database: file is not a database"
        );
    }

    #[test]
    fn causes_not_in_the_message_are_all_kept() {
        #[derive(Debug, thiserror::Error)]
        #[error("starting")]
        struct Top(#[source] Leaf);

        assert_eq!(chain(&Top(Leaf)), "starting: file is not a database");
    }
}
