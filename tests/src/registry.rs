//! A throwaway Docker registry for tests: Debian's `docker-registry` on
//! 127.0.0.1 with a random free port, a temp config and a temp storage dir,
//! optionally behind htpasswd basic auth. Started and stopped by the test
//! itself (killed on drop); never a system service.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::require_program;

const START_TIMEOUT: Duration = Duration::from_secs(20);
const SKOPEO_TIMEOUT: Duration = Duration::from_secs(120);

/// How the registry authenticates.
enum Auth {
    None,
    /// htpasswd basic auth.
    Basic(String, String),
    /// Bearer tokens from our token server, which wants these credentials.
    Token(String, String),
}

/// A running registry.
pub struct TestRegistry {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    auth: Option<(String, String)>,
    token_server: Option<TokenServer>,
}

impl TestRegistry {
    /// Starts an open registry.
    pub fn start() -> Self {
        Self::start_inner(Auth::None)
    }

    /// Starts a registry that demands basic auth with this user.
    pub fn start_with_basic_auth(user: &str, password: &str) -> Self {
        Self::start_inner(Auth::Basic(user.to_string(), password.to_string()))
    }

    /// Starts a registry that demands bearer tokens (the challenge flow),
    /// with a token server on loopback that hands a token to this user
    /// for repository `token/app` (pull and push).
    pub fn start_with_token_auth(user: &str, password: &str) -> Self {
        Self::start_inner(Auth::Token(user.to_string(), password.to_string()))
    }

    /// The token the token server hands out (for `registry_token` tests).
    pub fn token(&self) -> Option<&str> {
        self.token_server.as_ref().map(|t| t.token.as_str())
    }

    /// The identity (refresh) token the token server accepts by POST.
    pub fn identity_token(&self) -> Option<&str> {
        self.token_server.as_ref().map(|t| t.refresh.as_str())
    }

