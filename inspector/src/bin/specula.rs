//! `specula`: the client of the inspector's HTTP API (human-readable tables by default,
//! `--json` for the raw replies), and `specula openapi` prints the API document.
//!
//! ```text
//! specula --socket /run/vm1.api status
//! specula --socket /run/vm1.api read 0x1000000 4096 -o page.bin
//! specula --socket /run/vm1.api scan 0x0 0x20000000 "Linux version"
//! specula --socket /run/vm1.api events --kinds watch,source
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

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
    /// Source and inspector status.
    Status,
    /// Granted ranges of source RAM.
    Grants,
    /// The source's vCPU registers.
    Vcpus,
    /// Guest-physical memory, streamed (to a file with -o, else to stdout as a hex dump).
    Read {
        gpa: String,
        len: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// xxh64 and SHA-256 of a range.
    Hash { gpa: String, len: String },
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
    /// The source's Linux kernel (found in its RAM, no symbols).
    Kernel,
    /// The source's processes.
    Ps,
    /// The source's kernel modules.
    Lsmod,
    /// A process's memory areas.
    Maps { pid: u32 },
    /// Rootkit checks: hidden processes and modules, redirected system calls and
    /// interrupts, kernel text changed since attach (exit status 3 when any is found).
    Checks {
        /// Only these checks (processes, modules, syscalls, interrupts, kernel_text; msrs, which reads
        /// each vCPU's LSTAR and may pause a QEMU guest for milliseconds, runs only when named).
        #[arg(value_delimiter = ',')]
        only: Vec<String>,
    },
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
    /// A process's virtual memory (pid 0: the kernel's), as a hex dump.
    Vread { pid: u32, va: String, len: String },
    /// Pause the source's vCPUs.
    Pause,
    /// Resume them.
    Resume,
    /// Follow the event stream.
    Events {
        #[arg(long)]
        since: Option<u64>,
        /// Comma-separated kinds or prefixes (watch, source, grant.revoked, ...).
        #[arg(long)]
        kinds: Option<String>,
    },
    /// Print the OpenAPI document (no socket needed).
    Openapi,
    /// Start a source and an inspector attached to it, and supervise both (Ctrl-C stops both).
    Launch(LaunchArgs),
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
    /// Initramfs (QEMU sources).
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long, default_value = "256M")]
    memory: String,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Kernel command line (QEMU sources).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Run directory for the sockets and logs.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Integrity watch, GPA:LEN (repeatable).
    #[arg(long)]
    watch: Vec<String>,
    /// QEMU accelerator.
    #[arg(long, default_value = "tcg")]
    accel: String,
}

impl LaunchArgs {
    fn config(&self) -> Result<inspector::launch::LaunchConfig, String> {
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            return inspector::launch::LaunchConfig::from_toml(&text);
        }
        Ok(inspector::launch::LaunchConfig {
            source: self.source.clone(),
            kernel: self.kernel.clone().ok_or("--kernel PATH is needed (or --config FILE)")?,
            initrd: self.initrd.clone(),
            memory: self.memory.clone(),
            cpus: self.cpus,
            cmdline: self.cmdline.clone(),
            dir: self.dir.clone().ok_or("--dir PATH is needed (or --config FILE)")?,
            watch: self.watch.clone(),
            accel: self.accel.clone(),
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

/// An API reply: status and body.
struct Reply {
    status: StatusCode,
    body: Bytes,
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// An HTTP/1.1 connection to the API socket.
async fn connect(socket: &PathBuf) -> Result<hyper::client::conn::http1::SendRequest<Body>, String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn call(socket: &PathBuf, method: Method, path: &str, body: Option<Value>) -> Result<Reply, String> {
    let mut sender = connect(socket).await?;
    let builder = Request::builder().method(method).uri(path).header("host", "specula");
    let request = match body {
        Some(v) => builder
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(v.to_string())).boxed())
            .map_err(|e| e.to_string())?,
        None => builder.body(Empty::<Bytes>::new().boxed()).map_err(|e| e.to_string())?,
    };
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply { status, body })
}

/// The JSON of a successful reply, or the API's error message.
fn json_of(reply: Reply) -> Result<Value, String> {
    let value: Value = if reply.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&reply.body).map_err(|e| e.to_string())?
    };
    if reply.status.is_success() {
        Ok(value)
    } else {
        Err(format!(
            "{} ({}): {} [request {}]",
            value["code"].as_str().unwrap_or("error"),
            reply.status.as_u16(),
            value["message"].as_str().unwrap_or(""),
            value["request_id"]
        ))
    }
}

