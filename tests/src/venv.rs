//! Cached virtual environments holding the Python peers.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::command::{self, CommandFailure};

/// nameko 2.14.1 and its working set on CPython 3.11 (`pip freeze` of a verified install).
const NAMEKO_REQUIREMENTS: &[&str] = &[
    "nameko==2.14.1",
    "kombu==5.7.0",
    "amqp==5.4.2",
    "eventlet==0.41.3",
    "vine==5.1.0",
    "greenlet==3.5.6",
    "dnspython==2.9.2",
    "PyYAML==6.0.4",
    "Werkzeug==3.1.9",
    "MarkupSafe==3.0.4",
    "mock==5.2.0",
    "path==17.1.1",
    "path.py==12.5.0",
    "requests==2.34.2",
    "certifi==2026.10.19.post1",
    "charset-normalizer==3.5.3",
    "idna==3.20",
    "urllib3==2.8.0",
    "six==1.17.0",
    "wrapt==2.5.2",
    "packaging==26.4",
];

/// micro-framework 2.0.16 and its working set (kombu < 5, websockets < 9).
const MICRO_FRAMEWORK_REQUIREMENTS: &[&str] = &[
    "micro-framework==2.0.16",
    "kombu==4.6.11",
    "amqp==2.6.1",
    "vine==1.3.0",
    "websockets==8.1",
    "websocket-client==0.59.0",
    "prometheus-client==0.8.0",
    "loky==2.9.0",
    "cloudpickle==3.1.3",
    "psutil==7.2.2",
    "six==1.17.0",
];

/// The Python 3.11 fixes for micro-framework's dependencies, installed into its venv.
const PY311_FIXES: &str = include_str!("../python/microfw_py311_fixes.py");
const PY311_FIXES_MODULE: &str = "microfw_py311_fixes";

/// Marker written last inside a finished venv (before the atomic rename).
const READY_MARKER: &str = "microfw-peers-ready.txt";
const PIP_TIMEOUT: Duration = Duration::from_secs(20 * 60);
const PYTHON_TIMEOUT: Duration = Duration::from_secs(120);

/// Which Python peer a venv holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PeerKind {
    /// nameko 2.14.1 (kombu 5, eventlet).
    Nameko,
    /// micro-framework 2.0.16 (kombu 4.6, websockets 8.1) with the Python 3.11 fixes.
    MicroFramework,
}

impl PeerKind {
    /// The exact `pip install` pins of this peer's venv (the whole dependency set).
    pub fn requirements(self) -> &'static [&'static str] {
        match self {
            PeerKind::Nameko => NAMEKO_REQUIREMENTS,
            PeerKind::MicroFramework => MICRO_FRAMEWORK_REQUIREMENTS,
        }
    }

    /// Short name used in cache directory names: `nameko-2.14.1` or `micro-framework-2.0.16`.
    pub fn label(self) -> &'static str {
        match self {
            PeerKind::Nameko => "nameko-2.14.1",
            PeerKind::MicroFramework => "micro-framework-2.0.16",
        }
    }

    /// Python statement run after creation to prove the venv works (and the fixes are active).
    fn smoke_import(self) -> &'static str {
        match self {
            PeerKind::Nameko => "import nameko.standalone.rpc, nameko.runners",
            PeerKind::MicroFramework => {
                "import inspect, asyncio; import kombu, websockets, micro_framework.runner; \
                 assert inspect.formatargspec and inspect.getargspec; asyncio.Lock(loop=None)"
            }
        }
    }

    fn index(self) -> usize {
        match self {
            PeerKind::Nameko => 0,
            PeerKind::MicroFramework => 1,
        }
    }
}

/// Why a Python-peer test did not run. The only skip allowed: no usable `python3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkipReason(String);

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Failure to provide a peer venv.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// No Python interpreter on this machine: the test should print the reason and return.
    #[error("python peers unavailable: {0}")]
    Skip(SkipReason),
    /// Creating the venv, pip install or the post-install import check failed (output inside).
    #[error("creating the {peer} venv failed: {failure}")]
    Setup {
        /// Which peer.
        peer: &'static str,
        /// The failing command and its output (pip's output for install failures).
        failure: CommandFailure,
    },
    /// A filesystem operation on the cache failed.
    #[error("python peer cache: {action} {path}: {message}")]
    Cache {
        /// What was attempted.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error text.
        message: String,
    },
}

