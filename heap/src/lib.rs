//! Gives back to the system the memory the allocator holds free. glibc's malloc keeps what a
//! large call freed in its arenas (116 to 637 MiB a second after the memory bench's large text
//! calls), so a device would stay at its peak; the daemons call [`give_back`] after such a call.
//! One FFI call, so this crate alone may use `unsafe`, there and nowhere else.

/// Returns the free memory of every malloc arena to the system (glibc's `malloc_trim(0)`);
/// whether any was returned. Takes milliseconds for hundreds of MiB: call it off the async
/// threads. Off glibc it does nothing and returns `false`.
pub fn give_back() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointer of ours; it walks the allocator's own free lists
        // under the allocator's locks and may be called from any thread at any time.
        #[allow(unsafe_code)]
        let released = unsafe { libc::malloc_trim(0) };
        released == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Resident pages of this process, KiB.
    fn resident_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    #[test]
    fn freed_memory_goes_back_to_the_system() {
        // 256 MiB in 64 KiB blocks (below glibc's mmap threshold: freed, they stay in the
        // arena), touched so they are resident, and one small block after them so the arena's
        // top cannot shrink by itself.
        let blocks: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8; 64 << 10]).collect();
        let keep = std::hint::black_box(vec![1u8; 64]);
        let full = resident_kib();
        drop(blocks);
        let freed = resident_kib();
        assert!(give_back(), "nothing was given back");
        let after = resident_kib();
        assert!(
            after + (128 << 10) < full,
            "resident: {full} KiB full, {freed} KiB after the free, {after} KiB after give_back"
        );
        assert_eq!(keep[0], 1);
    }
}
