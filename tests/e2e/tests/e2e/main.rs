//! Outpost end to end, across crates, processes and networks: one test binary (linking tract and
//! wgpu is slow), a module per area. The fixtures they share are `outpost-test-support`.
//!
//! - [`sync`]: what an agent downloads to serve a release.
//! - [`inference`]: the agent's inference API (local, cloud, cascade, binary tensors, refusals
//!   of bad requests), around a model's life on the device: upgrade, rollback, offline, restart.
//! - [`resilience`]: a coordinator that restarts, a dead coordinator in the list.
//! - [`refusals`]: releases and identities an agent refuses, and says why.
//! - [`engines`]: the engine choice (GPU, tract) and what status and metadata say.
//! - [`foundation`]: the protocol pieces end to end without a network.
//! - [`processes`]: the three binaries as separate processes, from provisioning output.
//! - [`faults`]: faults done for real to those processes (floods, slowloris, descriptor limits).
//! - [`fakes`]: a fake coordinator (real QUIC, the fleet's certificate) that answers as a test
//!   says: one that hangs, one that replays old releases.
//! - [`backends`]: the coordinator as a gateway to real OIP servers (MLServer, KServe), and its
//!   rate limits.
//! - [`brokers`]: the coordinator against real production brokers (Mosquitto, NATS) run with
//!   the provisioned files.
//! - [`replicas`]: coordinator replicas over one shared store (a folder, S3), one killed
//!   mid-rollout.
//! - [`rollouts`]: rollouts gated on device health (abort, widen, promote).
//! - [`quickstart`]: `outpost up` in-process.
//! - [`bench`]: `outpost bench` in-process, briefly.
//! - [`sim`]: `outpost sim`, the real executable, each scenario on a small fleet.
//! - [`text`]: text in through the OIP API, with the model's tokenizer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod backends;
mod bench;
mod brokers;
mod engines;
mod fakes;
mod faults;
mod foundation;
mod inference;
mod memory;
mod processes;
mod quickstart;
mod refusals;
mod replicas;
mod resilience;
mod rollouts;
mod sim;
mod sync;
mod text;
