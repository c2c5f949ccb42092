//! # microfw-runtime-tokio
//!
//! Contract (to be built, see the runtimes issue): one driver task owns a
//! [`microfw_core::Engine`]-to-be; link readers and handler completions feed one input channel;
//! the driver drains every action after each input and sleeps until the Engine's next deadline.
//! Handlers run as tokio tasks (`async` worker mode) or on a dedicated blocking pool (`thread`,
//! `greedy_thread`).
//!
//! What it does NOT do yet: anything. This crate is a placeholder that compiles so the
//! workspace layout is fixed; it holds no API.
#![warn(missing_docs)]
