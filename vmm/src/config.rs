//! VM configuration: the serde types read from `--config` / command-line flags, and their validation.
//! These are plain data; the live KVM objects are built from them in `builder`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Smallest guest memory accepted (MiB). The boot structures alone need the first megabyte.
pub const MIN_MEM_MIB: u32 = 2;
/// Largest vCPU count accepted (the MP table and APIC ids are laid out for this many).
pub const MAX_VCPUS: u8 = 32;
/// Largest number of empty disk slots (`--disk-slots`): each takes one of the 19 virtio IRQs.
pub const MAX_DISK_SLOTS: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no kernel given (--kernel or \"kernel\" in the config file)")]
    NoKernel,
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u8),
    #[error("memory must be at least {MIN_MEM_MIB} MiB, got {0}")]
    Memory(u32),
    #[error("invalid MAC address {0:?} (want xx:xx:xx:xx:xx:xx)")]
    Mac(String),
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("vsock guest CID must be >= 3, got {0}")]
    Cid(u64),
    #[error("duplicate device id {0:?}")]
    DuplicateId(String),
    #[error("disk slots must be at most {MAX_DISK_SLOTS}, got {0}")]
    DiskSlots(u32),
}

/// Where the guest's 8250 output goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "path")]
pub enum SerialConfig {
    #[default]
    Stdout,
    File(PathBuf),
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub id: String,
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub tap: String,
    /// `xx:xx:xx:xx:xx:xx`; a locally administered address is derived from the tap name if absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// An inherited fd already attached to the tap (a jailed VMM cannot attach by name).
    #[serde(default)]
    pub fd: Option<i32>,
}

/// A host directory shared with the guest over virtio-fs (`mount -t virtiofs TAG DIR`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    pub tag: String,
    pub shared_dir: PathBuf,
    /// Let the guest make set-id files and FIFOs in the share (refused by default).
    #[serde(default)]
    pub allow_special_files: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// Host unix socket: host-initiated connections go to it, guest-initiated ones to `<uds>_<port>`.
    pub uds_path: PathBuf,
}

fn default_vcpus() -> u8 {
    1
}
fn default_mem() -> u32 {
    128
}
/// Serial console, reboot through the i8042 (which ends the VMM), no PCI bus to probe, and the
/// i8042 options that let Ctrl-Alt-Del (SIGTERM) reach a Linux guest through this minimal
/// controller (the same set Firecracker documents).
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_mem")]
    pub memory_mib: u32,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Empty read-only virtio-blk slots, filled at run time through the control socket
    /// (`disk-attach SLOT PATH SERIAL`); placed after `disks`.
    #[serde(default)]
    pub disk_slots: u32,
    #[serde(default)]
    pub net: Vec<NetConfig>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    #[serde(default)]
    pub serial: SerialConfig,
    /// Optional control socket (a line protocol: `status`, `stop`).
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// How long the guest gets to shut down after Ctrl-Alt-Del (SIGTERM or `stop`).
    #[serde(default = "default_stop_grace")]
    pub stop_grace_ms: u64,
    /// A virtio-balloon device with free page reporting: pages the guest frees go back to
    /// the host (`devices::virtio::balloon`).
    #[serde(default)]
    pub balloon: bool,
}

fn default_stop_grace() -> u64 {
    5000
}

impl VmConfig {
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::NoKernel);
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.memory_mib < MIN_MEM_MIB {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        let mut ids = std::collections::HashSet::new();
        for d in &self.disks {
            if d.id.is_empty() || d.id.len() > 20 {
                return Err(ConfigError::Invalid {
                    what: "disk id",
                    value: d.id.clone(),
                    reason: "must be 1 to 20 bytes (virtio-blk serial)",
                });
            }
            if !ids.insert(d.id.clone()) {
                return Err(ConfigError::DuplicateId(d.id.clone()));
            }
        }
        if self.disk_slots > MAX_DISK_SLOTS {
            return Err(ConfigError::DiskSlots(self.disk_slots));
        }
        for n in &self.net {
            if n.tap.is_empty() || n.tap.len() >= libc::IFNAMSIZ {
                return Err(ConfigError::Invalid {
                    what: "tap name",
                    value: n.tap.clone(),
                    reason: "must be 1 to 15 bytes",
                });
            }
            if let Some(m) = &n.mac {
                parse_mac(m)?;
            }
        }
        if let Some(v) = &self.vsock
            && v.guest_cid < 3
        {
            return Err(ConfigError::Cid(v.guest_cid));
        }
        Ok(())
    }
}

/// Parses `xx:xx:xx:xx:xx:xx`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], ConfigError> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(ConfigError::Mac(s.to_string()));
    }
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return Err(ConfigError::Mac(s.to_string()));
        }
        mac[i] = u8::from_str_radix(p, 16).map_err(|_| ConfigError::Mac(s.to_string()))?;
    }
    Ok(mac)
}

/// A stable, locally administered unicast MAC derived from a name.
pub fn derive_mac(name: &str) -> [u8; 6] {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    [0x06, 0xfe, b[0], b[1], b[2], b[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> VmConfig {
        serde_json::from_str(r#"{"kernel": "/k"}"#).expect("minimal config parses")
    }

    #[test]
    fn defaults_and_validation() {
        let c = base();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.memory_mib, 128);
        assert_eq!(c.serial, SerialConfig::Stdout);
        c.validate().expect("valid");
        let mut c2 = c.clone();
        c2.vcpus = 0;
        assert!(matches!(c2.validate(), Err(ConfigError::Vcpus(0))));
        let mut c3 = c.clone();
        c3.memory_mib = 1;
        assert!(matches!(c3.validate(), Err(ConfigError::Memory(1))));
        let mut c4 = c;
        c4.vsock = Some(VsockConfig {
            guest_cid: 2,
            uds_path: "/x".into(),
        });
        assert!(matches!(c4.validate(), Err(ConfigError::Cid(2))));
    }

    #[test]
    fn full_config_and_unknown_fields() {
        let c: VmConfig = serde_json::from_str(
            r#"{"kernel":"/k","initrd":"/i","vcpus":2,"memory_mib":64,
                "disks":[{"id":"root","path":"/d","read_only":true}],
                "net":[{"tap":"tap0","mac":"06:00:00:00:00:01"}],
                "vsock":{"guest_cid":3,"uds_path":"/v.sock"},
                "serial":{"kind":"file","path":"/s.log"}}"#,
        )
        .expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.serial, SerialConfig::File("/s.log".into()));
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","bogus":1}"#).is_err());
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("06:00:0a:0B:ff:01").expect("ok"),
            [6, 0, 10, 11, 255, 1]
        );
        assert!(parse_mac("06:00:0a:0B:ff").is_err());
        assert!(parse_mac("06:00:0a:0B:ff:zz").is_err());
        let m = derive_mac("tap0");
        assert_eq!(m[0] & 0x03, 0x02, "locally administered unicast");
        assert_eq!(m, derive_mac("tap0"));
    }

    #[test]
    fn duplicate_disk_ids_rejected() {
        let mut c = base();
        let d = DiskConfig {
            id: "a".into(),
            path: "/d".into(),
            read_only: false,
        };
        c.disks = vec![d.clone(), d];
        assert!(matches!(c.validate(), Err(ConfigError::DuplicateId(_))));
    }
}
