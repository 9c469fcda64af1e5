//! Looking for a usable adapter in a child process, so that a process that finds none never
//! loads the drivers it looked at. Probing maps every installed Vulkan/GL driver into the
//! process and they stay (Mesa's software Vulkan with its LLVM: an idle agent held 69.7 MiB with
//! `engine = "auto"` against 13.4 MiB with `engine = "cpu"`, on a machine with only software
//! adapters); a child that probes and exits takes them with it.
//!
//! A binary opts in by calling [`answer_probe_if_asked`] first thing in `main`: started as a
//! probe (the `OUTPOST_GPU_PROBE` variable set), it probes, prints one line and exits; otherwise
//! it marks the process as one whose own executable answers probes. A process that has not opted
//! in (a test binary, a library user's program) gets `None` from [`probe_in_child`] and probes
//! in-process, as before.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{GpuContext, GpuOptions};

/// Set in a probe child's environment: `software` when software adapters count, else `hardware`.
const PROBE_ENV: &str = "OUTPOST_GPU_PROBE";

/// How long a probe may take before it counts as finding nothing (a driver that hangs).
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

static ANSWERS_PROBES: AtomicBool = AtomicBool::new(false);

/// First thing in `main`: answers a probe and exits when this process is a probe child;
/// otherwise records that this executable can answer probes.
#[allow(clippy::print_stdout)]
pub fn answer_probe_if_asked() {
    let Some(kind) = std::env::var_os(PROBE_ENV) else {
        ANSWERS_PROBES.store(true, Ordering::SeqCst);
        return;
    };
    let options = GpuOptions {
        allow_software: kind == "software",
        ..GpuOptions::default()
    };
    match GpuContext::new(options) {
        Ok(gpu) => {
            let adapter = gpu.adapter();
            println!("usable {} ({})", adapter.name, adapter.backend);
        }
        Err(why) => println!("unusable {why}"),
    }
    std::process::exit(0);
}

/// Whether an adapter `options` allow is present, asked of a child process: `Ok(adapter)` or
/// `Err(why not)`. `None` when this process cannot ask (it has not called
/// [`answer_probe_if_asked`], or the child could not run): probe in-process then.
pub fn probe_in_child(options: GpuOptions) -> Option<Result<String, String>> {
    if !ANSWERS_PROBES.load(Ordering::SeqCst) {
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    let kind = if options.allow_software {
        "software"
    } else {
        "hardware"
    };
    let mut child = Command::new(exe)
        .env(PROBE_ENV, kind)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() < PROBE_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Some(Err(format!(
                    "the GPU probe did not finish within {} s",
                    PROBE_TIMEOUT.as_secs()
                )));
            }
        }
    }
    let mut out = String::new();
    child.stdout.take()?.read_to_string(&mut out).ok()?;
    let line = out.lines().next()?;
    if let Some(adapter) = line.strip_prefix("usable ") {
        Some(Ok(adapter.to_owned()))
    } else {
        line.strip_prefix("unusable ")
            .map(|why| Err(why.to_owned()))
    }
}
