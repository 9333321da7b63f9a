//! The host's log format, shared by init and vmmd: the time since boot in
//! the kernel's own format, lines to the console and, once `/dev/kmsg` is
//! open, to the kernel log.

/// Log timestamps in the kernel's own format, `[   12.345678]`, from
/// CLOCK_BOOTTIME, so init's, vmmd's and the kernel's lines on the console
/// line up.
#[derive(Debug, Clone, Copy)]
pub struct BootTime;

impl tracing_subscriber::fmt::time::FormatTime for BootTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
            Ok(t) => write!(w, "[{:>5}.{:06}]", t.tv_sec(), t.tv_nsec() / 1000),
            Err(_) => write!(w, "[    ?.??????]"),
        }
    }
}

/// `/dev/kmsg`, once the `kmsg-logging` phase has opened it.
static KMSG: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// Phase `kmsg-logging`: from now on every log line also goes to the kernel
/// log (`dmesg`), at level 5 (notice): below the console's level, so the
/// console does not show it twice. The kernel's rate limit on `/dev/kmsg`
/// writers (10 lines in 5 s by default) is turned off first
/// (`kernel.printk_devkmsg = on`), or most of init's lines would be
/// dropped from `cup dmesg`; only init's own lines go there, not the
/// units' output.
pub fn log_to_kmsg() -> std::io::Result<()> {
    let _ = std::fs::write("/proc/sys/kernel/printk_devkmsg", "on\n");
    let f = std::fs::OpenOptions::new().write(true).open("/dev/kmsg")?;
    let _ = KMSG.set(f);
    Ok(())
}

/// Writes each log record to stderr and, once opened, to /dev/kmsg.
#[derive(Debug, Clone, Copy)]
pub struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(mut k) = KMSG.get() {
            // One record per write; the kernel caps records at ~1 KiB.
            let mut rec = Vec::with_capacity(buf.len().min(900) + 16);
            rec.extend_from_slice(b"<5>steelcup: ");
            rec.extend_from_slice(&buf[..buf.len().min(900)]);
            let _ = k.write(&rec);
        }
        std::io::stderr().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Sets up logging to the console (stderr) with the time since boot.
/// `STEELCUP_LOG` takes a tracing filter (`debug`, `init=trace`, ...).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STEELCUP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_writer(|| LogWriter)
        .with_ansi(false)
        .with_target(false)
        .with_timer(BootTime)
        .with_env_filter(filter)
        .try_init();
}
