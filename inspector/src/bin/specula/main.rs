//! `specula`: the client of the inspector's HTTP API (tables by default, `--json` for
//! the API's JSON), and `specula openapi` prints the API document. Every request of
//! the API (`specula_api::Request`, a clap subcommand) is a command here as it is;
//! the commands below it stream, page, or read files.
//!
//! ```text
//! specula --socket /run/vm1.api status
//! specula --socket /run/vm1.api ps
//! specula --socket /run/vm1.api read 0x1000000 4096 -o page.bin
//! specula --socket /run/vm1.api scan 0x0 0x20000000 "Linux version"
//! specula --socket /run/vm1.api events --kinds watch,source
//! specula --socket /run/vm1.api trace msr_writes
//! ```

mod client;
mod dump;
mod isf;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::Method;
use inspector::launch::{LaunchConfig, LaunchError};
use specula_api::{Event, Reply, Request, ScanRequest, ScanResult, YaraRequest};
use specula_common::parse::number;

use client::{ask, call, connect, send, success, CliError};

#[derive(Parser)]
#[command(name = "specula", version, about = "Client of a Specula inspector's API")]
struct Cli {
    /// The inspector's API socket (`inspector --api-socket PATH`).
    #[arg(long, short, env = "SPECULA_SOCKET", global = true, default_value = "specula.sock")]
    socket: PathBuf,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    #[command(flatten)]
    Api(Request),
    /// Guest-physical memory, streamed (to a file with -o, else to stdout as a hex dump).
    Read {
        gpa: String,
        len: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Every GPA where PATTERN occurs (text, or hex with --hex).
    Scan {
        gpa: String,
        len: String,
        pattern: String,
        #[arg(long)]
        hex: bool,
        #[arg(long, default_value_t = 0)]
        offset: usize,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Integrity watches.
    #[command(subcommand)]
    Watch(WatchCmd),
    /// Builds a Volatility 3 symbol table (ISF) from the guest's own BTF and kallsyms
    /// and writes it where Specula's Volatility layer looks (or to --output).
    Isf {
        /// Where to write it (default: $XDG_CACHE_HOME/specula/volatility/linux/RELEASE-HASH.json).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Build it again even if the default path already holds this kernel's table.
        #[arg(long)]
        force: bool,
    },
    /// Scans guest memory with YARA rules (a file): all granted physical memory, or one
    /// process's virtual memory (--pid), or the kernel image (--kernel). Exit status 3
    /// when a rule matched.
    Yara {
        rules: PathBuf,
        #[arg(long, conflicts_with = "kernel")]
        pid: Option<u32>,
        #[arg(long)]
        kernel: bool,
    },
    /// Writes the source's memory to a file, as an ELF core (with the kernel's VMCOREINFO,
    /// for Volatility, drgn and crash) or LiME; the source is paused for the copy unless
    /// --live (or it cannot be paused: the dump then says it is live).
    Dump {
        output: PathBuf,
        /// `elf` or `lime`.
        #[arg(long, default_value = "elf")]
        format: String,
        /// Copy while the source runs (the dump is marked live).
        #[arg(long)]
        live: bool,
    },
    /// Follow the event stream.
    Events {
        #[arg(long)]
        since: Option<u64>,
        /// Comma-separated kinds or prefixes (watch, source, grant.revoked, ...).
        #[arg(long)]
        kinds: Option<String>,
    },
    /// Trace the source's guest and follow what it reports: starts tracing KINDS
    /// (msr_writes, exec, exit, module_load, kernel_writes; every kind by default) and prints each
    /// trace.* event as it comes. Tracing stays on when this ends (trace-stop ends it).
    Trace {
        #[arg(value_delimiter = ',')]
        kinds: Vec<String>,
        /// Break with int3 over no-op instructions instead of the debug registers.
        #[arg(long)]
        software_breakpoints: bool,
    },
    /// Print the OpenAPI document (no socket needed).
    Openapi,
    /// Start a source and an inspector attached to it, and supervise both (Ctrl-C stops both).
    Launch(Box<LaunchArgs>),
}

#[derive(clap::Args)]
struct LaunchArgs {
    /// A TOML file with the same keys as these flags (flags are then ignored).
    #[arg(long)]
    config: Option<PathBuf>,
    /// `specula` (a vmm guest image) or `qemu` (a Linux kernel under QEMU).
    #[arg(long, default_value = "specula")]
    source: String,
    /// Guest image or Linux kernel.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long, default_value = "256M")]
    memory: String,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Kernel command line (QEMU prefixes console=ttyS0; the vmm takes it as is).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// A virtio-blk disk, path=FILE[,readonly=on] (repeatable; /dev/vda first).
    #[arg(long)]
    disk: Vec<String>,
    /// A virtio-net device on a tap, tap=NAME[,mac=MAC] (repeatable).
    #[arg(long)]
    net: Vec<String>,
    /// A virtio-vsock device, cid=N (through the host's vhost-vsock in either source).
    #[arg(long)]
    vsock: Option<String>,
    /// Run directory for the sockets and logs.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Integrity watch, GPA:LEN (repeatable).
    #[arg(long)]
    watch: Vec<String>,
    /// QEMU accelerator.
    #[arg(long, default_value = "tcg")]
    accel: String,
    /// `socket`: the source shares memfd RAM (mirror socket, QEMU's memfd backend);
    /// `pid`: it keeps private anonymous RAM and the inspector attaches by pid through
    /// the kernel mirror device (KVM and specula_mirror.ko needed).
    #[arg(long, default_value = "socket")]
    attach: String,
}

impl LaunchArgs {
    fn config(&self) -> Result<LaunchConfig, LaunchError> {
        if let Some(path) = &self.config {
            let text =
                std::fs::read_to_string(path).map_err(|source| LaunchError::File { path: path.clone(), source })?;
            return LaunchConfig::from_toml(&text);
        }
        Ok(LaunchConfig {
            source: self.source.clone(),
            kernel: self.kernel.clone().ok_or(LaunchError::Missing("--kernel PATH is needed (or --config FILE)"))?,
            initrd: self.initrd.clone(),
            memory: self.memory.clone(),
            cpus: self.cpus,
            cmdline: self.cmdline.clone(),
            disk: self.disk.clone(),
            net: self.net.clone(),
            vsock: self.vsock.clone(),
            dir: self.dir.clone().ok_or(LaunchError::Missing("--dir PATH is needed (or --config FILE)"))?,
            watch: self.watch.clone(),
            accel: self.accel.clone(),
            attach: self.attach.clone(),
        })
    }
}

#[derive(Subcommand)]
enum WatchCmd {
    /// Watch a range (page-aligned).
    Add { gpa: String, len: String },
    /// List watches.
    List,
    /// Stop a watch.
    Rm { id: usize },
    /// What a watch saw change.
    Findings { id: usize },
}

/// Prints tables with their columns aligned, one after another; a table with no rows
/// says so.
fn print_tables(tables: &[Vec<Vec<String>>]) {
    for (i, rows) in tables.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
            .map(|c| rows.iter().map(|r| r.get(c).map_or(0, String::len)).max().unwrap_or(0))
            .collect();
        for row in rows {
            let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
            println!("{}", line.join("  ").trim_end());
        }
        if rows.len() == 1 {
            println!("(none)");
        }
    }
}

/// Bytes as a hex dump, 16 a line, addressed from `base`.
fn hexdump(base: u64, bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    for (i, line) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = line.iter().map(|&b| if (32..127).contains(&b) { b as char } else { '.' }).collect();
        let _ = writeln!(out, "{:016x}  {:<47}  {text}", base + i as u64 * 16, hex.join(" "));
    }
}