fn hex(v: &Value) -> String {
    v.as_u64().map_or_else(|| v.to_string(), |n| format!("{n:#x}"))
}

fn table(rows: &[Vec<String>]) {
    let widths: Vec<usize> =
        (0..rows.first().map_or(0, Vec::len)).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    for row in rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// Runs one command; returns the exit status (3: rootkit checks found something).
async fn run(cli: Cli) -> Result<u8, String> {
    let s = &cli.socket;
    let show = |value: &Value, human: &dyn Fn(&Value)| {
        if cli.json {
            println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
        } else {
            human(value);
        }
    };
    match &cli.command {
        Cmd::Openapi => println!("{}", inspector::api::openapi_json()),
        Cmd::Launch(_) => unreachable!("launch runs without the async client"),
        Cmd::Status => {
            let v = json_of(call(s, Method::GET, "/v1/status", None).await?)?;
            show(&v, &|v| {
                table(&[
                    vec!["source".into(), v["source"].as_str().unwrap_or("").into()],
                    vec!["kind".into(), v["kind"].as_str().unwrap_or("").into()],
                    vec!["grants".into(), v["grants"].to_string()],
                    vec!["memslots".into(), v["memslots"].to_string()],
                    vec!["window".into(), hex(&v["window_len"])],
                    vec!["last event".into(), v["last_event"].to_string()],
                ])
            });
        }
        Cmd::Grants => {
            let v = json_of(call(s, Method::GET, "/v1/grants", None).await?)?;
            show(&v, &|v| {
                let mut rows = vec![vec!["ID".into(), "GPA".into(), "LEN".into()]];
                for g in v.as_array().into_iter().flatten() {
                    rows.push(vec![g["id"].to_string(), hex(&g["gpa"]), hex(&g["len"])]);
                }
                table(&rows)
            });
        }
        Cmd::Vcpus => {
            let v = json_of(call(s, Method::GET, "/v1/vcpus", None).await?)?;
            show(&v, &|v| {
                let mut rows = vec![["CPU", "RIP", "RSP", "CR3", "CR4", "EFER", "GS_BASE"].map(String::from).to_vec()];
                for c in v.as_array().into_iter().flatten() {
                    rows.push(vec![
                        c["index"].to_string(),
                        hex(&c["rip"]),
                        hex(&c["rsp"]),
                        hex(&c["cr3"]),
                        hex(&c["cr4"]),
                        hex(&c["efer"]),
                        hex(&c["gs_base"]),
                    ]);
                }
                table(&rows)
            });
        }
        Cmd::Read { gpa, len, output } => {
            let reply = call(s, Method::GET, &format!("/v1/memory/physical?gpa={gpa}&len={len}"), None).await?;
            if !reply.status.is_success() {
                return json_of(reply).map(|_| 0);
            }
            match output {
                Some(path) => std::fs::write(path, &reply.body).map_err(|e| format!("{}: {e}", path.display()))?,
                None => {
                    let base = vmm::line_server::parse_number(Some(gpa), "GPA")?;
                    let mut out = std::io::stdout().lock();
                    for (i, line) in reply.body.chunks(16).enumerate() {
                        let bytes: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
                        let text: String =
                            line.iter().map(|&b| if (32..127).contains(&b) { b as char } else { '.' }).collect();
                        let _ = writeln!(out, "{:016x}  {:<47}  {text}", base + i as u64 * 16, bytes.join(" "));
                    }
                }
            }
        }
        Cmd::Hash { gpa, len } => {
            let v = json_of(call(s, Method::POST, "/v1/hash", Some(json!({"gpa": gpa, "len": len}))).await?)?;
            show(&v, &|v| {
                println!("xxh64  {}\nsha256 {}", v["xxh64"].as_str().unwrap_or(""), v["sha256"].as_str().unwrap_or(""))
            });
        }
        Cmd::Scan { gpa, len, pattern, hex: is_hex, offset, limit } => {
            let pattern = if *is_hex { pattern.clone() } else { pattern.bytes().map(|b| format!("{b:02x}")).collect() };
            let body = json!({"gpa": gpa, "len": len, "pattern": pattern, "offset": offset, "limit": limit});
            let v = json_of(call(s, Method::POST, "/v1/scan", Some(body)).await?)?;
            show(&v, &|v| {
                println!("{} match(es)", v["total"]);
                for h in v["hits"].as_array().into_iter().flatten() {
                    println!("{}", hex(h));
                }
                if let Some(next) = v["next_offset"].as_u64() {
                    println!("more: --offset {next}");
                }
            });
        }
        Cmd::Watch(WatchCmd::Add { gpa, len }) => {
            let v = json_of(call(s, Method::POST, "/v1/watches", Some(json!({"gpa": gpa, "len": len}))).await?)?;
            show(&v, &|v| println!("watch {} on {}+{}", v["id"], hex(&v["gpa"]), hex(&v["len"])));
        }
        Cmd::Watch(WatchCmd::List) => {
            let v = json_of(call(s, Method::GET, "/v1/watches", None).await?)?;
            show(&v, &|v| {
                let mut rows = vec![["ID", "GPA", "LEN", "MODE", "POLLED", "FINDINGS"].map(String::from).to_vec()];
                for w in v.as_array().into_iter().flatten() {
                    rows.push(vec![
                        w["id"].to_string(),
                        hex(&w["gpa"]),
                        hex(&w["len"]),
                        w["mode"].as_str().unwrap_or("").into(),
                        w["polled"].to_string(),
                        w["findings"].to_string(),
                    ]);
                }
                table(&rows)
            });
        }
        Cmd::Watch(WatchCmd::Rm { id }) => {
            json_of(call(s, Method::DELETE, &format!("/v1/watches/{id}"), None).await?)?;
        }
        Cmd::Watch(WatchCmd::Findings { id }) => {
            let v = json_of(call(s, Method::GET, &format!("/v1/watches/{id}/findings"), None).await?)?;
            show(&v, &|v| {
                for f in v.as_array().into_iter().flatten() {
                    let pages: Vec<String> = f["pages"].as_array().into_iter().flatten().map(hex).collect();
                    println!("event {}: {}", f["seq"], pages.join(" "));
                }
            });
        }
        Cmd::Kernel => {
            let v = json_of(call(s, Method::GET, "/v1/os/kernel", None).await?)?;
            show(&v, &|v| {
                let mut rows = Vec::new();
                for key in [
                    "release",
                    "kaslr_offset",
                    "phys_base",
                    "paging",
                    "kernel_pgd",
                    "online_cpus",
                    "symbols",
                    "btf_types",
                ] {
                    let value = &v[key];
                    let text = if key.contains("offset") || key.contains("pgd") {
                        hex(value)
                    } else {
                        value.as_str().map_or(value.to_string(), String::from)
                    };
                    rows.push(vec![key.replace('_', " "), text]);
                }
                table(&rows)
            });
        }
        Cmd::Ps => {
            let v = json_of(call(s, Method::GET, "/v1/os/processes", None).await?)?;
            show(&v, &|v| {
                let mut rows = vec![["PID", "PPID", "UID", "COMM", "ARGS"].map(String::from).to_vec()];
                for p in v.as_array().into_iter().flatten() {
                    let args: Vec<&str> =
                        p["args"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                    let comm = p["comm"].as_str().unwrap_or("");
                    let comm = if p["kernel_thread"] == true { format!("[{comm}]") } else { comm.to_string() };
                    rows.push(vec![
                        p["pid"].to_string(),
                        p["ppid"].to_string(),
                        p["uid"].to_string(),
                        comm,
                        args.join(" "),
                    ]);
                }
                table(&rows)
            });
        }
        Cmd::Lsmod => {
            let v = json_of(call(s, Method::GET, "/v1/os/modules", None).await?)?;
            show(&v, &|v| {
                let mut rows = vec![["MODULE", "BASE", "SIZE", "STATE"].map(String::from).to_vec()];
                for m in v.as_array().into_iter().flatten() {
                    rows.push(vec![
                        m["name"].as_str().unwrap_or("").into(),
                        hex(&m["base"]),
                        m["size"].to_string(),
                        m["state"].as_str().unwrap_or("").into(),
                    ]);
                }
                table(&rows)
            });
        }
        Cmd::Checks { only } => {
            let query = if only.is_empty() { String::new() } else { format!("?only={}", only.join(",")) };
            let v = json_of(call(s, Method::GET, &format!("/v1/os/checks{query}"), None).await?)?;
            show(&v, &|v| {
                for c in v["checks"].as_array().into_iter().flatten() {
                    match c["error"].as_str() {
                        Some(why) => println!("{:<12} could not run: {why}", c["check"].as_str().unwrap_or("")),
                        None => println!("{:<12} {} examined", c["check"].as_str().unwrap_or(""), c["examined"]),
                    }
                }
                let mut rows = vec![["FINDING", "ID", "NAME", "ADDRESS", "DETAIL"].map(String::from).to_vec()];
                for f in v["findings"].as_array().into_iter().flatten() {
                    rows.push(vec![
                        f["kind"].as_str().unwrap_or("").into(),
                        f["id"].as_i64().map_or(String::new(), |i| i.to_string()),
                        f["name"].as_str().unwrap_or("").into(),
                        hex(&f["address"]),
                        f["detail"].as_str().unwrap_or("").into(),
                    ]);
                }
                if rows.len() > 1 {
                    table(&rows);
                } else {
                    println!("no findings");
                }
            });
            if v["clean"] != true {
                return Ok(3);
            }
        }
        Cmd::Yara { rules, pid, kernel } => {
            let text = std::fs::read_to_string(rules).map_err(|e| format!("{}: {e}", rules.display()))?;
            let target = match (pid, kernel) {
                (Some(_), _) => "process",
                (None, true) => "kernel",
                (None, false) => "physical",
            };
            let body = json!({"rules": text, "target": target, "pid": pid});
            let v = json_of(call(s, Method::POST, "/v1/yara", Some(body)).await?)?;
            show(&v, &|v| {
                let mut rows = vec![["RULE", "STRING", "PID", "VA", "GPA", "LENGTH"].map(String::from).to_vec()];
                for m in v["matches"].as_array().into_iter().flatten() {
                    let opt = |k: &str| if m[k].is_null() { String::new() } else { hex(&m[k]) };
                    rows.push(vec![
                        m["rule"].as_str().unwrap_or("").into(),
                        m["string"].as_str().unwrap_or("").into(),
                        m["pid"].as_u64().map_or(String::new(), |p| p.to_string()),
                        opt("va"),
                        opt("gpa"),
                        m["length"].to_string(),
                    ]);
                }
                println!("{} bytes scanned", v["scanned_bytes"]);
                if rows.len() > 1 {
                    table(&rows);
                } else {
                    println!("no matches");
                }
            });
            if v["matches"].as_array().is_some_and(|m| !m.is_empty()) {
                return Ok(3);
            }
        }
        Cmd::Dump { output, format, live } => {
            let summary = dump(s, output, format, *live).await?;
            show(&summary, &|v| {
                println!(
                    "{}: {} bytes of guest memory in {} ranges, {} ({})",
                    output.display(),
                    v["bytes"],
                    v["ranges"],
                    v["format"].as_str().unwrap_or(""),
                    v["consistency"].as_str().unwrap_or("")
                )
            });
        }
        Cmd::Isf { output, force } => {
            let path = write_isf(s, output.clone(), *force).await?;
            show(&json!({"path": path}), &|_| println!("{}", path.display()));
        }
        Cmd::Maps { pid } => {
            let v = json_of(call(s, Method::GET, &format!("/v1/os/processes/{pid}/maps"), None).await?)?;
            show(&v, &|v| {
                for m in v.as_array().into_iter().flatten() {
                    println!(
                        "{:x}-{:x} {} {:08x} {}",
                        m["start"].as_u64().unwrap_or(0),
                        m["end"].as_u64().unwrap_or(0),
                        m["perms"].as_str().unwrap_or(""),
                        m["pgoff"].as_u64().unwrap_or(0) * 4096,
                        m["file"].as_str().unwrap_or("")
                    );
                }
            });
        }
        Cmd::Vread { pid, va, len } => {
            let reply = call(s, Method::GET, &format!("/v1/os/processes/{pid}/memory?va={va}&len={len}"), None).await?;
            if !reply.status.is_success() {
                return json_of(reply).map(|_| 0);
            }
            let base = vmm::line_server::parse_number(Some(va), "VA")?;
            for (i, line) in reply.body.chunks(16).enumerate() {
                let bytes: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
                let text: String = line.iter().map(|&b| if (32..127).contains(&b) { b as char } else { '.' }).collect();
                println!("{:016x}  {:<47}  {text}", base + i as u64 * 16, bytes.join(" "));
            }
        }
        Cmd::Pause => {
            json_of(call(s, Method::POST, "/v1/source/pause", None).await?)?;
        }
        Cmd::Resume => {
            json_of(call(s, Method::POST, "/v1/source/resume", None).await?)?;
        }
        Cmd::Events { since, kinds } => follow_events(s, *since, kinds.as_deref(), cli.json).await?,
    }
    Ok(0)
}

/// Prints each event as it comes (one JSON object per line with --json).
async fn follow_events(socket: &PathBuf, since: Option<u64>, kinds: Option<&str>, raw: bool) -> Result<(), String> {
    let mut path = String::from("/v1/events?");
    if let Some(since) = since {
        path.push_str(&format!("since={since}&"));
    }
    if let Some(kinds) = kinds {
        path.push_str(&format!("kinds={kinds}"));
    }
    let mut sender = connect(socket).await?;
    let request = Request::builder()
        .uri(path)
        .header("host", "specula")
        .body(Empty::<Bytes>::new().boxed())
        .map_err(|e| e.to_string())?;
    let mut response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        return json_of(Reply { status: StatusCode::FORBIDDEN, body }).map(|_| ());
    }
    let mut pending = String::new();
    while let Some(frame) = response.body_mut().frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Some(data) = frame.data_ref() else { continue };
        pending.push_str(&String::from_utf8_lossy(data));
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) else { continue };
            let event: Value = serde_json::from_str(data.trim()).map_err(|e| e.to_string())?;
            if raw {
                println!("{event}");
            } else {
                println!("#{} {} {}", event["seq"], event["kind"].as_str().unwrap_or(""), event["detail"]);
            }
            let _ = std::io::stdout().flush();
        }
    }
    Ok(())
}

