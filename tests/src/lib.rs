#![warn(missing_docs)]
//! Cross-crate integration tests for microfw, and the harness that runs the real Python peers.
//!
//! The integration tests live in `tests/tests/`. This library is the harness they share for
//! interoperability tests against the Python originals microfw must talk to:
//!
//! * [`PythonPeers`] creates (once, cached outside the repository) one virtual environment per
//!   peer: nameko 2.14.1 and micro-framework 2.0.16 with its two Python 3.11 fixes, each with a
//!   fully pinned dependency set.
//! * [`TestVhost`] creates a unique RabbitMQ vhost for one test and deletes it on drop.
//! * [`PythonProcess`] runs one of the scripts in `tests/python/` inside a venv, captures its
//!   output, waits for readiness lines with timeouts and stops it (SIGINT, then SIGKILL) on drop.
//!
//! The only allowed skip is a machine without `python3` ([`PeerError::Skip`]); use
//! [`peer_or_skip!`] to print the reason and return early. Everything else (pip failures,
//! RabbitMQ unreachable, a peer that never gets ready) is an error and must fail the test.
//!
//! Environment overrides: `MICROFW_PYTHON` (interpreter used to create the venvs, default
//! `python3`), `MICROFW_PYTHON_PEERS_CACHE` (cache directory, default
//! `$XDG_CACHE_HOME/microfw-python-peers` or `~/.cache/microfw-python-peers`), `RABBITMQCTL`
//! (default `rabbitmqctl`).

mod command;
mod process;
mod rabbit;
mod venv;

pub use command::CommandFailure;
pub use process::{DEFAULT_STOP_GRACE, ProcessError, PythonProcess, free_tcp_port, python_dir};
pub use rabbit::{AMQP_AUTHORITY, ExchangeInfo, QueueInfo, RabbitError, TestVhost};
pub use venv::{PeerError, PeerKind, PythonPeers, SkipReason, Venv};

/// Unwraps a [`PeerError`] result inside a `#[test]` function returning `()`.
///
/// `Ok(v)` gives `v`; `Err(PeerError::Skip(reason))` prints `SKIPPED: <reason>` to stderr and
/// returns from the enclosing function (the only allowed skip: no Python on the machine); any
/// other error panics with its full text (including pip's output). It does not retry.
#[macro_export]
macro_rules! peer_or_skip {
    ($result:expr) => {
        match $result {
            Ok(value) => value,
            Err($crate::PeerError::Skip(reason)) => {
                eprintln!("SKIPPED: {reason}");
                return;
            }
            Err(error) => panic!("{error}"),
        }
    };
}
