//! Child processes for tests that run Outpost's real executables (and Mosquitto): where the
//! workspace's binaries are, and guards that kill a child when the test ends, however it ends.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The workspace binary `name` (`edge-agent`, `cloud-coordinator`, `firmware-config`, …),
/// beside this test executable's `deps/` folder in the target folder: `cargo test --workspace`
/// builds every member's binaries there. Fails the test, naming the command, when it is missing.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/{profile}/deps/e2e-HASH: the binaries are in target/{profile}.
    let profile_dir = exe
        .parent()
        .filter(|d| d.ends_with("deps"))
        .and_then(Path::parent)
        .or_else(|| exe.parent())
        .unwrap();
    let path = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` (cargo test --workspace builds it)",
        path.display()
    );
    path
}

/// Runs workspace binary `name` to completion; its stdout. Fails the test, with both outputs, if
/// it fails.
pub fn run(name: &str, args: &[&str]) -> String {
    let out = Command::new(binary(name)).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{name} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether this process runs as root (its effective user id, from `/proc/self/status`).
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

/// A child process killed (and reaped) when dropped.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Spawns `command`; fails the test if it cannot start.
    pub fn spawn(command: &mut Command) -> Self {
        ChildGuard(command.spawn().unwrap())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A workspace binary running for a test, killed when dropped, its stdout and stderr lines on a
/// channel.
#[derive(Debug)]
pub struct Process {
    child: ChildGuard,
    lines: mpsc::Receiver<String>,
    name: &'static str,
}

impl Process {
    /// Starts binary `name` with `args` and `RUST_LOG=info`.
    pub fn start(name: &'static str, args: &[&str]) -> Self {
        let mut command = Command::new(binary(name));
        command.env("RUST_LOG", "info");
        Self::spawn(name, command.args(args))
    }

    /// Starts binary `name` with `args` and no `RUST_LOG`: the log a user gets by default.
    pub fn start_with_default_log(name: &'static str, args: &[&str]) -> Self {
        let mut command = Command::new(binary(name));
        command.env_remove("RUST_LOG");
        Self::spawn(name, command.args(args))
    }

    /// Starts binary `name` with `args` and `RUST_LOG=info`, limited to `files` open
    /// descriptors (soft and hard) by util-linux's `prlimit`, which then runs it as the same
    /// process. Fails the test, naming the package, when `prlimit` is missing.
    pub fn start_with_open_files(name: &'static str, files: u32, args: &[&str]) -> Self {
        let prlimit = ["/usr/bin/prlimit", "/bin/prlimit"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("prlimit is missing: install util-linux");
        let mut command = Command::new(prlimit);
        command
            .arg(format!("--nofile={files}:{files}"))
            .arg("--")
            .arg(binary(name))
            .args(args)
            .env("RUST_LOG", "info");
        Self::spawn(name, &mut command)
    }

    /// Starts binary `name` with `args`, `RUST_LOG=info` and the environment variables `env`.
    pub fn start_with_env(name: &'static str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(binary(name));
        command.env("RUST_LOG", "info").args(args);
        for (key, value) in env {
            command.env(key, value);
        }
        Self::spawn(name, &mut command)
    }

    /// Starts binary `name` with `args` and `RUST_LOG=info` in a mount namespace of its own
    /// (util-linux's `unshare`; a user namespace too when the tests do not run as root), where
    /// the folder `at` is a tmpfs of `bytes`: a small disk that can be filled for real. The
    /// folder's content is reachable from outside as `/proc/{id}/root/{at}`. Fails the test,
    /// naming what is missing, when the namespace cannot be made.
    pub fn start_on_tmpfs(name: &'static str, at: &Path, bytes: u64, args: &[&str]) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let mut command = Command::new("unshare");
        if !running_as_root() {
            command.arg("--map-root-user");
        }
        command
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o "size=$1" outpost-test "$2" && shift 2 && exec "$@""#)
            .arg("sh")
            .arg(bytes.to_string())
            .arg(at)
            .arg(binary(name))
            .args(args)
            .env("RUST_LOG", "info");
        Self::spawn(name, &mut command)
    }

    /// Waits up to `limit` for the process to exit by itself; its exit status, or `None` if it
    /// still runs.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.0.id()
    }

    fn spawn(name: &'static str, command: &mut Command) -> Self {
        let mut child = ChildGuard::spawn(command.stdout(Stdio::piped()).stderr(Stdio::piped()));
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.0.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.0.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Process { child, lines, name }
    }

    /// The lines printed since the last call (or `wait_for`), without waiting.
    pub fn printed(&mut self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// Waits up to 60 s for a line containing `needle`; returns it. Fails the test with what the
    /// process printed otherwise.
    pub fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => seen.push(line),
                Err(_) => panic!(
                    "{} printed no {needle:?} (exit: {:?}):\n{}",
                    self.name,
                    self.child.0.try_wait(),
                    seen.join("\n")
                ),
            }
        }
    }
}
