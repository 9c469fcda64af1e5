//! The Outpost edge agent: local Open Inference Protocol API, engines, router, offload client,
//! model sync and local store.
//!
//! Not built yet: this crate is a placeholder in the workspace so dependencies point the right
//! way from the start. The agent arrives with issue 4 (see the README).
