//! A VM pod's link to its CNI network, as Kata's tc-redirect model: CNI
//! gives the pod's network namespace an `eth0` (a veth on the node's
//! bridge, say); this module adds a tap device next to it and redirects
//! every frame from one to the other with tc ingress qdiscs and
//! `mirred egress redirect` actions. QEMU runs in that namespace, attaches
//! to the tap, and gives the guest NIC eth0's MAC, so the frames that pass
//! through unchanged are addressed to the guest; the agent then puts eth0's
//! addresses and routes on that NIC.
//!
//! Uses iproute2's `ip` and `tc` through `nsenter --net`, each with a
//! timeout. The tap and the qdiscs live in the pod's namespace and end
//! with it (and CNI DEL removes eth0).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::network::cni::{self, POD_IFNAME};

/// The tap device in each VM pod's network namespace.
pub const TAP_NAME: &str = "tap0";
/// How long one `ip`/`tc` call may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from wiring a VM pod's network.
#[derive(Debug, thiserror::Error)]
pub enum VmNetworkError {
    #[error("running `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` did not finish within {TOOL_TIMEOUT:?}")]
    Timeout { command: String },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("reading {POD_IFNAME} in the pod's namespace: {0}")]
    Link(String),
    #[error("the CNI result gives the pod no IPv4 address")]
    NoAddress,
}

/// What QEMU and the agent need: the guest NIC.
#[derive(Clone, Debug, PartialEq)]
pub struct GuestNic {
    pub netns: PathBuf,
    pub tap: String,
    /// eth0's MAC: the guest NIC's.
    pub mac: String,
    pub interface: vmpod_proto::v1::NetworkInterface,
}

/// Creates the tap in `netns` and redirects eth0 ⇄ tap.
pub async fn connect(netns: &Path, result: &serde_json::Value) -> Result<GuestNic, VmNetworkError> {
    let link = run(netns, "ip", &["-j", "link", "show", "dev", POD_IFNAME]).await?;
    let (mac, eth0_mtu) = parse_link(&link)?;
    let mtu = eth0_mtu.to_string();
    let steps: [(&str, Vec<&str>); 6] = [
        ("ip", vec!["tuntap", "add", "dev", TAP_NAME, "mode", "tap"]),
        (
            "ip",
            vec!["link", "set", "dev", TAP_NAME, "mtu", &mtu, "up"],
        ),
        ("tc", vec!["qdisc", "add", "dev", POD_IFNAME, "ingress"]),
        ("tc", redirect(POD_IFNAME, TAP_NAME)),
        ("tc", vec!["qdisc", "add", "dev", TAP_NAME, "ingress"]),
        ("tc", redirect(TAP_NAME, POD_IFNAME)),
    ];
    for (tool, args) in steps {
        run(netns, tool, &args).await?;
    }
    let interface = guest_interface(&mac, eth0_mtu, &cni::pod_network(result))?;
    Ok(GuestNic {
        netns: netns.to_path_buf(),
        tap: TAP_NAME.to_string(),
        mac,
        interface,
    })
}

/// `tc filter` arguments that send every frame arriving on `from` out of
/// `to` (u32 match-all: available where cls_matchall is not).
fn redirect<'a>(from: &'a str, to: &'a str) -> Vec<&'a str> {
    vec![
        "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match", "u8",
        "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
    ]
}

/// eth0's MAC and MTU from `ip -j link show`.
fn parse_link(json: &[u8]) -> Result<(String, u32), VmNetworkError> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| VmNetworkError::Link(e.to_string()))?;
    let link = v
        .get(0)
        .ok_or_else(|| VmNetworkError::Link("no such link".into()))?;
    let mac = link
        .get("address")
        .and_then(|a| a.as_str())
        .filter(|a| a.len() == 17)
        .ok_or_else(|| VmNetworkError::Link("no MAC address".into()))?
        .to_ascii_lowercase();
    let mtu = link
        .get("mtu")
        .and_then(|m| m.as_u64())
        .and_then(|m| u32::try_from(m).ok())
        .filter(|m| (68..=65535).contains(m))
        .ok_or_else(|| VmNetworkError::Link("no valid MTU".into()))?;
    Ok((mac, mtu))
}

