//! The `assetd` binary: parse the command line, run the subcommand.

// The memory allocator (see BENCHMARKS.md, "Memory"): glibc's keeps what uploads freed,
// fragmented across its per-thread arenas, long after they end (an assetd that took 600
// aborted 8 MiB uploads settled at ~300 MB). Chosen by a cargo feature so the bench can
// compare; the default build ships jemalloc.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its start: a background thread gives freed pages back
/// to the system after about a second (not at the next allocation, which an idle
/// process never makes).
#[cfg(feature = "jemalloc")]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 63] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000\0";

#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The stack of threads that do not choose their own (lapin's I/O threads).
const DEFAULT_THREAD_STACK: usize = 512 << 20;
/// Tokio's worker and blocking threads: they drop what lapin parsed (see below),
/// recursively too.
const RUNTIME_THREAD_STACK: usize = 64 << 20;

fn main() -> anyhow::Result<()> {
    // lapin parses every frame it receives recursively, on an I/O thread of its own
    // with the default stack: one command whose headers nest ~1,500 tables deep (a
    // frame of ~10 KB; the broker allows 128 KiB, ~18,000 levels) overflowed 2 MiB and
    // aborted the process, again at every redelivery; dropping it on a runtime thread
    // did the same. Such threads get 512 MiB of address space, the runtime's 64 MiB
    // (memory is only used as touched). Set before any thread starts, which is why the
    // runtime is built by hand.
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        std::env::set_var("RUST_MIN_STACK", DEFAULT_THREAD_STACK.to_string());
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(RUNTIME_THREAD_STACK)
        .build()?
        .block_on(assetd::cli::run())
}
