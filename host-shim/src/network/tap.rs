//! VM plumbing inside a pod's network namespace: a tap device for the VMM
//! and tc ingress redirects both ways between the CNI interface and the
//! tap (the "tcfilter" model Kata uses), so every frame the CNI network
//! sends to the pod reaches the guest and every guest frame leaves through
//! the CNI interface. The guest NIC takes the CNI interface's MAC and MTU,
//! the guest interface the CNI addresses and routes (via the agent's
//! ConfigureNetwork).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;

use husk_proto::agent as pb;

use super::cni::CniResult;
use super::netns::{self, NetnsError};

/// The tap huskd makes in every VM pod's namespace.
pub const TAP_NAME: &str = "tap0_husk";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("{0}")]
    Netns(#[from] NetnsError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tc {args}: {msg}")]
    Tc { args: String, msg: String },
    #[error("ip {args}: {msg}")]
    Ip { args: String, msg: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TapError {
    let what = what.into();
    move |source| TapError::Io { what, source }
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Opens `/dev/net/tun` attached to tap `name` (creating it) in the calling
/// thread's namespace.
fn tun_open(name: &str) -> std::io::Result<OwnedFd> {
    let path = c"/dev/net/tun";
    // SAFETY: open(2) on a constant path; the fd is owned right away.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
    // SAFETY: TUNSETIFF reads/writes one ifreq that outlives the call, on a tun fd.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// What the VMM and the agent need for the pod's one NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNic {
    /// The pod's network namespace (where the tap is).
    pub netns: std::path::PathBuf,
    /// Tap name inside the pod's namespace (QEMU gets an fd from [`open`]).
    pub tap: String,
    /// The guest NIC's MAC: the CNI interface's.
    pub mac: String,
    pub mtu: u32,
    /// CIDR addresses from the CNI result.
    pub addresses: Vec<String>,
    /// (destination CIDR, gateway) from the CNI result; "" gateway = on-link.
    pub routes: Vec<(String, String)>,
}

impl VmNic {
    /// The agent's ConfigureNetwork for the guest: the NIC found by MAC,
    /// named like the CNI interface, with CNI's addresses and routes.
    pub fn configure_request(&self, ifname: &str) -> pb::ConfigureNetworkRequest {
        pb::ConfigureNetworkRequest {
            interfaces: vec![pb::NetworkInterface {
                mac: self.mac.clone(),
                name: ifname.to_string(),
                addresses: self.addresses.clone(),
                mtu: self.mtu,
                ..Default::default()
            }],
            routes: self
                .routes
                .iter()
                .map(|(dst, gw)| pb::Route {
                    destination: dst.clone(),
                    gateway: gw.clone(),
                    device: ifname.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}

/// Makes tap `tap` next to `ifname` in the namespace at `ns` with the same
/// MTU, both up, and redirects each one's ingress to the other's egress.
/// Idempotent: an existing tap and filters are replaced.
pub fn attach(ns: &Path, ifname: &str, tap: &str, cni: &CniResult) -> Result<VmNic, TapError> {
    let (ifname_s, tap_s) = (ifname.to_string(), tap.to_string());
    let (mac, mtu) = netns::run_in(ns, move || -> Result<(String, u32), TapError> {
        let (ifname, tap) = (ifname_s.as_str(), tap_s.as_str());
        let fd = tun_open(tap).map_err(io(format!("create tap {tap}")))?;
        // SAFETY: TUNSETPERSIST takes an int argument by value on a tun fd.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_ulong) } < 0 {
            return Err(io(format!("persist tap {tap}"))(
                std::io::Error::last_os_error(),
            ));
        }
        drop(fd);
        redirect(ifname, tap)
    })??;
    Ok(nic(ns, tap, mac, mtu, cni))
}

/// A pooled VM's tap (made in the pool's namespace `from` when the VM booted, the VMM
/// holding its fd) moved into the pod's namespace `ns` as `tap`, then wired to `ifname`
/// as [`attach`] does. The VMM keeps its fd across the move: no NIC hot-plug.
pub fn adopt(
    from: &Path,
    pooled: &str,
    ns: &Path,
    ifname: &str,
    tap: &str,
    cni: &CniResult,
) -> Result<VmNic, TapError> {
    let (pooled_s, ns_s) = (pooled.to_string(), ns.display().to_string());
    netns::run_in(from, move || {
        ip(&["link", "set", "dev", &pooled_s, "netns", &ns_s])
    })??;
    let (ifname_s, tap_s, pooled_s) = (ifname.to_string(), tap.to_string(), pooled.to_string());
    let (mac, mtu) = netns::run_in(ns, move || -> Result<(String, u32), TapError> {
        let (ifname, tap) = (ifname_s.as_str(), tap_s.as_str());
        if pooled_s != tap {
            ip(&["link", "set", "dev", &pooled_s, "name", tap])?;
        }
        redirect(ifname, tap)
    })??;
    Ok(nic(ns, tap, mac, mtu, cni))
}

/// In the calling thread's namespace: `tap` takes `ifname`'s MTU, both go up, and each
/// one's ingress is redirected to the other's egress. Returns `ifname`'s MAC and MTU.
fn redirect(ifname: &str, tap: &str) -> Result<(String, u32), TapError> {
    let mac = netns::mac(ifname).map_err(io(format!("mac of {ifname}")))?;
    let mtu = netns::mtu(ifname).map_err(io(format!("mtu of {ifname}")))?;
    netns::set_mtu(tap, mtu).map_err(io(format!("mtu of {tap}")))?;
    netns::set_up(tap).map_err(io(format!("up {tap}")))?;
    netns::set_up(ifname).map_err(io(format!("up {ifname}")))?;
    for (from, to) in [(ifname, tap), (tap, ifname)] {
        // Fresh ingress qdisc (deleting drops old filters), then one catch-all redirect.
        let _ = tc(&["qdisc", "del", "dev", from, "ingress"]);
        tc(&["qdisc", "add", "dev", from, "handle", "ffff:", "ingress"])?;
        tc(&[
            "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
            "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
        ])?;
    }
    Ok((mac, mtu))
}

/// The guest's NIC as CNI configured the pod: addresses, routes, MAC, MTU.
fn nic(ns: &Path, tap: &str, mac: String, mtu: u32, cni: &CniResult) -> VmNic {
    let addresses = cni
        .sandbox_ips()
        .iter()
        .map(|ip| ip.address.clone())
        .collect();
    let mut routes: Vec<(String, String)> = cni
        .routes
        .iter()
        .map(|r| (r.dst.clone(), r.gw.clone()))
        .collect();
    // A result without explicit routes (bridge without isDefaultGateway)
    // still has a gateway per address: make it the default route.
    if routes.is_empty() {
        for ip in cni.sandbox_ips() {
            if !ip.gateway.is_empty() {
                let dst = if ip.gateway.contains(':') {
                    "::/0"
                } else {
                    "0.0.0.0/0"
                };
                routes.push((dst.to_string(), ip.gateway.clone()));
            }
        }
    }
    VmNic {
        netns: ns.to_path_buf(),
        tap: tap.to_string(),
        mac,
        mtu,
        addresses,
        routes,
    }
}

/// An fd on the pod's tap, for a VMM that does not run in the pod's
/// namespace (QEMU `-netdev tap,fd=N`).
pub fn open(ns: &Path, tap: &str) -> Result<OwnedFd, TapError> {
    let t = tap.to_string();
    netns::run_in(ns, move || tun_open(&t))?.map_err(io(format!("open tap {tap}")))
}

/// Deletes the tap (its filters go with it); absent is fine.
pub fn remove(ns: &Path, tap: &str) -> Result<(), TapError> {
    let t = tap.to_string();
    let exists = netns::run_in(ns, move || netns::mtu(&t).is_ok())?;
    if !exists {
        return Ok(());
    }
    let t = tap.to_string();
    netns::run_in(ns, move || -> Result<(), TapError> {
        let fd = tun_open(&t).map_err(io(format!("open tap {t}")))?;
        // SAFETY: TUNSETPERSIST takes an int argument by value on a tun fd.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST as _, 0 as libc::c_ulong) } < 0 {
            return Err(io(format!("unpersist tap {t}"))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    })?
}

/// Runs ip(8) (in the calling thread's namespace).
fn ip(args: &[&str]) -> Result<(), TapError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(io("run ip (iproute2)"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(TapError::Ip {
        args: args.join(" "),
        msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Runs tc(8) (in the calling thread's namespace).
fn tc(args: &[&str]) -> Result<(), TapError> {
    let out = Command::new("tc")
        .args(args)
        .output()
        .map_err(io("run tc (iproute2)"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(TapError::Tc {
        args: args.join(" "),
        msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configure_request_from_nic() {
        let nic = VmNic {
            netns: "/run/husk/netns/p".into(),
            tap: TAP_NAME.into(),
            mac: "0a:58:0a:01:00:05".into(),
            mtu: 1450,
            addresses: vec!["10.1.0.5/24".into(), "fd00::5/64".into()],
            routes: vec![
                ("0.0.0.0/0".into(), "10.1.0.1".into()),
                ("::/0".into(), "fd00::1".into()),
            ],
        };
        let r = nic.configure_request("eth0");
        assert_eq!(r.interfaces[0].mac, "0a:58:0a:01:00:05");
        assert_eq!(r.interfaces[0].addresses.len(), 2);
        assert_eq!(r.interfaces[0].mtu, 1450);
        assert_eq!(r.routes[1].gateway, "fd00::1");
        assert_eq!(r.routes[0].device, "eth0");
    }
}
