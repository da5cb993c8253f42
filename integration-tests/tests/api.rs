//! The inspector's HTTP API and the `specula` client, end to end: a real source `vmm`,
//! a real inspector serving `--api-socket`, requests over the Unix socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use guest_images::workload;
use integration_tests::{binary, run_with_timeout, spawn_api_inspector, unix_request, Running, SourceVm, TempDir};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

struct Setup {
    source: Running,
    source_api: PathBuf,
    inspector: Running,
    api: PathBuf,
    _dir: TempDir,
}

fn setup(extra: &[&str]) -> Setup {
    let dir = TempDir::new("api");
    let SourceVm { vm: mut source, mirror, api: source_api } = SourceVm::spawn(&dir, &["--memory", "256M"]);
    source.expect_line("workload: ready", LIMIT);
    let api = dir.join("inspector-api.sock");
    let inspector = spawn_api_inspector(&mirror, &api, extra);
    Setup { source, source_api, inspector, api, _dir: dir }
}

/// One HTTP/1.1 request over the Unix socket: (status, headers, body).
fn http(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String, Vec<u8>) {
    let mut stream = UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    let body = body.unwrap_or("");
    // A server that refuses a body (too large) may answer and close before it is all sent.
    let _ = write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, head, body)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&data[..line_end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[line_end + 2..line_end + 2 + size]);
        data = &data[line_end + 4 + size..];
    }
}

