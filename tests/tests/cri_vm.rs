//! The CRI server end to end on the VM backend: hypervisor `qemu` under TCG
//! (this machine's KVM cannot boot a stock guest), vsock through
//! `vhost-device-vsock`, the demo image as a virtio-blk disk, volumes and
//! an image pulled after the boot through the pod's virtiofsd. One pod VM
//! carries the whole scenario, including a daemon kill -9 and re-adoption,
//! because every boot costs seconds under TCG.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use tonic::Code;
use vmpod::hypervisor::qemu::VhostVsock;
use vmpod::sandbox::shared_fs::virtiofsd_binary;
use vmpod_tests::cri::*;
use vmpod_tests::oci_layout::{Compression, busybox_layer, layer, write_image};
use vmpod_tests::registry::TestRegistry;
use vmpod_tests::{require_program, sha256_digest};

async fn run_vm_pod(cri: &mut Cri, config: PodSandboxConfig) -> String {
    cri.run_pod_sandbox(RunPodSandboxRequest {
        config: Some(config),
        runtime_handler: "vm".into(),
    })
    .await
    .unwrap_or_else(|s| panic!("RunPodSandbox on the vm handler: {s:?}"))
    .into_inner()
    .pod_sandbox_id
}

fn mount(host: &Path, container: &str, readonly: bool) -> Mount {
    Mount {
        container_path: container.into(),
        host_path: host.display().to_string(),
        readonly,
        ..Default::default()
    }
}

