//! Linux capabilities: bounding set, effective/permitted/inheritable and ambient
//! sets from the OCI process, with raw capset/prctl (no libcap). The names are
//! the project's one table, [`husk_proto::caps`].

use husk_proto::caps::{self as table, NAMES};

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("unknown capability {0}")]
    Unknown(String),
    #[error("{0}: {1}")]
    Os(&'static str, #[source] std::io::Error),
}

/// A set of capabilities as a bitmask (bit n = capability n).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    pub fn parse<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Result<Self, CapsError> {
        let mut bits = 0u64;
        for n in names {
            let n = n.as_ref();
            let i = table::number(n).ok_or_else(|| CapsError::Unknown(n.to_string()))?;
            bits |= 1 << i;
        }
        Ok(CapSet(bits))
    }

    pub fn contains(self, cap: usize) -> bool {
        self.0 & (1 << cap) != 0
    }
}

/// The five sets of an OCI process, parsed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub bounding: CapSet,
    pub effective: CapSet,
    pub permitted: CapSet,
    pub inheritable: CapSet,
    pub ambient: CapSet,
}

impl Caps {
    pub fn from_oci(c: &oci_spec::runtime::LinuxCapabilities) -> Result<Self, CapsError> {
        fn set(s: &Option<oci_spec::runtime::Capabilities>) -> Result<CapSet, CapsError> {
            match s {
                Some(s) => CapSet::parse(s.iter().map(|c| c.to_string())),
                None => Ok(CapSet(0)),
            }
        }
        Ok(Caps {
            bounding: set(c.bounding())?,
            effective: set(c.effective())?,
            permitted: set(c.permitted())?,
            inheritable: set(c.inheritable())?,
            ambient: set(c.ambient())?,
        })
    }
}

fn last_cap() -> usize {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(NAMES.len() - 1)
}

fn prctl(op: libc::c_int, a: libc::c_ulong, b: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(op, a, b, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Drop everything outside the bounding set (needs CAP_SETPCAP: call as root,
/// before changing uid).
pub fn apply_bounding(caps: &Caps) -> Result<(), CapsError> {
    for cap in 0..=last_cap() {
        if !caps.bounding.contains(cap) {
            prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0)
                .map_err(|e| CapsError::Os("drop bounding", e))?;
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Set effective/permitted/inheritable, then raise ambient ones.
pub fn apply_sets(caps: &Caps) -> Result<(), CapsError> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    for (i, d) in data.iter_mut().enumerate() {
        let shift = 32 * i;
        d.effective = (caps.effective.0 >> shift) as u32;
        d.permitted = (caps.permitted.0 >> shift) as u32;
        d.inheritable = (caps.inheritable.0 >> shift) as u32;
    }
    // SAFETY: header and two data structs laid out as the kernel's v3 ABI.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(CapsError::Os("capset", std::io::Error::last_os_error()));
    }
    for cap in 0..=last_cap() {
        if caps.ambient.contains(cap) {
            // Ambient needs the cap in permitted and inheritable; ignore others like runc.
            let _ = prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                cap as libc::c_ulong,
            );
        }
    }
    Ok(())
}

pub fn keep_caps(on: bool) -> Result<(), CapsError> {
    prctl(libc::PR_SET_KEEPCAPS, on as libc::c_ulong, 0).map_err(|e| CapsError::Os("keepcaps", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_and_without_prefix() {
        let s = CapSet::parse(["CAP_CHOWN", "net_bind_service", "CAP_CHECKPOINT_RESTORE"])
            .expect("parse");
        assert!(s.contains(0) && s.contains(10) && s.contains(40));
        assert!(!s.contains(21));
        assert!(matches!(
            CapSet::parse(["CAP_BOGUS"]),
            Err(CapsError::Unknown(_))
        ));
    }

    #[test]
    fn from_oci_spec_json() {
        let c: oci_spec::runtime::LinuxCapabilities = serde_json::from_value(serde_json::json!({
            "bounding": ["CAP_KILL", "CAP_SYS_ADMIN"], "effective": ["CAP_KILL"]
        }))
        .expect("caps");
        let caps = Caps::from_oci(&c).expect("from oci");
        assert_eq!(caps.bounding, CapSet((1 << 5) | (1 << 21)));
        assert_eq!(caps.effective, CapSet(1 << 5));
        assert_eq!(caps.ambient, CapSet(0));
    }
}
