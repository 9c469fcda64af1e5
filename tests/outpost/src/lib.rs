//! The `outpost` tool's library: the quickstart ([`quickstart`], `outpost up`), the
//! benchmarks ([`bench`], `outpost bench`), the GPU engine's parity check from the binary
//! ([`gpu_check`], `outpost gpu-check`) and the fleet simulator ([`sim`], `outpost sim`). The end-to-end tests are the `outpost-e2e` package
//! (`tests/e2e/`); what they share is `outpost-test-support` (`tests/support/`).

pub mod backend_bench;
pub mod bench;
pub mod gpu_check;
pub mod memory;
pub mod mqtt_connect;
pub mod quickstart;
pub mod replica_bench;
pub mod sim;
pub mod switching;
pub mod text_bench;
