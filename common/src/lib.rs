//! Small helpers shared by Specula's crates, on std alone: the parsers of command-line
//! and request arguments ([`parse`]), hex text ([`hex`]), a lock that survives a
//! panicked holder ([`sync`]), and an error's message with its causes
//! ([`error_chain`]). Parse failures are a typed [`ParseError`].

pub mod hex;
pub mod parse;
pub mod sync;

pub use parse::ParseError;

/// Formats an error with its chain of sources: "what failed: because: because".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_joins_every_cause() {
        let error = parse::range("zz:1").unwrap_err();
        assert_eq!(error_chain(&error), "bad range 'zz:1': bad GPA 'zz'");
        assert_eq!(error_chain(&ParseError::Missing { what: "GPA".into() }), "missing GPA");
    }
}
