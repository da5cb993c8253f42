//! Specula's introspection API, shared by the inspector and its clients.
//!
//! - [`Request`] is every operation an inspector serves, and [`Reply`] what each
//!   answers. The inspector's core handles a `Request` (`Inspector::handle`); its front
//!   ends only translate: the HTTP server builds a `Request` from a route, the line
//!   socket and the `specula` CLI parse one from words (`Request` is a clap
//!   subcommand), and [`Request::route`] says where the CLI sends it over HTTP.
//! - The models (`Status`, `ProcessView`, ...) are the JSON the HTTP API speaks, with
//!   their OpenAPI schemas, and the rows the CLI prints ([`Rows`]).

mod models;
mod ops;
mod os_models;

pub use models::*;
pub use ops::{Reply, Request, Route};
pub use os_models::*;
pub use specula_common::parse::ParseError;
