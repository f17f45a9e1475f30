//! Shared helpers: the refold binary, the guest components (built from
//! source on first use), temp dirs, a running `refold run` with its HTTP API.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `refold` binary, built once if needed.
pub fn refold_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root().join("target"));
        let bin = target.join("debug/refold");
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "refold", "--bin", "refold"])
            .current_dir(root())
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building the refold binary failed");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
    .clone()
}

/// Guest components, built from `plugins/` by `plugins/build.sh` once per run.
pub fn component(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let out = root().join("plugins/target/components");
        let status = Command::new("bash")
            .arg(root().join("plugins/build.sh"))
            .arg(&out)
            .current_dir(root())
            .stdout(Stdio::null())
            .status()
            .expect("running plugins/build.sh");
        assert!(
            status.success(),
            "plugins/build.sh failed: the guest components could not be built"
        );
        out
    });
    let p = dir.join(format!("{name}.wasm"));
    assert!(p.exists(), "component {} was not built", p.display());
    p
}

/// A fresh temp dir.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("refold-it-")
        .tempdir()
        .expect("temp dir")
}

/// Run the binary to completion; (exit code, stdout, stderr).
pub fn refold(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out = Command::new(refold_bin())
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("running refold");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The sha256 digest of a component file, as `refold inspect` gives it (hex).
pub fn digest_of(p: &Path) -> String {
    let (_, out, _) = refold(&["inspect", p.to_str().unwrap()], &root());
    let v: Value = serde_json::from_str(&out).unwrap();
    v["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string()
}

/// `refold test --plugin PLUGIN FIXTURE --json`: its report (`null` when it
/// printed none) and what it wrote.
pub fn refold_test(plugin: &Path, fixture: &Path, cwd: &Path) -> (Value, String) {
    let (_, out, err) = refold(
        &[
            "test",
            "--plugin",
            plugin.to_str().unwrap(),
            fixture.to_str().unwrap(),
            "--json",
        ],
        cwd,
    );
    let v = serde_json::from_str(&out).unwrap_or(Value::Null);
    (v, format!("{out}{err}"))
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `refold run` process; killed on drop.
pub struct Host {
    /// The process.
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Its log file.
    pub log: PathBuf,
}

impl Host {
    /// Start `refold run --config CONFIG` (the config's `[http] listen` is
    /// overridden to a free port) with extra env, and wait for `/healthz`.
    pub fn start(config: &Path, dir: &Path, env: &[(&str, &str)]) -> Host {
        let port = free_port();
        let log = dir.join(format!("host-{port}.log"));
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(refold_bin());
        cmd.args(["run", "--config"])
            .arg(config)
            .current_dir(dir)
            .env("REFOLD_HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env("REFOLD_LOG", "info,refold=debug")
            .stdout(Stdio::null())
            .stderr(logf);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawning refold run");
        let host = Host {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        host.wait_ready(Duration::from_secs(60));
        host
    }

    fn wait_ready(&self, limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(r) = http().get(format!("{}/healthz", self.base)).send()
                && (r.status().as_u16() < 500 || r.status().as_u16() == 503)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "refold did not answer on {} within {limit:?}; log:\n{}",
            self.base,
            self.log_text()
        );
    }

    /// The host's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET a JSON document; (status, body).
    pub fn get(&self, path: &str) -> (u16, Value) {
        let r = http()
            .get(format!("{}{path}", self.base))
            .send()
            .expect("GET");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    /// Its `/metrics`, as text.
    pub fn metrics(&self) -> String {
        http()
            .get(format!("{}/metrics", self.base))
            .send()
            .and_then(|r| r.text())
            .expect("GET /metrics")
    }

    /// Kill the process hard (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A blocking HTTP client with a timeout.
pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Poll `f` until it returns `Some` or `limit` passes.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Append lines to a file.
pub fn append(path: &Path, lines: &[String]) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

/// A structured CloudEvent line.
pub fn ce(id: &str, entity_type: &str, subject: &str, ty: &str, data: Value) -> String {
    serde_json::json!({"specversion":"1.0","id":id,"source":"/it","type":ty,"subject":subject,
                       "entitytype":entity_type,"data":data})
    .to_string()
}

/// Write an embedded-mode config into `dir` and return its path.
pub fn embedded_config(
    dir: &Path,
    events: &[PathBuf],
    plugins: &[PathBuf],
    extra: &str,
) -> PathBuf {
    let q = |p: &PathBuf| format!("{:?}", p.display().to_string());
    let cfg = format!(
        "[source]\nkind = \"jsonl\"\npaths = [{}]\nfollow = true\nbatch_size = 200\nlinger_ms = 20\n\n[store]\nkind = \"sqlite\"\npath = {:?}\n\n[plugins]\nfiles = [{}]\n\n{extra}\n",
        events.iter().map(q).collect::<Vec<_>>().join(", "),
        dir.join("state/refold.db").display().to_string(),
        plugins.iter().map(q).collect::<Vec<_>>().join(", "),
    );
    let p = dir.join("refold.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

/// Wait until every account of `expected` answers its state; the answers.
pub fn wait_for_accounts(
    host: &Host,
    expected: &std::collections::BTreeMap<String, Value>,
    limit: Duration,
) -> Vec<Value> {
    expected
        .iter()
        .map(|(id, want)| {
            let path = format!("/v1/entities/account/{id}");
            wait_for(limit, &path, || {
                let (c, v) = host.get(&path);
                (c == 200 && v["state"] == *want).then_some(v)
            })
        })
        .collect()
}

/// The quarantine record of one entity (by type and id) on the first
/// page of `/v1/quarantine`, if it is there.
pub fn quarantine_of(host: &Host, entity_type: &str, entity_id: &str) -> Option<Value> {
    let (_, q) = host.get("/v1/quarantine");
    q["items"]
        .as_array()?
        .iter()
        .find(|i| i["key"]["entity_type"] == entity_type && i["key"]["entity_id"] == entity_id)
        .cloned()
}

/// Wait until `/healthz` answers `status`; its body.
pub fn wait_for_health(host: &Host, status: u16, limit: Duration) -> Value {
    wait_for(limit, &format!("healthz {status}"), || {
        let (c, h) = host.get("/healthz");
        (c == status).then_some(h)
    })
}

/// The admin API of a host, as a client with its token sees it.
pub struct Admin<'a> {
    /// The host.
    pub host: &'a Host,
    /// Bearer token sent with every request (`None`: none).
    pub token: Option<&'a str>,
}

impl<'a> Admin<'a> {
    /// The admin API of `host` with `token`.
    pub fn new(host: &'a Host, token: &'a str) -> Self {
        Admin {
            host,
            token: Some(token),
        }
    }

    fn auth(&self, r: reqwest::blocking::RequestBuilder) -> reqwest::blocking::RequestBuilder {
        match self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    fn answer(r: reqwest::blocking::RequestBuilder) -> (u16, Value) {
        let resp = r.send().unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().unwrap_or(Value::Null))
    }

    /// Upload `file` as a version of `entity_type`, activated with `mode`.
    pub fn put_plugin(&self, entity_type: &str, file: &Path, mode: &str) -> (u16, Value) {
        let r = http()
            .put(format!(
                "{}/v1/plugins/{entity_type}?mode={mode}",
                self.host.base
            ))
            .body(std::fs::read(file).unwrap());
        Self::answer(self.auth(r))
    }

    /// `POST path` with an optional JSON body.
    pub fn post(&self, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = http().post(format!("{}{path}", self.host.base));
        if let Some(b) = body {
            r = r.json(&b);
        }
        Self::answer(self.auth(r))
    }

    /// `GET path`, its JSON body (`null` when it has none).
    pub fn get(&self, path: &str) -> Value {
        Self::answer(self.auth(http().get(format!("{}{path}", self.host.base)))).1
    }

    /// The digest the host runs for `entity_type` (empty when none).
    pub fn running_digest(&self, entity_type: &str) -> String {
        self.get(&format!("/v1/plugins/{entity_type}"))["running_digest"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}
