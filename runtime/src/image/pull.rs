//! Registry pulls with `oci-client`: per-host endpoints (mirrors) tried in
//! order, credentials from the CRI `AuthConfig` (the bearer-token challenge
//! is oci-client's), manifests and indexes, and layer downloads that are
//! bounded, verified and only then moved into the store.

use std::collections::BTreeMap;
use std::sync::Once;
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use serde::{Deserialize, Serialize};

use super::manifest::{self, Document, ManifestError, Platform};
use super::reference::ImageReference;
use super::store::{LayerRecord, Store, StoreError, sha256_digest};

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The registry does not have the image.
    #[error("{0} not found")]
    NotFound(String),
    /// The registry refused the credentials (or wants some).
    #[error("not authorized to pull {0}")]
    Unauthorized(String),
    /// Any other registry or transport failure.
    #[error("registry {endpoint}")]
    Registry {
        /// The endpoint that failed.
        endpoint: String,
        /// What it said.
        #[source]
        source: OciDistributionError,
    },
    /// A registry request took longer than allowed.
    #[error("registry {endpoint} did not answer within {timeout:?}")]
    Timeout {
        /// The endpoint.
        endpoint: String,
        /// The bound.
        timeout: Duration,
    },
    /// The registry sent content that does not match its digest.
    #[error("{what} from {endpoint} does not match digest {expected}")]
    DigestMismatch {
        /// What was fetched.
        what: &'static str,
        /// The endpoint.
        endpoint: String,
        /// The digest it should have.
        expected: String,
    },
    /// Content larger than its descriptor or our bounds.
    #[error("{what} {digest} is larger than {limit} bytes")]
    TooLarge {
        /// What was fetched.
        what: &'static str,
        /// Its digest.
        digest: String,
        /// The bound.
        limit: u64,
    },
    /// The manifest, index or config is unusable.
    #[error("image {reference}")]
    Manifest {
        /// The image.
        reference: String,
        /// What is wrong with it.
        #[source]
        source: ManifestError,
    },
    /// Storing content failed.
    #[error("storing content")]
    Store(#[from] StoreError),
    /// The host has no endpoints configured (an empty list in the config).
    #[error("no endpoints configured for registry host {0}")]
    NoEndpoints(String),
}

impl PullError {
    /// Whether trying another endpoint could help.
    fn is_fatal(&self) -> bool {
        matches!(self, PullError::Manifest { .. } | PullError::Store(_))
    }
}

/// One place a registry host can be reached.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// `host[:port]` of the endpoint.
    pub host: String,
    /// Plain HTTP: only for registries you trust the path to (loopback).
    #[serde(default)]
    pub plain_http: bool,
}

/// Endpoints of one registry host, tried in order (like containerd's hosts.toml).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Mirrors first, then the origin if you want it as a fallback.
    pub endpoints: Vec<Endpoint>,
}

/// Registry settings, embedded in the daemon's TOML config as `[registry]`:
///
/// ```toml
/// [registry.hosts."docker.io"]
/// endpoints = [{ host = "mirror.example:5000", plain_http = true }, { host = "registry-1.docker.io" }]
/// ```
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Per registry host (as in image names: `docker.io`, `127.0.0.1:5000`).
    pub hosts: BTreeMap<String, HostConfig>,
    /// Bound on one registry request (manifest, token) and on any stall of a download.
    pub request_timeout_secs: u64,
    /// Bound on establishing a connection.
    pub connect_timeout_secs: u64,
    /// Layers downloaded at once per pull.
    pub max_concurrent_downloads: usize,
    /// Largest layer accepted.
    pub max_layer_bytes: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            hosts: BTreeMap::new(),
            request_timeout_secs: 30,
            connect_timeout_secs: 10,
            max_concurrent_downloads: 4,
            max_layer_bytes: 16 << 30,
        }
    }
}

