//! Test harness: real `redis-server`, the real `api-shim` and `worker`
//! binaries, and a real HTTP webhook receiver, all on free 127.0.0.1 ports.
//! Every process is killed when its handle drops.

#![allow(dead_code)]

pub mod platform;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::Value;
use tokio::sync::Notify;

pub const API_KEY: &str = "test-key-1";
pub const OTHER_KEY: &str = "test-key-2";
/// The tenants of [`API_KEY`] and [`OTHER_KEY`] (the shim's `SHIM_API_KEYS`).
pub const TENANT: &str = "tenant-a";
pub const OTHER_TENANT: &str = "tenant-b";
/// base64 of "a-test-signing-secret-of-32-bytes".
pub const WEBHOOK_SECRET: &str = "whsec_YS10ZXN0LXNpZ25pbmctc2VjcmV0LW9mLTMyLWJ5dGVz";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The path of one of the workspace's binaries (built by `cargo build`).
pub fn binary_path(name: &str) -> PathBuf {
    binary(name)
}

fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let path = dir.join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; scripts/test does)",
        path.display()
    );
    path
}

/// Where a child's stderr goes: `target/test-logs/NAME-N.log`.
fn log_file(name: &str) -> Stdio {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = repo_root().join("target").join("test-logs");
    std::fs::create_dir_all(&dir).unwrap();
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = dir.join(format!("{name}-{}-{n}.log", std::process::id()));
    Stdio::from(std::fs::File::create(path).unwrap())
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe_sigterm(self.child.id());
        self.child.wait().unwrap()
    }
}

fn unsafe_sigterm(pid: u32) {
    Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Redis {
    pub proc: Proc,
    pub url: String,
    port: u16,
    /// Data folder of a persistent server (AOF on), kept across restarts.
    dir: Option<PathBuf>,
}

impl Redis {
    /// A throwaway server: no persistence.
    pub fn start() -> Self {
        Self::spawn(free_port(), None)
    }

    /// A server with AOF on (`appendfsync always`) in `dir`, so a restart
    /// keeps every job, as the README tells operators to configure.
    pub fn start_persistent(dir: &std::path::Path) -> Self {
        Self::spawn(free_port(), Some(dir.to_path_buf()))
    }

    /// Kills the server (no clean shutdown) and starts it again on the same
    /// port and data folder.
    pub fn restart(&mut self) {
        self.proc.kill();
        *self = Self::spawn(self.port, self.dir.clone());
    }

    /// Stops the server until `start_again`.
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    pub fn start_again(&mut self) {
        *self = Self::spawn(self.port, self.dir.clone());
    }

    fn spawn(port: u16, dir: Option<PathBuf>) -> Self {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ]);
        match &dir {
            Some(d) => {
                cmd.args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                    .arg(d);
            }
            None => {
                cmd.args(["--appendonly", "no"]);
            }
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server must be installed (apt-get install redis-server; scripts/test does)",
            );
        let url = format!("redis://127.0.0.1:{port}");
        let client = redis::Client::open(url.as_str()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = client.get_connection() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            proc: Proc {
                child,
                name: "redis".into(),
            },
            url,
            port,
            dir,
        }
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// A number of `INFO section`: the line that starts with `prefix`, up
    /// to its first comma (`connected_clients:`,
    /// `cmdstat_xinfo|consumers:calls=`); None when no line has it.
    pub async fn info_number(&self, section: &str, prefix: &str) -> Option<i64> {
        let info: String = redis::cmd("INFO")
            .arg(section)
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.split(',').next().unwrap_or("").trim().parse().unwrap())
    }
}

pub struct Shim {
    pub proc: Proc,
    pub base: String,
}

impl Shim {
    pub async fn start(redis: &Redis, env: &[(&str, &str)]) -> Self {
        Self::start_url(&redis.url, env).await
    }

