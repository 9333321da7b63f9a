//! Builds a ready-to-run VM from a [`VmConfig`]: KVM VM, memory, kernel,
//! initramfs with the guest config appended, command line, zero page,
//! devices, and configured vCPUs.

use crate::arch::{self, ArchError};
use crate::config::VmConfig;
use crate::devices::event_loop::DeviceLoop;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioTransport, MMIO_SIZE, QUEUE_NOTIFY};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::devices::{
    serial::{IrqTrigger, Output, SerialConsole},
    Bus,
};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{self, Vcpu};
use crate::vstate::vm::Vm;
use crate::vstate::KvmError;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use std::io::{Read, Seek};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use steelcup_proto::cpio::{CpioError, CpioWriter};
use steelcup_proto::guest::CONFIG_PATH;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error("open kernel {path}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("load kernel {path}")]
    LoadKernel {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("read initramfs {path}")]
    ReadInitramfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write initramfs into guest memory")]
    WriteInitramfs(#[source] vm_memory::GuestMemoryError),
    #[error("guest config")]
    GuestConfig(#[source] CpioError),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("vCPU count {0} is out of range 1..=32")]
    Vcpus(u8),
    #[error("open /dev/urandom for the guest's entropy device")]
    Rng(#[source] std::io::Error),
    #[error(transparent)]
    Mptable(#[from] crate::arch::mptable::MptableError),
    #[error(transparent)]
    Disk(#[from] crate::devices::virtio::block::BlockError),
    #[error("vmmd sent {got} descriptors with the config; its disks and tap need {expected}")]
    Handles { expected: usize, got: usize },
    #[error("network on tap {tap}")]
    Net {
        tap: String,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock socket {path}")]
    Vsock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the thread creating the KVM VM panicked")]
    VmThread,
    #[error("{0} virtio devices do not fit the 19 interrupt lines")]
    TooManyDevices(usize),
}

/// The first virtio-mmio device's interrupt line; device `i` uses
/// `FIRST_VIRTIO_IRQ + i` and has its registers at
/// `MMIO_HOLE_START + i * 4 KiB`.
pub const FIRST_VIRTIO_IRQ: u32 = 5;
/// The last usable I/O APIC line.
const LAST_IRQ: u32 = 23;

/// A VM ready to run.
#[derive(Debug)]
pub struct BuiltVm {
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
    pub vcpus: Vec<Vcpu>,
    pub bus: Arc<Mutex<Bus>>,
    /// What the device thread waits on.
    pub devices: DeviceLoop,
    /// The empty disk slots by disk id, for the worker's `attach` command.
    pub slots: Vec<(String, crate::devices::virtio::SharedTransport)>,
}

/// The virtio devices of a VM in slot order: the entropy device first, then
/// the disks in the order given (so the first disk is the guest's `vda`),
/// then the network device, then vsock.
///
/// The disks' files and the tap come from vmmd in `handles`, in that order
/// (see [`crate::config::VmConfig`]); the worker opens none of them.
fn virtio_devices(
    config: &VmConfig,
    handles: Vec<std::fs::File>,
    mem: &GuestMemoryMmap,
) -> Result<Vec<Wired>, BuildError> {
    let mut devices: Vec<Wired> = Vec::new();
    let rng: Box<dyn VirtioDevice> = Box::new(Rng::new().map_err(BuildError::Rng)?);
    devices.push(rng.into());
    let expected = config.handles();
    if handles.len() != expected {
        return Err(BuildError::Handles {
            expected,
            got: handles.len(),
        });
    }
    let mut handles = handles.into_iter();
    for d in &config.disks {
        let disk: Box<dyn VirtioDevice> = Box::new(match d.empty_slot {
            true => Block::empty_slot(&d.id)?,
            false => match handles.next() {
                Some(file) => Block::from_open(file, d.read_only, &d.id)?,
                None => return Err(BuildError::Handles { expected, got: 0 }),
            },
        });
        devices.push(disk.into());
    }
    if let Some(n) = &config.net {
        let err = |source| BuildError::Net {
            tap: n.tap.clone(),
            source,
        };
        let Some(tap) = handles.next() else {
            return Err(BuildError::Handles { expected, got: 0 });
        };
        devices.push(net_device(tap, n.mac, mem).map_err(err)?);
    }
    if let Some(v) = &config.vsock {
        let vsock = Vsock::new(v.cid, &v.uds).map_err(|source| BuildError::Vsock {
            path: v.uds.clone(),
            source,
        })?;
        let vsock: Box<dyn VirtioDevice> = Box::new(vsock);
        devices.push(vsock.into());
    }
    Ok(devices)
}

/// A device and, for one the host kernel serves, the eventfds it was
/// given: its queues' notifications and its interrupt (registered with
/// KVM as they are for every device, but never watched by the device
/// thread).
struct Wired {
    device: Box<dyn VirtioDevice>,
    kernel: Option<(Vec<EventFd>, EventFd)>,
}

impl From<Box<dyn VirtioDevice>> for Wired {
    fn from(device: Box<dyn VirtioDevice>) -> Self {
        Wired {
            device,
            kernel: None,
        }
    }
}

/// The network device: on vhost-net where the host has it (the kernel
/// moves the frames, with offloads), else the userspace device, saying
/// why in the worker's log.
fn net_device(tap: std::fs::File, mac: [u8; 6], mem: &GuestMemoryMmap) -> std::io::Result<Wired> {
    use crate::devices::virtio::vhost_net::{Kernel, VhostNet};
    let kicks = vec![
        EventFd::new(libc::EFD_NONBLOCK)?,
        EventFd::new(libc::EFD_NONBLOCK)?,
    ];
    let call = EventFd::new(libc::EFD_NONBLOCK)?;
    match Kernel::open(tap.try_clone()?, mem, &kicks, &call) {
        Ok(kernel) => {
            tracing::debug!("virtio-net: on vhost-net");
            Ok(Wired {
                device: Box::new(VhostNet::new(kernel, mac)),
                kernel: Some((kicks, call)),
            })
        }
        Err(e) => {
            tracing::info!(
                "virtio-net: vhost-net unavailable ({e}): frames go through the worker, without offloads"
            );
            let net: Box<dyn VirtioDevice> = Box::new(Net::new(tap, mac)?);
            Ok(net.into())
        }
    }
}

/// The guest config as a cpio archive to append to the initramfs.
pub fn guest_config_cpio(config: &VmConfig) -> Result<Vec<u8>, CpioError> {
    let json = serde_json::to_vec(&config.guest).map_err(std::io::Error::other)?;
    let path = CONFIG_PATH.trim_start_matches('/');
    let mut w = CpioWriter::new(Vec::new(), 0);
    if let Some((dir, _)) = path.rsplit_once('/') {
        w.dir(dir, 0o755)?;
    }
    w.file(path, 0o644, &json)?;
    w.finish()
}

/// Where [`build`] gets its KVM VM.
#[derive(Debug)]
pub enum VmSource {
    /// A VM made already (see [`Vm::new`]); `build` registers its memory.
    Ready(Vm),
    /// A thread creating the VM (see [`crate::worker::create_vm`]): `build`
    /// sends it the guest memory as soon as that exists, and the thread
    /// registers it as soon as the VM exists, while `build` goes on.
    Pending {
        memory: std::sync::mpsc::Sender<GuestMemoryMmap>,
        vm: std::thread::JoinHandle<Result<Vm, KvmError>>,
    },
}

/// Builds the VM described by `config`; guest serial output goes to `out`.
/// Everything that does not need the KVM VM — guest memory, the kernel,
/// initramfs and command line in it, the boot tables, opening the devices
/// — is done before `vm` is waited for, so that a VM still being created
/// on another thread (and its memory registered there) overlaps with it.
pub fn build(
    config: &VmConfig,
    handles: Vec<std::fs::File>,
    out: Output,
    vm: VmSource,
) -> Result<BuiltVm, BuildError> {
    if config.vcpus == 0 || config.vcpus > 32 {
        return Err(BuildError::Vcpus(config.vcpus));
    }
    let mem = memory::create_with(config.memory_mib, config.memory_backing, config.huge_pages)?;
    if let VmSource::Pending { memory, .. } = &vm {
        // If the thread has ended already (the VM could not be made), the
        // join below says why.
        let _ = memory.send(mem.clone());
    }
    if config.report_timing {
        // Where guest memory lies in the worker, for `vmmd bench`'s
        // overhead (the kernel's file mapping and the huge-page ranges split it
        // in parts).
        if let Some(r) = vm_memory::GuestMemoryBackend::iter(&mem).next() {
            crate::worker::send(&crate::config::WorkerMessage::GuestMemory {
                start: r.as_ptr() as u64,
                len: vm_memory::GuestMemoryRegion::len(r),
            });
        }
    }
    crate::worker::mark("memory");

    // Kernel: ELF vmlinux enters at its ELF entry, bzImage at its 64-bit entry.
    let open_err = |source| BuildError::OpenKernel {
        path: config.kernel.clone(),
        source,
    };
    let mut kernel = std::fs::File::open(&config.kernel).map_err(open_err)?;
    let mut magic = [0u8; 4];
    kernel.read_exact(&mut magic).map_err(open_err)?;
    kernel.rewind().map_err(open_err)?;
    let load_err = |source| BuildError::LoadKernel {
        path: config.kernel.clone(),
        source,
    };
    let himem = Some(GuestAddress(arch::HIMEM_START));
    let kernel_len = kernel.metadata().map(|m| m.len()).unwrap_or(0);
    let (loaded, entry) = if magic == *b"\x7fELF" {
        let r = load_elf(&mem, &mut kernel, kernel_len, himem).map_err(load_err)?;
        let entry = r.kernel_load;
        (r, entry)
    } else {
        let r = load_bzimage(&mem, &mut kernel, kernel_len, himem).map_err(load_err)?;
        let entry = GuestAddress(r.kernel_load.0 + 0x200);
        (r, entry)
    };
    if let Some(h) = loaded.setup_header {
        // Where the kernel decompresses itself and then runs: written end
        // to end in the guest's first moments, so huge pages there spare
        // it thousands of 4 KiB faults.
        memory::advise_huge(&mem, GuestAddress(h.pref_address), u64::from(h.init_size));
    }
    crate::worker::mark("kernel-loaded");

    // Initramfs: the shared base image read into guest memory, then this
    // VM's config (a cpio the kernel unpacks on top) at the next 4-byte
    // boundary. Read, not mapped like the kernel: the guest reads all of
    // it at once when it unpacks it, and in huge pages that costs it a
    // few faults where 4 KiB pages of a file mapping cost it one per page
    // (on a nested host that came to more than the copy, measured); it
    // frees the pages afterwards and reuses them, so mapping would save
    // no memory either.
    let read_err = |source| BuildError::ReadInitramfs {
        path: config.initramfs.clone(),
        source,
    };
    let mut base = std::fs::File::open(&config.initramfs).map_err(read_err)?;
    let base_len = base.metadata().map_err(read_err)?.len();
    let extra = guest_config_cpio(config).map_err(BuildError::GuestConfig)?;
    let config_at = base_len.next_multiple_of(4);
    let initrd_len = config_at + extra.len() as u64;
    let initrd_max = loaded
        .setup_header
        .map(|h| h.initrd_addr_max)
        .filter(|m| *m != 0)
        .unwrap_or(0x37ff_ffff);
    let initrd_addr = arch::initrd_address(&mem, initrd_len, initrd_max)?;
    // Huge pages for it and, just below, where a Linux guest's early
    // allocator (top down) puts its memory map (64 bytes per 4 KiB page,
    // written in full while it boots): at most that much memory more if
    // a guest puts it elsewhere.
    let memmap = (config.memory_mib << 20) / 64;
    memory::advise_huge(
        &mem,
        GuestAddress(initrd_addr.0.saturating_sub(memmap)),
        memmap + initrd_len,
    );
    memory::populate(&mem, initrd_addr, initrd_len);
    mem.read_exact_volatile_from(initrd_addr, &mut base, base_len as usize)
        .map_err(|e| read_err(std::io::Error::other(e)))?;
    mem.write_slice(&extra, GuestAddress(initrd_addr.0 + config_at))
        .map_err(BuildError::WriteInitramfs)?;

    let mut cmdline = linux_loader::cmdline::Cmdline::new(arch::CMDLINE_MAX_SIZE)
        .map_err(|e| BuildError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(&config.cmdline)
        .map_err(|e| BuildError::Cmdline(e.to_string()))?;
    crate::worker::mark("kernel-initramfs-loaded");
    let devices = virtio_devices(config, handles, &mem)?;
    if devices.len() > (LAST_IRQ - FIRST_VIRTIO_IRQ + 1) as usize {
        return Err(BuildError::TooManyDevices(devices.len()));
    }
    // virtio-mmio devices are declared on the command line: SIZE@ADDR:IRQ.
    for i in 0..devices.len() {
        let (base, irq) = virtio_slot(i);
        cmdline
            .insert_str(format!("virtio_mmio.device=4K@{base:#x}:{irq}"))
            .map_err(|e| BuildError::Cmdline(e.to_string()))?;
    }
    linux_loader::loader::load_cmdline(&mem, GuestAddress(arch::CMDLINE_START), &cmdline)
        .map_err(|e| BuildError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .map_err(|e| BuildError::Cmdline(e.to_string()))?;
    crate::arch::mptable::write(&mem, config.vcpus)?;
    arch::write_zero_page(
        &mem,
        loaded.setup_header,
        cmdline_len,
        Some((initrd_addr, initrd_len)),
    )?;
    crate::worker::mark("devices-opened");

    // From here on, the KVM VM.
    let vm = match vm {
        VmSource::Ready(vm) => {
            vm.register_memory(&mem)?;
            crate::worker::mark("memory-registered");
            vm
        }
        VmSource::Pending { vm, .. } => vm.join().map_err(|_| BuildError::VmThread)??,
    };

    // Devices: the serial console raises GSI 4 through an irqfd.
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(KvmError::EventFd)?;
    vm.register_irqfd(&serial_irq, 4)?;
    let bus = Arc::new(Mutex::new(Bus::new(SerialConsole::new(
        Some(serial_irq),
        out,
    ))));
    // Each virtio device: an irqfd for its interrupt, an ioeventfd per queue
    // for the device thread.
    let mut device_loop = DeviceLoop::new().map_err(KvmError::EventFd)?;
    let mut slots = Vec::new();
    for (i, wired) in devices.into_iter().enumerate() {
        let (base, gsi) = virtio_slot(i);
        let Wired { device, kernel } = wired;
        let (kicks, irq) = match kernel {
            Some((kicks, call)) => (Some(kicks), call),
            None => (
                None,
                EventFd::new(libc::EFD_NONBLOCK).map_err(KvmError::EventFd)?,
            ),
        };
        vm.register_irqfd(&irq, gsi)?;
        let host_fd = device.host_event_fd();
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device,
            mem.clone(),
            IrqTrigger(Some(irq)),
        )));
        match kicks {
            // The kernel reads these itself.
            Some(kicks) => {
                for (q, evt) in kicks.iter().enumerate() {
                    vm.register_ioevent(evt, base + QUEUE_NOTIFY, q as u32)?;
                }
            }
            None => {
                for q in 0..crate::devices::virtio::lock(&transport).queue_count() {
                    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(KvmError::EventFd)?;
                    vm.register_ioevent(&evt, base + QUEUE_NOTIFY, q as u32)?;
                    device_loop
                        .add_queue(transport.clone(), q, evt)
                        .map_err(KvmError::EventFd)?;
                }
            }
        }
        if let Some(fd) = host_fd {
            device_loop
                .add_host(transport.clone(), fd)
                .map_err(KvmError::EventFd)?;
        }
        // Disks follow the entropy device (slot 0), in config order.
        if let Some(d) = i.checked_sub(1).and_then(|d| config.disks.get(d)) {
            if d.empty_slot {
                slots.push((d.id.clone(), transport.clone()));
            }
        }
        bus.lock()
            .unwrap_or_else(|p| p.into_inner())
            .mmio
            .push((base, transport));
    }

    crate::worker::mark("devices-wired");
    let supported = vcpu::supported_cpuid(&vm.kvm)?;
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        let v = Vcpu::new(&vm.fd, index)?;
        v.configure(&mem, &supported, entry, config.vcpus)?;
        vcpus.push(v);
    }
    crate::worker::mark("vcpus");
    Ok(BuiltVm {
        vm,
        mem,
        vcpus,
        bus,
        devices: device_loop,
        slots,
    })
}

/// Loads a bzImage of `len` bytes: linux-loader checks the setup header (given only the
/// boot sector and setup code, it copies nothing more), then the protected
/// mode kernel is mapped copy-on-write at its load address straight from
/// the file (see [`memory::map_file`]) — or, where it cannot be, loaded
/// by linux-loader as usual.
fn load_bzimage(
    mem: &GuestMemoryMmap,
    kernel: &mut std::fs::File,
    len: u64,
    himem: Option<GuestAddress>,
) -> Result<linux_loader::loader::KernelLoaderResult, linux_loader::loader::Error> {
    use std::os::unix::fs::FileExt;
    let mut sects = [0u8; 1];
    let setup_sects = match kernel.read_exact_at(&mut sects, 0x1f1) {
        Ok(()) if sects[0] == 0 => 4,
        Ok(()) => u64::from(sects[0]),
        Err(_) => return BzImage::load(mem, None, kernel, himem),
    };
    let setup_size = (setup_sects + 1) * 512;
    let mut head = vec![0u8; setup_size as usize];
    if len <= setup_size || kernel.read_exact_at(&mut head, 0).is_err() {
        return BzImage::load(mem, None, kernel, himem);
    }
    let mut r = BzImage::load(mem, None, &mut std::io::Cursor::new(&head), himem)?;
    let payload = len - setup_size;
    if memory::map_file(mem, r.kernel_load, kernel, setup_size, payload) {
        r.kernel_end = r.kernel_load.0 + payload;
        Ok(r)
    } else {
        memory::populate(mem, r.kernel_load, payload);
        kernel
            .rewind()
            .map_err(|_| linux_loader::loader::bzimage::Error::SeekBzImageHeader)?;
        BzImage::load(mem, None, kernel, himem)
    }
}

/// One `PT_LOAD` segment of an ELF kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

const PAGE: u64 = 4096;

/// The entry point and loadable segments of the 64-bit x86 ELF file
/// `kernel` of `len` bytes, if every segment can be mapped: its file offset
/// and address on page boundaries, its bytes inside the file, no two
/// segments sharing a page, and all of them in guest memory `mem` above
/// `himem`. `None` sends the kernel to linux-loader, which copies it (and
/// checks it its own way).
fn mappable_elf(
    mem: &GuestMemoryMmap,
    kernel: &std::fs::File,
    len: u64,
    himem: u64,
) -> Option<(u64, Vec<Segment>)> {
    use std::os::unix::fs::FileExt;
    use vm_memory::GuestMemoryBackend;
    let mut ehdr = [0u8; 64];
    kernel.read_exact_at(&mut ehdr, 0).ok()?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(v)
    };
    // 64-bit, little-endian, x86-64, 56-byte program headers.
    if ehdr[..4] != *b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 || u16_at(&ehdr, 18) != 62 {
        return None;
    }
    let entry = u64_at(&ehdr, 24);
    let phoff = u64_at(&ehdr, 32);
    let (phentsize, phnum) = (u16_at(&ehdr, 54), u16_at(&ehdr, 56));
    if phentsize != 56 || phnum == 0 || phnum > 64 || entry < himem {
        return None;
    }
    let mut table = vec![0u8; 56 * usize::from(phnum)];
    kernel.read_exact_at(&mut table, phoff).ok()?;
    let mut segments: Vec<Segment> = table
        .chunks_exact(56)
        .filter(|p| u32::from_le_bytes([p[0], p[1], p[2], p[3]]) == 1) // PT_LOAD
        .map(|p| Segment {
            offset: u64_at(p, 8),
            paddr: u64_at(p, 24),
            filesz: u64_at(p, 32),
            memsz: u64_at(p, 40),
        })
        .filter(|s| s.filesz > 0)
        .collect();
    segments.sort_by_key(|s| s.paddr);
    let mut next_free = himem;
    for s in &segments {
        let end = s.paddr.checked_add(s.memsz)?;
        let fits = s.filesz <= s.memsz
            && s.offset.checked_add(s.filesz).is_some_and(|e| e <= len)
            && s.offset.is_multiple_of(PAGE)
            && s.paddr.is_multiple_of(PAGE)
            && s.paddr >= next_free
            && mem.address_in_range(GuestAddress(end - 1));
        if !fits {
            return None;
        }
        next_free = end.next_multiple_of(PAGE);
    }
    (!segments.is_empty()).then_some((entry, segments))
}

/// Loads an ELF kernel (a `vmlinux`): each `PT_LOAD` segment is mapped
/// copy-on-write from the file at its physical address, as a bzImage's
/// payload is (see [`memory::map_file`]), and the rest of its last page
/// zeroed; the guest reads the kernel from the host's page cache, shared by
/// every VM booting it. Where that cannot be done (see [`mappable_elf`]),
/// linux-loader copies it.
fn load_elf(
    mem: &GuestMemoryMmap,
    kernel: &mut std::fs::File,
    len: u64,
    himem: Option<GuestAddress>,
) -> Result<linux_loader::loader::KernelLoaderResult, linux_loader::loader::Error> {
    let low = himem.map_or(0, |h| h.0);
    if let Some((entry, segments)) = mappable_elf(mem, kernel, len, low) {
        let mut kernel_end = 0;
        let mut mapped = true;
        for s in &segments {
            if !memory::map_file(mem, GuestAddress(s.paddr), kernel, s.offset, s.filesz) {
                mapped = false;
                break;
            }
            // The mapping's last page holds the file's next bytes past the
            // segment: zeros there, as a copy would leave.
            let tail = s.paddr + s.filesz;
            let zeros = tail.next_multiple_of(PAGE) - tail;
            if zeros > 0
                && mem
                    .write_slice(&vec![0u8; zeros as usize], GuestAddress(tail))
                    .is_err()
            {
                mapped = false;
                break;
            }
            kernel_end = kernel_end.max(s.paddr + s.memsz);
        }
        if mapped {
            return Ok(linux_loader::loader::KernelLoaderResult {
                kernel_load: GuestAddress(entry),
                kernel_end,
                ..Default::default()
            });
        }
        // Copied below, over whatever was mapped (copy-on-write).
    }
    // Fault in where the kernel goes in one call, not page by page.
    memory::populate(mem, GuestAddress(low), len);
    kernel
        .rewind()
        .map_err(|_| linux_loader::loader::elf::Error::SeekElfStart)?;
    Elf::load(mem, None, kernel, himem)
}

/// Register base and interrupt line of virtio slot `i`.
pub fn virtio_slot(i: usize) -> (u64, u32) {
    (
        arch::MMIO_HOLE_START + i as u64 * MMIO_SIZE,
        FIRST_VIRTIO_IRQ + i as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF file: header, two program headers, and two segments at file
    /// offsets 0x1000 and 0x3000 (the first followed by marker bytes that
    /// must not reach the guest).
    fn elf(second_paddr: u64) -> std::fs::File {
        let mut b = vec![0u8; 0x4000];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes()); // entry
        b[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&2u16.to_le_bytes());
        let ph = |b: &mut Vec<u8>, at: usize, off: u64, paddr: u64, filesz: u64, memsz: u64| {
            b[at..at + 4].copy_from_slice(&1u32.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            b[at + 24..at + 32].copy_from_slice(&paddr.to_le_bytes());
            b[at + 32..at + 40].copy_from_slice(&filesz.to_le_bytes());
            b[at + 40..at + 48].copy_from_slice(&memsz.to_le_bytes());
        };
        ph(&mut b, 64, 0x1000, 0x20_0000, 0x1800, 0x5000);
        ph(&mut b, 120, 0x3000, second_paddr, 0x800, 0x800);
        b[0x1000..0x2800].fill(0xaa);
        b[0x2800..0x3000].fill(0xee);
        b[0x3000..0x3800].fill(0xbb);
        b[0x3800..].fill(0xee);
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &b).unwrap();
        f
    }

    fn read(mem: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    #[test]
    fn an_elf_kernel_is_mapped_segment_by_segment_with_zeros_past_each() {
        let mem = memory::create(16).unwrap();
        let mut f = elf(0x30_0000);
        let himem = Some(GuestAddress(0x10_0000));
        assert!(mappable_elf(&mem, &f, 0x4000, 0x10_0000).is_some());
        let r = load_elf(&mem, &mut f, 0x4000, himem).unwrap();
        assert_eq!(r.kernel_load, GuestAddress(0x20_0000));
        assert_eq!(r.kernel_end, 0x30_0800);
        assert!(read(&mem, 0x20_0000, 0x1800).iter().all(|b| *b == 0xaa));
        assert!(
            read(&mem, 0x20_1800, 0x3800).iter().all(|b| *b == 0),
            "the file's next bytes and the bss read as zeros"
        );
        assert!(read(&mem, 0x30_0000, 0x800).iter().all(|b| *b == 0xbb));
        assert!(read(&mem, 0x30_0800, 0x800).iter().all(|b| *b == 0));
        // Mapped, not copied: a page the guest has not written follows
        // the file (its page cache).
        std::os::unix::fs::FileExt::write_all_at(&f, &[0x11], 0x1000).unwrap();
        assert_eq!(read(&mem, 0x20_0000, 1), [0x11]);
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xaa], 0x1000).unwrap();
        // The same bytes as linux-loader's copy.
        let copied = memory::create(16).unwrap();
        f.rewind().unwrap();
        Elf::load(&copied, None, &mut f, himem).unwrap();
        assert_eq!(
            read(&mem, 0x20_0000, 0x10_1000),
            read(&copied, 0x20_0000, 0x10_1000)
        );
    }

    #[test]
    fn segments_sharing_a_page_or_out_of_memory_are_copied() {
        let mem = memory::create(16).unwrap();
        // The second segment inside the first one's bss: not mapped.
        let mut f = elf(0x20_3000);
        assert!(mappable_elf(&mem, &f, 0x4000, 0x10_0000).is_none());
        // Past the end of guest memory: refused, by linux-loader too.
        let mut far = elf(0x4000_0000);
        assert!(mappable_elf(&mem, &far, 0x4000, 0x10_0000).is_none());
        assert!(load_elf(&mem, &mut far, 0x4000, Some(GuestAddress(0x10_0000))).is_err());
        // A truncated file: the header says more than there is.
        assert!(mappable_elf(&mem, &f, 0x3400, 0x10_0000).is_none());
        let r = load_elf(&mem, &mut f, 0x4000, Some(GuestAddress(0x10_0000))).unwrap();
        assert_eq!(r.kernel_load, GuestAddress(0x20_0000));
        assert!(read(&mem, 0x20_3000, 0x800).iter().all(|b| *b == 0xbb));
    }
}
