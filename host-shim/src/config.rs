//! huskd configuration: `/etc/husk/config.toml` (or `huskd --config PATH`).
//! Every key is optional; defaults below.
//!
//! ```toml
//! socket = "/run/husk/huskd.sock"     # CRI gRPC socket (mode 0660)
//! state_dir = "/var/lib/husk"         # persistent state (images, pods)
//! run_dir = "/run/husk"               # runtime files (pod sockets below it: at most 24 bytes
//!                                     # with a namespace handler, 60 with VM handlers only)
//! log_level = "info"                  # tracing filter; RUST_LOG overrides
//!
//! [image]
//! registry_config_dir = "/etc/husk/certs.d"   # <registry>/hosts.toml files
//! docker_config = "/root/.docker/config.json" # registry credentials
//! max_concurrent_downloads = 3
//!
//! [runtime]
//! default_handler = "husk"            # RuntimeClass handler used when the CRI names none
//! agent_binary = ""                   # husk-agent for husk-ns ("" = next to huskd, else $PATH)
//! cgroup_parent = "husk"              # pod cgroups: <cgroup_parent>/<pod id> unless the CRI gives one
//! agent_start_timeout_ms = 10000      # husk-ns: agent process up and answering
//! restrict_oom_score_adj = false      # clamp containers' oom_score_adj to huskd's own (hosts where
//!                                     # root lacks CAP_SYS_RESOURCE and cannot lower it)
//! # handler name -> sandbox kind: "vm" (husk-vmm on KVM), "qemu" (QEMU, accel from
//! # runtime.vm.qemu_accel) or "namespace"; a table picks QEMU's accel per handler.
//! [runtime.handlers]
//! husk = "vm"                         # VM sandbox on husk-vmm (needs hardware KVM)
//! husk-qemu = { kind = "qemu", accel = "auto" }   # VM sandbox on QEMU: kvm, else tcg
//! husk-ns = "namespace"               # namespace sandbox: container-level isolation, NOT a VM
//!
//! [runtime.vm]                        # VM sandbox (both backends)
//! kernel = "/var/lib/husk/guest/bzImage"            # guest kernel (images/build-kernel.sh)
//! initrd = "/var/lib/husk/guest/initramfs.cpio.gz"  # initramfs with husk-agent as /init
//! kernel_params = ""                  # appended to the guest kernel command line
//! vcpus = 1                           # per pod, plus the pod's CPU limit (rounded up)
//! memory_mib = 256                    # per pod, plus the pod's memory limit
//! max_vcpus = 8
//! max_memory_mib = 8192
//! boot_timeout_ms = 60000             # VMM start -> agent answering (TCG is slow); also
//!                                     # the deadline of the pod's setup calls after it
//! log_max_bytes = 4194304             # each VM pod log (console, VMM, helpers), over two files
//! qemu_binary = "qemu-system-x86_64"
//! qemu_accel = "auto"                 # "kvm" | "tcg" | "auto" (kvm when /dev/kvm works)
//! vmm_binary = ""                     # husk-vmm ("" = next to huskd, else $PATH)
//! hotplug_slots = 8                   # QEMU PCIe root ports for image disks added later
//! tcg_tb_mib = 32                     # QEMU/TCG translation cache per VM (0 = QEMU's default)
//! free_page_reporting = false         # virtio-balloon free page reporting (QEMU and husk-vmm)
//! jail = true                         # VMM and helpers jailed (docs/security.md)
//! jail_uid_base = 1879048192          # pod n's processes run as uid = gid = base + n ...
//! jail_uid_count = 65536              # ... n < count (held in <run_dir>/jail-uids)
//!
//! [runtime.vm.pool]                   # warm VMs per VM handler, booted in the background
//! size = 1                            # per VM handler; 0 = no pool (each pod boots its VM)
//! handlers = { husk-qemu = 4 }        # per handler sizes, overriding `size`
//! memory_budget_mib = 4096            # guest RAM all pooled VMs together may hold
//! parallel_boots = 2                  # pooled VMs booting at once, per handler
//! vcpus = 0                           # a pooled VM's size (0 = runtime.vm's vcpus / memory_mib);
//! memory_mib = 0                      # pods whose limits ask for more boot their own VM
//!
//! [network]
//! cni_conf_dir = "/etc/cni/net.d"     # first .conflist/.conf/.json (by name) is the pod network
//! cni_bin_dirs = ["/usr/lib/cni", "/opt/cni/bin"]  # where plugin binaries are looked up, in order
//! cni_timeout_ms = 120000             # one plugin run (ADD/DEL/CHECK)
//!
//! [metrics]                           # Prometheus endpoint, off unless set
//! address = "127.0.0.1:9464"          # GET /metrics (docs/metrics.md)
//! ```

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG: &str = "/etc/husk/config.toml";
pub const DEFAULT_SOCKET: &str = "/run/husk/huskd.sock";
/// Linux's unix socket path buffer (`sun_path`), terminating NUL included:
/// a socket path has at most `SUN_PATH_MAX - 1` bytes.
pub const SUN_PATH_MAX: usize = 108;
/// The longest socket path huskd derives below `run_dir` for a `husk-ns`
/// pod, minus `run_dir`: its port-forward socket
/// `/pods/<64-hex pod id>/forward.sock`. The sandbox tests check the real
/// paths against these bounds.
pub const NS_RUN_DIR_SOCKET_SUFFIX_MAX: usize = "/pods/".len() + 64 + "/forward.sock".len();
/// The same for a VM pod: husk-vmm's vsock muxer reaches a guest-initiated
/// port at `/vm/<16 hex>/sock/vsock.sock_<u32 port>` (the other sockets in the
/// jail-writable `sock/`, `control.sock`, `qmp.sock`, `vu.sock`, `fs.sock`, are shorter).
pub const VM_RUN_DIR_SOCKET_SUFFIX_MAX: usize =
    "/vm/".len() + 16 + "/sock/vsock.sock_".len() + "4294967295".len();

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub log_level: String,
    pub image: ImageConfig,
    pub runtime: RuntimeConfig,
    pub network: NetworkConfig,
    pub streaming: StreamingConfig,
    pub metrics: MetricsConfig,
}

