//! Entry point: parse the command line and hand over to the library. No logic here but one
//! allocator setting.
fn main() -> std::process::ExitCode {
    // Every step allocates and frees the same large activation buffers. By default glibc
    // serves blocks over 128 KiB with fresh mmaps and returns them on free, so each step
    // page-faults its whole working set again; raising both thresholds keeps the freed
    // blocks in the heap for the next step. One arena: a rayon worker's allocations
    // otherwise go to a per-thread arena whose heaps hold at most 64 MiB, and anything
    // larger (the triplet tape's stem maps) is mmapped and unmapped every step whatever the
    // thresholds (docs/PERFORMANCE.md, "allocator setting"). MTX_MALLOC_DEFAULTS=1 keeps
    // glibc's defaults, for measuring the difference.
    if std::env::var_os("MTX_MALLOC_DEFAULTS").is_none() {
        // SAFETY: mallopt only changes allocator tunables; no other thread runs yet.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
    mtx_hpc::cli::main()
}