/// Bytes fetched per request while dumping.
const DUMP_CHUNK: u64 = 32 << 20;

/// `specula dump`: pauses the source (unless `live`), streams every granted range into
/// `output` after the format's headers, resumes the source whatever happened.
async fn dump(s: &PathBuf, output: &PathBuf, format: &str, live: bool) -> Result<Value, String> {
    use inspector::dump::{Consistency, Range};
    if format != "elf" && format != "lime" {
        return Err(format!("unknown dump format {format:?} (elf or lime)"));
    }
    let mut ranges: Vec<Range> = json_of(call(s, Method::GET, "/v1/grants", None).await?)?
        .as_array()
        .ok_or("the grant list is not a list")?
        .iter()
        .map(|g| Range { gpa: g["gpa"].as_u64().unwrap_or(0), len: g["len"].as_u64().unwrap_or(0) })
        .filter(|r| r.len > 0)
        .collect();
    ranges.sort_by_key(|r| r.gpa);
    // Adjacent grants are one range of RAM.
    let mut merged: Vec<Range> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(last) if last.gpa + last.len == r.gpa => last.len += r.len,
            _ => merged.push(r),
        }
    }
    if merged.is_empty() {
        return Err("the inspector has no granted memory to dump".into());
    }
    let consistency = if live {
        Consistency::Live
    } else {
        let reply = call(s, Method::POST, "/v1/source/pause", None).await?;
        if reply.status.is_success() {
            Consistency::Paused
        } else {
            eprintln!(
                "specula: the source cannot be paused ({}): the dump is live",
                json_of(reply).err().unwrap_or_default()
            );
            Consistency::Live
        }
    };
    let written = write_dump(s, output, format, &merged, consistency).await;
    if consistency == Consistency::Paused {
        let resumed = call(s, Method::POST, "/v1/source/resume", None).await.and_then(json_of);
        if let Err(e) = resumed {
            eprintln!("specula: resuming the source failed: {e}");
        }
    }
    let bytes = written?;
    Ok(json!({
        "path": output,
        "format": format,
        "ranges": merged.len(),
        "bytes": bytes,
        "consistency": if consistency == Consistency::Paused { "paused" } else { "live" },
    }))
}