/// `[metrics]`: the Prometheus scrape endpoint (off unless `address` is set).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// host:port serving `GET /metrics` (port 0 = a random free port, logged).
    pub address: Option<String>,
}

/// Pod networking with CNI plugins (see docs/networking.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
    pub cni_timeout_ms: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            cni_conf_dir: "/etc/cni/net.d".into(),
            cni_bin_dirs: vec!["/usr/lib/cni".into(), "/opt/cni/bin".into()],
            cni_timeout_ms: 120_000,
        }
    }
}

/// `[streaming]`: the server Exec/Attach/PortForward URLs point at.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamingConfig {
    /// host:port to listen on (port 0 = a random free port).
    pub address: String,
    /// How long a URL handed out by Exec/Attach/PortForward stays usable.
    pub token_ttl_secs: u64,
    /// Address put into the URLs (default: the bound address).
    pub advertise: Option<String>,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:0".into(),
            token_ttl_secs: 60,
            advertise: None,
        }
    }
}

/// The kind of sandbox a RuntimeClass handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerKind {
    /// A husk-vmm microVM per pod (hardware KVM).
    Vm,
    /// A QEMU VM per pod (KVM or TCG), same guest image as `Vm`.
    Qemu,
    /// A husk-agent host process in fresh namespaces per pod (no VM).
    Namespace,
}

impl HandlerKind {
    pub fn is_vm(self) -> bool {
        matches!(self, HandlerKind::Vm | HandlerKind::Qemu)
    }
}

/// QEMU's accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
    /// KVM when /dev/kvm opens, else TCG.
    #[default]
    Auto,
}

/// One RuntimeClass handler: `"qemu"` or `{ kind = "qemu", accel = "tcg" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Handler {
    pub kind: HandlerKind,
    /// QEMU only; None = runtime.vm.qemu_accel.
    pub accel: Option<Accel>,
}

impl From<HandlerKind> for Handler {
    fn from(kind: HandlerKind) -> Self {
        Self { kind, accel: None }
    }
}

impl<'de> Deserialize<'de> for Handler {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Kind(HandlerKind),
            Table {
                kind: HandlerKind,
                #[serde(default)]
                accel: Option<Accel>,
            },
        }
        Ok(match Repr::deserialize(d)? {
            Repr::Kind(kind) => kind.into(),
            Repr::Table { kind, accel } => Handler { kind, accel },
        })
    }
}

/// Default `runtime.vm.log_max_bytes`: what each VM pod log keeps over its two files.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 4 << 20;
/// Smallest `runtime.vm.log_max_bytes` (a rotation every few lines would be churn).
const MIN_LOG_BYTES: u64 = 64 << 10;

