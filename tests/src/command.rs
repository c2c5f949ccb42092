//! Running a helper command (python, pip, rabbitmqctl) with a deadline and captured output.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A helper command that could not run, exited unsuccessfully or overran its deadline.
///
/// Carries the command line and everything it printed, so a failing test shows why. It does not
/// distinguish "program not found" from other spawn failures except through [`Self::not_found`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{command}` {outcome}\n--- output ---\n{output}")]
pub struct CommandFailure {
    /// The command line, for humans.
    pub command: String,
    /// What went wrong: "could not start: ...", "exited with ...", "timed out after ...".
    pub outcome: String,
    /// Captured stdout followed by stderr.
    pub output: String,
    /// True when the program itself does not exist (spawn failed with `NotFound`).
    pub not_found: bool,
}

/// Output of a helper command that exited successfully.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finished {
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `cmd` to completion, killing it after `timeout`; non-zero exit is a failure.
pub(crate) fn run(mut cmd: Command, timeout: Duration) -> Result<Finished, CommandFailure> {
    let line = describe(&cmd);
    let failure = |outcome: String, output: String, not_found: bool| CommandFailure {
        command: line.clone(),
        outcome,
        output,
        not_found,
    };
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        failure(format!("could not start: {e}"), String::new(), e.kind() == std::io::ErrorKind::NotFound)
    })?;
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);
    let deadline = Instant::now() + timeout;
    let status: Result<ExitStatus, String> = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("timed out after {timeout:?} (killed)"));
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => break Err(format!("could not be waited for: {e}")),
        }
    };
    let stdout = stdout.and_then(|h| h.join().ok()).unwrap_or_default();
    let stderr = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    match status {
        Ok(status) if status.success() => Ok(Finished { stdout, stderr }),
        Ok(status) => Err(failure(format!("exited with {status}"), format!("{stdout}{stderr}"), false)),
        Err(outcome) => Err(failure(outcome, format!("{stdout}{stderr}"), false)),
    }
}

/// Renders a command line for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_reports_failure() {
        let mut ok = Command::new("sh");
        ok.args(["-c", "echo out; echo err >&2"]);
        let done = run(ok, Duration::from_secs(10)).unwrap();
        assert_eq!((done.stdout.as_str(), done.stderr.as_str()), ("out\n", "err\n"));

        let mut bad = Command::new("sh");
        bad.args(["-c", "echo why; exit 3"]);
        let err = run(bad, Duration::from_secs(10)).unwrap_err();
        assert!(err.outcome.contains("exit status: 3"), "{err}");
        assert_eq!(err.output, "why\n");
        assert!(!err.not_found);
    }

    #[test]
    fn times_out_and_flags_missing_programs() {
        let mut slow = Command::new("sleep");
        slow.arg("30");
        let started = Instant::now();
        let err = run(slow, Duration::from_millis(200)).unwrap_err();
        assert!(err.outcome.starts_with("timed out"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));

        let err =
            run(Command::new("/nonexistent/microfw-no-such-program"), Duration::from_secs(5)).unwrap_err();
        assert!(err.not_found, "{err}");
    }
}