/// A ready virtual environment holding one Python peer.
///
/// Use [`Venv::python`] (with `-m module` or a script path) rather than the console scripts in
/// `bin/`: venvs are built in a temporary directory and renamed into the cache, so the
/// scripts' shebang lines point at the temporary path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Venv {
    kind: PeerKind,
    root: PathBuf,
}

impl Venv {
    /// The peer this venv holds.
    pub fn kind(&self) -> PeerKind {
        self.kind
    }

    /// The venv directory (inside the cache).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The venv's interpreter, `<root>/bin/python`.
    pub fn python(&self) -> PathBuf {
        self.root.join("bin").join("python")
    }
}

/// Entry point for the cached Python-peer venvs.
///
/// Each venv is created once per (peer, pinned requirements, fixes, base interpreter) and reused
/// by later tests and later `cargo test` runs. Creation happens in a temporary directory next to
/// the final one and is published with an atomic rename, so concurrent test processes never see
/// a half-built venv (a loser of the race discards its copy). Within one process, creation of the
/// same peer is serialised. Temporary directories left by killed runs are removed once they are
/// older than twice the pip timeout (40 min).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PythonPeers;

impl PythonPeers {
    /// The nameko 2.14.1 venv (created on first use).
    pub fn nameko() -> Result<Venv, PeerError> {
        Self::venv(PeerKind::Nameko)
    }

    /// The micro-framework 2.0.16 venv with the Python 3.11 fixes (created on first use).
    pub fn micro_framework() -> Result<Venv, PeerError> {
        Self::venv(PeerKind::MicroFramework)
    }

