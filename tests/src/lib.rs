//! The `outpost` tool's library and the end-to-end tests that cross Outpost's crates.
//!
//! Today it holds the cross-crate tests of the foundation (in `tests/`): a provisioned fleet's
//! keys sign and verify a demo model's manifest, and the model's chunks reassemble into bytes
//! tract runs. The `outpost up|sim|bench` tool arrives with the agent and coordinator.