/// The VM sandbox's guest image, sizes and VMM binaries.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_params: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub max_vcpus: u32,
    pub max_memory_mib: u32,
    /// VMM start to the agent's first answer; also the deadline of each of the pod's setup
    /// calls (CreateSandbox, ConfigureNetwork) after it, which a starved guest answers late.
    pub boot_timeout_ms: u64,
    /// Bytes each VM pod log (guest console, VMM, helpers) keeps over its two files.
    pub log_max_bytes: u64,
    pub qemu_binary: PathBuf,
    pub qemu_accel: Accel,
    pub vmm_binary: Option<PathBuf>,
    pub hotplug_slots: u32,
    /// Jail the VMM and helper processes (unprivileged uid/gid per pod, private minimal root).
    pub jail: bool,
    pub jail_uid_base: u32,
    pub jail_uid_count: u32,
    /// QEMU/TCG translation cache per VM, MiB (0: QEMU's default, which grows up to 1 GiB).
    pub tcg_tb_mib: u32,
    /// A virtio-balloon device with free page reporting (guest-freed pages go back), on
    /// QEMU and on husk-vmm.
    pub free_page_reporting: bool,
    /// Warm VMs booted ahead of the pods that will use them (`sandbox::vm::pool`).
    pub pool: PoolConfig,
}

/// `[runtime.vm.pool]`: per VM handler, VMs booted to "agent ready" in the background,
/// each claimed by one RunPodSandbox.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Warm VMs per VM handler (0: no pool, every pod boots its own VM).
    pub size: u32,
    /// Per handler sizes, overriding `size` (`husk-qemu = 20`).
    pub handlers: BTreeMap<String, u32>,
    /// Guest RAM all pooled VMs together may hold, MiB (the pools stop refilling there).
    pub memory_budget_mib: u64,
    /// Pooled VMs booting at once, per handler.
    pub parallel_boots: u32,
    /// A pooled VM's vCPUs and memory (0: runtime.vm's `vcpus` / `memory_mib`). A pod whose
    /// limits ask for more gets a VM of its own.
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Images whose disks each pooled VM gets attached while it waits (pulled images
    /// only), so a pod's first container of one of them starts without a disk hot-plug.
    /// Every pod that claims such a VM can read these images: list public ones.
    pub images: Vec<String>,
    /// Pod starts a pooled VM rehearses after its boot (a throwaway sandbox and container
    /// each, see the agent's `Rehearse`; 0: none): under TCG its pod's first container then
    /// runs on code QEMU has already translated. One by default: a second pass (it
    /// translates again what QEMU's mid-rehearsal cache flush dropped) makes a single start
    /// faster at p50 but leaves the 32 MiB cache nearly full, so a pod start flushes it
    /// more often: worse p99 and bursts (SPECIFICATION.md).
    pub rehearsals: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            size: 1,
            handlers: BTreeMap::new(),
            memory_budget_mib: 4096,
            parallel_boots: 2,
            vcpus: 0,
            memory_mib: 0,
            images: Vec::new(),
            rehearsals: 1,
        }
    }
}

impl PoolConfig {
    /// The pool size of `handler`.
    pub fn size_of(&self, handler: &str) -> u32 {
        self.handlers.get(handler).copied().unwrap_or(self.size)
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            kernel: "/var/lib/husk/guest/bzImage".into(),
            initrd: "/var/lib/husk/guest/initramfs.cpio.gz".into(),
            kernel_params: String::new(),
            vcpus: 1,
            memory_mib: 256,
            max_vcpus: 8,
            max_memory_mib: 8192,
            boot_timeout_ms: 60_000,
            log_max_bytes: DEFAULT_LOG_MAX_BYTES,
            qemu_binary: "qemu-system-x86_64".into(),
            qemu_accel: Accel::Auto,
            vmm_binary: None,
            hotplug_slots: 8,
            jail: true,
            jail_uid_base: 0x7000_0000,
            jail_uid_count: 65536,
            tcg_tb_mib: 32,
            free_page_reporting: false,
            pool: PoolConfig::default(),
        }
    }
}

impl VmConfig {
    /// husk-vmm: configured, next to the running executable, or on $PATH.
    pub fn vmm_path(&self) -> PathBuf {
        beside_exe(self.vmm_binary.as_ref(), "husk-vmm")
    }
}

