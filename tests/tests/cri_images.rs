//! The CRI ImageService served by `vmpod serve` on its own socket, as
//! crictl and the kubelet use it: pull from a registry, run a pod and a
//! container from the pulled image, refuse to remove an image in use.

use k8s_cri::v1::*;
use tonic::Code;
use vmpod_tests::cri::*;
use vmpod_tests::oci_layout::{Compression, busybox_layer, layer, write_image};
use vmpod_tests::registry::TestRegistry;

/// `vmpod serve` that pulls from the test registry at `host` (plain HTTP).
fn daemon_pulling_from(host: &str) -> Daemon {
    Daemon::start(&format!(
        "[image.registry]\nrequest_timeout_secs = 10\n\
         [image.registry.hosts.\"{host}\"]\nendpoints = [{{ host = \"{host}\", plain_http = true }}]\n"
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn pulled_images_run_in_pods_through_the_cri_socket() {
    let registry = TestRegistry::start();
    let layout = tempfile::tempdir().unwrap();
    write_image(
        layout.path(),
        "v1",
        &[layer(&busybox_layer(), Compression::Gzip)],
        "",
    );
    registry.push_layout(layout.path(), "v1", "test/busybox", &[]);
    let host = registry.host();
    let d = daemon_pulling_from(&host);
    let mut images = d.image_client().await;
    let mut cri = d.client().await;
    let image = format!("{host}/test/busybox:v1");
    let spec = || {
        Some(ImageSpec {
            image: image.clone(),
            ..Default::default()
        })
    };

    let pulled = images
        .pull_image(PullImageRequest {
            image: spec(),
            ..Default::default()
        })
        .await
        .expect("PullImage through the daemon")
        .into_inner();
    assert!(pulled.image_ref.starts_with("sha256:"), "{pulled:?}");
    let listed = images
        .list_images(ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner();
    assert!(
        listed
            .images
            .iter()
            .any(|i| i.id == pulled.image_ref && i.repo_tags.contains(&image)),
        "{listed:?}"
    );

    let pod = run_pod(&mut cri, pod_config(&d, "pulled", &[])).await;
    let mut config = container_config("c", &["sh", "-c"], &["echo from-the-registry"]);
    config.image = spec();
    let id = run_container(&mut cri, &pod, config).await;
    let st = wait_exited(&mut cri, &id).await;
    assert_eq!(st.exit_code, 0, "{st:?}");
    assert_eq!(
        st.image_ref, pulled.image_ref,
        "the container ran the pulled image"
    );
    let lines = log_lines(&d.log_root().join("pulled/c/0.log"), 1).await;
    assert_eq!(parse_record(&lines[0]).3, "from-the-registry");

    // In use: RemoveImage refuses; once the container is gone it works.
    let remove = || RemoveImageRequest { image: spec() };
    assert_eq!(
        code(images.remove_image(remove()).await),
        Code::FailedPrecondition
    );
    cri.remove_container(RemoveContainerRequest { container_id: id })
        .await
        .expect("RemoveContainer");
    images.remove_image(remove()).await.expect("RemoveImage");
    let status = images
        .image_status(ImageStatusRequest {
            image: spec(),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner();
    assert!(status.image.is_none(), "removed: {status:?}");
    stop_remove_pod(&mut cri, &pod).await;
}

/// `vmpod run` of an image the daemon does not have pulls it through the
/// daemon's ImageService, then runs it.
#[tokio::test(flavor = "multi_thread")]
async fn vmpod_run_pulls_a_missing_image() {
    let registry = TestRegistry::start();
    let layout = tempfile::tempdir().unwrap();
    write_image(
        layout.path(),
        "v2",
        &[layer(&busybox_layer(), Compression::Gzip)],
        "",
    );
    registry.push_layout(layout.path(), "v2", "test/run", &[]);
    let host = registry.host();
    let d = daemon_pulling_from(&host);
    let image = format!("{host}/test/run:v2");
    let out = d
        .vmpod_run("", 60, &image, &["sh", "-c", "echo pulled-and-ran"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, b"pulled-and-ran\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pulling"),
        "{out:?}"
    );
    let listed = d
        .image_client()
        .await
        .list_images(ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner()
        .images;
    assert!(
        listed.iter().any(|i| i.repo_tags.contains(&image)),
        "{listed:?}"
    );
    assert_no_leaks(&d, &[]);
}

/// Images pulled by digest, through stock crictl: `repo@sha256:…` is
/// listed with that repo digest and no tag, resolves in ImageStatus by
/// digest and by ID alike (critest's "all kinds of references"), and
/// `crictl rmi` by the digest removes it. A `repo:tag@sha256:…` reference
/// pulls the digest; as containerd, the tag is dropped.
#[tokio::test(flavor = "multi_thread")]
async fn images_pulled_by_digest_through_crictl() {
    use vmpod_tests::crictl::Crictl;
    let registry = TestRegistry::start();
    let layout = tempfile::tempdir().unwrap();
    let built = write_image(
        layout.path(),
        "v1",
        &[layer(&busybox_layer(), Compression::Gzip)],
        "",
    );
    registry.push_layout(layout.path(), "v1", "test/pinned", &[]);
    let host = registry.host();
    let d = daemon_pulling_from(&host);
    let crictl = Crictl::new(&d);
    let mut images = d.image_client().await;
    let status = |reference: String| {
        let mut images = images.clone();
        async move {
            images
                .image_status(ImageStatusRequest {
                    image: Some(ImageSpec {
                        image: reference,
                        ..Default::default()
                    }),
                    verbose: false,
                })
                .await
                .expect("ImageStatus")
                .into_inner()
                .image
        }
    };
    let by_digest = format!("{host}/test/pinned@{}", built.manifest);
    let with_tag = format!("{host}/test/pinned:v1@{}", built.manifest);
    for reference in [&by_digest, &with_tag] {
        crictl.ok(&["pull", reference]).await;
        let listed = crictl.ok(&["images", "--digests", "--no-trunc"]).await;
        assert!(
            listed.contains(built.manifest.trim_start_matches("sha256:")),
            "{listed}"
        );
        let image = status(reference.clone()).await.expect("pulled");
        assert!(image.repo_tags.is_empty(), "{image:?}");
        assert_eq!(image.repo_digests, vec![by_digest.clone()]);
        assert_eq!(image.id, built.config);
        for other in [by_digest.clone(), image.id.clone()] {
            assert_eq!(status(other).await.as_ref(), Some(&image));
        }
        crictl.ok(&["rmi", reference]).await;
        assert_eq!(status(reference.clone()).await, None, "{reference} removed");
    }
    let left = images
        .list_images(ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner();
    assert!(left.images.iter().all(|i| i.id != built.config), "{left:?}");
}
