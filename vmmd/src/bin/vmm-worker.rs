//! `vmm-worker`: the per-VM worker process on its own, the binary vmmd
//! starts for every VM (`vmm-worker worker NAME`, config as JSON on stdin;
//! NAME only shows in `ps`). It holds only the VMM — no daemon, registry
//! client or image store — so it starts faster, maps less and offers a
//! jailed guest less code than `vmmd worker`, which runs the same worker.

fn main() {
    std::process::exit(vmmd::worker::main());
}
