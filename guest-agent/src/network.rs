//! Pod networking inside the sandbox's network namespace: interface MTU and
//! up, addresses and routes (what CNI gave the pod, for the VM sandbox where
//! the guest's interfaces must be configured by the agent). rtnetlink by hand:
//! a few fixed-layout messages, no crate.

use std::ffi::CString;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("bad address {0:?} (want CIDR)")]
    Address(String),
    #[error("bad MAC {0:?} (want aa:bb:cc:dd:ee:ff, unicast)")]
    Mac(String),
    #[error("no interface {0}")]
    NoInterface(String),
    #[error("{0}: {1}")]
    Os(String, #[source] std::io::Error),
}

type Result<T> = std::result::Result<T, NetError>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    /// Match by MAC (aa:bb:..) when set, else by name.
    pub mac: Option<String>,
    pub name: Option<String>,
    pub addresses: Vec<(IpAddr, u8)>,
    pub mtu: u32,
    /// A MAC to give the interface before it goes up.
    pub set_mac: Option<[u8; 6]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// None: the default route.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    /// Interface name or MAC.
    pub device: Option<String>,
}

pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8)> {
    let bad = || NetError::Address(s.to_string());
    let (ip, len) = s.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(bad());
    }
    Ok((ip, len))
}

/// `aa:bb:cc:dd:ee:ff` to bytes; multicast (and so broadcast) addresses are refused.
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let bad = || NetError::Mac(s.to_string());
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || out[0] & 1 == 1 {
        return Err(bad());
    }
    Ok(out)
}

const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;

fn family(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    }
}

fn octets(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

/// One netlink request: header + fixed body + attributes.
pub struct Message {
    buf: Vec<u8>,
}

impl Message {
    pub fn new(typ: u16, flags: u16, seq: u32, body: &[u8]) -> Self {
        let mut buf = vec![0u8; 16];
        buf[4..6].copy_from_slice(&typ.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(body);
        let mut m = Self { buf };
        m.pad();
        m
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub fn attr(mut self, typ: u16, data: &[u8]) -> Self {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&typ.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    pub fn bytes(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

pub fn addr_message(index: u32, ip: &IpAddr, prefix: u8, seq: u32) -> Vec<u8> {
    // ifaddrmsg: family, prefixlen, flags, scope, index
    let mut body = vec![family(ip), prefix, 0, 0];
    body.extend_from_slice(&index.to_ne_bytes());
    let mut m = Message::new(
        RTM_NEWADDR,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        seq,
        &body,
    )
    .attr(IFA_ADDRESS, &octets(ip));
    if ip.is_ipv4() {
        m = m.attr(IFA_LOCAL, &octets(ip));
    }
    m.bytes()
}

pub fn route_message(
    dest: Option<(IpAddr, u8)>,
    gateway: Option<IpAddr>,
    oif: Option<u32>,
    seq: u32,
) -> Vec<u8> {
    let fam_ip = dest
        .map(|d| d.0)
        .or(gateway)
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let dst_len = dest.map(|d| d.1).unwrap_or(0);
    let scope = if gateway.is_some() {
        0
    } else {
        libc::RT_SCOPE_LINK
    };
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
    let mut body = vec![
        family(&fam_ip),
        dst_len,
        0,
        0,
        libc::RT_TABLE_MAIN,
        libc::RTPROT_BOOT,
        scope,
        libc::RTN_UNICAST,
    ];
    body.extend_from_slice(&0u32.to_ne_bytes());
    let mut m = Message::new(
        RTM_NEWROUTE,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        seq,
        &body,
    );
    if let Some((ip, len)) = dest
        && len > 0
    {
        m = m.attr(RTA_DST, &octets(&ip));
    }
    if let Some(gw) = gateway {
        m = m.attr(RTA_GATEWAY, &octets(&gw));
    }
    if let Some(i) = oif {
        m = m.attr(RTA_OIF, &i.to_ne_bytes());
    }
    m.bytes()
}

struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    fn open() -> Result<Self> {
        // SAFETY: plain socket() call.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(NetError::Os(
                "netlink socket".into(),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Self {
            // SAFETY: fresh fd we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            seq: 1,
        })
    }

    /// Send one request and wait for its ACK.
    fn request(&mut self, what: &str, msg: Vec<u8>) -> Result<()> {
        let os = |e| NetError::Os(what.to_string(), e);
        // SAFETY: msg is a valid buffer for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(os(std::io::Error::last_os_error()));
        }
        self.seq += 1;
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: buf is writable for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(os(std::io::Error::last_os_error()));
            }
            let mut off = 0usize;
            while off + 16 <= n as usize {
                let len =
                    u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
                let typ = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap_or_default());
                if typ == NLMSG_ERROR && off + 20 <= n as usize {
                    let code =
                        i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap_or_default());
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(os(std::io::Error::from_raw_os_error(-code)))
                    };
                }
                if len < 16 {
                    break;
                }
                off += (len + 3) & !3;
            }
        }
    }
}

fn ioctl_socket() -> Result<OwnedFd> {
    // SAFETY: plain socket() call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetError::Os(
            "socket".into(),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(NetError::NoInterface(name.to_string()));
    }
    // SAFETY: ifreq is plain data; zeroed is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in name.bytes().enumerate() {
        req.ifr_name[i] = b as libc::c_char;
    }
    Ok(req)
}

