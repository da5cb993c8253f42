//! A line-protocol server on a Unix socket (mode 0600): one request per line,
//! bounded in length, one reply line each: `ok ...` or `error ...`. The vmm's
//! API socket and the inspector's control socket both speak it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

/// Answers one request line with the reply text, or an error text.
pub type Handler = Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

/// Binds `path` (mode 0600) and serves each client on its own thread.
pub fn serve(path: &Path, name: &str, max_line: u64, handler: Handler) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let client_name = format!("{name}-client");
    std::thread::Builder::new().name(name.to_string()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let handler = handler.clone();
            let _ =
                std::thread::Builder::new().name(client_name.clone()).spawn(move || client(stream, max_line, &handler));
        }
    })?;
    Ok(())
}

fn client(stream: UnixStream, max_line: u64, handler: &Handler) {
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match (&mut reader).take(max_line).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = if !line.ends_with('\n') {
            // Over-long line: drop the rest of it so the next request parses.
            let mut rest = Vec::new();
            let _ = reader.read_until(b'\n', &mut rest);
            format!("error request longer than {max_line} bytes")
        } else {
            match handler(line.trim()) {
                Ok(text) => format!("ok {text}").trim_end().to_string(),
                Err(text) => format!("error {text}"),
            }
        };
        if writeln!(writer, "{reply}").is_err() {
            return;
        }
    }
}

/// Parses a request argument: decimal, or hex with `0x`.
pub fn parse_number(word: Option<&str>, what: &str) -> Result<u64, String> {
    let word = word.ok_or_else(|| format!("missing {what}"))?;
    let parsed = match word.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => word.parse(),
    };
    parsed.map_err(|_| format!("bad {what} '{word}'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_parse_in_decimal_and_hex() {
        assert_eq!(parse_number(Some("0x10"), "GPA"), Ok(16));
        assert_eq!(parse_number(Some("10"), "GPA"), Ok(10));
        assert_eq!(parse_number(Some("0xzz"), "GPA"), Err("bad GPA '0xzz'".into()));
        assert_eq!(parse_number(None, "LEN"), Err("missing LEN".into()));
    }

    #[test]
    fn requests_get_one_reply_line_and_overlong_lines_are_refused() {
        let dir = std::env::temp_dir().join(format!("specula-line-server-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        serve(
            &path,
            "test-line",
            16,
            Arc::new(|line: &str| if line == "boom" { Err("no".into()) } else { Ok(line.len().to_string()) }),
        )
        .unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut ask = |line: &str| {
            writeln!(&stream, "{line}").unwrap();
            let mut reply = String::new();
            reader.read_line(&mut reply).unwrap();
            reply.trim_end().to_string()
        };
        assert_eq!(ask("abc"), "ok 3");
        assert_eq!(ask("boom"), "error no");
        assert_eq!(ask(&"x".repeat(40)), "error request longer than 16 bytes");
        assert_eq!(ask("after"), "ok 5", "the stream stays in step after an over-long line");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