impl RegistryConfig {
    /// The endpoints to try for a registry host: the configured ones, or the
    /// host itself over HTTPS.
    pub fn endpoints(&self, domain: &str) -> Vec<Endpoint> {
        match self.hosts.get(domain) {
            Some(host) => host.endpoints.clone(),
            None => vec![Endpoint {
                host: domain.to_string(),
                plain_http: false,
            }],
        }
    }

    fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs.max(1))
    }
}

/// Credentials for one pull (the CRI `AuthConfig`).
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Credentials {
    /// No credentials.
    #[default]
    Anonymous,
    /// Username and password: HTTP basic, or exchanged for a bearer token
    /// when the registry challenges with one.
    Basic {
        /// The user.
        username: String,
        /// The password.
        password: String,
    },
    /// A token for the registry itself, sent as `Authorization: Bearer`.
    RegistryToken(String),
    /// An identity (OAuth2 refresh) token, exchanged at the registry's
    /// token service for an access token (`grant_type=refresh_token`).
    IdentityToken(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => write!(f, "Anonymous"),
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credentials::RegistryToken(_) => write!(f, "RegistryToken(<redacted>)"),
            Credentials::IdentityToken(_) => write!(f, "IdentityToken(<redacted>)"),
        }
    }
}

impl Credentials {
    fn to_oci(&self) -> RegistryAuth {
        match self {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Credentials::RegistryToken(token) => RegistryAuth::Bearer(token.clone()),
            // Exchanged for an access token before use: see `exchange_identity_token`.
            Credentials::IdentityToken(_) => RegistryAuth::Anonymous,
        }
    }
}

/// Largest token-service answer read.
const MAX_TOKEN_RESPONSE: usize = 1 << 20;

/// An in-memory sink that refuses to grow past `limit` bytes: a write that
/// would fails, and `overflowed` says so.
struct BoundedBuf {
    buf: Vec<u8>,
    limit: u64,
    overflowed: bool,
}

impl BoundedBuf {
    fn new(limit: u64) -> BoundedBuf {
        BoundedBuf {
            buf: Vec::new(),
            limit,
            overflowed: false,
        }
    }
}

impl tokio::io::AsyncWrite for BoundedBuf {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.buf.len() as u64 + data.len() as u64 > self.limit {
            self.overflowed = true;
            return std::task::Poll::Ready(Err(std::io::Error::other("more bytes than allowed")));
        }
        self.buf.extend_from_slice(data);
        std::task::Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// `realm` and `service` of a `WWW-Authenticate: Bearer ...` challenge.
fn parse_bearer_challenge(header: &str) -> Option<(String, String)> {
    let (scheme, params) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = String::new();
    let mut rest = params.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim(), &after[end..])
        };
        match key.as_str() {
            "realm" => realm = Some(value.to_string()),
            "service" => service = value.to_string(),
            _ => {}
        }
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some((realm?, service))
}

/// A progress report of a pull.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PullEvent {
    /// The manifest is known.
    Resolved {
        /// The endpoint that serves it.
        endpoint: String,
        /// Number of layers.
        layers: usize,
        /// Their total size.
        bytes: u64,
    },
    /// A layer is already in the store.
    LayerCached {
        /// Its digest.
        digest: String,
    },
    /// Bytes of a layer arrived (reported about every MiB).
    LayerProgress {
        /// Its digest.
        digest: String,
        /// Bytes so far.
        done: u64,
        /// Its size.
        total: u64,
    },
    /// A layer was downloaded and verified.
    LayerDone {
        /// Its digest.
        digest: String,
    },
    /// Layers are being unpacked and the erofs image built.
    Unpacking,
}

/// Receives progress reports.
pub type Progress<'a> = &'a (dyn Fn(PullEvent) + Send + Sync);

