//! # microfw-transport-amqp
//!
//! Contract (to be built, see the transport-amqp issue): a pure codec (AMQP properties and body
//! to and from the core's `Envelope`) and topology derivation for the `nameko` (default) and
//! `micro_framework` dialects, plus IO halves that only move bytes: a lapin link (feature
//! `tokio`) and an amiquip link (feature `sync`). Every decision stays in the core.
//!
//! What it does NOT do yet: anything. This crate is a placeholder that compiles so the
//! workspace layout is fixed; it holds no API.
#![warn(missing_docs)]
