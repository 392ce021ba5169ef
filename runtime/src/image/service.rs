//! The CRI v1 ImageService over the image manager.
//!
//! Each RPC is a thin method that validates its request, calls the
//! manager, and goes through `instrument` and [`to_status`], the one place where errors
//! become gRPC statuses (so NotFound stays NotFound at the kubelet).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use k8s_cri::v1::image_service_server::ImageService;
use k8s_cri::v1::{
    AuthConfig, FilesystemIdentifier, FilesystemUsage, Image, ImageFsInfoRequest,
    ImageFsInfoResponse, ImageSpec, ImageStatusRequest, ImageStatusResponse, Int64Value,
    ListImagesRequest, ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse, UInt64Value,
};
use tonic::{Code, Request, Response, Status};

use super::manager::{ImageError, ImageManager, Removed};
use super::manifest::{self, split_user};
use super::pull::{Credentials, PullError};
use super::store::ImageRecord;
use super::unpack::UnpackError;

/// Tells the image service whether a container still uses an image; the
/// CRI runtime service implements it over its container store.
pub trait ImageUsage: Send + Sync {
    /// Whether any container was created from the image ID.
    fn in_use(&self, image_id: &str) -> bool;

    /// The filesystem of containers' writable layers on the node, for
    /// ImageFsInfo's `container_filesystems`; None: the runtime has none
    /// (layers in memory only).
    fn container_fs(&self) -> Option<ContainerFs> {
        None
    }
}

/// What containers' writable layers take on the node's disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerFs {
    /// Where they live (the mountpoint reported as the filesystem's ID).
    pub mountpoint: String,
    /// Bytes the layers' files take (allocated: sparse files count only
    /// what was written).
    pub used_bytes: u64,
    /// The node's inodes they take: one per layer file.
    pub inodes_used: u64,
}

/// The CRI ImageService.
pub struct CriImageService {
    manager: Arc<ImageManager>,
    usage: Arc<dyn ImageUsage>,
}

impl CriImageService {
    /// Serves `manager`, refusing to remove images `usage` reports in use.
    pub fn new(manager: Arc<ImageManager>, usage: Arc<dyn ImageUsage>) -> Self {
        Self { manager, usage }
    }
}