/// The guest NIC's configuration: eth0's MTU, the pod's IPv4 addresses and
/// the result's routes (a route without a gateway goes through the address's
/// gateway, as the CNI plugins' own interface setup does).
pub fn guest_interface(
    mac: &str,
    mtu: u32,
    net: &cni::PodNetwork,
) -> Result<vmpod_proto::v1::NetworkInterface, VmNetworkError> {
    use std::net::IpAddr;
    let v4: Vec<_> = net
        .ips
        .iter()
        .filter_map(|ip| match ip.address {
            IpAddr::V4(a) => Some((a, ip.prefix, ip.gateway)),
            IpAddr::V6(_) => None,
        })
        .collect();
    if v4.is_empty() {
        return Err(VmNetworkError::NoAddress);
    }
    let default_gw = v4.iter().find_map(|(_, _, gw)| match gw {
        Some(IpAddr::V4(g)) => Some(*g),
        _ => None,
    });
    Ok(vmpod_proto::v1::NetworkInterface {
        mac: mac.to_string(),
        mtu,
        addresses: v4
            .iter()
            .map(|(a, p, _)| vmpod_proto::v1::IpAddress {
                address: a.to_string(),
                prefix_len: u32::from(*p),
            })
            .collect(),
        routes: net
            .routes
            .iter()
            .map(|r| vmpod_proto::v1::Route {
                destination: r.dst.to_string(),
                prefix_len: u32::from(r.prefix),
                gateway: r
                    .gateway
                    .or(default_gw)
                    .map(|g| g.to_string())
                    .unwrap_or_default(),
            })
            .collect(),
    })
}

/// Runs `tool args` inside `netns` with a timeout; returns its stdout.
async fn run(netns: &Path, tool: &str, args: &[&str]) -> Result<Vec<u8>, VmNetworkError> {
    let command = format!("{tool} {}", args.join(" "));
    let mut cmd = tokio::process::Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(tool)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(TOOL_TIMEOUT, cmd.output()).await {
        Ok(r) => r.map_err(|source| VmNetworkError::Spawn {
            command: command.clone(),
            source,
        })?,
        Err(_) => return Err(VmNetworkError::Timeout { command }),
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(VmNetworkError::Failed {
            command,
            stderr: stderr.trim().chars().take(2000).collect(),
        });
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mac_and_mtu_of_eth0() {
        let json = br#"[{"ifindex":3,"ifname":"eth0","mtu":1450,"address":"0E:17:43:FC:11:8A"}]"#;
        assert_eq!(
            parse_link(json).unwrap(),
            ("0e:17:43:fc:11:8a".to_string(), 1450)
        );
        assert!(parse_link(b"[]").is_err());
        assert!(parse_link(br#"[{"mtu":1500}]"#).is_err());
        assert!(parse_link(b"garbage").is_err());
    }

    #[test]
    fn guest_gets_ipv4_addresses_and_routes_via_the_gateway() {
        let result = serde_json::json!({
            "interfaces": [{"name": "eth0", "sandbox": "/n", "mac": "0a:00:00:00:00:05"}],
            "ips": [
                {"address": "10.88.0.5/24", "gateway": "10.88.0.1", "interface": 0},
                {"address": "fd00::5/64", "interface": 0}
            ],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.99.0.0/16", "gw": "10.88.0.254"}]
        });
        let nic = guest_interface("0a:00:00:00:00:05", 1450, &cni::pod_network(&result)).unwrap();
        assert_eq!(nic.addresses.len(), 1);
        assert_eq!(nic.mtu, 1450, "the guest NIC gets eth0's MTU");
        assert_eq!(nic.addresses[0].address, "10.88.0.5");
        assert_eq!(nic.addresses[0].prefix_len, 24);
        assert_eq!(nic.routes[0].destination, "0.0.0.0");
        assert_eq!(nic.routes[0].gateway, "10.88.0.1");
        assert_eq!(nic.routes[1].gateway, "10.88.0.254");
        assert!(matches!(
            guest_interface("0a:00:00:00:00:05", 1450, &cni::PodNetwork::default()),
            Err(VmNetworkError::NoAddress)
        ));
    }

    #[test]
    fn redirect_is_a_u32_match_all_mirred_filter() {
        assert_eq!(
            redirect("eth0", "tap0").join(" "),
            "filter add dev eth0 parent ffff: protocol all u32 match u8 0 0 \
             action mirred egress redirect dev tap0"
        );
    }
}
