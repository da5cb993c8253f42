//! Failures of one request to the inspector's core.

use crate::agent_link::AgentError;
use crate::source::SourceError;

/// Failures of one analysis request.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("range {gpa:#x}+{len:#x} is not granted (revoked, released, or never asked for)")]
    NotGranted { gpa: u64, len: u64 },
    #[error("{0}")]
    BadRequest(String),
    /// The source has gone away: what needs it live (its vCPUs, pausing it) is refused.
    #[error("the source is gone")]
    SourceGone,
    #[error("{0}")]
    NotFound(String),
    #[error("agent: {0}")]
    Agent(#[from] AgentError),
    /// The whole chain in one message: these errors end up as one reply line.
    #[error("{}", vmm::error_chain(.0))]
    Source(SourceError),
    #[error("the agent's reply is not credible: {0}")]
    BadReply(String),
    /// A request reached a part of the core that does not serve it (a bug).
    #[error("internal: {0} reached the wrong part of the inspector")]
    Misrouted(String),
    /// An OS view failed in the agent (the kernel was not found, a structure is corrupt...).
    #[error("OS view: {0}")]
    Os(String),
}

impl From<specula_os::Error> for InspectError {
    /// A reply that does not decode.
    fn from(e: specula_os::Error) -> Self {
        InspectError::BadReply(e.to_string())
    }
}

impl From<SourceError> for InspectError {
    fn from(e: SourceError) -> Self {
        InspectError::Source(e)
    }
}

impl InspectError {
    /// `request` reached a part of the core that does not serve it (named by the start
    /// of its debug form: a YARA request carries up to 1 MiB of rules).
    pub(crate) fn misrouted(request: &specula_api::Request) -> Self {
        InspectError::Misrouted(format!("{request:?}").chars().take(80).collect())
    }
}