/// Prints a reply: its JSON with --json, else its tables (bytes as a hex dump from
/// `base`). Returns the exit status: 3 when rootkit checks found something or YARA
/// rules matched.
fn show(json: bool, body: &Bytes, reply: &Reply, base: u64) -> u8 {
    match reply {
        Reply::Bytes(bytes) => hexdump(base, bytes),
        Reply::Done => {}
        _ if json => {
            let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
        }
        Reply::Yara(report) => {
            println!("{} bytes scanned", report.scanned_bytes);
            print_tables(&reply.tables());
        }
        _ => print_tables(&reply.tables()),
    }
    match reply {
        Reply::Checks(report) if !report.findings.is_empty() || report.runs.iter().any(|r| r.error.is_some()) => 3,
        Reply::Yara(report) if !report.matches.is_empty() => 3,
        _ => 0,
    }
}

/// Sends `request` and prints its reply; returns the exit status.
async fn request(cli: &Cli, request: &Request) -> Result<u8, CliError> {
    let (body, reply) = send(&cli.socket, request).await?;
    let base = match request {
        Request::Vread { va, .. } => *va,
        _ => 0,
    };
    Ok(show(cli.json, &body, &reply, base))
}

/// Runs one command; returns the exit status (3: rootkit checks or YARA found something).
async fn run(cli: &Cli) -> Result<u8, CliError> {
    let s = &cli.socket;
    match &cli.command {
        Cmd::Api(api) => request(cli, api).await,
        Cmd::Openapi => {
            println!("{}", inspector::api::openapi_json());
            Ok(0)
        }
        Cmd::Launch(_) => unreachable!("launch runs without the async client"),
        Cmd::Read { gpa, len, output } => {
            let path = format!("/v1/memory/physical?gpa={gpa}&len={len}");
            let body = success(call(s, Method::GET, &path, None).await?, &path)?;
            match output {
                Some(out) => {
                    std::fs::write(out, &body).map_err(|source| CliError::File { path: out.clone(), source })?
                }
                None => hexdump(number(Some(gpa), "GPA")?, &body),
            }
            Ok(0)
        }
        Cmd::Scan { gpa, len, pattern, hex, offset, limit } => {
            let pattern = if *hex { pattern.clone() } else { specula_common::hex::encode(pattern.as_bytes()) };
            let body =
                ScanRequest { gpa: gpa.clone(), len: len.clone(), pattern, offset: *offset, limit: Some(*limit) };
            let body =
                serde_json::to_value(body).map_err(|source| CliError::Reply { path: "/v1/scan".into(), source })?;
            let bytes = success(call(s, Method::POST, "/v1/scan", Some(&body)).await?, "/v1/scan")?;
            let page: ScanResult =
                serde_json::from_slice(&bytes).map_err(|source| CliError::Reply { path: "/v1/scan".into(), source })?;
            let reply = Reply::Hits { total: page.total, hits: page.hits };
            show(cli.json, &bytes, &reply, 0);
            if let (Some(next), false) = (page.next_offset, cli.json) {
                println!("more: --offset {next}");
            }
            Ok(0)
        }
        Cmd::Watch(watch) => {
            let api = match watch {
                WatchCmd::Add { gpa, len } => {
                    Request::Watch { gpa: number(Some(gpa), "GPA")?, len: number(Some(len), "LEN")?, polled: true }
                }
                WatchCmd::List => Request::Watches,
                WatchCmd::Rm { id } => Request::DeleteWatch { id: *id },
                WatchCmd::Findings { id } => Request::Findings { id: *id },
            };
            request(cli, &api).await
        }
        Cmd::Yara { rules, pid, kernel } => {
            let text =
                std::fs::read_to_string(rules).map_err(|source| CliError::File { path: rules.clone(), source })?;
            let target = match (pid, kernel) {
                (Some(_), _) => "process",
                (None, true) => "kernel",
                (None, false) => "physical",
            };
            request(cli, &Request::Yara(YaraRequest { rules: text, target: Some(target.into()), pid: *pid })).await
        }
        Cmd::Dump { output, format, live } => {
            let summary = dump::dump(s, output, format, *live).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&summary).unwrap_or_default());
            } else {
                println!(
                    "{}: {} bytes of guest memory in {} ranges, {} ({})",
                    output.display(),
                    summary.bytes,
                    summary.ranges,
                    summary.format,
                    summary.consistency
                );
            }
            Ok(0)
        }
        Cmd::Isf { output, force } => {
            let path = isf::write_isf(s, output.clone(), *force).await?;
            if cli.json {
                println!("{}", serde_json::json!({ "path": path }));
            } else {
                println!("{}", path.display());
            }
            Ok(0)
        }
        Cmd::Events { since, kinds } => follow_events(s, *since, kinds.as_deref(), cli.json).await.map(|()| 0),
        Cmd::Trace { kinds, software_breakpoints } => {
            // Only what happens from now on: the events before it are not this trace's.
            let since = match ask(s, &Request::Status).await? {
                Reply::Status(status) => Some(status.last_event),
                _ => None,
            };
            let start = Request::TraceStart { kinds: kinds.clone(), software_breakpoints: *software_breakpoints };
            if let Reply::Trace(status) = ask(s, &start).await? {
                eprintln!("specula: tracing {} (at most {} events/s)", status.kinds.join(","), status.max_per_second);
            }
            follow_events(s, since, Some("trace"), cli.json).await.map(|()| 0)
        }
    }
}