/// Runs one RPC: a span, its latency in the log, and the error mapping.
async fn instrument<T, F>(rpc: &'static str, fut: F) -> Result<Response<T>, Status>
where
    F: std::future::Future<Output = Result<T, ImageError>>,
{
    let span = tracing::info_span!("cri", rpc);
    let _enter = span.enter();
    let start = Instant::now();
    let result = fut.await;
    let elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    match result {
        Ok(v) => {
            tracing::debug!(rpc, elapsed_ms, "ok");
            Ok(Response::new(v))
        }
        Err(e) => {
            let status = to_status(&e);
            tracing::warn!(rpc, elapsed_ms, code = ?status.code(), error = %status.message(), "failed");
            Err(status)
        }
    }
}

/// The one mapping from image errors to gRPC codes.
pub fn to_status(error: &ImageError) -> Status {
    let code = match error {
        ImageError::Reference(_) => Code::InvalidArgument,
        ImageError::NotFound(_) => Code::NotFound,
        ImageError::InUse(_) => Code::FailedPrecondition,
        ImageError::Pull(_, e) => match e {
            PullError::NotFound(_) => Code::NotFound,
            PullError::Unauthorized(_) => Code::Unauthenticated,
            PullError::Timeout { .. } => Code::DeadlineExceeded,
            PullError::DigestMismatch { .. } => Code::DataLoss,
            PullError::Manifest { .. } | PullError::TooLarge { .. } => Code::FailedPrecondition,
            PullError::Registry { .. } | PullError::NoEndpoints(_) => Code::Unavailable,
            PullError::Store(_) => Code::Internal,
        },
        ImageError::Manifest(..) | ImageError::Import { .. } => Code::FailedPrecondition,
        ImageError::Unpack(_, e) => match e {
            UnpackError::Io { .. } | UnpackError::Cancelled => Code::Internal,
            _ => Code::FailedPrecondition,
        },
        ImageError::Erofs(..) | ImageError::Store(_) | ImageError::Task(_) => Code::Internal,
    };
    Status::new(code, crate::error_chain(error))
}

fn spec_image(spec: Option<&ImageSpec>) -> Result<&str, ImageError> {
    match spec.map(|s| s.image.as_str()) {
        Some(image) if !image.is_empty() => Ok(image),
        _ => Err(ImageError::Reference(
            super::reference::ReferenceError::Empty,
        )),
    }
}

fn to_cri(record: &ImageRecord) -> Image {
    let (uid, username) = split_user(&record.user);
    Image {
        id: record.id.clone(),
        repo_tags: record.repo_tags.clone(),
        repo_digests: record.repo_digests.clone(),
        size: record.size,
        uid: uid.map(|value| Int64Value { value }),
        username,
        spec: Some(ImageSpec {
            image: record.id.clone(),
            ..ImageSpec::default()
        }),
        pinned: false,
    }
}

/// Credentials from a CRI `AuthConfig`: a registry token wins, then an
/// identity token, then username/password, then the base64 `auth` pair.
pub fn credentials(auth: Option<&AuthConfig>) -> Result<Credentials, ImageError> {
    let Some(auth) = auth else {
        return Ok(Credentials::Anonymous);
    };
    if !auth.registry_token.is_empty() {
        return Ok(Credentials::RegistryToken(auth.registry_token.clone()));
    }
    if !auth.identity_token.is_empty() {
        return Ok(Credentials::IdentityToken(auth.identity_token.clone()));
    }
    if !auth.username.is_empty() {
        return Ok(Credentials::Basic {
            username: auth.username.clone(),
            password: auth.password.clone(),
        });
    }
    if !auth.auth.is_empty() {
        let bad = || {
            ImageError::Pull(
                auth.server_address.clone(),
                PullError::Unauthorized("malformed auth field".into()),
            )
        };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .map_err(|_| bad())?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
        let (username, password) = decoded.split_once(':').ok_or_else(bad)?;
        return Ok(Credentials::Basic {
            username: username.to_string(),
            password: password.to_string(),
        });
    }
    Ok(Credentials::Anonymous)
}

impl CriImageService {
    async fn list_images(&self, req: ListImagesRequest) -> Result<ListImagesResponse, ImageError> {
        let wanted = req
            .filter
            .as_ref()
            .and_then(|f| f.image.as_ref())
            .map(|s| s.image.as_str())
            .filter(|s| !s.is_empty());
        let images = match wanted {
            Some(query) => self.manager.find(query).into_iter().collect(),
            None => self.manager.list(),
        };
        Ok(ListImagesResponse {
            images: images.iter().map(to_cri).collect(),
        })
    }

    async fn image_status(
        &self,
        req: ImageStatusRequest,
    ) -> Result<ImageStatusResponse, ImageError> {
        let query = spec_image(req.image.as_ref())?;
        // A missing image is an empty answer, not an error (CRI contract).
        let Some(record) = self.manager.find(query) else {
            return Ok(ImageStatusResponse::default());
        };
        let mut info = HashMap::new();
        if req.verbose {
            let config: serde_json::Value = self
                .manager
                .store()
                .read_blob(&record.id, manifest::MAX_CONFIG_BYTES)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(serde_json::Value::Null);
            let verbose = serde_json::json!({
                "id": record.id,
                "manifestDigest": record.manifest_digest,
                "layers": record.layers,
                "rootfs": self.manager.store().rootfs_path(&record.id),
                "rootfsSize": record.rootfs_size,
                "imageSpec": config,
            });
            info.insert("info".to_string(), verbose.to_string());
        }
        Ok(ImageStatusResponse {
            image: Some(to_cri(&record)),
            info,
        })
    }

    async fn pull_image(&self, req: PullImageRequest) -> Result<PullImageResponse, ImageError> {
        let reference = spec_image(req.image.as_ref())?;
        let credentials = credentials(req.auth.as_ref())?;
        let record = self.manager.pull(reference, &credentials, &|_| {}).await?;
        Ok(PullImageResponse {
            image_ref: record.id,
        })
    }

    async fn remove_image(
        &self,
        req: RemoveImageRequest,
    ) -> Result<RemoveImageResponse, ImageError> {
        let query = spec_image(req.image.as_ref())?;
        let usage = self.usage.clone();
        match self.manager.remove(query, &|id| usage.in_use(id)).await? {
            Removed::NotFound => tracing::debug!(query, "remove: no such image"),
            Removed::Untagged(tag) => tracing::info!(tag, "untagged"),
            Removed::Deleted(r) => tracing::info!(id = r.id, "removed image"),
        }
        Ok(RemoveImageResponse {})
    }

    async fn image_fs_info(&self) -> Result<ImageFsInfoResponse, ImageError> {
        let usage = self.manager.fs_usage().await?;
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        Ok(ImageFsInfoResponse {
            image_filesystems: vec![FilesystemUsage {
                timestamp,
                fs_id: Some(FilesystemIdentifier {
                    mountpoint: self.manager.store().root().display().to_string(),
                }),
                used_bytes: Some(UInt64Value { value: usage.bytes }),
                inodes_used: Some(UInt64Value {
                    value: usage.inodes,
                }),
            }],
            container_filesystems: self
                .usage
                .container_fs()
                .map(|fs| FilesystemUsage {
                    timestamp,
                    fs_id: Some(FilesystemIdentifier {
                        mountpoint: fs.mountpoint,
                    }),
                    used_bytes: Some(UInt64Value {
                        value: fs.used_bytes,
                    }),
                    inodes_used: Some(UInt64Value {
                        value: fs.inodes_used,
                    }),
                })
                .into_iter()
                .collect(),
        })
    }
}

#[tonic::async_trait]
impl ImageService for CriImageService {
    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        instrument("ListImages", self.list_images(request.into_inner())).await
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        instrument("ImageStatus", self.image_status(request.into_inner())).await
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        instrument("PullImage", self.pull_image(request.into_inner())).await
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        instrument("RemoveImage", self.remove_image(request.into_inner())).await
    }

    async fn image_fs_info(
        &self,
        _request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        instrument("ImageFsInfo", self.image_fs_info()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_config_becomes_credentials() {
        let auth = |f: &dyn Fn(&mut AuthConfig)| {
            let mut a = AuthConfig::default();
            f(&mut a);
            credentials(Some(&a)).unwrap()
        };
        assert_eq!(credentials(None).unwrap(), Credentials::Anonymous);
        assert_eq!(
            auth(&|a| {
                a.username = "u".into();
                a.password = "p".into();
            }),
            Credentials::Basic {
                username: "u".into(),
                password: "p".into()
            }
        );
        assert_eq!(
            auth(&|a| a.auth = "dTpwOnE=".into()),
            Credentials::Basic {
                username: "u".into(),
                password: "p:q".into()
            }
        );
        assert_eq!(
            auth(&|a| a.registry_token = "t".into()),
            Credentials::RegistryToken("t".into())
        );
        assert_eq!(
            auth(&|a| a.identity_token = "i".into()),
            Credentials::IdentityToken("i".into())
        );
        let bad = AuthConfig {
            auth: "!!!".into(),
            ..AuthConfig::default()
        };
        assert!(credentials(Some(&bad)).is_err());
    }

    #[test]
    fn error_kinds_survive_the_mapping() {
        let nf = ImageError::Pull("x".into(), PullError::NotFound("x".into()));
        assert_eq!(to_status(&nf).code(), Code::NotFound);
        let bad = ImageError::Reference(super::super::reference::ReferenceError::Empty);
        assert_eq!(to_status(&bad).code(), Code::InvalidArgument);
        assert_eq!(
            to_status(&ImageError::InUse("i".into())).code(),
            Code::FailedPrecondition
        );
        let esc = ImageError::Unpack("i".into(), UnpackError::PathEscape("../x".into()));
        let status = to_status(&esc);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("../x"), "{}", status.message());
    }
}
