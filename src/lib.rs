//! redcloak: a Redis protocol proxy that authenticates each client to a
//! project, confines its keys to the project's namespace, and seals values.
//!
//! The data path, module by module: `listener` accepts, `session` runs one
//! client (`frame` decodes, `command` + `plan` decide, `namespace` rewrites),
//! `upstream` talks to Redis, and replies flow back through the same plan.

pub mod audit;
pub mod auth;
pub mod command;
pub mod config;
pub mod crypto;
pub mod detection;
pub mod direct;
pub mod frame;
pub mod keyring;
pub mod keys_cli;
pub mod leakage;
pub mod listener;
pub mod lockout;
pub mod metrics;
pub mod namespace;
pub mod plan;
pub mod pubsub;
pub mod reencrypt;
pub mod reply;
pub mod sealer;
pub mod session;
pub mod shutdown;
pub mod tls;
pub mod upstream;
pub mod workers;
