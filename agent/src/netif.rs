//! Guest NIC configuration for VM pods (SetupSandbox `interfaces`): the
//! daemon ran CNI in the pod's network namespace on the host and redirects
//! that namespace's eth0 to the VM's tap, so the guest NIC (which has eth0's
//! MAC) gets eth0's IPv4 addresses and routes. Classic ioctls are enough
//! for IPv4 and need no netlink dependency.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use vmpod_proto::v1::NetworkInterface;

/// Errors from configuring a NIC.
#[derive(Debug, thiserror::Error)]
pub enum NetifError {
    #[error("{0}")]
    Invalid(String),
    #[error("no network interface has MAC {0}")]
    NoSuchMac(String),
    #[error("{what} on {ifname}")]
    Ioctl {
        what: &'static str,
        ifname: String,
        #[source]
        source: std::io::Error,
    },
}

/// Interface names are at most IFNAMSIZ-1 bytes.
const IFNAMSIZ: usize = 16;

/// Configures every interface of the request.
pub fn configure(interfaces: &[NetworkInterface]) -> Result<(), NetifError> {
    if interfaces.is_empty() {
        return Ok(());
    }
    let plans = interfaces
        .iter()
        .map(Plan::from_request)
        .collect::<Result<Vec<_>, _>>()?;
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetifError::Ioctl {
            what: "socket(AF_INET)",
            ifname: String::new(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fd is a socket we just opened and own from here on.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    for plan in plans {
        let ifname = find_by_mac(Path::new("/sys/class/net"), &plan.mac)?;
        for (i, (addr, prefix)) in plan.addresses.iter().enumerate() {
            // More than one address: the extra ones as aliases (eth0:1).
            let label = if i == 0 {
                ifname.clone()
            } else {
                format!("{ifname}:{i}")
            };
            set_addr(
                &sock,
                &label,
                libc::SIOCSIFADDR,
                *addr,
                "setting the address",
            )?;
            set_addr(
                &sock,
                &label,
                libc::SIOCSIFNETMASK,
                netmask(*prefix),
                "setting the netmask",
            )?;
        }
        if let Some(mtu) = plan.mtu {
            set_mtu(&sock, &ifname, mtu)?;
        }
        link_up(&sock, &ifname)?;
        for (dst, prefix, gw) in &plan.routes {
            add_route(&sock, &ifname, *dst, *prefix, *gw)?;
        }
    }
    Ok(())
}

/// A validated interface request.
struct Plan {
    mac: String,
    mtu: Option<i32>,
    addresses: Vec<(Ipv4Addr, u8)>,
    routes: Vec<(Ipv4Addr, u8, Option<Ipv4Addr>)>,
}

impl Plan {
    fn from_request(i: &NetworkInterface) -> Result<Plan, NetifError> {
        let mac = i.mac.to_ascii_lowercase();
        let parts: Vec<&str> = mac.split(':').collect();
        if parts.len() != 6
            || !parts
                .iter()
                .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(NetifError::Invalid(format!("invalid MAC {:?}", i.mac)));
        }
        let ip = |s: &str| {
            s.parse::<Ipv4Addr>()
                .map_err(|_| NetifError::Invalid(format!("invalid IPv4 address {s:?}")))
        };
        let prefix = |p: u32| {
            u8::try_from(p)
                .ok()
                .filter(|&p| p <= 32)
                .ok_or_else(|| NetifError::Invalid(format!("invalid prefix length {p}")))
        };
        let mut addresses = Vec::new();
        for a in &i.addresses {
            addresses.push((ip(&a.address)?, prefix(a.prefix_len)?));
        }
        let mut routes = Vec::new();
        for r in &i.routes {
            let gw = if r.gateway.is_empty() {
                None
            } else {
                Some(ip(&r.gateway)?)
            };
            routes.push((ip(&r.destination)?, prefix(r.prefix_len)?, gw));
        }
        let mtu = match i.mtu {
            0 => None,
            m if MTU_RANGE.contains(&m) => i32::try_from(m).ok(),
            m => {
                return Err(NetifError::Invalid(format!(
                    "invalid MTU {m} (expected {}..={})",
                    MTU_RANGE.start(),
                    MTU_RANGE.end()
                )));
            }
        };
        Ok(Plan {
            mac,
            mtu,
            addresses,
            routes,
        })
    }
}

/// The interface in `sys_class_net` whose address is `mac` (lowercase).
fn find_by_mac(sys_class_net: &Path, mac: &str) -> Result<String, NetifError> {
    let entries =
        std::fs::read_dir(sys_class_net).map_err(|_| NetifError::NoSuchMac(mac.to_string()))?;
    for e in entries.flatten() {
        let Ok(addr) = std::fs::read_to_string(e.path().join("address")) else {
            continue;
        };
        let name = e.file_name().to_string_lossy().into_owned();
        if addr.trim().eq_ignore_ascii_case(mac) && name.len() < IFNAMSIZ {
            return Ok(name);
        }
    }
    Err(NetifError::NoSuchMac(mac.to_string()))
}

fn netmask(prefix: u8) -> Ipv4Addr {
    let bits = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Ipv4Addr::from(bits)
}

fn ifreq(name: &str) -> Result<libc::ifreq, NetifError> {
    if name.is_empty() || name.len() >= IFNAMSIZ {
        return Err(NetifError::Invalid(format!(
            "invalid interface name {name:?}"
        )));
    }
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain C structs;
    // the kernel reads a sockaddr_in out of a sockaddr for AF_INET.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn set_addr(
    sock: &OwnedFd,
    ifname: &str,
    request: libc::Ioctl,
    addr: Ipv4Addr,
    what: &'static str,
) -> Result<(), NetifError> {
    let mut req = ifreq(ifname)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    // SAFETY: SIOCSIFADDR/SIOCSIFNETMASK read an ifreq with the name and
    // the address member set; req lives for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, &req) } < 0 {
        return Err(NetifError::Ioctl {
            what,
            ifname: ifname.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The MTUs Linux accepts on an Ethernet NIC (IPv4's minimum to 64 KiB).
const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;

fn set_mtu(sock: &OwnedFd, ifname: &str, mtu: i32) -> Result<(), NetifError> {
    let mut req = ifreq(ifname)?;
    req.ifr_ifru.ifru_mtu = mtu;
    // SAFETY: SIOCSIFMTU reads the name and the mtu member of req, which
    // lives for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &req) } < 0 {
        return Err(NetifError::Ioctl {
            what: "setting the MTU",
            ifname: ifname.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn link_up(sock: &OwnedFd, ifname: &str) -> Result<(), NetifError> {
    let err = |what| {
        move |source| NetifError::Ioctl {
            what,
            ifname: ifname.to_string(),
            source,
        }
    };
    let mut req = ifreq(ifname)?;
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags into req,
    // which lives for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(err("reading the flags")(std::io::Error::last_os_error()));
    }
    // SAFETY: the flags member is the one SIOCGIFFLAGS filled in.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads req, which lives for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(err("bringing the link up")(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn add_route(
    sock: &OwnedFd,
    ifname: &str,
    dst: Ipv4Addr,
    prefix: u8,
    gw: Option<Ipv4Addr>,
) -> Result<(), NetifError> {
    let mut dev: Vec<u8> = ifname.as_bytes().to_vec();
    dev.push(0);
    // SAFETY: rtentry is plain old data; all zeroes is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(dst);
    rt.rt_genmask = sockaddr_in(netmask(prefix));
    rt.rt_flags = libc::RTF_UP;
    if let Some(gw) = gw {
        rt.rt_gateway = sockaddr_in(gw);
        rt.rt_flags |= libc::RTF_GATEWAY;
    }
    if prefix == 32 {
        rt.rt_flags |= libc::RTF_HOST;
    }
    rt.rt_dev = dev.as_mut_ptr().cast();
    // SAFETY: SIOCADDRT reads rt and the NUL-terminated device name it
    // points to; both live for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &rt) } < 0 {
        let source = std::io::Error::last_os_error();
        // The kernel made the subnet's route with the address already.
        if source.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(NetifError::Ioctl {
            what: "adding a route",
            ifname: ifname.to_string(),
            source,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmpod_proto::v1::{IpAddress, Route};

    #[test]
    fn netmasks_from_prefixes() {
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(netmask(17), Ipv4Addr::new(255, 255, 128, 0));
    }

    #[test]
    fn requests_are_validated() {
        let good = NetworkInterface {
            mac: "0A:58:0a:58:00:05".into(),
            addresses: vec![IpAddress {
                address: "10.88.0.5".into(),
                prefix_len: 24,
            }],
            routes: vec![Route {
                destination: "0.0.0.0".into(),
                prefix_len: 0,
                gateway: "10.88.0.1".into(),
            }],
            mtu: 1400,
        };
        let plan = Plan::from_request(&good).unwrap();
        assert_eq!(plan.mac, "0a:58:0a:58:00:05");
        assert_eq!(plan.mtu, Some(1400));
        let mut default_mtu = good.clone();
        default_mtu.mtu = 0;
        assert_eq!(Plan::from_request(&default_mtu).unwrap().mtu, None);
        for mtu in [67, 65536, u32::MAX] {
            let mut bad = good.clone();
            bad.mtu = mtu;
            assert!(Plan::from_request(&bad).is_err(), "MTU {mtu}");
        }
        assert_eq!(
            plan.routes,
            [(Ipv4Addr::UNSPECIFIED, 0, Some(Ipv4Addr::new(10, 88, 0, 1)))]
        );
        let mut bad = good.clone();
        bad.mac = "0a:58".into();
        assert!(Plan::from_request(&bad).is_err());
        let mut bad = good.clone();
        bad.addresses[0].prefix_len = 33;
        assert!(Plan::from_request(&bad).is_err());
        let mut bad = good;
        bad.routes[0].gateway = "fe80::1".into();
        assert!(Plan::from_request(&bad).is_err());
    }

    #[test]
    fn finds_the_nic_by_mac() {
        let dir = tempfile::tempdir().unwrap();
        for (name, mac) in [("lo", "00:00:00:00:00:00"), ("eth0", "0a:58:0a:58:00:05")] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("address"), format!("{mac}\n")).unwrap();
        }
        assert_eq!(
            find_by_mac(dir.path(), "0a:58:0a:58:00:05").unwrap(),
            "eth0"
        );
        assert!(matches!(
            find_by_mac(dir.path(), "0a:58:0a:58:00:06"),
            Err(NetifError::NoSuchMac(_))
        ));
    }
}