/// Interface names of the current network namespace.
fn interface_names() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push(
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

fn mac_of(sock: &OwnedFd, name: &str) -> Option<String> {
    let mut req = ifreq(name).ok()?;
    // SAFETY: SIOCGIFHWADDR fills the ifreq we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
        return None;
    }
    // SAFETY: the kernel filled ifru_hwaddr.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    Some(
        data[..6]
            .iter()
            .map(|b| format!("{:02x}", *b as u8))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

/// A name or MAC to an interface name.
fn resolve(sock: &OwnedFd, key: &str) -> Result<String> {
    let names = interface_names();
    if names.iter().any(|n| n == key) {
        return Ok(key.to_string());
    }
    let key_l = key.to_ascii_lowercase();
    names
        .into_iter()
        .find(|n| mac_of(sock, n).as_deref() == Some(key_l.as_str()))
        .ok_or_else(|| NetError::NoInterface(key.to_string()))
}

fn index_of(name: &str) -> Result<u32> {
    let c = CString::new(name).map_err(|_| NetError::NoInterface(name.to_string()))?;
    // SAFETY: c is a valid C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(NetError::NoInterface(name.to_string())),
        i => Ok(i),
    }
}

fn set_mac(sock: &OwnedFd, name: &str, mac: &[u8; 6]) -> Result<()> {
    let mut req = ifreq(name)?;
    // SAFETY: ifru_hwaddr is a plain sockaddr inside the zeroed ifreq; we fill it in.
    unsafe {
        req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (d, s) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
            *d = *s as libc::c_char;
        }
    }
    // SAFETY: SIOCSIFHWADDR reads the ifreq we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFHWADDR, &req) } < 0 {
        return Err(NetError::Os(
            format!("set mac of {name}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn set_mtu_and_up(sock: &OwnedFd, name: &str, mtu: u32) -> Result<()> {
    let os = |what: &str| NetError::Os(format!("{what} {name}"), std::io::Error::last_os_error());
    if mtu > 0 {
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
        // SAFETY: SIOCSIFMTU reads the ifreq we pass.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &req) } < 0 {
            return Err(os("set mtu"));
        }
    }
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we pass.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(os("get flags"));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(os("set up"));
        }
    }
    Ok(())
}

/// Apply interfaces then routes in the calling thread's network namespace.
pub fn configure(interfaces: &[InterfaceConfig], routes: &[RouteConfig]) -> Result<()> {
    let sock = ioctl_socket()?;
    let mut nl = Netlink::open()?;
    for i in interfaces {
        let key = i.mac.as_deref().or(i.name.as_deref()).unwrap_or_default();
        let name = resolve(&sock, key)?;
        if let Some(mac) = &i.set_mac {
            set_mac(&sock, &name, mac)?;
        }
        set_mtu_and_up(&sock, &name, i.mtu)?;
        let index = index_of(&name)?;
        for (ip, prefix) in &i.addresses {
            let seq = nl.seq;
            nl.request(
                &format!("add address {ip}/{prefix} to {name}"),
                addr_message(index, ip, *prefix, seq),
            )?;
        }
    }
    for r in routes {
        let oif = match &r.device {
            Some(d) => Some(index_of(&resolve(&sock, d)?)?),
            None => None,
        };
        let seq = nl.seq;
        let what = format!("add route {:?} via {:?}", r.destination, r.gateway);
        nl.request(&what, route_message(r.destination, r.gateway, oif, seq))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("0a:58:0A:01:00:05").expect("mac"),
            [0x0a, 0x58, 0x0a, 0x01, 0x00, 0x05]
        );
        for bad in [
            "",
            "0a:58:0a:01:00",
            "0a:58:0a:01:00:05:06",
            "0a:58:0a:01:00:5",
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
            "0g:58:0a:01:00:05",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs_parse() {
        assert_eq!(
            parse_cidr("10.0.0.5/24").expect("v4"),
            ("10.0.0.5".parse().expect("ip"), 24)
        );
        assert_eq!(parse_cidr("fd00::1/64").expect("v6").1, 64);
        for bad in ["10.0.0.5", "10.0.0.5/33", "x/1", "fd00::1/129"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn message_layout() {
        let m = addr_message(7, &"10.1.2.3".parse().expect("ip"), 16, 9);
        // header 16 + ifaddrmsg 8 + two 8-byte attributes
        assert_eq!(m.len(), 40);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().expect("len")), 40);
        assert_eq!(
            u16::from_ne_bytes(m[4..6].try_into().expect("type")),
            RTM_NEWADDR
        );
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().expect("seq")), 9);
        assert_eq!(&m[16..20], &[libc::AF_INET as u8, 16, 0, 0]);
        assert_eq!(u32::from_ne_bytes(m[20..24].try_into().expect("index")), 7);
        assert_eq!(&m[28..32], &[10, 1, 2, 3]);
        let r = route_message(None, Some("10.1.0.1".parse().expect("gw")), Some(7), 1);
        // header 16 + rtmsg 12 + gateway 8 + oif 8; default route: no RTA_DST.
        assert_eq!(r.len(), 44);
        assert_eq!(r[17], 0, "dst_len 0");
        let v6 = addr_message(1, &"fd00::5".parse().expect("ip"), 64, 1);
        assert_eq!(v6.len(), 16 + 8 + 20, "v6: IFA_ADDRESS only");
    }
}
