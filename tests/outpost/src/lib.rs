//! The `outpost` tool's library: the quickstart ([`quickstart`], `outpost up`) and the
//! benchmarks ([`bench`], `outpost bench`). The end-to-end tests are the `outpost-e2e` package
//! (`tests/e2e/`); what they share is `outpost-test-support` (`tests/support/`).

pub mod bench;
pub mod memory;
pub mod mqtt_connect;
pub mod quickstart;
pub mod switching;