    /// A shim on the Redis at `redis_url`, which need not be up yet.
    pub async fn start_url(redis_url: &str, env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let mut cmd = Command::new(binary("api-shim"));
        cmd.env("REDIS_URL", redis_url)
            .env("SHIM_BIND", format!("127.0.0.1:{port}"))
            .env(
                "SHIM_API_KEYS",
                format!("{TENANT}:{API_KEY},{OTHER_TENANT}:{OTHER_KEY}"),
            )
            .env("WEBHOOK_SECRET", WEBHOOK_SECRET)
            // The receivers of these tests listen on loopback.
            .env("OUTBOUND_ALLOW", "127.0.0.0/8,::1")
            // Tests poll fast; the rate limit has its own test.
            .env("RATE_LIMIT_PER_S", "0")
            .env("WEBHOOK_RETRY_SCHEDULE", "0s,100ms,200ms")
            .env("LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file("api-shim"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{base}/health")).send().await.is_err() {
            assert!(Instant::now() < deadline, "api-shim did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            proc: Proc {
                child,
                name: "api-shim".into(),
            },
            base,
        }
    }
}

/// Starts a worker on the default model. `env` overrides settings.
pub fn start_worker(redis: &Redis, env: &[(&str, &str)]) -> Proc {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    // A name per start, so a test can tell which worker ran a job.
    let name = format!(
        "t{}w{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let mut cmd = Command::new(binary("worker"));
    cmd.current_dir(repo_root())
        .env("WORKER_NAME", &name)
        .env("REDIS_URL", &redis.url)
        .env("CHARACTER_TEMPLATES_DIR", repo_root().join("characters"))
        .env("MAX_NEW_TOKENS", "12")
        .env("WORKER_HEARTBEAT_MS", "200")
        .env("WORKER_MISSED_HEARTBEATS", "5")
        .env("LOG", "info")
        // Speech models load only where a test asks for them.
        .env("STT_BACKEND", "none")
        .env("TTS_BACKEND", "espeak-ng")
        .stdout(Stdio::null())
        .stderr(log_file("worker"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc {
        child: cmd.spawn().unwrap(),
        name,
    }
}

pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(shim: &Shim) -> Self {
        Self {
            base: shim.base.clone(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).body(body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> (StatusCode, Value) {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// `GET /stream/{id}` as Server-Sent Events, with `key`.
    pub async fn open_sse(&self, id: &str, key: &str) -> reqwest::Response {
        self.http
            .get(format!("{}/stream/{id}", self.base))
            .bearer_auth(key)
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap()
    }

    /// `/health` (with `key`, if any) once `done` holds, within 30 s.
    pub async fn wait_for_health(&self, key: Option<&str>, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, h) = self.get("/health", key).await;
            if done(&h) {
                return h;
            }
            assert!(Instant::now() < deadline, "/health never got there: {h}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let resp = self
            .http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        resp.text().await.unwrap()
    }

    pub async fn status(&self, id: &str) -> Value {
        let (code, body) = self.get(&format!("/status/{id}"), Some(API_KEY)).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        body
    }

    /// Waits until the job's status satisfies `done` (bounded).
    pub async fn wait_for(
        &self,
        id: &str,
        limit: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.status(id).await;
            if done(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never reached the expected state: {s}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The text of each option as `GET /stream/{id}` (SSE) replays it,
    /// and the final state of its `completed` event.
    pub async fn sse_texts(&self, id: &str) -> (Vec<String>, String) {
        let sse = self
            .http
            .get(format!("{}/stream/{id}", self.base))
            .bearer_auth(API_KEY)
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let mut per_option: Vec<String> = Vec::new();
        let mut end = String::new();
        for event in sse.split("\n\n") {
            let Some(line) = event.lines().find(|l| l.starts_with("data: ")) else {
                continue;
            };
            let v: Value = serde_json::from_str(&line[6..]).unwrap();
            if event.contains("event: output") {
                let i = v["option"].as_u64().unwrap() as usize;
                if per_option.len() <= i {
                    per_option.resize(i + 1, String::new());
                }
                per_option[i].push_str(v["text"].as_str().unwrap());
            } else if event.contains("event: completed") {
                end = v["status"].as_str().unwrap_or_default().to_string();
            }
        }
        (per_option, end)
    }

    pub async fn wait_terminal(&self, id: &str) -> Value {
        self.wait_for(id, Duration::from_secs(120), |s| {
            !matches!(s["status"].as_str(), Some("IN_QUEUE") | Some("IN_PROGRESS"))
        })
        .await
    }
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub answered: u16,
}

/// An HTTP webhook receiver that answers `fail_first` requests with 500, then
/// 200.
#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    pub got: Arc<Mutex<Vec<Received>>>,
    /// While set, every request is answered 503 (the receiver is "down").
    pub down: Arc<std::sync::atomic::AtomicBool>,
    notify: Arc<Notify>,
}

impl Receiver {
    pub async fn start(fail_first: usize) -> Self {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let notify = Arc::new(Notify::new());
        let down: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let (g, n, d) = (got.clone(), notify.clone(), down.clone());
        let app = Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: Bytes| {
                let (g, n, d) = (g.clone(), n.clone(), d.clone());
                async move {
                    let mut list = g.lock().unwrap();
                    let code = if d.load(std::sync::atomic::Ordering::SeqCst) {
                        503
                    } else if list.len() < fail_first {
                        500
                    } else {
                        200
                    };
                    list.push(Received {
                        headers,
                        body,
                        answered: code,
                    });
                    drop(list);
                    n.notify_waiters();
                    StatusCode::from_u16(code).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            url,
            got,
            down,
            notify,
        }
    }

    /// Waits (bounded) until `n` requests have arrived; returns them all.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.notify.notified();
            {
                let list = self.got.lock().unwrap();
                if list.len() >= n {
                    return list.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "the receiver got {} of {n} callbacks",
                    self.got.lock().unwrap().len()
                );
            }
        }
    }
}

/// The test venv's python (scripts/setup installs the runpod and openai
/// SDKs there); `SDK_PYTHON` overrides it.
pub fn sdk_python() -> PathBuf {
    let python = std::env::var_os("SDK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap())
                .join(".cache/companion-worker/venv/bin/python")
        });
    assert!(
        python.exists(),
        "{} is missing: scripts/setup installs the SDKs there",
        python.display()
    );
    python
}

impl Api {
    /// A `fleet_worker_totals` figure from /metrics (0 when not there yet).
    pub async fn worker_total(&self, stat: &str) -> f64 {
        let metrics = self.metrics().await;
        let key = format!("stat=\"{stat}\"");
        metrics
            .lines()
            .find(|l| l.starts_with("fleet_worker_totals") && l.contains(&key))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

pub fn seed_file(name: &str) -> Value {
    let raw = std::fs::read_to_string(repo_root().join("examples").join(name)).unwrap();
    serde_json::from_str(&raw).unwrap()
}

/// A real S3-compatible server (`s3s-fs`, installed by scripts/setup) over a
/// fresh directory, with one bucket.
pub struct S3Server {
    pub proc: Proc,
    pub endpoint: String,
    pub bucket: String,
    pub dir: tempfile::TempDir,
}

pub const S3_KEY: &str = "test-access";
pub const S3_SECRET: &str = "test-secret-key";

impl S3Server {
    pub async fn start() -> Self {
        let bin = std::env::var_os("S3S_FS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cargo/bin/s3s-fs")
            });
        assert!(
            bin.exists(),
            "{} is missing: scripts/setup installs s3s-fs",
            bin.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--access-key",
                S3_KEY,
                "--secret-key",
                S3_SECRET,
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(log_file("s3s-fs"))
            .spawn()
            .unwrap();
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "s3s-fs did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let server = Self {
            proc: Proc {
                child,
                name: "s3s-fs".into(),
            },
            endpoint,
            bucket: "media".into(),
            dir,
        };
        server
            .client()
            .create_bucket()
            .bucket(&server.bucket)
            .send()
            .await
            .unwrap();
        server
    }

    pub fn client(&self) -> aws_sdk_s3::Client {
        let cfg = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                S3_KEY, S3_SECRET, None, None, "test",
            ))
            .build();
        aws_sdk_s3::Client::from_conf(cfg)
    }

    pub async fn get(&self, key: &str) -> Vec<u8> {
        let obj = self
            .client()
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        obj.body.collect().await.unwrap().into_bytes().to_vec()
    }
}
