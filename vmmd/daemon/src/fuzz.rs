//! Entry points for fuzzing what the image store reads from outside: layer
//! tar streams and OCI JSON. The cargo-fuzz targets in `vmmd/fuzz/` and the
//! smoke test (`tests/fuzz_smoke.rs`) call these; the device models' entry
//! points are `steelcup_vmm::fuzz`.

/// Any bytes as an image layer (a tar stream) applied over a small image:
/// errors are fine, panics and unbounded memory are not (small limits).
pub fn layer_tar(data: &[u8]) {
    use crate::image::rootfs::layer::apply_layer;
    use crate::image::rootfs::tree::{Limits, MemorySink, Tree};
    let limits = Limits {
        max_entries: 512,
        max_path: 1024,
        max_header: 16 << 10,
        max_bytes: 4 << 20,
        max_inline_total: 64 << 10,
        max_inodes: 4096,
        max_xattr_total: 64 << 10,
    };
    let mut tree = Tree::new(limits);
    let mut sink = MemorySink::default();
    // The same bytes twice: the second pass meets everything the first
    // created (whiteouts, replacements, links through symlinks).
    let Ok((_, used)) = apply_layer(&mut tree, &mut sink, &mut &data[..], 0, 0) else {
        return;
    };
    let _ = apply_layer(&mut tree, &mut sink, &mut &data[..], 1, used);
    let mut n = 0;
    tree.walk(|_, _| n += 1);
}

/// Any bytes as an image manifest, an image config (and the process it
/// describes, merged with overrides) and an image source string.
pub fn image_json(data: &[u8]) {
    use crate::image::store::{parse_manifest, Digest};
    let d = Digest::of(data);
    let _ = parse_manifest(&d, data);
    if let Ok(config) = serde_json::from_slice::<oci_spec::image::ImageConfiguration>(data) {
        let p = crate::image::workload::Process::from_config(&config);
        let _ = p.merge(&Default::default());
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = crate::image::source::Source::parse(s);
        let _ = s.parse::<Digest>();
    }
}

/// Any bytes as the bodies the APIs and the guest channels read: a `cup
/// run` spec, a guest control request and answer, a worker's message and
/// command, an exec request, a published port, a memory size, a `-v`
/// volume, a `--network` value, a warm-pool size.
pub fn api_bodies(data: &[u8]) {
    use steelcup_api::vmm1::{NamedVolume, RunSpec};
    use steelcup_proto::control::{GuestAnswer, GuestRequest};
    use steelcup_proto::worker::{WorkerCommand, WorkerMessage};
    let _ = serde_json::from_slice::<RunSpec>(data);
    let _ = serde_json::from_slice::<WorkerMessage>(data);
    let _ = serde_json::from_slice::<WorkerCommand>(data);
    let _ = serde_json::from_slice::<steelcup_proto::stdio::ExecRequest>(data);
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = GuestRequest::parse(s);
    let _ = GuestAnswer::parse(s);
    let _ = steelcup_units::ports::PortSpec::parse(s);
    let _ = steelcup_units::MemSize::try_from(s);
    let _ = NamedVolume::try_from(s);
    let _ = crate::net::NetOptions::parse(s);
    let _ = crate::pool::PoolSpec::try_from(s);
}
