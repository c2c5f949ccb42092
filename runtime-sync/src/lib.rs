//! # microfw-runtime-sync
//!
//! Contract (to be built, see the runtimes issue): the same features as runtime-tokio with no
//! tokio at all: one engine thread blocking on a channel with `recv_timeout(next deadline)`, a
//! fixed thread pool per context, blocking handlers.
//!
//! What it does NOT do yet: anything. This crate is a placeholder that compiles so the
//! workspace layout is fixed; it holds no API.
#![warn(missing_docs)]