/// Writes the dump file; returns the guest bytes written. The file is written under a
/// temporary name and renamed when complete: a failed dump leaves nothing that looks whole.
async fn write_dump(
    s: &PathBuf,
    output: &PathBuf,
    format: &str,
    ranges: &[inspector::dump::Range],
    consistency: inspector::dump::Consistency,
) -> Result<u64, String> {
    use std::io::IsTerminal;
    let partial = output.with_extension("partial");
    let file = std::fs::File::create(&partial).map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
    let mut out = std::io::BufWriter::with_capacity(8 << 20, file);
    let fail = |e: std::io::Error| format!("writing {}: {e}", partial.display());
    if format == "elf" {
        let vmcoreinfo = vmcoreinfo_text(s).await;
        if vmcoreinfo.is_none() {
            eprintln!("specula: no Linux kernel found in the source: the core has no VMCOREINFO note");
        }
        out.write_all(&inspector::dump::elf_header(ranges, vmcoreinfo.as_deref(), consistency)).map_err(fail)?;
    }
    let total: u64 = ranges.iter().map(|r| r.len).sum();
    let progress = std::io::stderr().is_terminal();
    let mut done = 0u64;
    for r in ranges {
        if format == "lime" {
            out.write_all(&inspector::dump::lime_header(*r)).map_err(fail)?;
        }
        let mut at = r.gpa;
        while at < r.gpa + r.len {
            let n = (r.gpa + r.len - at).min(DUMP_CHUNK);
            let reply = call(s, Method::GET, &format!("/v1/memory/physical?gpa={at}&len={n}"), None).await?;
            if !reply.status.is_success() {
                let _ = std::fs::remove_file(&partial);
                return Err(json_of(reply).err().unwrap_or_default());
            }
            if reply.body.len() as u64 != n {
                let _ = std::fs::remove_file(&partial);
                return Err(format!("{} bytes for a {n}-byte read at {at:#x}", reply.body.len()));
            }
            out.write_all(&reply.body).map_err(fail)?;
            at += n;
            done += n;
            if progress {
                eprint!("\rdump: {} / {} MiB ({}%)", done >> 20, total >> 20, done * 100 / total.max(1));
            }
        }
    }
    if progress {
        eprintln!();
    }
    out.flush().map_err(fail)?;
    drop(out);
    std::fs::rename(&partial, output).map_err(|e| format!("cannot write {}: {e}", output.display()))?;
    Ok(done)
}

