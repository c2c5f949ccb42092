//! Per-test RabbitMQ vhosts managed with `rabbitmqctl`.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::command::{self, CommandFailure};

/// Host and port of the test broker (user `guest`, password `guest`).
pub const AMQP_AUTHORITY: &str = "127.0.0.1:5672";

const CTL_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A `rabbitmqctl` operation failed or a wait on broker state timed out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RabbitError {
    /// `rabbitmqctl` could not run or failed (output inside).
    #[error("rabbitmqctl failed: {0}")]
    Ctl(CommandFailure),
    /// The awaited queue state did not appear before the deadline.
    #[error("vhost {vhost}: {what} not seen within {waited:?}; last queues: {last:?}")]
    Timeout {
        /// The vhost polled.
        vhost: String,
        /// What was awaited.
        what: String,
        /// How long it waited.
        waited: Duration,
        /// The last listing seen.
        last: Vec<QueueInfo>,
    },
}

/// One row of `rabbitmqctl list_queues name messages consumers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    /// Queue name.
    pub name: String,
    /// Ready + unacknowledged messages.
    pub messages: u64,
    /// Number of consumers.
    pub consumers: u64,
}

/// One row of `rabbitmqctl list_exchanges name type durable auto_delete`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeInfo {
    /// Exchange name (empty for the default exchange).
    pub name: String,
    /// Exchange type: `topic`, `direct`, `fanout`, `headers`, ...
    pub kind: String,
    /// Survives a broker restart.
    pub durable: bool,
    /// Deleted by the broker when its last binding goes.
    pub auto_delete: bool,
}

/// A uniquely named RabbitMQ vhost (`microfw-test-<pid>-<n>-<nanos>`) with full permissions for
/// `guest`, deleted (with everything in it) when dropped, also when the test panics.
///
/// It does not start or configure RabbitMQ and does not clean up vhosts leaked by killed test
/// processes (`rabbitmqctl list_vhosts` shows them; they are harmless).
#[derive(Debug)]
pub struct TestVhost {
    name: String,
}

impl TestVhost {
    /// Creates the vhost and grants `guest` configure/write/read on everything in it.
    pub fn create() -> Result<Self, RabbitError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let name = format!("microfw-test-{}-{n}-{nanos}", std::process::id());
        ctl(&["add_vhost", &name])?;
        // From here on, Drop deletes the vhost even if granting permissions fails.
        let vhost = TestVhost { name };
        ctl(&["set_permissions", "-p", &vhost.name, "guest", ".*", ".*", ".*"])?;
        Ok(vhost)
    }

    /// The vhost name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `amqp://guest:guest@127.0.0.1:5672/<name>` (the name needs no percent-encoding).
    pub fn amqp_uri(&self) -> String {
        format!("amqp://guest:guest@{AMQP_AUTHORITY}/{}", self.name)
    }

    /// The queues currently in the vhost.
    pub fn queues(&self) -> Result<Vec<QueueInfo>, RabbitError> {
        let out = ctl(&[
            "list_queues",
            "-p",
            &self.name,
            "-q",
            "--no-table-headers",
            "name",
            "messages",
            "consumers",
        ])?;
        Ok(out.lines().filter_map(parse_queue_line).collect())
    }

    /// The exchanges currently in the vhost (the broker's predefined ones included).
    pub fn exchanges(&self) -> Result<Vec<ExchangeInfo>, RabbitError> {
        let out = ctl(&[
            "list_exchanges",
            "-p",
            &self.name,
            "-q",
            "--no-table-headers",
            "name",
            "type",
            "durable",
            "auto_delete",
        ])?;
        Ok(out.lines().filter_map(parse_exchange_line).collect())
    }

    /// The exchange called `name`, if it exists.
    pub fn exchange(&self, name: &str) -> Result<Option<ExchangeInfo>, RabbitError> {
        Ok(self.exchanges()?.into_iter().find(|e| e.name == name))
    }

    /// Polls until queue `name` exists with at least `min_consumers` consumers, or `timeout`.
    ///
    /// Use it as a readiness check for peers that print nothing when ready. It polls every
    /// 200 ms (each poll runs `rabbitmqctl`, which itself takes a few hundred ms).
    pub fn wait_for_queue(
        &self,
        name: &str,
        min_consumers: u64,
        timeout: Duration,
    ) -> Result<QueueInfo, RabbitError> {
        let deadline = Instant::now() + timeout;
        loop {
            let queues = self.queues()?;
            if let Some(found) = queues.iter().find(|q| q.name == name && q.consumers >= min_consumers) {
                return Ok(found.clone());
            }
            if Instant::now() >= deadline {
                return Err(RabbitError::Timeout {
                    vhost: self.name.clone(),
                    what: format!("queue {name} with >= {min_consumers} consumers"),
                    waited: timeout,
                    last: queues,
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        if let Err(e) = ctl(&["delete_vhost", &self.name]) {
            eprintln!("warning: could not delete test vhost {}: {e}", self.name);
        }
    }
}

fn ctl(args: &[&str]) -> Result<String, RabbitError> {
    let program = std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".to_owned());
    let mut cmd = Command::new(program);
    cmd.args(args);
    command::run(cmd, CTL_TIMEOUT).map(|done| done.stdout).map_err(RabbitError::Ctl)
}

fn parse_queue_line(line: &str) -> Option<QueueInfo> {
    let mut fields = line.split('\t');
    let name = fields.next()?.to_owned();
    let messages = fields.next()?.trim().parse().ok()?;
    let consumers = fields.next()?.trim().parse().ok()?;
    Some(QueueInfo { name, messages, consumers })
}

fn parse_exchange_line(line: &str) -> Option<ExchangeInfo> {
    let mut fields = line.split('\t');
    let name = fields.next()?.to_owned();
    let kind = fields.next()?.trim().to_owned();
    let durable = fields.next()?.trim().parse().ok()?;
    let auto_delete = fields.next()?.trim().parse().ok()?;
    Some(ExchangeInfo { name, kind, durable, auto_delete })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_list_exchanges_rows() {
        assert_eq!(
            parse_exchange_line("src.events\ttopic\ttrue\tfalse"),
            Some(ExchangeInfo {
                name: "src.events".into(),
                kind: "topic".into(),
                durable: true,
                auto_delete: false
            })
        );
        assert_eq!(parse_exchange_line("\tdirect\ttrue\tfalse").map(|e| e.name), Some(String::new()));
        assert_eq!(parse_exchange_line("Listing exchanges ..."), None);
    }

    #[test]
    fn parses_list_queues_rows() {
        assert_eq!(
            parse_queue_line("rpc-svc\t3\t1"),
            Some(QueueInfo { name: "rpc-svc".into(), messages: 3, consumers: 1 })
        );
        assert_eq!(parse_queue_line("Timeout: 60.0 seconds ..."), None);
        assert_eq!(parse_queue_line("q\tx\t1"), None);
    }
}
