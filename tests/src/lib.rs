//! The `outpost` tool's library: the quickstart ([`quickstart`]), the benchmarks ([`bench`]),
//! and the home of the end-to-end tests that cross Outpost's crates, processes and networks (in
//! `tests/`).

pub mod bench;
pub mod quickstart;
