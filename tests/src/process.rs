//! A Python peer script running in a venv, with captured output.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::venv::Venv;

/// How long [`PythonProcess`]'s `Drop` waits after SIGINT before sending SIGKILL.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// After the child exits, how long to wait for its pipes to drain (a grandchild could hold them).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the target script with SIGINT restored to Python's default handler (a child of a
/// background job inherits an ignored SIGINT and micro_framework stops only on SIGINT), the script
/// directory first on `sys.path`, and `sys.argv` as if the script had been run directly.
const BOOTSTRAP: &str = "import os, runpy, signal, sys\n\
signal.signal(signal.SIGINT, signal.default_int_handler)\n\
sys.argv = sys.argv[1:]\n\
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))\n\
runpy.run_path(sys.argv[0], run_name='__main__')\n";

/// `tests/python/` of this crate, where the peer scripts live.
pub fn python_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// A free TCP port on 127.0.0.1 (bound then released; another process could take it first).
pub fn free_tcp_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A failure while running or waiting for a [`PythonProcess`]. Each variant carries the process's
/// output so far, so the assertion message shows the Python traceback.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// The interpreter could not be started.
    #[error("could not start {script}: {message}")]
    Spawn {
        /// The script.
        script: String,
        /// The OS error text.
        message: String,
    },
    /// The awaited line or exit did not happen before the deadline.
    #[error("{script}: {what} not seen within {waited:?}\n{output}")]
    Timeout {
        /// The script.
        script: String,
        /// What was awaited.
        what: String,
        /// How long it waited.
        waited: Duration,
        /// Output so far.
        output: String,
    },
    /// The process closed stdout (exited) before printing the awaited line.
    #[error("{script}: exited before {what}\n{output}")]
    Exited {
        /// The script.
        script: String,
        /// What was awaited.
        what: String,
        /// Full output.
        output: String,
    },
    /// Waiting for or signalling the process failed.
    #[error("{script}: {message}")]
    Os {
        /// The script.
        script: String,
        /// The OS error text.
        message: String,
    },
}

/// A Python script from `tests/python/` running in a peer venv.
///
/// Contract: the child runs with `python -u`, cwd `tests/python/`, the caller's environment plus
/// the given variables and `PYTHONUNBUFFERED=1`, default SIGINT handling, in its own process
/// group. Stdout and stderr are collected line by line in memory for the whole lifetime.
/// Dropping it stops the process group (SIGINT, then SIGKILL after [`DEFAULT_STOP_GRACE`]); if
/// the thread is panicking the output is printed to stderr for debugging. It never sleeps as
/// synchronisation: every wait is on output, exit or a deadline.
#[derive(Debug)]
pub struct PythonProcess {
    script: String,
    child: Child,
    exit: Option<ExitStatus>,
    output: Arc<Output>,
}

