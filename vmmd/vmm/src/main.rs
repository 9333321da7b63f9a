//! `vmm-worker`: the per-VM worker process on its own, the binary vmmd
//! starts for every VM (`vmm-worker worker NAME`, config as JSON on stdin;
//! NAME only shows in `ps`). It holds only the VMM — no daemon, registry
//! client or image store — so it starts faster, maps less and offers a
//! jailed guest less code than `vmmd worker`, which runs the same worker.
//! `vmm-worker --version` prints its version and exits.

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        // Also what `vmmd bench` times as the cost of starting this binary.
        println!("vmm-worker {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    std::process::exit(steelcup_vmm::worker::main());
}
