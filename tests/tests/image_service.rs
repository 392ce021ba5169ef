//! The CRI ImageService through a real tonic server on a temp unix socket,
//! driven by the k8s-cri client, against a real local registry.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::{
    AuthConfig, ImageFilter, ImageFsInfoRequest, ImageSpec, ImageStatusRequest, ListImagesRequest,
    PullImageRequest, RemoveImageRequest,
};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use vmpod::image::manager::{ImageConfig, ImageManager};
use vmpod::image::pull::{self, HostConfig};
use vmpod::image::service::{CriImageService, ImageUsage};
use vmpod_tests::oci_layout::{Compression, LayerTar, busybox_layer, layer, write_image};
use vmpod_tests::registry::TestRegistry;

/// A container store stand-in: the image IDs "containers" use.
#[derive(Default)]
struct FakeUsage(Mutex<HashSet<String>>);

impl ImageUsage for FakeUsage {
    fn in_use(&self, image_id: &str) -> bool {
        self.0.lock().unwrap().contains(image_id)
    }
}

async fn serve(
    socket: &Path,
    manager: Arc<ImageManager>,
    usage: Arc<FakeUsage>,
) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::UnixListener::bind(socket).expect("binding the CRI socket");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let service = CriImageService::new(manager, usage);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(ImageServiceServer::new(service))
            .serve_with_incoming(incoming)
            .await
            .expect("serving the image service");
    })
}

