//! A private `XDG_RUNTIME_DIR` for `outpost up` and `outpost bench` when the environment has
//! none (a container, a service, `ssh` without a login session).
//!
//! When the engine probes GPU adapters, Mesa asks libwayland for the default display (its Vulkan
//! device-select layer, to rank the GPU a compositor runs on; EGL, for its Wayland platform), and
//! libwayland's `wl_display_connect` prints `error: XDG_RUNTIME_DIR is invalid or not set in the
//! environment.` whenever that variable is unset or not an absolute path (and the display name is
//! not one either): once per probe. With the variable naming an empty folder of our own, the
//! connection finds no `wayland-0` socket there and fails in silence, and Mesa goes on as before
//! (X11, then no display); nothing else changes.
//!
//! The environment must change before any thread reads it, and `std::env::set_var` is `unsafe`
//! (forbidden in this workspace), so the tool executes itself again, once, with the variable set.

use std::ffi::OsStr;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;

/// The variable libwayland reads.
const VAR: &str = "XDG_RUNTIME_DIR";

/// Whether the variable is unusable as libwayland judges it: unset, or not an absolute path.
fn missing() -> bool {
    std::env::var_os(VAR).is_none_or(|v| !v.as_encoded_bytes().starts_with(b"/"))
}

/// `$TMPDIR/outpost-runtime-{uid}` (as Qt's `/tmp/runtime-$USER`), made with mode 0700 when
/// absent; `None` unless it is a folder (not a link) of this user's that only they can open.
fn private_dir() -> Option<PathBuf> {
    let uid = std::fs::metadata("/proc/self").ok()?.uid();
    let dir = std::env::temp_dir().join(format!("outpost-runtime-{uid}"));
    // A relative one would be missing again after the exec (and exec again).
    if !dir.is_absolute() {
        return None;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(_) => return None,
    }
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    let private = meta.is_dir() && meta.uid() == uid && meta.permissions().mode() & 0o777 == 0o700;
    private.then_some(dir)
}

/// Executes this program again, with the same arguments and `XDG_RUNTIME_DIR` set to the
/// private folder, when the variable is missing. Returns when it is not missing, or when that
/// cannot be done (then the program goes on as it is, and Mesa may print its message).
pub fn ensure() {
    if !missing() {
        return;
    }
    let (Some(dir), Ok(exe)) = (private_dir(), std::env::current_exe()) else {
        return;
    };
    let mut args = std::env::args_os();
    let name = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    // `exec` returns only if it failed.
    let _ = std::process::Command::new(&exe)
        .arg0(AsRef::<OsStr>::as_ref(&name))
        .args(args)
        .env(VAR, dir)
        .exec();
}