impl PythonProcess {
    /// Starts `python -u <tests/python/script> args...` in `venv` with extra `env` variables.
    pub fn spawn(
        venv: &Venv,
        script: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self, ProcessError> {
        let path = python_dir().join(script);
        let mut cmd = Command::new(venv.python());
        cmd.arg("-u")
            .arg("-c")
            .arg(BOOTSTRAP)
            .arg(&path)
            .args(args)
            .current_dir(python_dir())
            .env("PYTHONUNBUFFERED", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| ProcessError::Spawn { script: script.to_owned(), message: e.to_string() })?;
        let output = Arc::new(Output::default());
        if let Some(pipe) = child.stdout.take() {
            collect(pipe, Arc::clone(&output), Stream::Stdout);
        }
        if let Some(pipe) = child.stderr.take() {
            collect(pipe, Arc::clone(&output), Stream::Stderr);
        }
        Ok(PythonProcess { script: script.to_owned(), child, exit: None, output })
    }

    /// Spawns the script, waits for it to exit within `timeout` and returns it (output intact).
    ///
    /// A non-zero exit status is not an error here; check [`Self::exit_status`].
    pub fn run(
        venv: &Venv,
        script: &str,
        args: &[&str],
        env: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<Self, ProcessError> {
        let mut process = Self::spawn(venv, script, args, env)?;
        process.wait_for_exit(timeout)?;
        Ok(process)
    }

    /// The child's process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the first stdout line (since start) that starts with `prefix` and returns it.
    ///
    /// Fails with [`ProcessError::Exited`] as soon as stdout closes without such a line, and with
    /// [`ProcessError::Timeout`] after `timeout`.
    pub fn wait_for_line(&self, prefix: &str, timeout: Duration) -> Result<String, ProcessError> {
        let what = format!("a stdout line starting with {prefix:?}");
        let deadline = Instant::now() + timeout;
        let mut state = self.output.lock();
        loop {
            if let Some(line) = state.stdout.iter().find(|l| l.starts_with(prefix)) {
                return Ok(line.clone());
            }
            if state.stdout_closed {
                drop(state);
                return Err(ProcessError::Exited { script: self.script.clone(), what, output: self.dump() });
            }
            let now = Instant::now();
            if now >= deadline {
                drop(state);
                return Err(ProcessError::Timeout {
                    script: self.script.clone(),
                    what,
                    waited: timeout,
                    output: self.dump(),
                });
            }
            state = self
                .output
                .changed
                .wait_timeout(state, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
    }

    /// Waits up to `timeout` for the process to exit by itself and returns its status.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Result<ExitStatus, ProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(ProcessError::Timeout {
                    script: self.script.clone(),
                    what: "exit".to_owned(),
                    waited: timeout,
                    output: self.dump(),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process: SIGINT to its process group, then SIGKILL if it is still running after
    /// `grace`. Returns the exit status; calling it again returns the same status.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus, ProcessError> {
        if let Some(status) = self.try_exit()? {
            return Ok(status);
        }
        self.signal_group("-INT");
        match self.wait_for_exit(grace) {
            Ok(status) => Ok(status),
            Err(ProcessError::Timeout { .. }) => {
                self.signal_group("-KILL");
                let _ = self.child.kill();
                let status = self.child.wait().map_err(|e| self.os_error(e))?;
                self.exit = Some(status);
                Ok(status)
            }
            Err(other) => Err(other),
        }
    }

    /// The exit status if the process has exited (polls without blocking).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.try_exit().ok().flatten()
    }

    /// All stdout lines so far (without line terminators).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.output.lock().stdout.clone()
    }

    /// All stdout so far, one `\n`-terminated line each.
    pub fn stdout(&self) -> String {
        join(&self.output.lock().stdout)
    }

    /// All stderr so far, one `\n`-terminated line each.
    pub fn stderr(&self) -> String {
        join(&self.output.lock().stderr)
    }

    /// Stdout and stderr so far, labelled, for assertion messages.
    pub fn dump(&self) -> String {
        let state = self.output.lock();
        format!(
            "--- {} stdout ---\n{}--- {} stderr ---\n{}",
            self.script,
            join(&state.stdout),
            self.script,
            join(&state.stderr)
        )
    }

    fn try_exit(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().map_err(|e| self.os_error(e))?;
            if self.exit.is_some() {
                // Make everything the child printed visible before reporting the exit.
                self.output.wait_drained(DRAIN_TIMEOUT);
            }
        }
        Ok(self.exit)
    }

    fn signal_group(&self, signal: &str) {
        // The group leader is not reaped yet (checked by the caller), so its pid is still ours.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args([signal, "--", &group])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    fn os_error(&self, e: std::io::Error) -> ProcessError {
        ProcessError::Os { script: self.script.clone(), message: e.to_string() }
    }
}

impl Drop for PythonProcess {
    fn drop(&mut self) {
        let stopped = self.stop(DEFAULT_STOP_GRACE);
        if thread::panicking() {
            eprintln!("{}", self.dump());
        }
        if let Err(e) = stopped {
            eprintln!("warning: stopping {} failed: {e}", self.script);
        }
    }
}

#[derive(Debug, Default)]
struct Output {
    state: Mutex<OutputState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct OutputState {
    stdout: Vec<String>,
    stderr: Vec<String>,
    stdout_closed: bool,
    stderr_closed: bool,
}

impl Output {
    fn lock(&self) -> MutexGuard<'_, OutputState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits (bounded by `timeout`) until both pipes reached end of file.
    fn wait_drained(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while !(state.stdout_closed && state.stderr_closed) {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

fn collect(pipe: impl Read + Send + 'static, output: Arc<Output>, stream: Stream) {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_owned();
                    let mut state = output.lock();
                    match stream {
                        Stream::Stdout => state.stdout.push(line),
                        Stream::Stderr => state.stderr.push(line),
                    }
                    output.changed.notify_all();
                }
            }
        }
        let mut state = output.lock();
        match stream {
            Stream::Stdout => state.stdout_closed = true,
            Stream::Stderr => state.stderr_closed = true,
        }
        output.changed.notify_all();
    });
}

fn join(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}