fn json(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let (status, _, body) = http(socket, method, path, body);
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[test]
fn the_served_openapi_document_is_the_committed_one() {
    let s = setup(&[]);
    let (status, _, body) = http(&s.api, "GET", "/v1/openapi.json", None);
    assert_eq!(status, 200);
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json")).unwrap();
    assert_eq!(String::from_utf8(body).unwrap().trim_end(), committed.trim_end());
}

#[test]
fn views_bulk_reads_errors_and_request_ids() {
    let s = setup(&[]);
    let (status, st) = json(&s.api, "GET", "/v1/status", None);
    assert_eq!(
        (status, st["source"].as_str(), st["kind"].as_str(), st["grants"].as_u64()),
        (200, Some("attached"), Some("specula"), Some(128))
    );
    assert_eq!(st["dirty_log"].as_str(), Some("KVM dirty ring"), "the vmm's default on a host that offers the ring");
    // A binary read of 8 MiB is streamed whole and equals what small hex reads give.
    let (status, head, bytes) =
        http(&s.api, "GET", &format!("/v1/memory/physical?gpa={:#x}&len={}", workload::HEADER_GPA, 8 << 20), None);
    assert_eq!(status, 200, "{head}");
    assert!(head.to_ascii_lowercase().contains("application/octet-stream"), "{head}");
    assert_eq!(bytes.len(), 8 << 20);
    assert_eq!(&bytes[..16], &workload::HEADER_MAGIC);
    let text_at = (workload::TEXT_GPA - workload::HEADER_GPA) as usize;
    let (_, hex) =
        json(&s.api, "GET", &format!("/v1/memory/physical/hex?gpa={:#x}&len=4096", workload::TEXT_GPA), None);
    let hex = hex["hex"].as_str().unwrap();
    let small: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    assert_eq!(&bytes[text_at..text_at + 4096], &small[..]);
    // Errors: JSON with a stable code and the request's id, which every reply carries.
    let (status, head, body) = http(&s.api, "GET", "/v1/memory/physical?gpa=0x20000000&len=4096", None);
    let err: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, err["code"].as_str()), (409, Some("not_granted")), "{err}");
    let id = head.lines().find_map(|l| l.strip_prefix("x-request-id: ")).expect("x-request-id");
    assert_eq!(err["request_id"].to_string(), id);
    let (status, err) = json(&s.api, "POST", "/v1/hash", Some(r#"{"gpa": "zz", "len": "1"}"#));
    assert_eq!((status, err["code"].as_str()), (400, Some("bad_request")), "{err}");
    let (status, err) = json(&s.api, "GET", "/v1/nothing", None);
    assert_eq!((status, err["code"].as_str()), (404, Some("not_found")));
    // Scan paging: 8 hits of "postgres", three per page.
    let pattern: String = b"postgres".iter().map(|b| format!("{b:02x}")).collect();
    let mut hits = Vec::new();
    let mut offset = 0;
    loop {
        let body = format!(
            r#"{{"gpa": "0x1000000", "len": "0x100000", "pattern": "{pattern}", "offset": {offset}, "limit": 3}}"#
        );
        let (status, page) = json(&s.api, "POST", "/v1/scan", Some(&body));
        assert_eq!((status, page["total"].as_u64()), (200, Some(8)), "{page}");
        hits.extend(page["hits"].as_array().unwrap().iter().map(|h| h.as_u64().unwrap()));
        match page["next_offset"].as_u64() {
            Some(next) => offset = next as usize,
            None => break,
        }
    }
    assert_eq!(hits.len(), 8);
    assert!(hits.windows(2).all(|w| w[0] < w[1]), "pages follow each other: {hits:x?}");
}

#[test]
fn the_event_stream_reports_watch_changes_and_revokes_and_replays_after_a_reconnect() {
    let mut s = setup(&["--watch-interval-ms", "50"]);
    let body = format!(r#"{{"gpa": "{:#x}", "len": "{:#x}"}}"#, workload::TEXT_GPA, workload::TEXT_LEN);
    let (status, watch) = json(&s.api, "POST", "/v1/watches", Some(&body));
    assert_eq!(status, 200, "{watch}");
    assert_eq!(watch["mode"], "dirty-log", "a Specula source feeds its dirty pages: {watch}");
    let id = watch["id"].as_u64().unwrap();
    // A subscriber through the CLI, following only watch events.
    let mut follower = Running::spawn(Command::new(binary("specula")).args([
        "--socket",
        s.api.to_str().unwrap(),
        "--json",
        "events",
        "--kinds",
        "watch",
    ]));
    std::thread::sleep(Duration::from_millis(300));
    s.source.send("text-modify 4096\n");
    s.source.expect_line("ack text-modify", LIMIT);
    let line = follower.expect_line("watch.changed", LIMIT);
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["detail"]["watch"].as_u64(), Some(id));
    assert!(event["detail"]["pages"].as_array().unwrap().contains(&Value::from(workload::TEXT_GPA + 4096)), "{event}");
    let seq = event["seq"].as_u64().unwrap();
    let (_, found) = json(&s.api, "GET", &format!("/v1/watches/{id}/findings"), None);
    assert_eq!(found[0]["seq"].as_u64(), Some(seq));
    // A revoke on the source becomes an event too; a client that reconnects with the last
    // sequence it saw gets it from the backlog.
    let grants = unix_request(&s.source_api, "grants");
    let grant = grants.split_whitespace().nth(5).unwrap().split(':').next().unwrap().to_string();
    assert!(unix_request(&s.source_api, &format!("revoke {grant}")).starts_with("ok revoked="));
    let mut stream = UnixStream::connect(&s.api).unwrap();
    write!(stream, "GET /v1/events?since={seq} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let deadline = Instant::now() + LIMIT;
    let mut seen = String::new();
    while !seen.contains("grant.revoked") {
        assert!(Instant::now() < deadline, "no grant.revoked event after {seq}: {seen}");
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        seen.push_str(&line);
    }
    assert!(!seen.contains(&format!("\"seq\":{seq},")), "events up to {seq} are not replayed");
}

#[test]
fn read_clients_see_views_control_clients_also_control_and_others_nothing() {
    let s = setup(&["--api-read-uid", "65534"]);
    let specula = |uid: u32, args: &[&str]| {
        let mut cmd = Command::new(binary("specula"));
        cmd.args(["--socket", s.api.to_str().unwrap()]).args(args).uid(uid).gid(uid);
        let out = run_with_timeout(&mut cmd, LIMIT);
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let (ok, out) = specula(65534, &["status"]);
    assert!(ok && out.contains("attached"), "a read client reads: {out}");
    let (ok, out) = specula(65534, &["watch", "add", "0x1010000", "0x1000"]);
    assert!(!ok && out.contains("forbidden") && out.contains("uid 65534 may not control"), "{out}");
    let (ok, out) = specula(65533, &["status"]);
    assert!(!ok && out.contains("uid 65533 may not use this API"), "{out}");
    let (ok, out) = specula(0, &["watch", "add", "0x1010000", "0x1000"]);
    assert!(ok, "the inspector's own uid controls: {out}");
    drop(s.inspector);
}

/// The inspector's anonymous resident memory (its heap: a buffered reply would be here;
/// the source's pages the agent reads through the shared mappings are RssShmem).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn a_64_mib_read_is_streamed_not_buffered_and_bad_requests_get_clear_errors() {
    let s = setup(&[]);
    let pid = s.inspector.child.id();
    // Read 64 MiB slowly, watching the inspector's RSS: it must not hold the whole reply.
    let mut stream = UnixStream::connect(&s.api).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    write!(stream, "GET /v1/memory/physical?gpa=0&len={} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", 64 << 20)
        .unwrap();
    let before = rss_kib(pid);
    let (mut total, mut peak) = (0usize, before);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
        if total % (4 << 20) < n {
            peak = peak.max(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert!(total > 64 << 20, "the whole body came: {total} bytes");
    assert!(peak < before + 32 * 1024, "the inspector's heap went from {before} to {peak} KiB while streaming 64 MiB");
    // Malformed JSON, an oversized body, a bad number, a path outside /v1.
    let (status, err) = json(&s.api, "POST", "/v1/hash", Some("{not json"));
    assert_eq!(status, 400, "{err}");
    let big = format!(r#"{{"gpa": "0", "len": "4096", "pad": "{}"}}"#, "x".repeat(4 << 20));
    let (status, _, _) = http(&s.api, "POST", "/v1/hash", Some(&big));
    assert_eq!(status, 413, "an oversized body is refused");
    let (status, err) = json(&s.api, "GET", "/v1/memory/physical?gpa=0&len=lots", None);
    assert_eq!((status, err["code"].as_str()), (400, Some("bad_request")), "{err}");
    let (status, _, _) = http(&s.api, "GET", "/etc/passwd", None);
    assert_eq!(status, 404);
}

#[test]
fn fifty_concurrent_clients_do_not_block_each_other() {
    let s = setup(&["--watch-interval-ms", "50"]);
    let api = s.api.clone();
    // One subscriber holds an event stream open the whole time.
    let mut subscriber = UnixStream::connect(&api).unwrap();
    write!(subscriber, "GET /v1/events HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let started = Instant::now();
    let workers: Vec<_> = (0..50)
        .map(|i| {
            let api = api.clone();
            std::thread::spawn(move || match i % 3 {
                0 => http(&api, "GET", "/v1/memory/physical?gpa=0x1000000&len=1048576", None).0,
                1 => {
                    json(
                        &api,
                        "POST",
                        "/v1/scan",
                        Some(r#"{"gpa": "0x1000000", "len": "0x200000", "pattern": "706f737467726573"}"#),
                    )
                    .0
                }
                _ => json(&api, "GET", "/v1/status", None).0,
            })
        })
        .collect();
    for w in workers {
        assert_eq!(w.join().unwrap(), 200);
    }
    assert!(started.elapsed() < Duration::from_secs(30), "50 clients took {:?}", started.elapsed());
    // The subscriber still gets events while others come and go.
    let (status, _) = json(&api, "POST", "/v1/watches", Some(r#"{"gpa": "0x1010000", "len": "0x40000"}"#));
    assert_eq!(status, 200);
    drop(subscriber);
}

#[test]
fn an_integrity_change_reaches_a_subscriber_within_200_ms_of_the_write() {
    let mut s = setup(&["--watch-interval-ms", "20"]);
    let body = format!(r#"{{"gpa": "{:#x}", "len": "{:#x}"}}"#, workload::TEXT_GPA, workload::TEXT_LEN);
    assert_eq!(json(&s.api, "POST", "/v1/watches", Some(&body)).0, 200);
    let mut stream = UnixStream::connect(&s.api).unwrap();
    write!(stream, "GET /v1/events?kinds=watch HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while line.trim() != "" || line.is_empty() {
        line.clear();
        reader.read_line(&mut line).unwrap(); // the header block
    }
    s.source.send("text-modify 4096\n");
    s.source.expect_line("ack text-modify", LIMIT);
    let acked = Instant::now();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.contains("watch.changed") {
            break;
        }
    }
    let delay = acked.elapsed();
    assert!(delay < Duration::from_millis(200), "the change arrived {delay:?} after the write was acknowledged");
}

#[test]
fn the_readmes_curl_examples_work() {
    let s = setup(&[]);
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let block = readme.split("<!-- api-curl-examples -->").nth(1).expect("the marked block in README.md");
    let script = block.split("```sh").nth(1).unwrap().split("```").next().unwrap();
    let dir = TempDir::new("api-curl");
    std::fs::create_dir_all(dir.join("run")).unwrap();
    std::os::unix::fs::symlink(&s.api, dir.join("run/api.sock")).unwrap();
    let out = run_with_timeout(Command::new("sh").args(["-ec", script]).current_dir(&dir.0), LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl (Debian package curl) ran the README's lines: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"source\":\"attached\"") && stdout.contains("\"total\":8"), "{stdout}");
    assert_eq!(std::fs::metadata(dir.join("page.bin")).unwrap().len(), 4096);
    let served = std::fs::read_to_string(dir.join("openapi.json")).unwrap();
    assert!(served.contains("\"/v1/scan\""));
}

#[test]
fn the_remaining_endpoints_answer_as_documented() {
    let s = setup(&[]);
    let (status, grants) = json(&s.api, "GET", "/v1/grants", None);
    assert_eq!((status, grants.as_array().map(Vec::len)), (200, Some(128)));
    assert_eq!((grants[0]["gpa"].as_u64(), grants[0]["len"].as_u64()), (Some(0), Some(2 << 20)));
    let (status, vcpus) = json(&s.api, "GET", "/v1/vcpus", None);
    assert_eq!((status, vcpus.as_array().map(Vec::len)), (200, Some(1)), "{vcpus}");
    // The mirror protocol's own vCPU shape: RSP is gprs[6].
    assert!(vcpus[0]["cr3"].as_u64().unwrap() != 0 && vcpus[0]["gprs"][6].as_u64().unwrap() != 0, "{vcpus}");
    let body = format!(r#"{{"gpa": "{:#x}", "len": "{:#x}"}}"#, workload::TEXT_GPA, workload::TEXT_LEN);
    let (status, digests) = json(&s.api, "POST", "/v1/hash", Some(&body));
    let mut text = vec![0u8; workload::TEXT_LEN];
    workload::fill_text(&mut text);
    let expected = String::from_utf8(guest_images::sha256::hex(&guest_images::sha256::digest(&text)).to_vec()).unwrap();
    assert_eq!((status, digests["sha256"].as_str()), (200, Some(expected.as_str())));
    let (_, watch) = json(&s.api, "POST", "/v1/watches", Some(&body));
    let id = watch["id"].as_u64().unwrap();
    assert_eq!(http(&s.api, "DELETE", &format!("/v1/watches/{id}"), None).0, 204);
    let (status, err) = json(&s.api, "DELETE", &format!("/v1/watches/{id}"), None);
    assert_eq!((status, err["code"].as_str()), (404, Some("not_found")));
    let (_, list) = json(&s.api, "GET", "/v1/watches", None);
    assert_eq!(list.as_array().map(Vec::len), Some(0));
    // This source does not let inspectors pause it.
    let (status, err) = json(&s.api, "POST", "/v1/source/pause", None);
    assert_eq!((status, err["code"].as_str()), (403, Some("policy_denied")), "{err}");
}

#[test]
fn a_source_that_allows_it_is_paused_and_resumed_through_the_api() {
    let dir = TempDir::new("api-pause");
    let SourceVm { vm: mut source, mirror, .. } = SourceVm::spawn(&dir, &["--memory", "256M", "--mirror-allow-pause"]);
    source.expect_line("workload: ready", LIMIT);
    let api = dir.join("inspector-api.sock");
    let _inspector = spawn_api_inspector(&mirror, &api, &[]);
    let heartbeat = || {
        let (_, v) =
            json(&api, "GET", &format!("/v1/memory/physical/hex?gpa={:#x}&len=8", workload::HEADER_GPA + 24), None);
        u64::from_str_radix(
            &v["hex"]
                .as_str()
                .unwrap()
                .chars()
                .collect::<Vec<_>>()
                .chunks(2)
                .rev()
                .map(|c| c.iter().collect::<String>())
                .collect::<String>(),
            16,
        )
        .unwrap()
    };
    assert_eq!(http(&api, "POST", "/v1/source/pause", None).0, 204);
    let frozen = heartbeat();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(heartbeat(), frozen);
    assert_eq!(http(&api, "POST", "/v1/source/resume", None).0, 204);
    std::thread::sleep(Duration::from_millis(100));
    assert!(heartbeat() > frozen);
}