/// `configured` if set, else `name` next to the running executable, else `name` ($PATH).
fn beside_exe(configured: Option<&PathBuf>, name: &str) -> PathBuf {
    if let Some(p) = configured.filter(|p| !p.as_os_str().is_empty()) {
        return p.clone();
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        let p = dir.join(name);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(name)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    pub default_handler: String,
    pub agent_binary: Option<PathBuf>,
    pub cgroup_parent: String,
    pub agent_start_timeout_ms: u64,
    pub restrict_oom_score_adj: bool,
    pub handlers: BTreeMap<String, Handler>,
    pub vm: VmConfig,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            default_handler: "husk".into(),
            agent_binary: None,
            cgroup_parent: "husk".into(),
            agent_start_timeout_ms: 10_000,
            restrict_oom_score_adj: false,
            handlers: BTreeMap::from([
                ("husk".to_string(), HandlerKind::Vm.into()),
                ("husk-qemu".to_string(), HandlerKind::Qemu.into()),
                ("husk-ns".to_string(), HandlerKind::Namespace.into()),
            ]),
            vm: VmConfig::default(),
        }
    }
}

impl RuntimeConfig {
    /// The sandbox kind of `handler` ("" = the default handler).
    pub fn resolve<'a>(&'a self, handler: &'a str) -> Option<(&'a str, Handler)> {
        let name = if handler.is_empty() {
            self.default_handler.as_str()
        } else {
            handler
        };
        self.handlers.get(name).map(|k| (name, *k))
    }

    /// The husk-agent binary: configured, next to the running executable, or `husk-agent` on $PATH.
    pub fn agent_path(&self) -> PathBuf {
        beside_exe(self.agent_binary.as_ref(), "husk-agent")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageConfig {
    pub registry_config_dir: Option<PathBuf>,
    pub docker_config: Option<PathBuf>,
    pub max_concurrent_downloads: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: DEFAULT_SOCKET.into(),
            state_dir: "/var/lib/husk".into(),
            run_dir: "/run/husk".into(),
            log_level: "info".into(),
            image: ImageConfig::default(),
            runtime: RuntimeConfig::default(),
            network: NetworkConfig::default(),
            streaming: StreamingConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl Default for ImageConfig {
    fn default() -> Self {
        let docker = std::env::var_os("DOCKER_CONFIG")
            .map(|d| PathBuf::from(d).join("config.json"))
            .unwrap_or_else(|| PathBuf::from("/root/.docker/config.json"));
        Self {
            registry_config_dir: Some("/etc/husk/certs.d".into()),
            docker_config: Some(docker),
            max_concurrent_downloads: 3,
        }
    }
}

impl Config {
    /// Loads `path`; a missing default config file means all defaults, a
    /// missing explicitly named file is an error.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Self::default());
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let cfg: Config =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { path, source })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.image.max_concurrent_downloads == 0 || self.image.max_concurrent_downloads > 64 {
            return Err(ConfigError::Invalid(
                "image.max_concurrent_downloads must be 1..=64".into(),
            ));
        }
        if !self
            .runtime
            .handlers
            .contains_key(&self.runtime.default_handler)
        {
            return Err(ConfigError::Invalid(format!(
                "runtime.default_handler {:?} is not in runtime.handlers",
                self.runtime.default_handler
            )));
        }
        let vm = &self.runtime.vm;
        if vm.vcpus == 0 || vm.vcpus > vm.max_vcpus || vm.max_vcpus > 255 {
            return Err(ConfigError::Invalid(
                "runtime.vm: need 1 <= vcpus <= max_vcpus <= 255".into(),
            ));
        }
        if vm.memory_mib < 64 || vm.memory_mib > vm.max_memory_mib {
            return Err(ConfigError::Invalid(
                "runtime.vm: need 64 <= memory_mib <= max_memory_mib".into(),
            ));
        }
        if vm.log_max_bytes < MIN_LOG_BYTES {
            return Err(ConfigError::Invalid(format!(
                "runtime.vm.log_max_bytes must be at least {MIN_LOG_BYTES}"
            )));
        }
        let pool = &vm.pool;
        if pool.parallel_boots == 0 || pool.parallel_boots > 64 {
            return Err(ConfigError::Invalid(
                "runtime.vm.pool.parallel_boots must be 1..=64".into(),
            ));
        }
        if pool.vcpus > vm.max_vcpus || pool.memory_mib > vm.max_memory_mib {
            return Err(ConfigError::Invalid(
                "runtime.vm.pool: vcpus and memory_mib must be at most runtime.vm's max_vcpus / max_memory_mib".into(),
            ));
        }
        if pool.memory_mib != 0 && pool.memory_mib < 64 {
            return Err(ConfigError::Invalid(
                "runtime.vm.pool.memory_mib must be 0 or at least 64".into(),
            ));
        }
        if let Some(h) = pool.handlers.keys().find(|h| {
            self.runtime
                .handlers
                .get(*h)
                .is_none_or(|k| !k.kind.is_vm())
        }) {
            return Err(ConfigError::Invalid(format!(
                "runtime.vm.pool.handlers: {h:?} is not a VM handler in runtime.handlers"
            )));
        }
        if vm.hotplug_slots > 30 {
            return Err(ConfigError::Invalid(
                "runtime.vm.hotplug_slots must be at most 30".into(),
            ));
        }
        if vm.jail
            && (vm.jail_uid_base < 1000
                || vm.jail_uid_count == 0
                || vm
                    .jail_uid_base
                    .checked_add(vm.jail_uid_count)
                    .is_none_or(|end| end >= u32::MAX - 1))
        {
            return Err(ConfigError::Invalid(
                "runtime.vm: need jail_uid_base >= 1000, jail_uid_count >= 1 and the range below 2^32-2"
                    .into(),
            ));
        }
        if self.runtime.cgroup_parent.is_empty() || self.runtime.cgroup_parent.contains("..") {
            return Err(ConfigError::Invalid(
                "runtime.cgroup_parent must be a non-empty relative cgroup path".into(),
            ));
        }
        for (k, p) in [
            ("socket", &self.socket),
            ("state_dir", &self.state_dir),
            ("run_dir", &self.run_dir),
            ("network.cni_conf_dir", &self.network.cni_conf_dir),
        ] {
            if !p.is_absolute() {
                return Err(ConfigError::Invalid(format!(
                    "{k} must be an absolute path, got {}",
                    p.display()
                )));
            }
        }
        check_socket_room("socket", &self.socket, 0)?;
        check_socket_room("run_dir", &self.run_dir, self.run_dir_socket_suffix())?;
        if let Some(p) = self.network.cni_bin_dirs.iter().find(|p| !p.is_absolute()) {
            return Err(ConfigError::Invalid(format!(
                "network.cni_bin_dirs must be absolute paths, got {}",
                p.display()
            )));
        }
        if self.network.cni_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "network.cni_timeout_ms must be positive".into(),
            ));
        }
        Ok(())
    }

    /// The longest socket path huskd derives below `run_dir` for the
    /// configured handlers, minus `run_dir`.
    pub fn run_dir_socket_suffix(&self) -> usize {
        let kinds = self.runtime.handlers.values().map(|h| h.kind);
        kinds
            .map(|k| match k {
                HandlerKind::Namespace => NS_RUN_DIR_SOCKET_SUFFIX_MAX,
                _ => VM_RUN_DIR_SOCKET_SUFFIX_MAX,
            })
            .max()
            .unwrap_or(0)
    }

    pub fn pods_state_dir(&self) -> PathBuf {
        self.state_dir.join("pods")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }

    /// Persisted pod network records (what CNI DEL needs after a crash).
    pub fn network_state_dir(&self) -> PathBuf {
        self.state_dir.join("network")
    }

    /// Bind-mounted pod network namespaces.
    pub fn netns_dir(&self) -> PathBuf {
        self.run_dir.join("netns")
    }
}