/// sh -c `script` in a container; (exit code, stdout, stderr).
async fn sh(cri: &mut Cri, id: &str, script: &str) -> (i32, String, String) {
    let r = exec(cri, id, &["sh", "-c", script], 120)
        .await
        .unwrap_or_else(|s| panic!("ExecSync {script:?}: {s:?}"));
    (
        r.exit_code,
        String::from_utf8_lossy(&r.stdout).into_owned(),
        String::from_utf8_lossy(&r.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_pod_lifecycle_logs_exec_volumes_late_images_and_restart() {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    assert!(
        VhostVsock::binary().is_file(),
        "vhost-device-vsock is not installed: `cargo install vhost-device-vsock --locked` (scripts/install-deps does)"
    );
    assert!(
        virtiofsd_binary().is_file(),
        "virtiofsd is not installed: `cargo install virtiofsd --locked` (scripts/install-deps does)"
    );
    // An image that exists only in a registry until the pod has booted.
    let registry = TestRegistry::start();
    let layout = tempfile::tempdir().unwrap();
    write_image(
        layout.path(),
        "late",
        &[layer(&busybox_layer(), Compression::Gzip)],
        "",
    );
    registry.push_layout(layout.path(), "late", "test/late", &[]);
    let host = registry.host();
    let mut d = Daemon::start(&format!(
        "[image.registry]\nrequest_timeout_secs = 10\n\
         [image.registry.hosts.\"{host}\"]\nendpoints = [{{ host = \"{host}\", plain_http = true }}]\n"
    ));
    let mut cri = d.client().await;
    let pod = run_vm_pod(&mut cri, pod_config(&d, "vmweb", &[])).await;
    let sandbox_dir = d.state_dir().join("sandboxes").join(&pod);
    let st = cri
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: true,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner();
    assert_eq!(
        st.status.as_ref().map(|s| s.state),
        Some(PodSandboxState::SandboxReady as i32)
    );
    assert!(
        st.info["info"].contains("\"kind\":\"qemu\""),
        "{:?}",
        st.info
    );

    let c = create(
        &mut cri,
        &pod,
        container_config(
            "main",
            &["sh", "-c"],
            &["echo hello; echo oops >&2; hostname; uname -r; while :; do sleep 1; done"],
        ),
    )
    .await;
    start(&mut cri, &c).await;
    let log = d.log_root().join("vmweb/main/0.log");
    let lines = log_lines(&log, 4).await;
    let msgs: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            let (_, stream, _, msg) = parse_record(l);
            (stream, msg)
        })
        .collect();
    assert!(msgs.contains(&("stdout", "hello")), "{lines:?}");
    assert!(msgs.contains(&("stderr", "oops")), "{lines:?}");
    assert!(msgs.contains(&("stdout", "vmweb-host")), "{lines:?}");
    // The container runs on the guest kernel, not the host's.
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    assert!(
        !msgs.contains(&("stdout", host_release.trim())),
        "the container must see the guest kernel: {lines:?}"
    );

    let r = exec(&mut cri, &c, &["sh", "-c", "echo in-vm; exit 5"], 30)
        .await
        .expect("ExecSync");
    assert_eq!((r.exit_code, r.stdout.as_slice()), (5, &b"in-vm\n"[..]));
    assert_eq!(
        exec(&mut cri, &c, &["sleep", "60"], 2)
            .await
            .expect_err("must time out")
            .code(),
        Code::DeadlineExceeded
    );

    // Volumes through the pod's virtiofsd, as a kubelet sends them: a
    // read-write hostPath, a read-only one, and single files (/etc/hosts,
    // the termination log).
    let rw = d.dir.path().join("vol-rw");
    let ro = d.dir.path().join("vol-ro");
    std::fs::create_dir(&rw).unwrap();
    std::fs::create_dir(&ro).unwrap();
    std::fs::write(ro.join("kept"), "read-only data\n").unwrap();
    let hosts = d.dir.path().join("etc-hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n10.9.8.7 vmweb-host\n").unwrap();
    let termination = d.dir.path().join("termination-log");
    std::fs::write(&termination, "").unwrap();
    let mut vol = container_config("vol", &["sleep", "100000"], &[]);
    vol.mounts = vec![
        mount(&rw, "/data", false),
        mount(&ro, "/ro", true),
        mount(&hosts, "/etc/hosts", false),
        mount(&termination, "/dev/termination-log", false),
    ];
    let v = run_container(&mut cri, &pod, vol.clone()).await;
    let (code_, _, err) = sh(&mut cri, &v, "echo from-the-guest > /data/written").await;
    assert_eq!(code_, 0, "{err}");
    assert_eq!(
        std::fs::read_to_string(rw.join("written")).unwrap(),
        "from-the-guest\n",
        "the host sees what the guest wrote"
    );
    std::fs::write(rw.join("from-host"), "host data\n").unwrap();
    assert_eq!(
        sh(&mut cri, &v, "cat /data/from-host").await.1,
        "host data\n"
    );
    assert_eq!(sh(&mut cri, &v, "cat /ro/kept").await.1, "read-only data\n");
    let (code_, _, err) = sh(&mut cri, &v, "echo x > /ro/new").await;
    assert_ne!(code_, 0, "a read-only volume took a write");
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(!ro.join("new").exists());
    assert_eq!(
        sh(&mut cri, &v, "cat /etc/hosts").await.1,
        "127.0.0.1 localhost\n10.9.8.7 vmweb-host\n"
    );
    let (code_, _, err) = sh(&mut cri, &v, "echo done > /dev/termination-log").await;
    assert_eq!(code_, 0, "{err}");
    assert_eq!(std::fs::read_to_string(&termination).unwrap(), "done\n");
    // A large file arrives whole (its read time is printed, not asserted;
    // docs/benchmarks.md has the figure).
    let big: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(rw.join("big"), &big).unwrap();
    let t = Instant::now();
    sh(&mut cri, &v, "true").await;
    eprintln!("an empty exec, for comparison: {:?}", t.elapsed());
    let t = Instant::now();
    let (code_, _, err) = sh(&mut cri, &v, "dd if=/data/big of=/dev/null bs=1M").await;
    eprintln!(
        "64 MiB dd through the volume (cold): {:?}: {}",
        t.elapsed(),
        err.trim()
    );
    assert_eq!(code_, 0, "{err}");
    let t = Instant::now();
    let (code_, out, err) = sh(&mut cri, &v, "sha256sum /data/big").await;
    eprintln!(
        "64 MiB sha256sum through the volume (guest page cache warm): {:?}",
        t.elapsed()
    );
    assert_eq!(code_, 0, "{err}");
    assert_eq!(
        format!("sha256:{}", out.split(' ').next().unwrap_or_default()),
        sha256_digest(&big)
    );
    std::fs::remove_file(rw.join("big")).unwrap();
    // Only the volumes are in the share, and the guest cannot add to it.
    let shared = sandbox_dir.join("shared");
    assert!(shared.join(&v).join("0/written").is_file());
    let err = std::fs::write(shared.join("planted"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    // A missing host path is refused as the host backend refuses it.
    let mut missing = container_config("missing", &["true"], &[]);
    missing.mounts = vec![mount(&d.dir.path().join("nope"), "/x", false)];
    assert_eq!(
        code(
            cri.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(missing),
                sandbox_config: None,
            })
            .await
        ),
        Code::InvalidArgument
    );

    // An image pulled after the boot: no disk for it, its erofs file goes
    // through the share and a loop device in the guest.
    let mut images = d.image_client().await;
    let late = format!("{host}/test/late:late");
    images
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: late.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("PullImage after the pod booted");
    let mut late_config = container_config("late", &["/bin/sh", "-c"], &["echo from-a-late-image"]);
    late_config.image = Some(ImageSpec {
        image: late.clone(),
        ..Default::default()
    });
    let l = create(&mut cri, &pod, late_config).await;
    assert!(
        sandbox_dir.join("mounts").join(&l).join("rootfs").is_file(),
        "the late image must be in the share"
    );
    start(&mut cri, &l).await;
    let st = wait_exited(&mut cri, &l).await;
    assert_eq!(st.exit_code, 0, "{st:?}");
    let lines = log_lines(&d.log_root().join("vmweb/late/0.log"), 1).await;
    assert_eq!(parse_record(&lines[0]).3, "from-a-late-image");
    cri.remove_container(RemoveContainerRequest {
        container_id: l.clone(),
    })
    .await
    .expect("RemoveContainer of the late image's container");
    assert!(!sandbox_dir.join("mounts").join(&l).exists());
    assert!(mounts_under(&sandbox_dir.join("shared").join(&l)).is_empty());

    // The daemon dies; the VM does not, and the new daemon adopts it.
    d.kill9_and_restart();
    let mut cri = d.client().await;
    assert_eq!(
        status(&mut cri, &c).await.state,
        ContainerState::ContainerRunning as i32
    );
    let r = exec(&mut cri, &c, &["echo", "adopted"], 30)
        .await
        .expect("ExecSync after restart");
    assert_eq!(r.stdout, b"adopted\n");
    // The share outlived the daemon; the new one withdraws what the old
    // one exposed.
    assert_eq!(
        sh(&mut cri, &v, "cat /data/written").await.1,
        "from-the-guest\n"
    );
    cri.remove_container(RemoveContainerRequest {
        container_id: v.clone(),
    })
    .await
    .expect("RemoveContainer of the volume container");
    let left = mounts_under(&sandbox_dir.join("mounts").join(&v));
    assert!(left.is_empty(), "{left:?}");
    assert!(!sandbox_dir.join("mounts").join(&v).exists());
    // The same volumes again in a new container of the running pod.
    vol.metadata.as_mut().unwrap().attempt = 1;
    let v2 = run_container(&mut cri, &pod, vol).await;
    assert_eq!(
        sh(&mut cri, &v2, "cat /data/written /ro/kept").await.1,
        "from-the-guest\nread-only data\n"
    );

    cri.stop_container(StopContainerRequest {
        container_id: c.clone(),
        timeout: 1,
    })
    .await
    .expect("StopContainer");
    // The shell dies of the SIGTERM (the host suite covers the escalation
    // to SIGKILL).
    let s = wait_exited(&mut cri, &c).await;
    assert_eq!(s.exit_code, 143, "{s:?}");
    // A new container in the same VM after the first one exited.
    let c2 = run_container(
        &mut cri,
        &pod,
        container_config("second", &["sleep", "1000"], &[]),
    )
    .await;
    let r = exec(&mut cri, &c2, &["true"], 30)
        .await
        .expect("exec in c2");
    assert_eq!(r.exit_code, 0);

    stop_remove_pod(&mut cri, &pod).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // No mount, virtiofsd or share dir left (assert_no_leaks checks the
    // mounts and processes under the test dir) and no volume data lost.
    assert_no_leaks(&d, &[pod]);
    assert!(!sandbox_dir.exists());
    assert_eq!(
        std::fs::read_to_string(rw.join("written")).unwrap(),
        "from-the-guest\n"
    );
    assert!(ro.join("kept").is_file() && hosts.is_file());
}

#[tokio::test(flavor = "multi_thread")]
async fn vmpod_run_in_a_vm() {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    let d = Daemon::start("");
    let out = d
        .vmpod_run(
            "vm",
            120,
            BUSYBOX,
            &["sh", "-c", "echo from-the-guest; exit 2"],
        )
        .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(out.stdout, b"from-the-guest\n");
    assert_no_leaks(&d, &[]);
}

/// A node with 20 images still starts QEMU pods: microvm has 8 virtio-mmio
/// slots, so only the images that fit get boot disks, and a container of
/// any other image runs from its erofs file through the pod's share.
#[tokio::test(flavor = "multi_thread")]
async fn a_qemu_pod_starts_with_twenty_images_on_the_node() {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    let layouts = tempfile::tempdir().unwrap();
    let mut extra = String::new();
    for i in 0..20 {
        let dir = layouts.path().join(format!("img{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        // A layer of its own makes a config, and so an image ID, of its own.
        let tar = vmpod_tests::oci_layout::LayerTar::new()
            .file("n", 0o644, format!("{i}\n").as_bytes())
            .finish();
        write_image(&dir, "latest", &[layer(&tar, Compression::Gzip)], "");
        extra.push_str(&format!(
            "[[static_images]]\nname = \"localhost/many/img{i}:latest\"\nerofs = \"{}\"\n\
             oci_layout = \"{}\"\n",
            vmpod_tests::artefact("demo-image.erofs").display(),
            dir.display()
        ));
    }
    let d = Daemon::start(&extra);
    let mut cri = d.client().await;
    let pod = run_vm_pod(&mut cri, pod_config(&d, "many", &[])).await;
    let info = cri
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: true,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner()
        .info;
    let verbose: serde_json::Value = serde_json::from_str(&info["info"]).unwrap();
    let disks = verbose["backend"]["image_disks"]
        .as_object()
        .expect("image_disks")
        .clone();
    // vsock and the share take two of the eight slots (no NIC here).
    assert_eq!(disks.len(), 6, "{verbose}");
    // Images sort by name: img9 is past the boot disks.
    let mut config = container_config("late", &["sh", "-c", "echo from-the-share"], &[]);
    config.image = Some(ImageSpec {
        image: "localhost/many/img9:latest".into(),
        ..Default::default()
    });
    let c = create(&mut cri, &pod, config).await;
    let image_id = status(&mut cri, &c).await.image_ref;
    assert!(
        !disks.contains_key(image_id.trim_start_matches("sha256:"))
            && !disks.contains_key(&image_id),
        "img9 ({image_id}) should not have a boot disk: {disks:?}"
    );
    start(&mut cri, &c).await;
    let st = wait_exited(&mut cri, &c).await;
    assert_eq!(st.exit_code, 0, "{st:?}");
    let lines = log_lines(&d.log_root().join("many/late/0.log"), 1).await;
    assert!(lines[0].ends_with("from-the-share"), "{lines:?}");
    stop_remove_pod(&mut cri, &pod).await;
    assert_no_leaks(&d, &[pod]);
}
