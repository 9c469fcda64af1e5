//! What Outpost's end-to-end tests share (`outpost-e2e`), written once: coordinator and agent
//! fixtures on free loopback ports in temporary folders, bounded polling ([`eventually`]), an
//! MQTT observer, guards that kill child processes on drop, free ports, the HTTP helpers the
//! tests call the agents' and coordinators' APIs with, and float comparisons with a stated
//! tolerance.
//!
//! A dev-only crate (never published, never a dependency of shipped code). A fixture that
//! cannot do its job panics, failing the test that called it, so unwrap and panic are allowed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod agent;
pub mod coordinator;
pub mod eventually;
pub mod fleet;
pub mod floats;
pub mod http;
pub mod mqtt;
pub mod oip_servers;
pub mod ports;
pub mod process;
pub mod s3;