async fn connect(socket: &Path) -> ImageServiceClient<Channel> {
    let socket = socket.to_path_buf();
    // The URI is ignored: the connector dials the unix socket.
    let channel = Endpoint::try_from("http://[::]:0")
        .unwrap()
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("connecting to the CRI socket");
    ImageServiceClient::new(channel)
}

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_string(),
        ..ImageSpec::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_service_rpcs_over_a_unix_socket() {
    let registry = TestRegistry::start_with_basic_auth("bob", "pw");
    let layout = tempfile::tempdir().unwrap();
    let base = layer(&busybox_layer(), Compression::Gzip);
    let numeric = write_image(layout.path(), "numeric", &[base], "1000:1000");
    registry.push_layout(layout.path(), "numeric", "cri/app", &[]);
    let layout = tempfile::tempdir().unwrap();
    let t = LayerTar::new().file("named", 0o644, b"n").finish();
    let named = write_image(
        layout.path(),
        "named",
        &[layer(&t, Compression::Gzip)],
        "www-data",
    );
    registry.push_layout(layout.path(), "named", "cri/app", &[]);
    // The same image under a second name.
    registry.push_layout(layout.path(), "named", "cri/alias", &[]);

    let state = tempfile::tempdir().unwrap();
    let mut config = ImageConfig::default();
    config.registry.hosts.insert(
        registry.host(),
        HostConfig {
            endpoints: vec![pull::Endpoint {
                host: registry.host(),
                plain_http: true,
            }],
        },
    );
    let manager = Arc::new(ImageManager::open(state.path(), config).unwrap());
    let usage = Arc::new(FakeUsage::default());
    let socket = state.path().join("cri.sock");
    let server = serve(&socket, manager.clone(), usage.clone()).await;
    let mut client = connect(&socket).await;

    let numeric_ref = format!("{}/cri/app:numeric", registry.host());
    let named_ref = format!("{}/cri/app:named", registry.host());

    // Without credentials the registry refuses: Unauthenticated, not Internal.
    let err = client
        .pull_image(PullImageRequest {
            image: spec(&numeric_ref),
            ..PullImageRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // With the base64 `auth` field and with username/password.
    let auth = AuthConfig {
        auth: "Ym9iOnB3".into(), // bob:pw
        ..AuthConfig::default()
    };
    let pulled = client
        .pull_image(PullImageRequest {
            image: spec(&numeric_ref),
            auth: Some(auth),
            ..PullImageRequest::default()
        })
        .await
        .expect("PullImage")
        .into_inner();
    assert_eq!(pulled.image_ref, numeric.config);
    let auth = AuthConfig {
        username: "bob".into(),
        password: "pw".into(),
        ..AuthConfig::default()
    };
    client
        .pull_image(PullImageRequest {
            image: spec(&named_ref),
            auth: Some(auth),
            ..PullImageRequest::default()
        })
        .await
        .expect("PullImage with username/password");

    // ListImages, with and without a filter.
    let all = client
        .list_images(ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(all.len(), 2);
    let filtered = client
        .list_images(ListImagesRequest {
            filter: Some(ImageFilter {
                image: spec(&named_ref),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(filtered.len(), 1);
    assert_eq!(filtered[0].id, named.config);

    // ImageStatus by tag, digest, ID and short ID; uid vs username.
    let digest_ref = format!("{}/cri/app@{}", registry.host(), numeric.manifest);
    for query in [
        numeric_ref.clone(),
        digest_ref.clone(),
        numeric.config.clone(),
        numeric.config["sha256:".len()..].to_string(),
        numeric.config["sha256:".len().."sha256:".len() + 12].to_string(),
    ] {
        let status = client
            .image_status(ImageStatusRequest {
                image: spec(&query),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner();
        let image = status.image.unwrap_or_else(|| panic!("{query} not found"));
        assert_eq!(image.id, numeric.config);
        assert_eq!(image.uid.map(|u| u.value), Some(1000));
        assert_eq!(image.username, "");
        assert_eq!(image.repo_tags, vec![numeric_ref.clone()]);
        assert_eq!(image.repo_digests, vec![digest_ref.clone()]);
        assert!(image.size > 0);
    }
    let status = client
        .image_status(ImageStatusRequest {
            image: spec(&named_ref),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let image = status.image.unwrap();
    assert_eq!(image.uid, None);
    assert_eq!(image.username, "www-data");
    let info: serde_json::Value = serde_json::from_str(&status.info["info"]).unwrap();
    assert_eq!(info["imageSpec"]["config"]["User"], "www-data");
    assert_eq!(info["id"], named.config);

    // A missing image is an empty status, not an error.
    let missing = client
        .image_status(ImageStatusRequest {
            image: spec("docker.io/library/nothing:here"),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(missing.image.is_none());

    // An empty or malformed reference is InvalidArgument.
    let err = client
        .image_status(ImageStatusRequest {
            image: spec(""),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .pull_image(PullImageRequest {
            image: spec("Not A Reference"),
            ..PullImageRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A missing tag on the registry is NotFound.
    let err = client
        .pull_image(PullImageRequest {
            image: spec(&format!("{}/cri/app:absent", registry.host())),
            auth: Some(AuthConfig {
                username: "bob".into(),
                password: "pw".into(),
                ..AuthConfig::default()
            }),
            ..PullImageRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // ImageFsInfo counts the store.
    let fs = client
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let usage_now = &fs.image_filesystems[0];
    assert!(usage_now.used_bytes.as_ref().unwrap().value > 1_000_000);
    assert!(usage_now.inodes_used.as_ref().unwrap().value >= 6);
    assert_eq!(
        usage_now.fs_id.as_ref().unwrap().mountpoint,
        state.path().display().to_string()
    );

    // RemoveImage refuses while a container uses the image...
    usage.0.lock().unwrap().insert(numeric.config.clone());
    let err = client
        .remove_image(RemoveImageRequest {
            image: spec(&numeric.config),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(manager.find(&numeric.config).is_some());
    usage.0.lock().unwrap().clear();

    // An image with two tags loses only the tag named...
    let alias_ref = format!("{}/cri/alias:named", registry.host());
    client
        .pull_image(PullImageRequest {
            image: spec(&alias_ref),
            auth: Some(AuthConfig {
                username: "bob".into(),
                password: "pw".into(),
                ..AuthConfig::default()
            }),
            ..PullImageRequest::default()
        })
        .await
        .expect("PullImage of the alias");
    let both = manager.find(&alias_ref).unwrap();
    assert_eq!(both.id, named.config);
    assert_eq!(both.repo_tags.len(), 2, "{:?}", both.repo_tags);
    client
        .remove_image(RemoveImageRequest {
            image: spec(&alias_ref),
        })
        .await
        .expect("RemoveImage of one tag");
    let left = manager
        .find(&named_ref)
        .expect("image kept for its other tag");
    assert_eq!(left.repo_tags, vec![named_ref.clone()]);
    assert!(manager.find(&alias_ref).is_none());

    // ...removes by ID with all its tags once it is free...
    client
        .remove_image(RemoveImageRequest {
            image: spec(&numeric.config),
        })
        .await
        .expect("RemoveImage by ID");
    assert!(manager.find(&numeric_ref).is_none());
    assert!(!manager.store().rootfs_path(&numeric.config).exists());
    // ...by tag too, and a second removal is not an error.
    for _ in 0..2 {
        client
            .remove_image(RemoveImageRequest {
                image: spec(&named_ref),
            })
            .await
            .expect("RemoveImage by tag");
    }
    let left = client
        .list_images(ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;
    assert!(left.is_empty(), "{left:?}");
    // No orphan blobs after the last image is gone.
    assert_eq!(
        std::fs::read_dir(state.path().join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );

    // A pull past its deadline is dropped by the server and leaves nothing.
    let layout = tempfile::tempdir().unwrap();
    let late = write_image(
        layout.path(),
        "late",
        &[layer(&busybox_layer(), Compression::Gzip)],
        "",
    );
    registry.push_layout(layout.path(), "late", "cri/late", &[]);
    let late_ref = format!("{}/cri/late:late", registry.host());
    let mut request = tonic::Request::new(PullImageRequest {
        image: spec(&late_ref),
        auth: Some(AuthConfig {
            username: "bob".into(),
            password: "pw".into(),
            ..AuthConfig::default()
        }),
        ..PullImageRequest::default()
    });
    request.set_timeout(std::time::Duration::from_millis(1));
    let err = client.pull_image(request).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{err:?}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_dir(state.path().join("tmp"))
        .unwrap()
        .next()
        .is_some()
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(manager.find(&late_ref).is_none());
    assert!(!manager.store().rootfs_path(&late.config).exists());
    assert_eq!(
        std::fs::read_dir(state.path().join("tmp")).unwrap().count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(state.path().join("ingest"))
            .unwrap()
            .count(),
        0
    );
    server.abort();
}
