//! natserve's stateless HTTP edge: HTTP in, NATS JetStream out, one NATS reply back.
//!
//! [`run`] connects to NATS, follows the route and agent registrations agents keep in KV,
//! and answers `POST <route>` by publishing the body to the route's first stage and
//! waiting for the pipeline's reply on this ingress's own reply subjects.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod config;
pub mod drain;
pub mod error;
pub mod http;
pub mod listen;
pub mod liveness;
pub mod metrics;
pub mod openapi;
pub mod postbox;
pub mod replies;
pub mod request_id;
pub mod routes;
pub mod server;
pub mod status;
pub mod stream;
pub mod submit;
pub mod watch;

pub use config::Config;
pub use error::{Error, RequestError};
pub use server::{run, Listener};