    fn start_inner(auth: Auth) -> Self {
        require_program("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().expect("temp dir for the registry");
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).expect("registry storage dir");
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        let mut token_server = None;
        let creds = match &auth {
            Auth::None => None,
            Auth::Basic(u, p) | Auth::Token(u, p) => Some((u.clone(), p.clone())),
        };
        if let Auth::Token(user, password) = &auth {
            let server = TokenServer::start(dir.path(), user, password);
            config.push_str(&format!(
                "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                server.port,
                dir.path().join("token-cert.pem").display()
            ));
            token_server = Some(server);
        }
        if let Auth::Basic(user, password) = &auth {
            require_program("htpasswd", "apache2-utils");
            let htpasswd = dir.path().join("htpasswd");
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("running htpasswd");
            assert!(out.status.success(), "htpasswd failed");
            std::fs::write(&htpasswd, &out.stdout).expect("writing htpasswd");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: vmpod-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("writing the registry config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("registry log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("registry log"))
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        let registry = Self {
            child,
            dir,
            port,
            auth: creds,
            token_server,
        };
        registry.wait_ready();
        registry
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(
                &([127, 0, 0, 1], self.port).into(),
                Duration::from_millis(200),
            )
            .is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        panic!(
            "docker-registry did not listen on 127.0.0.1:{} within {START_TIMEOUT:?}: {log}",
            self.port
        );
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's storage dir (to corrupt blobs in).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps a blob.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.storage()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Pushes an OCI layout (`dir`, entry `tag`) as `repo:tag` with skopeo;
    /// `extra` are more skopeo copy flags (`--format v2s2`, `--all`).
    pub fn push_layout(&self, dir: &Path, tag: &str, repo: &str, extra: &[&str]) {
        require_program("skopeo", "skopeo");
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ]);
        if let Some((user, password)) = &self.auth {
            cmd.arg(format!("--dest-creds={user}:{password}"));
        }
        cmd.args(extra);
        cmd.arg(format!("oci:{}:{tag}", dir.display()));
        cmd.arg(format!("docker://{}/{repo}:{tag}", self.host()));
        run_with_timeout(cmd, SKOPEO_TIMEOUT);
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TOKEN_SERVICE: &str = "vmpod-test";
const TOKEN_ISSUER: &str = "vmpod-test-issuer";
const TOKEN_REPO: &str = "token/app";

/// A minimal Docker token server: answers `GET /token` with one
/// pre-signed JWT (RS256, x5c header, self-signed cert the registry
/// trusts) when the basic credentials match, and `POST /token` when the
/// form carries `grant_type=refresh_token` with its identity token
/// (the OAuth2 flow); 401 otherwise.
struct TokenServer {
    port: u16,
    token: String,
    refresh: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TokenServer {
    fn start(dir: &Path, user: &str, password: &str) -> Self {
        use base64::Engine as _;
        require_program("openssl", "openssl");
        let key = dir.join("token-key.pem");
        let cert = dir.join("token-cert.pem");
        let mut cmd = Command::new("openssl");
        cmd.args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=vmpod-test-token",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert);
        run_with_timeout(cmd, Duration::from_secs(60));
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .expect("converting the token cert");
        assert!(der.status.success(), "openssl x509 failed");
        let b64 = base64::engine::general_purpose::STANDARD;
        let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let header =
            serde_json::json!({ "typ": "JWT", "alg": "RS256", "x5c": [b64.encode(&der.stdout)] });
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER, "sub": user, "aud": TOKEN_SERVICE,
            "exp": now + 3600, "nbf": now - 60, "iat": now - 60, "jti": "vmpod-test",
            "access": [{ "type": "repository", "name": TOKEN_REPO, "actions": ["pull", "push"] }],
        });
        let signing_input = format!(
            "{}.{}",
            b64url.encode(header.to_string()),
            b64url.encode(claims.to_string())
        );
        let input_path = dir.join("token-input");
        std::fs::write(&input_path, &signing_input).expect("writing the signing input");
        let sig = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&key)
            .arg(&input_path)
            .output()
            .expect("signing the token");
        assert!(sig.status.success(), "openssl dgst failed");
        let token = format!("{signing_input}.{}", b64url.encode(&sig.stdout));

        let listener = TcpListener::bind("127.0.0.1:0").expect("token server port");
        let port = listener.local_addr().expect("token server addr").port();
        listener
            .set_nonblocking(true)
            .expect("nonblocking token listener");
        let expected = format!("Basic {}", b64.encode(format!("{user}:{password}")));
        let refresh = format!("refresh-{user}");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let token = token.clone();
            let refresh = refresh.clone();
            std::thread::spawn(move || serve_tokens(listener, &expected, &refresh, &token, &stop))
        };
        Self {
            port,
            token,
            refresh,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_tokens(
    listener: TcpListener,
    expected: &str,
    refresh: &str,
    token: &str,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::io::{BufRead, BufReader, Read, Write};
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut reader = BufReader::new(match stream.try_clone() {
            Ok(s) => s,
            Err(_) => continue,
        });
        let mut authorized = false;
        let mut content_length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            if let Some((name, value)) = trimmed.split_once(':') {
                if name.eq_ignore_ascii_case("authorization") && value.trim() == expected {
                    authorized = true;
                }
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.trim().parse().unwrap_or(0).min(64 * 1024);
                }
            }
        }
        if content_length > 0 {
            let mut body = vec![0u8; content_length];
            if reader.read_exact(&mut body).is_ok() {
                let body = String::from_utf8_lossy(&body);
                let fields: Vec<&str> = body.split('&').collect();
                if fields.contains(&"grant_type=refresh_token")
                    && fields.contains(&format!("refresh_token={refresh}").as_str())
                {
                    authorized = true;
                }
            }
        }
        let (status, body) = if authorized {
            (
                "200 OK",
                serde_json::json!({ "token": token, "access_token": token, "expires_in": 3600 })
                    .to_string(),
            )
        } else {
            (
                "401 Unauthorized",
                r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#.to_string(),
            )
        };
        let mut stream = stream;
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// Runs a command, killing it after `timeout`; panics with its output on failure.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) {
    let program = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait().expect("waiting for a child") {
            Some(_) => break,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{program} did not finish within {timeout:?}");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let out = child.wait_with_output().expect("collecting output");
    assert!(
        out.status.success(),
        "{program} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