/// An image manifest fetched from a registry: where it came from and what
/// it names.
pub struct RemoteImage {
    client: oci_client::Client,
    oci_ref: oci_client::Reference,
    endpoint: String,
    request_timeout: Duration,
    /// Digest the reference resolved to (the index, for multi-arch images).
    pub repo_digest: String,
    /// Digest of the platform manifest.
    pub manifest_digest: String,
    /// The manifest bytes (verified).
    pub manifest_bytes: Vec<u8>,
    /// The config digest: the image ID.
    pub config_digest: String,
    /// The config bytes (verified).
    pub config_bytes: Vec<u8>,
    /// The layers, bottom first.
    pub layers: Vec<LayerRecord>,
}

/// Builds clients for endpoints and resolves references.
#[derive(Clone, Debug)]
pub struct Puller {
    config: RegistryConfig,
    platform: Platform,
}

fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only when another provider is installed already: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Puller {
    /// A puller for a registry config and the platform to pick from indexes.
    pub fn new(config: RegistryConfig, platform: Platform) -> Self {
        install_crypto_provider();
        Self { config, platform }
    }

    /// The registry config.
    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// Finds the image on the first endpoint that has it and fetches its
    /// manifest and config. Every failure but a bad image moves on to the
    /// next endpoint; the last failure is returned.
    pub async fn resolve(
        &self,
        reference: &ImageReference,
        credentials: &Credentials,
    ) -> Result<RemoteImage, PullError> {
        let endpoints = self.config.endpoints(reference.domain());
        let mut last = PullError::NoEndpoints(reference.domain().to_string());
        for endpoint in endpoints {
            match self.resolve_at(&endpoint, reference, credentials).await {
                Ok(image) => return Ok(image),
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    tracing::warn!(endpoint = %endpoint.host, %reference, error = %e, "endpoint failed, trying the next");
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn resolve_at(
        &self,
        endpoint: &Endpoint,
        reference: &ImageReference,
        credentials: &Credentials,
    ) -> Result<RemoteImage, PullError> {
        let timeout = self.config.request_timeout();
        let client = oci_client::Client::new(ClientConfig {
            protocol: if endpoint.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            read_timeout: Some(timeout),
            connect_timeout: Some(Duration::from_secs(self.config.connect_timeout_secs.max(1))),
            platform_resolver: None,
            user_agent: concat!("vmpod/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        });
        let host = endpoint.host.clone();
        let path = reference.path().to_string();
        let oci_ref = match reference.digest() {
            Some(d) => oci_client::Reference::with_digest(host.clone(), path.clone(), d.into()),
            None => oci_client::Reference::with_tag(
                host.clone(),
                path.clone(),
                reference.registry_reference().into(),
            ),
        };
        let name = reference.to_string();
        let http = self.http_client(&host)?;
        let auth = match credentials {
            Credentials::IdentityToken(token) => {
                self.exchange_identity_token(&http, endpoint, &oci_ref, token, &name)
                    .await?
            }
            other => other.to_oci(),
        };
        let bad = |source| PullError::Manifest {
            reference: name.clone(),
            source,
        };

        let (bytes, digest) = self
            .fetch_manifest(
                &client,
                &http,
                &oci_ref,
                &auth,
                endpoint,
                reference.digest(),
            )
            .await?;
        let repo_digest = digest.clone();
        let (manifest_digest, manifest_bytes, manifest) =
            match manifest::parse(&bytes, None).map_err(bad)? {
                Document::Manifest(m) => (digest, bytes, m),
                Document::Index(index) => {
                    let desc = manifest::select(&index, &self.platform).map_err(bad)?;
                    let want = manifest::digest_of(&desc).map_err(bad)?;
                    let by_digest = oci_ref.clone_with_digest(want.clone());
                    let (bytes, digest) = self
                        .fetch_manifest(&client, &http, &by_digest, &auth, endpoint, Some(&want))
                        .await?;
                    match manifest::parse(&bytes, None).map_err(bad)? {
                        Document::Manifest(m) => (digest, bytes, m),
                        Document::Index(_) => {
                            return Err(bad(ManifestError::UnsupportedMediaType(
                                "nested index".into(),
                            )));
                        }
                    }
                }
            };

        let config_desc = manifest.config();
        let config_digest = manifest::digest_of(config_desc).map_err(bad)?;
        if config_desc.size() > manifest::MAX_CONFIG_BYTES {
            return Err(PullError::TooLarge {
                what: "config",
                digest: config_digest,
                limit: manifest::MAX_CONFIG_BYTES,
            });
        }
        let desc = OciDescriptor {
            digest: config_digest.clone(),
            size: config_desc.size() as i64,
            media_type: config_desc.media_type().to_string(),
            ..OciDescriptor::default()
        };
        // Bounded as it arrives: a registry may send more than it declared.
        let mut config_bytes = BoundedBuf::new(manifest::MAX_CONFIG_BYTES);
        let pulled = tokio::time::timeout(
            timeout,
            client.pull_blob(&oci_ref, &desc, &mut config_bytes),
        )
        .await
        .map_err(|_| PullError::Timeout {
            endpoint: host.clone(),
            timeout,
        })?;
        if config_bytes.overflowed {
            return Err(PullError::TooLarge {
                what: "config",
                digest: config_digest,
                limit: manifest::MAX_CONFIG_BYTES,
            });
        }
        pulled.map_err(|e| classify(e, &host, &name))?;
        let config_bytes = config_bytes.buf;
        if sha256_digest(&config_bytes) != config_digest {
            return Err(PullError::DigestMismatch {
                what: "config",
                endpoint: host,
                expected: config_digest,
            });
        }
        let layers = manifest
            .layers()
            .iter()
            .map(|l| {
                Ok(LayerRecord {
                    digest: manifest::digest_of(l)?,
                    media_type: l.media_type().to_string(),
                    size: l.size(),
                })
            })
            .collect::<Result<Vec<_>, ManifestError>>()
            .map_err(bad)?;
        Ok(RemoteImage {
            client,
            oci_ref,
            endpoint: host,
            request_timeout: timeout,
            repo_digest,
            manifest_digest,
            manifest_bytes,
            config_digest,
            config_bytes,
            layers,
        })
    }

    /// The HTTP client for what vmpod asks a registry itself (the
    /// identity-token exchange, manifest GETs), with the configured connect
    /// and request timeouts; one per pull.
    fn http_client(&self, host: &str) -> Result<reqwest::Client, PullError> {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(self.config.connect_timeout_secs.max(1)))
            .timeout(self.config.request_timeout())
            .user_agent(concat!("vmpod/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(self.http_error(host))
    }

    /// A failed request to `host`: past the request timeout, Timeout;
    /// otherwise a registry error.
    fn http_error(&self, host: &str) -> impl Fn(reqwest::Error) -> PullError + use<> {
        let (host, timeout) = (host.to_string(), self.config.request_timeout());
        move |e| {
            if e.is_timeout() {
                PullError::Timeout {
                    endpoint: host.clone(),
                    timeout,
                }
            } else {
                PullError::Registry {
                    endpoint: host.clone(),
                    source: OciDistributionError::RequestError(e),
                }
            }
        }
    }

    /// Exchanges an identity (refresh) token for an access token with the
    /// OAuth2 flow of Docker token services: the registry's challenge names
    /// the realm, which gets `grant_type=refresh_token` by POST.
    async fn exchange_identity_token(
        &self,
        http: &reqwest::Client,
        endpoint: &Endpoint,
        oci_ref: &oci_client::Reference,
        token: &str,
        name: &str,
    ) -> Result<RegistryAuth, PullError> {
        let host = oci_ref.resolve_registry().to_string();
        let failed = self.http_error(&host);
        let scheme = if endpoint.plain_http { "http" } else { "https" };
        let ping = http
            .get(format!("{scheme}://{host}/v2/"))
            .send()
            .await
            .map_err(&failed)?;
        if ping.status() != reqwest::StatusCode::UNAUTHORIZED {
            // The registry does not ask for credentials.
            return Ok(RegistryAuth::Anonymous);
        }
        let unauthorized = || PullError::Unauthorized(name.to_string());
        let (realm, service) = ping
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_bearer_challenge)
            .ok_or_else(unauthorized)?;
        let scope = format!("repository:{}:pull", oci_ref.repository());
        let response = http
            .post(&realm)
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", token),
                ("service", service.as_str()),
                ("scope", scope.as_str()),
                ("client_id", "vmpod"),
            ])
            .send()
            .await
            .map_err(&failed)?;
        if !response.status().is_success() {
            return Err(unauthorized());
        }
        let body = read_bounded(response, MAX_TOKEN_RESPONSE as u64)
            .await
            .map_err(&failed)?
            .ok_or_else(unauthorized)?;
        #[derive(Deserialize)]
        struct TokenResponse {
            access_token: Option<String>,
            token: Option<String>,
        }
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|_| unauthorized())?;
        parsed
            .access_token
            .or(parsed.token)
            .filter(|t| !t.is_empty())
            .map(RegistryAuth::Bearer)
            .ok_or_else(unauthorized)
    }

    /// GETs a manifest, reading at most [`manifest::MAX_MANIFEST_BYTES`]
    /// of its body: oci-client negotiates the registry's auth (Basic, or a
    /// Bearer token from its realm) and hands us the token, but its own
    /// manifest GET buffers a body of any size, so the GET is ours.
    async fn fetch_manifest(
        &self,
        client: &oci_client::Client,
        http: &reqwest::Client,
        oci_ref: &oci_client::Reference,
        auth: &RegistryAuth,
        endpoint: &Endpoint,
        expected: Option<&str>,
    ) -> Result<(Vec<u8>, String), PullError> {
        let timeout = self.config.request_timeout();
        let host = endpoint.host.as_str();
        let bytes = tokio::time::timeout(
            timeout,
            self.get_manifest_bounded(client, http, oci_ref, auth, endpoint),
        )
        .await
        .map_err(|_| PullError::Timeout {
            endpoint: host.to_string(),
            timeout,
        })??;
        // Our own check, whatever the client did: the digest is the identity.
        let digest = sha256_digest(&bytes);
        if let Some(expected) = expected
            && digest != expected
        {
            return Err(PullError::DigestMismatch {
                what: "manifest",
                endpoint: host.to_string(),
                expected: expected.to_string(),
            });
        }
        Ok((bytes, digest))
    }

    async fn get_manifest_bounded(
        &self,
        client: &oci_client::Client,
        http: &reqwest::Client,
        oci_ref: &oci_client::Reference,
        auth: &RegistryAuth,
        endpoint: &Endpoint,
    ) -> Result<Vec<u8>, PullError> {
        let host = endpoint.host.as_str();
        let name = oci_ref.whole();
        let token = client
            .auth(oci_ref, auth, oci_client::RegistryOperation::Pull)
            .await
            .map_err(|e| classify(e, host, &name))?;
        let scheme = if endpoint.plain_http { "http" } else { "https" };
        let url = format!(
            "{scheme}://{host}/v2/{}/manifests/{}",
            oci_ref.repository(),
            oci_ref.digest().or(oci_ref.tag()).unwrap_or("latest")
        );
        let failed = self.http_error(host);
        let mut request = http
            .get(&url)
            .header(reqwest::header::ACCEPT, manifest::ACCEPTED.join(", "));
        request = match (token, auth) {
            (Some(token), _) => request.bearer_auth(token),
            (None, RegistryAuth::Basic(user, password)) => request.basic_auth(user, Some(password)),
            _ => request,
        };
        let mut response = request.send().await.map_err(&failed)?;
        let status = response.status();
        if status == reqwest::StatusCode::OK {
            let limit = manifest::MAX_MANIFEST_BYTES;
            return read_bounded(response, limit).await.map_err(&failed)?.ok_or(
                PullError::TooLarge {
                    what: "manifest",
                    digest: name,
                    limit,
                },
            );
        }
        // An error's body only for its message: what fits.
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            let room = MAX_ERROR_BODY.saturating_sub(body.len());
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if room <= chunk.len() {
                break;
            }
        }
        let error = match status {
            reqwest::StatusCode::UNAUTHORIZED => {
                OciDistributionError::UnauthorizedError { url: url.clone() }
            }
            s if s.is_client_error() => {
                match serde_json::from_slice::<oci_client::errors::OciEnvelope>(&body) {
                    Ok(envelope) => OciDistributionError::RegistryError {
                        envelope,
                        url: url.clone(),
                    },
                    Err(_) => OciDistributionError::ServerError {
                        code: s.as_u16(),
                        url: url.clone(),
                        message: String::from_utf8_lossy(&body).into_owned(),
                    },
                }
            }
            s => OciDistributionError::ServerError {
                code: s.as_u16(),
                url: url.clone(),
                message: String::from_utf8_lossy(&body).into_owned(),
            },
        };
        Err(classify(error, host, &name))
    }
}

/// How much of a registry's error answer is kept (for its message).
const MAX_ERROR_BODY: usize = 64 << 10;

/// A response's body, or None once it passes `limit` bytes (a declared
/// length over it is refused before reading; a chunked body is cut there).
async fn read_bounded(
    mut response: reqwest::Response,
    limit: u64,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if response.content_length().is_some_and(|n| n > limit) {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if (body.len() + chunk.len()) as u64 > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

impl RemoteImage {
    /// The endpoint that served the manifest (layers come from it too).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Downloads one layer into the store: bounded by its descriptor size,
    /// verified, and renamed into place only then. A dropped future leaves
    /// no file behind.
    pub async fn fetch_layer(
        &self,
        store: &Store,
        layer: &LayerRecord,
        max_bytes: u64,
        progress: Progress<'_>,
    ) -> Result<(), PullError> {
        if layer.size > max_bytes {
            return Err(PullError::TooLarge {
                what: "layer",
                digest: layer.digest.clone(),
                limit: max_bytes,
            });
        }
        let desc = OciDescriptor {
            digest: layer.digest.clone(),
            size: layer.size as i64,
            media_type: layer.media_type.clone(),
            ..OciDescriptor::default()
        };
        let timeout = self.request_timeout;
        let endpoint = self.endpoint.clone();
        let name = self.oci_ref.whole();
        let stream =
            tokio::time::timeout(timeout, self.client.pull_blob_stream(&self.oci_ref, &desc))
                .await
                .map_err(|_| PullError::Timeout {
                    endpoint: endpoint.clone(),
                    timeout,
                })?
                .map_err(|e| classify(e, &endpoint, &name))?;
        let mut stream = stream.stream;
        let mut writer = store.blob_writer(&layer.digest, layer.size)?;
        let mut reported = 0u64;
        loop {
            // The client's read timeout bounds stalls too; this is the backstop.
            let next = tokio::time::timeout(timeout, stream.next())
                .await
                .map_err(|_| PullError::Timeout {
                    endpoint: endpoint.clone(),
                    timeout,
                })?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| {
                // The client checks the digest at the end of the stream too.
                let mismatch = e
                    .get_ref()
                    .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>());
                if mismatch {
                    PullError::DigestMismatch {
                        what: "layer",
                        endpoint: endpoint.clone(),
                        expected: layer.digest.clone(),
                    }
                } else {
                    PullError::Registry {
                        endpoint: endpoint.clone(),
                        source: OciDistributionError::IoError(e),
                    }
                }
            })?;
            writer.write(&chunk).await.map_err(|e| match e {
                StoreError::TooLarge { digest, limit } => PullError::TooLarge {
                    what: "layer",
                    digest,
                    limit,
                },
                other => PullError::Store(other),
            })?;
            if writer.written() - reported >= 1 << 20 {
                reported = writer.written();
                progress(PullEvent::LayerProgress {
                    digest: layer.digest.clone(),
                    done: reported,
                    total: layer.size,
                });
            }
        }
        writer.commit().await.map_err(|e| match e {
            StoreError::DigestMismatch { expected, .. } => PullError::DigestMismatch {
                what: "layer",
                endpoint: endpoint.clone(),
                expected,
            },
            other => PullError::Store(other),
        })?;
        progress(PullEvent::LayerDone {
            digest: layer.digest.clone(),
        });
        Ok(())
    }
}

/// Keeps NotFound and Unauthorized distinct from everything else: the CRI
/// caller reports them differently.
fn classify(error: OciDistributionError, endpoint: &str, name: &str) -> PullError {
    let not_found = || PullError::NotFound(name.to_string());
    let unauthorized = || PullError::Unauthorized(name.to_string());
    match &error {
        OciDistributionError::ImageManifestNotFoundError(_) => return not_found(),
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => return unauthorized(),
        OciDistributionError::ServerError { code: 404, .. } => return not_found(),
        OciDistributionError::ServerError {
            code: 401 | 403, ..
        } => return unauthorized(),
        OciDistributionError::RegistryError { envelope, .. } => {
            for e in &envelope.errors {
                match e.code {
                    OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::BlobUnknown
                    | OciErrorCode::NotFound => return not_found(),
                    OciErrorCode::Unauthorized | OciErrorCode::Denied => return unauthorized(),
                    _ => {}
                }
            }
        }
        _ => {}
    }
    PullError::Registry {
        endpoint: endpoint.to_string(),
        source: error,
    }
}

#[cfg(test)]
mod tests {

    #[tokio::test]
    async fn a_bounded_buffer_refuses_bytes_past_its_limit() {
        use tokio::io::AsyncWriteExt;
        let mut b = BoundedBuf::new(10);
        b.write_all(b"0123456789").await.unwrap();
        assert!(!b.overflowed);
        assert!(b.write_all(b"x").await.is_err());
        assert!(b.overflowed);
        assert_eq!(b.buf, b"0123456789");
    }

    use super::*;

    #[test]
    fn config_parses_mirrors_in_order_and_defaults_to_https_origin() {
        let cfg: RegistryConfig = toml::from_str(
            r#"
            request_timeout_secs = 5
            [hosts."docker.io"]
            endpoints = [{ host = "127.0.0.1:5000", plain_http = true }, { host = "registry-1.docker.io" }]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.request_timeout_secs, 5);
        assert_eq!(cfg.max_concurrent_downloads, 4);
        let eps = cfg.endpoints("docker.io");
        assert_eq!(eps.len(), 2);
        assert!(eps[0].plain_http);
        assert!(!eps[1].plain_http);
        assert_eq!(
            cfg.endpoints("quay.io"),
            vec![Endpoint {
                host: "quay.io".into(),
                plain_http: false
            }]
        );
        assert!(toml::from_str::<RegistryConfig>("bogus = 1").is_err());
    }

    #[test]
    fn bearer_challenges_are_parsed() {
        assert_eq!(
            parse_bearer_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#
            ),
            Some((
                "https://auth.example/token".into(),
                "registry.example".into()
            ))
        );
        assert_eq!(
            parse_bearer_challenge("bearer realm=http://x/t, service=s"),
            Some(("http://x/t".into(), "s".into()))
        );
        assert_eq!(parse_bearer_challenge(r#"Basic realm="x""#), None);
        assert_eq!(parse_bearer_challenge(r#"Bearer service="s""#), None);
        assert_eq!(
            parse_bearer_challenge(r#"Bearer realm="unterminated"#),
            None
        );
    }

    #[test]
    fn credentials_never_print_secrets() {
        let c = Credentials::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", Credentials::RegistryToken("tok".into())).contains("tok"));
    }
}