    /// The venv for `kind`, created on first use; [`PeerError::Skip`] when there is no Python.
    pub fn venv(kind: PeerKind) -> Result<Venv, PeerError> {
        static BUILDING: [Mutex<()>; 2] = [Mutex::new(()), Mutex::new(())];
        let _guard = BUILDING[kind.index()].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let base = BasePython::probe()?;
        let cache = Self::cache_dir();
        let root = cache.join(format!("{}-py{}-{:016x}", kind.label(), base.version, cache_key(kind, &base)));
        if root.join(READY_MARKER).is_file() {
            return Ok(Venv { kind, root });
        }
        fs::create_dir_all(&cache).map_err(|e| cache_error("create", &cache, e))?;
        remove_stale_builds(&cache, kind);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let tmp = cache.join(format!(".tmp-{}-{}-{nanos}", kind.label(), std::process::id()));
        let built = build(kind, &base, &tmp);
        if let Err(e) = built {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if let Err(e) = fs::rename(&tmp, &root) {
            let _ = fs::remove_dir_all(&tmp);
            if !root.join(READY_MARKER).is_file() {
                return Err(cache_error("rename into", &root, e));
            }
        }
        Ok(Venv { kind, root })
    }

    /// The cache directory holding the venvs (see the crate docs for the overrides).
    pub fn cache_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("MICROFW_PYTHON_PEERS_CACHE") {
            return PathBuf::from(dir);
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
            .unwrap_or_else(std::env::temp_dir);
        base.join("microfw-python-peers")
    }
}

/// The interpreter used to create venvs.
#[derive(Debug)]
struct BasePython {
    program: String,
    version: String,
    executable: String,
}

impl BasePython {
    fn probe() -> Result<Self, PeerError> {
        let program = std::env::var("MICROFW_PYTHON").unwrap_or_else(|_| "python3".to_owned());
        let mut cmd = Command::new(&program);
        cmd.args(["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3]); print(sys.executable)"]);
        match command::run(cmd, PYTHON_TIMEOUT) {
            Ok(done) => {
                let mut lines = done.stdout.lines();
                let version = lines.next().unwrap_or_default().trim().to_owned();
                let executable = lines.next().unwrap_or_default().trim().to_owned();
                Ok(BasePython { program, version, executable })
            }
            // A missing program, or a shim (pyenv) reporting "command not found", means no Python.
            Err(failure) if failure.not_found || failure.outcome.contains("exit status: 127") => {
                Err(PeerError::Skip(SkipReason(format!("`{program}` is not available: {}", failure.outcome))))
            }
            Err(failure) => Err(PeerError::Setup { peer: "base python", failure }),
        }
    }
}

fn build(kind: PeerKind, base: &BasePython, dir: &Path) -> Result<(), PeerError> {
    let setup = |failure| PeerError::Setup { peer: kind.label(), failure };
    let mut venv = Command::new(&base.program);
    venv.args(["-m", "venv"]).arg(dir);
    command::run(venv, PYTHON_TIMEOUT).map_err(setup)?;
    let python = dir.join("bin").join("python");
    let mut pip = Command::new(&python);
    pip.args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--no-compile"])
        .args(kind.requirements());
    command::run(pip, PIP_TIMEOUT).map_err(setup)?;
    if kind == PeerKind::MicroFramework {
        let mut purelib = Command::new(&python);
        purelib.args(["-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]);
        let site = PathBuf::from(command::run(purelib, PYTHON_TIMEOUT).map_err(setup)?.stdout.trim());
        write(&site.join(format!("{PY311_FIXES_MODULE}.py")), PY311_FIXES)?;
        write(&site.join(format!("{PY311_FIXES_MODULE}.pth")), &format!("import {PY311_FIXES_MODULE}\n"))?;
    }
    let mut check = Command::new(&python);
    check.args(["-c", kind.smoke_import()]);
    command::run(check, PYTHON_TIMEOUT).map_err(setup)?;
    let marker = format!(
        "{}\npython {} ({})\n{}\n",
        kind.label(),
        base.version,
        base.executable,
        kind.requirements().join("\n")
    );
    write(&dir.join(READY_MARKER), &marker)
}

/// Removes temporary build directories of `kind` left by killed runs (older than any live build).
fn remove_stale_builds(cache: &Path, kind: PeerKind) {
    let prefix = format!(".tmp-{}-", kind.label());
    let Ok(entries) = fs::read_dir(cache) else { return };
    for entry in entries.flatten() {
        let stale = entry.file_name().to_string_lossy().starts_with(&prefix)
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|modified| modified.elapsed().ok())
                .is_some_and(|age| age > 2 * PIP_TIMEOUT);
        if stale {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn write(path: &Path, contents: &str) -> Result<(), PeerError> {
    fs::write(path, contents).map_err(|e| cache_error("write", path, e))
}

fn cache_error(action: &'static str, path: &Path, e: std::io::Error) -> PeerError {
    PeerError::Cache { action, path: path.to_path_buf(), message: e.to_string() }
}

/// FNV-1a over everything that determines a venv's contents.
fn cache_key(kind: PeerKind, base: &BasePython) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let fixes = if kind == PeerKind::MicroFramework { PY311_FIXES } else { "" };
    let parts = [kind.label(), &base.version, &base.executable, &kind.requirements().join(" "), fixes];
    for part in parts {
        for byte in part.bytes().chain([0]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(version: &str) -> BasePython {
        BasePython {
            program: "python3".into(),
            version: version.into(),
            executable: "/usr/bin/python3".into(),
        }
    }

    #[test]
    fn cache_key_depends_on_peer_and_interpreter() {
        let k = |kind, v| cache_key(kind, &base(v));
        assert_eq!(k(PeerKind::Nameko, "3.11.7"), k(PeerKind::Nameko, "3.11.7"));
        assert_ne!(k(PeerKind::Nameko, "3.11.7"), k(PeerKind::Nameko, "3.12.1"));
        assert_ne!(k(PeerKind::Nameko, "3.11.7"), k(PeerKind::MicroFramework, "3.11.7"));
    }

    #[test]
    fn requirements_pin_every_package_exactly() {
        for kind in [PeerKind::Nameko, PeerKind::MicroFramework] {
            assert!(kind.requirements().iter().all(|r| r.contains("==")), "{kind:?}");
        }
        assert!(NAMEKO_REQUIREMENTS.contains(&"nameko==2.14.1"));
        assert!(MICRO_FRAMEWORK_REQUIREMENTS.contains(&"kombu==4.6.11"));
    }
}