/// Refuses a path under which a socket path of `suffix` more bytes would
/// not fit in `sun_path` (bind(2) would fail at the first pod instead).
fn check_socket_room(key: &str, p: &Path, suffix: usize) -> Result<(), ConfigError> {
    // Count what join() will produce ("a/b/" and "a//b" are "a/b").
    let len = p.components().collect::<PathBuf>().as_os_str().len();
    if len + suffix < SUN_PATH_MAX {
        return Ok(());
    }
    let what = if suffix == 0 {
        format!("{len} bytes")
    } else {
        format!("{len} bytes, and huskd's socket paths under it up to {suffix} more")
    };
    Err(ConfigError::Invalid(format!(
        "{key} {} is too long for unix sockets: {what}, over the {SUN_PATH_MAX}-byte sun_path \
         limit ({} bytes at most{})",
        p.display(),
        SUN_PATH_MAX - 1 - suffix,
        if suffix == 0 { "" } else { " for it" },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(
            &p,
            "state_dir = \"/tmp/x\"\n[image]\nmax_concurrent_downloads = 5\n",
        )
        .unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.image.max_concurrent_downloads, 5);
        std::fs::write(
            &p,
            "[runtime]\ndefault_handler = \"husk-ns\"\n[runtime.handlers]\nhusk-ns = \"namespace\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(
            c.runtime.resolve(""),
            Some(("husk-ns", HandlerKind::Namespace.into()))
        );
        assert_eq!(c.runtime.resolve("husk"), None);
        std::fs::write(
            &p,
            "[runtime]\ndefault_handler = \"q\"\n[runtime.handlers]\nq = { kind = \"qemu\", accel = \"tcg\" }\n[runtime.vm]\nvcpus = 2\n",
        )
        .unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(
            c.runtime.resolve("q"),
            Some((
                "q",
                Handler {
                    kind: HandlerKind::Qemu,
                    accel: Some(Accel::Tcg)
                }
            ))
        );
        assert_eq!(c.runtime.vm.vcpus, 2);
        assert_eq!(c.runtime.vm.memory_mib, 256);
        assert_eq!(c.runtime.vm.log_max_bytes, 4 << 20);
        std::fs::write(&p, "[runtime.vm]\nlog_max_bytes = 65536\n").unwrap();
        assert_eq!(
            Config::load(Some(&p)).unwrap().runtime.vm.log_max_bytes,
            65536
        );
        std::fs::write(&p, "[runtime.vm]\nlog_max_bytes = 65535\n").unwrap();
        assert!(matches!(
            Config::load(Some(&p)),
            Err(ConfigError::Invalid(_))
        ));
        std::fs::write(&p, "[runtime]\ndefault_handler = \"nope\"\n").unwrap();
        assert!(matches!(
            Config::load(Some(&p)),
            Err(ConfigError::Invalid(_))
        ));
        let rd = RuntimeConfig::default();
        assert_eq!(rd.resolve(""), Some(("husk", HandlerKind::Vm.into())));
        assert_eq!(
            rd.resolve("husk-ns"),
            Some(("husk-ns", HandlerKind::Namespace.into()))
        );
        std::fs::write(&p, "sockett = \"/x\"\n").unwrap();
        assert!(matches!(
            Config::load(Some(&p)),
            Err(ConfigError::Parse { .. })
        ));
        std::fs::write(&p, "socket = \"rel\"\n").unwrap();
        assert!(matches!(
            Config::load(Some(&p)),
            Err(ConfigError::Invalid(_))
        ));
        assert!(matches!(
            Config::load(Some(&d.path().join("missing"))),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn run_dir_and_socket_fit_sun_path() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        let longest = SUN_PATH_MAX - 1 - NS_RUN_DIR_SOCKET_SUFFIX_MAX;
        assert_eq!(longest, 24, "/run/husk and the tests' temp dirs must fit");
        let dir = |n: usize| format!("/{}", "r".repeat(n - 1));
        std::fs::write(&p, format!("run_dir = \"{}\"\n", dir(longest))).unwrap();
        assert_eq!(
            Config::load(Some(&p)).unwrap().run_dir.as_os_str().len(),
            24
        );
        // A trailing slash is not counted.
        std::fs::write(&p, format!("run_dir = \"{}/\"\n", dir(longest))).unwrap();
        Config::load(Some(&p)).unwrap();
        std::fs::write(&p, format!("run_dir = \"{}\"\n", dir(longest + 1))).unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(
            e.starts_with("run_dir /rrrr")
                && e.contains("108-byte sun_path limit (24 bytes at most"),
            "{e}"
        );
        // Without a husk-ns handler only the VM sockets count.
        let vm_only = "[runtime]\ndefault_handler = \"q\"\n[runtime.handlers]\nq = \"qemu\"\n";
        let longest_vm = SUN_PATH_MAX - 1 - VM_RUN_DIR_SOCKET_SUFFIX_MAX;
        assert_eq!(longest_vm, 60);
        std::fs::write(&p, format!("run_dir = \"{}\"\n{vm_only}", dir(longest_vm))).unwrap();
        Config::load(Some(&p)).unwrap();
        std::fs::write(
            &p,
            format!("run_dir = \"{}\"\n{vm_only}", dir(longest_vm + 1)),
        )
        .unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("(60 bytes at most for it)"), "{e}");
        std::fs::write(&p, format!("socket = \"{}\"\n", dir(107))).unwrap();
        Config::load(Some(&p)).unwrap();
        std::fs::write(&p, format!("socket = \"{}\"\n", dir(108))).unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(
            e.starts_with("socket /rrrr") && e.contains("108-byte"),
            "{e}"
        );
    }
}
