//! A line-protocol server on a Unix socket: one request per line, one reply
//! line each: `ok ...` or `error ...`, the error's message with its causes. The
//! vmm's API socket and the inspector's control socket both speak it.
//!
//! Limits, each enforced here:
//! - the socket file is mode 0600 from the moment it exists (its mode is set
//!   before `bind`, [`mirror_driver::socket::bind_private`]);
//! - a peer whose uid (SO_PEERCRED) is not in the allow list is told
//!   `error uid N is not allowed` and closed before anything it sent is read;
//! - at most [`Limits::max_clients`] clients ([`MAX_CLIENTS`] by default) are
//!   served at once; one more is told `error too many clients` and closed;
//! - a client has [`Limits::idle_timeout`] ([`IDLE_TIMEOUT`] by default) to send
//!   each whole request line (counted from the previous reply); then it is closed;
//!   a reply that cannot be written within the same time closes it too;
//! - a request line is at most [`Limits::max_line`] bytes, newline included; a
//!   longer one gets `error request longer than N bytes`, and its rest is read
//!   and dropped up to [`MAX_DRAIN`] bytes; if no newline came by then, the
//!   connection is closed after the reply.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mirror_driver::socket;

/// A request argument: decimal, or hex with `0x`. Where it was before
/// [`specula_common::parse::number`], for callers that have not moved (the fuzz targets).
pub use specula_common::parse::number as parse_number;

/// Clients served at once by default.
pub const MAX_CLIENTS: usize = 16;
/// How long a client may take to send a request line, by default.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of an over-long line read and dropped while looking for its end.
pub const MAX_DRAIN: u64 = 64 * 1024;
/// Mode of the socket file.
const SOCKET_MODE: u32 = 0o600;
/// How long the accept thread spends telling a refused peer why.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_millis(100);
/// Pause after a failed accept (out of fds, say) so the loop does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// Why a handler could not answer a request: any error; the client reads its message
/// and causes ([`crate::error_chain`]).
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Answers one request line with the reply text, or the error the client is told of.
/// [`serve`] takes any `Fn(&str) -> Result<String, E>` whose `E` converts into a
/// [`HandlerError`] (every error type; a `String` too).
pub type Handler = Arc<dyn Fn(&str) -> Result<String, HandlerError> + Send + Sync>;

/// Turns one request line into its reply line, without the newline.
type Responder = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// Why a peer is closed before anything it sent is read.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("cannot read peer credentials")]
    Credentials(#[source] io::Error),
    #[error("uid {0} is not allowed")]
    Uid(u32),
    #[error("too many clients")]
    TooManyClients,
}

/// A request line the handler never sees.
#[derive(Debug, thiserror::Error)]
enum BadRequest {
    #[error("request longer than {0} bytes")]
    TooLong(u64),
    #[error("request is not UTF-8")]
    NotUtf8,
}

/// Bounds on what one server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest request line in bytes, newline included.
    pub max_line: u64,
    /// Clients served at once.
    pub max_clients: usize,
    /// Time a client has to send each request line.
    pub idle_timeout: Duration,
}

impl Limits {
    /// `max_line`, with the default client cap and idle timeout.
    pub fn new(max_line: u64) -> Self {
        Self { max_line, max_clients: MAX_CLIENTS, idle_timeout: IDLE_TIMEOUT }
    }
}

/// What the accept thread and every client thread share.
struct Shared {
    allowed_uids: Vec<u32>,
    limits: Limits,
    respond: Responder,
    active: Arc<AtomicUsize>,
    name: String,
}