/// Prints each event as it comes (one JSON object per line with --json).
async fn follow_events(socket: &Path, since: Option<u64>, kinds: Option<&str>, raw: bool) -> Result<(), CliError> {
    let mut path = String::from("/v1/events?");
    if let Some(since) = since {
        path.push_str(&format!("since={since}&"));
    }
    if let Some(kinds) = kinds {
        path.push_str(&format!("kinds={kinds}"));
    }
    let mut sender = connect(socket).await?;
    let request = hyper::Request::builder().uri(&path).header("host", "specula").body(Empty::<Bytes>::new().boxed())?;
    let mut response = sender.send_request(request).await?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        return success(client::HttpReply { status, body }, &path).map(|_| ());
    }
    let mut pending = String::new();
    while let Some(frame) = response.body_mut().frame().await {
        let frame = frame?;
        let Some(data) = frame.data_ref() else { continue };
        pending.push_str(&String::from_utf8_lossy(data));
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) else { continue };
            let event: Event =
                serde_json::from_str(data.trim()).map_err(|source| CliError::Reply { path: path.clone(), source })?;
            if raw {
                println!("{}", serde_json::to_string(&event).unwrap_or_default());
            } else {
                println!("#{} {} {}", event.seq, event.kind, event.detail);
            }
            let _ = std::io::stdout().flush();
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: restoring the default SIGPIPE action, as command-line tools do, so that
    // `specula ... | head` ends quietly instead of failing on a closed pipe.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Cmd::Launch(args) => {
            args.config().and_then(|config| inspector::launch::launch(&config)).map_err(CliError::from)
        }
        _ => match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime.block_on(run(&cli)),
            Err(source) => Err(CliError::File { path: "the async runtime".into(), source }),
        },
    };
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("specula: error: {}", specula_common::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