/// The kernel's VMCOREINFO text, if the inspector found a Linux kernel.
async fn vmcoreinfo_text(s: &PathBuf) -> Option<Vec<u8>> {
    let kernel = json_of(call(s, Method::GET, "/v1/os/kernel", None).await.ok()?).ok()?;
    let at = kernel["vmcoreinfo_at"].as_u64()?;
    let reply = call(s, Method::GET, &format!("/v1/memory/physical?gpa={at}&len=4096"), None).await.ok()?;
    reply.status.is_success().then(|| reply.body.iter().copied().take_while(|&b| b != 0).collect())
}

/// Where `specula isf` writes by default, and where the Volatility layer looks.
fn isf_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("specula/volatility/linux")
}

/// Fetches the kernel's symbols, BTF and banner through the API and writes its ISF.
async fn write_isf(s: &PathBuf, output: Option<PathBuf>, force: bool) -> Result<PathBuf, String> {
    use sha2::Digest;
    let kernel = json_of(call(s, Method::GET, "/v1/os/kernel", None).await?)?;
    let symbols: Vec<specula_os::wire::SymbolRecord> = json_of(call(s, Method::GET, "/v1/os/symbols", None).await?)?
        .as_array()
        .ok_or("the symbol list is not a list")?
        .iter()
        .map(|v| -> Result<_, String> {
            Ok(specula_os::wire::SymbolRecord {
                name: v["name"].as_str().ok_or("a symbol without a name")?.to_string(),
                kind: v["kind"].as_str().and_then(|k| k.chars().next()).unwrap_or('?'),
                address: v["address"].as_u64().ok_or("a symbol without an address")?,
            })
        })
        .collect::<Result<_, _>>()?;
    let banner_at = symbols.iter().find(|s| s.name == "linux_banner").ok_or("no linux_banner in kallsyms")?.address;
    let reply = call(s, Method::GET, &format!("/v1/os/processes/0/memory?va={banner_at:#x}&len=512"), None).await?;
    if !reply.status.is_success() {
        return Err(json_of(reply).err().unwrap_or_default());
    }
    let banner: Vec<u8> = reply.body.iter().copied().take_while(|&b| b != 0).collect();
    if !banner.starts_with(b"Linux version ") {
        return Err(format!("linux_banner reads {:?}", String::from_utf8_lossy(&banner)));
    }
    // The default name is unique to the kernel build (its banner): a table already
    // there describes this kernel and is kept.
    let path = match output {
        Some(p) => p,
        None => {
            let release = kernel["release"].as_str().unwrap_or("linux").replace('/', "_");
            let digest = sha2::Sha256::digest(&banner);
            let hash: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
            let path = isf_cache_dir().join(format!("{release}-{hash}.json"));
            if path.is_file() && !force {
                return Ok(path);
            }
            path
        }
    };
    let btf_reply = call(s, Method::GET, "/v1/os/btf", None).await?;
    if !btf_reply.status.is_success() {
        return Err(json_of(btf_reply).err().unwrap_or_default());
    }
    let btf = specula_os::Btf::parse(btf_reply.body.to_vec()).map_err(|e| format!("the guest's BTF: {e}"))?;
    let kaslr_offset = kernel["kaslr_offset"].as_u64().ok_or("the kernel view has no kaslr_offset")?;
    let isf = inspector::isf::generate(&inspector::isf::IsfInput {
        btf: &btf,
        symbols: &symbols,
        kaslr_offset,
        banner: &banner,
    })
    .map_err(|e| e.to_string())?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let text = serde_json::to_vec(&isf).map_err(|e| e.to_string())?;
    // Written whole, then renamed: Volatility never sees half a table.
    let partial = path.with_extension("json.partial");
    std::fs::write(&partial, &text).map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
    std::fs::rename(&partial, &path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

fn main() -> ExitCode {
    // SAFETY: restoring the default SIGPIPE action, as command-line tools do, so that
    // `specula ... | head` ends quietly instead of failing on a closed pipe.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    if let Cmd::Launch(args) = &cli.command {
        return match args.config().and_then(|config| inspector::launch::launch(&config)) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("specula: error: {e}");
                ExitCode::from(1)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("specula: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("specula: error: {e}");
            ExitCode::from(1)
        }
    }
}