/// Binds `path` (mode 0600) and serves, on a thread per client, the peers whose
/// uid is in `allowed_uids`, within `limits`; `handler` answers each request line.
pub fn serve<F, E>(path: &Path, name: &str, allowed_uids: &[u32], limits: Limits, handler: Arc<F>) -> io::Result<()>
where
    F: Fn(&str) -> Result<String, E> + Send + Sync + ?Sized + 'static,
    E: Into<HandlerError>,
{
    let listener = socket::bind_private(path, SOCKET_MODE)?;
    let shared = Shared {
        allowed_uids: allowed_uids.to_vec(),
        limits,
        respond: Arc::new(move |line: &str| reply_line(handler(line))),
        active: Arc::new(AtomicUsize::new(0)),
        name: name.to_string(),
    };
    std::thread::Builder::new().name(name.to_string()).spawn(move || accept_loop(&listener, &shared))?;
    Ok(())
}

fn accept_loop(listener: &UnixListener, shared: &Shared) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => admit(stream, shared),
            Err(_) => std::thread::sleep(ACCEPT_RETRY),
        }
    }
}

/// Checks a new peer and gives it a client thread, or tells it why not.
fn admit(stream: UnixStream, shared: &Shared) {
    if let Err(refusal) = check_peer(&stream, &shared.allowed_uids) {
        log::warn!("{}: refused a peer: {}", shared.name, crate::error_chain(&refusal));
        return refuse(stream, &refusal);
    }
    let Some(slot) = Slot::take(&shared.active, shared.limits.max_clients) else {
        return refuse(stream, &Refusal::TooManyClients);
    };
    let (limits, respond) = (shared.limits, shared.respond.clone());
    // A failed spawn drops the closure, and with it the slot and the stream.
    let _ = std::thread::Builder::new().name(format!("{}-client", shared.name)).spawn(move || {
        client(&stream, limits, &respond);
        // The place is free before the client sees the close.
        drop(slot);
        drop(stream);
    });
}

/// Ok if the peer's uid is allowed; why not otherwise.
fn check_peer(stream: &UnixStream, allowed_uids: &[u32]) -> Result<(), Refusal> {
    let cred = socket::peer_cred(stream).map_err(Refusal::Credentials)?;
    if allowed_uids.contains(&cred.uid) {
        Ok(())
    } else {
        Err(Refusal::Uid(cred.uid))
    }
}

/// Replies `error REASON` without reading anything, and closes.
fn refuse(mut stream: UnixStream, refusal: &Refusal) {
    let _ = stream.set_write_timeout(Some(REFUSAL_WRITE_TIMEOUT));
    let _ = writeln!(stream, "error {}", crate::error_chain(refusal));
}

