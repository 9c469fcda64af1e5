//! The Outpost cloud coordinator: registry, model optimisation, manifest signing and
//! publishing, embedded MQTT broker, QUIC chunk and inference service, admin API.
//!
//! Not built yet: this crate is a placeholder in the workspace so dependencies point the right
//! way from the start. The coordinator arrives with issue 3 (see the README).