/// One of the `max_clients` client places, given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Takes a place if fewer than `max` are taken.
    fn take(active: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        active.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Self(active.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves one client until it closes, times out, or sends a line too long to skip.
fn client(stream: &UnixStream, limits: Limits, respond: &Responder) {
    if stream.set_write_timeout(Some(limits.idle_timeout)).is_err() {
        return;
    }
    let mut writer = stream;
    let mut reader = BufReader::new(DeadlineReader { stream, deadline: Instant::now() });
    loop {
        reader.get_mut().deadline = Instant::now() + limits.idle_timeout;
        let (reply, in_step) = match read_request(&mut reader, limits.max_line) {
            Request::Closed => return,
            Request::Line(line) => (answer(respond, &line), true),
            Request::TooLong { in_step } => (error_line(&BadRequest::TooLong(limits.max_line)), in_step),
        };
        if writeln!(writer, "{reply}").is_err() || !in_step {
            return;
        }
    }
}

/// The reply line to one request line.
fn answer(respond: &Responder, line: &[u8]) -> String {
    match std::str::from_utf8(line) {
        Ok(line) => respond(line.trim()),
        Err(_) => error_line(&BadRequest::NotUtf8),
    }
}

/// The reply line to what a handler answered: `ok TEXT` or `error MESSAGE: CAUSE...`.
fn reply_line<E: Into<HandlerError>>(answer: Result<String, E>) -> String {
    match answer {
        Ok(text) => format!("ok {text}").trim_end().to_string(),
        Err(error) => error_line(&*error.into()),
    }
}

/// `error ` and the message of `error` with its causes.
fn error_line(error: &(dyn std::error::Error + '_)) -> String {
    format!("error {}", crate::error_chain(error))
}

/// What the client sent next.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// A whole line, newline included.
    Line(Vec<u8>),
    /// A line longer than the limit; `in_step` if its end was found and skipped.
    TooLong { in_step: bool },
    /// End of stream, a timeout or an error, possibly in the middle of a line.
    Closed,
}

/// Reads one request line of at most `max_line` bytes.
fn read_request<R: BufRead>(reader: &mut R, max_line: u64) -> Request {
    let mut line = Vec::new();
    match reader.by_ref().take(max_line).read_until(b'\n', &mut line) {
        Ok(_) if line.ends_with(b"\n") => Request::Line(line),
        Ok(n) if n as u64 == max_line && n > 0 => Request::TooLong { in_step: skip_line(reader, MAX_DRAIN) },
        _ => Request::Closed,
    }
}

/// Reads and drops bytes up to and including the next newline, at most `limit`
/// bytes in all; whether the newline was found.
fn skip_line<R: BufRead>(reader: &mut R, limit: u64) -> bool {
    let mut left = limit;
    while left > 0 {
        let buf = match reader.fill_buf() {
            Ok([]) => return false,
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        let window = &buf[..buf.len().min(usize::try_from(left).unwrap_or(usize::MAX))];
        if let Some(end) = window.iter().position(|&b| b == b'\n') {
            reader.consume(end + 1);
            return true;
        }
        let n = window.len();
        reader.consume(n);
        left -= n as u64;
    }
    false
}

/// Reads from a stream, failing with `TimedOut` once `deadline` has passed.
struct DeadlineReader<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    use std::path::PathBuf;

    /// Set in a child copy of this test binary: the socket its client helper connects to.
    const CLIENT_SOCKET_VAR: &str = "SPECULA_LINE_SERVER_TEST_SOCKET";
    /// An unprivileged uid and gid (nobody/nogroup) for the other-uid client.
    const OTHER_ID: u32 = 65534;
    /// How long a test waits for a reply it expects.
    const WAIT: Duration = Duration::from_secs(5);

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("specula-line-server-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn socket(&self) -> PathBuf {
            self.0.join("s.sock")
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn my_uid() -> u32 {
        // SAFETY: getuid cannot fail.
        unsafe { libc::getuid() }
    }

    /// Serves `path` for our own uid with a handler that answers a line's length ("boom" fails).
    fn start(path: &Path, limits: Limits) {
        let handler: Handler =
            Arc::new(|line: &str| if line == "boom" { Err("no".into()) } else { Ok(line.len().to_string()) });
        serve(path, "test-line", &[my_uid()], limits, handler).unwrap();
    }

    /// A connected client with a read timeout, reading reply lines.
    struct Client {
        stream: UnixStream,
        reader: BufReader<UnixStream>,
    }

    impl Client {
        fn connect(path: &Path) -> Self {
            let stream = UnixStream::connect(path).unwrap();
            stream.set_read_timeout(Some(WAIT)).unwrap();
            Self { reader: BufReader::new(stream.try_clone().unwrap()), stream }
        }

        /// The next reply line; `None` once the server has closed the connection.
        fn reply(&mut self) -> Option<String> {
            let mut reply = String::new();
            match self.reader.read_line(&mut reply) {
                Ok(0) => None,
                Ok(_) => Some(reply.trim_end().to_string()),
                // Closing with unread requests makes the peer see a reset, after the replies.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => None,
                Err(e) => panic!("no reply and no close within {WAIT:?}: {e}"),
            }
        }

        /// Sends `line` (a server that already closed makes that fail: its reply may still be there).
        fn ask(&mut self, line: &str) -> Option<String> {
            let _ = writeln!(&self.stream, "{line}");
            self.reply()
        }
    }

    #[test]
    fn numbers_parse_in_decimal_and_hex() {
        assert_eq!(parse_number(Some("0x10"), "GPA"), Ok(16));
        assert_eq!(parse_number(Some("10"), "GPA"), Ok(10));
        assert_eq!(parse_number(Some("0xzz"), "GPA").unwrap_err().to_string(), "bad GPA '0xzz'");
        assert_eq!(parse_number(None, "LEN").unwrap_err().to_string(), "missing LEN");
    }

    #[test]
    fn a_typed_error_is_told_with_its_causes_and_a_string_as_it_is() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        assert_eq!(reply_line::<String>(Ok("a ".into())), "ok a");
        assert_eq!(reply_line::<String>(Ok(String::new())), "ok");
        assert_eq!(reply_line(Err::<String, _>(String::from("no"))), "error no");
        assert_eq!(
            reply_line(Err::<String, _>(Refusal::Credentials(io()))),
            "error cannot read peer credentials: gone"
        );
    }

    #[test]
    fn requests_get_one_reply_line_and_overlong_lines_are_refused() {
        let dir = Scratch::new("reply");
        start(&dir.socket(), Limits::new(16));
        assert_eq!(std::fs::metadata(dir.socket()).unwrap().permissions().mode() & 0o777, 0o600);
        let mut client = Client::connect(&dir.socket());
        assert_eq!(client.ask("abc").as_deref(), Some("ok 3"));
        assert_eq!(client.ask("boom").as_deref(), Some("error no"));
        assert_eq!(client.ask(&"x".repeat(40)).as_deref(), Some("error request longer than 16 bytes"));
        assert_eq!(client.ask("after").as_deref(), Some("ok 5"), "the stream stays in step after an over-long line");
        assert_eq!(client.ask("\u{e9}").as_deref(), Some("ok 2"));
    }

    #[test]
    fn an_overlong_line_without_an_end_is_drained_only_so_far_then_closed() {
        let dir = Scratch::new("drain");
        start(&dir.socket(), Limits::new(16));
        let mut client = Client::connect(&dir.socket());
        let writer = client.stream.try_clone().unwrap();
        // More than the line limit plus the drain limit, and no newline: the server
        // must give up rather than read (and wait) until a newline that never comes.
        let sender = std::thread::spawn(move || {
            let _ = (&writer).write_all(&vec![b'x'; (16 + MAX_DRAIN + 4096) as usize]);
        });
        assert_eq!(client.reply().as_deref(), Some("error request longer than 16 bytes"));
        assert_eq!(client.reply(), None, "closed after the reply");
        sender.join().unwrap();
    }

    #[test]
    fn clients_beyond_the_cap_are_refused_until_a_place_frees() {
        let dir = Scratch::new("cap");
        start(&dir.socket(), Limits { max_line: 64, max_clients: 2, idle_timeout: WAIT });
        let mut first = Client::connect(&dir.socket());
        let mut second = Client::connect(&dir.socket());
        assert_eq!(first.ask("a").as_deref(), Some("ok 1"));
        assert_eq!(second.ask("bb").as_deref(), Some("ok 2"));
        let mut third = Client::connect(&dir.socket());
        assert_eq!(third.reply().as_deref(), Some("error too many clients"));
        assert_eq!(third.reply(), None, "closed after the refusal");
        drop(first);
        let deadline = Instant::now() + WAIT;
        loop {
            let mut next = Client::connect(&dir.socket());
            match next.ask("ccc") {
                Some(reply) if reply == "ok 3" => break,
                reply => assert!(Instant::now() < deadline, "no place freed after a client left: {reply:?}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(second.ask("dddd").as_deref(), Some("ok 4"), "the remaining client is still served");
    }

    #[test]
    fn idle_and_slow_clients_are_closed_and_free_their_place() {
        let dir = Scratch::new("idle");
        let idle = Duration::from_millis(300);
        start(&dir.socket(), Limits { max_line: 64, max_clients: 1, idle_timeout: idle });
        let mut silent = Client::connect(&dir.socket());
        let started = Instant::now();
        assert_eq!(silent.reply(), None, "a silent client is closed");
        assert!(started.elapsed() >= idle.mul_f32(0.9), "closed only after the idle timeout");

        // Trickling one byte at a time does not stretch the time to send a line.
        let mut slow = Client::connect(&dir.socket());
        assert_eq!(slow.ask("go").as_deref(), Some("ok 2"), "the silent client's place was given back");
        let mut closed = false;
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(50));
            if (&slow.stream).write_all(b"x").is_err() {
                closed = true;
                break;
            }
        }
        assert!(closed || slow.reply().is_none(), "a client trickling a line is closed");
        let mut next = Client::connect(&dir.socket());
        assert_eq!(next.ask("again").as_deref(), Some("ok 5"), "the place is free again");
    }

    /// Runs this test binary's `other_uid_client` as uid/gid `OTHER_ID` against `path`; its stdout.
    fn run_client_as_other_uid(path: &Path) -> String {
        let exe = std::env::current_exe().unwrap();
        let output = std::process::Command::new(&exe)
            .args(["--exact", "line_server::tests::other_uid_client", "--nocapture", "--test-threads=1"])
            .env(CLIENT_SOCKET_VAR, path)
            .uid(OTHER_ID)
            .gid(OTHER_ID)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run {} as uid {OTHER_ID} (it must be reachable by that uid): {e}", exe.display())
            });
        assert!(output.status.success(), "client process: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Not a test on its own: when run as a child by the test below, asks "hello"
    /// and prints what came back.
    #[test]
    fn other_uid_client() {
        let Some(path) = std::env::var_os(CLIENT_SOCKET_VAR) else { return };
        let mut client = Client::connect(Path::new(&path));
        let reply = client.ask("hello");
        // After a refusal the server closes; after an answer it waits for the next request.
        let refused = reply.as_deref().is_some_and(|r| r.starts_with("error"));
        let after = if refused { format!("{:?}", client.reply()) } else { "open".to_string() };
        println!("uid={} reply={reply:?} then={after}", my_uid());
    }

    #[test]
    fn peers_are_checked_by_uid() {
        if my_uid() != 0 {
            eprintln!("peers_are_checked_by_uid needs root (to run a client as uid {OTHER_ID}); not run");
            return;
        }
        let refusing = Scratch::new("uid-refused");
        start(&refusing.socket(), Limits::new(64));
        // Let any uid connect at all, so only the server's own check stands in the way.
        std::fs::set_permissions(refusing.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
        let seen = run_client_as_other_uid(&refusing.socket());
        assert!(
            seen.contains(&format!("uid={OTHER_ID} reply=Some(\"error uid {OTHER_ID} is not allowed\") then=None")),
            "{seen}"
        );

        let allowing = Scratch::new("uid-allowed");
        let handler: Handler = Arc::new(|line: &str| Ok(line.len().to_string()));
        serve(&allowing.socket(), "test-line", &[0, OTHER_ID], Limits::new(64), handler).unwrap();
        std::fs::set_permissions(allowing.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
        let seen = run_client_as_other_uid(&allowing.socket());
        assert!(seen.contains(&format!("uid={OTHER_ID} reply=Some(\"ok 5\") then=open")), "{seen}");
    }

    #[test]
    fn requests_are_read_in_lines_and_long_ones_skipped_up_to_a_bound() {
        let mut input: &[u8] = b"abc\nxxxxxxxxxxyy\nnext\n";
        assert_eq!(read_request(&mut input, 8), Request::Line(b"abc\n".to_vec()));
        assert_eq!(read_request(&mut input, 8), Request::TooLong { in_step: true });
        assert_eq!(read_request(&mut input, 8), Request::Line(b"next\n".to_vec()));
        assert_eq!(read_request(&mut input, 8), Request::Closed);
        let mut partial: &[u8] = b"ab";
        assert_eq!(read_request(&mut partial, 8), Request::Closed, "end of stream inside a line");
        let mut endless: &[u8] = &[b'z'; 100];
        assert!(!skip_line(&mut endless, 50));
        assert_eq!(endless.len(), 50, "skipped no more than the bound");
    }
}
