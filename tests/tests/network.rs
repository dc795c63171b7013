#![allow(clippy::unwrap_used)]
//! Pod networking with CNI end to end: a real huskd running the standard
//! plugins (bridge + host-local + portmap + loopback, from
//! containernetworking-plugins) with a config list the test writes into
//! huskd's own CNI conf dir. Each test gets its own bridge name, subnet and
//! IPAM data dir and deletes the bridge at the end; everything else (netns,
//! veths, iptables rules, IPAM allocations) must be gone once the pods are
//! removed — that is what the tests check.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use husk_proto::cri;
use husk_tests::cri_env::CriEnv;
use husk_tests::huskd::Huskd;
use husk_tests::registry;
use husk_tests::require;
use husk_tests::runtime::{NS, VM_HANDLERS};
use tonic::Code;

const NEEDS: &str = "needs root, /usr/bin/docker-registry, /bin/busybox, iptables and the CNI plugins in /usr/lib/cni (tests/install-deps.sh installs them)";
const CNI_BIN: &str = "/usr/lib/cni";

fn env_ok() -> bool {
    registry::available()
        && husk_tests::is_root()
        && Path::new("/bin/busybox").exists()
        && ["bridge", "host-local", "portmap", "loopback"]
            .iter()
            .all(|p| Path::new(CNI_BIN).join(p).exists())
        && Command::new("iptables-save").output().is_ok()
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One test's CNI network: bridge, subnets, IPAM dir. Deletes the bridge on drop.
struct Net {
    name: String,
    bridge: String,
    /// The third octet of 198.18.X.0/24 (and fd00:4b:X::/64).
    x: u8,
    ipam_dir: PathBuf,
}

impl Net {
    fn new(dir: &Path) -> Net {
        let routes = sh(&["ip", "-o", "route"]);
        let x = loop {
            let x: u8 = rand::random::<u8>().clamp(1, 254);
            if !routes.contains(&format!("198.18.{x}.")) {
                break x;
            }
        };
        let tag: u32 = rand::random();
        Net {
            name: format!("husk-test-{tag:08x}"),
            bridge: format!("hk{tag:08x}"),
            x,
            ipam_dir: dir.join("ipam"),
        }
    }

    fn gateway(&self) -> String {
        format!("198.18.{}.1", self.x)
    }

    /// The config list: bridge (gateway on the host side) with dual-stack
    /// host-local IPAM, portmap and loopback. `prefix` narrows the IPv4 range.
    fn conflist(&self, prefix: u8) -> String {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": self.name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": self.ipam_dir,
                        "ranges": [
                            [{"subnet": format!("198.18.{}.0/{prefix}", self.x)}],
                            [{"subnet": format!("fd00:4b:{:x}::/64", self.x)}]
                        ],
                        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
                    }
                },
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
                {"type": "loopback"}
            ]
        })
        .to_string()
    }

    fn install(&self, d: &Huskd, prefix: u8) {
        std::fs::write(
            d.cni_conf_dir().join("10-test.conflist"),
            self.conflist(prefix),
        )
        .unwrap();
    }

    /// IPs host-local still has allocated.
    fn allocations(&self) -> Vec<String> {
        std::fs::read_dir(self.ipam_dir.join(&self.name))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<IpAddr>().is_ok())
            .collect()
    }

    fn veths(&self) -> String {
        sh(&["ip", "-o", "link", "show", "master", &self.bridge])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// The shared CRI environment (husk-ns) with the CNI plugins, `extra` huskd
/// config after the `[network]` keys. On drop it removes what pods a failed
/// test left through huskd, so that CNI DEL runs.
async fn env(extra: &str) -> CriEnv {
    CriEnv::new(NS, &format!("cni_bin_dirs = [\"{CNI_BIN}\"]\n{extra}"))
        .await
        .remove_pods_on_drop()
}

/// What the network tests do with pods, on top of [`CriEnv`].
trait NetEnv {
    /// A pod serving "hi-<name>" over HTTP on :8080 (busybox httpd).
    async fn server(&self, cfg: &cri::PodSandboxConfig) -> (String, String);
    async fn server_on(&self, cfg: &cri::PodSandboxConfig, handler: &str) -> (String, String);
    /// A pod with one running container, "web".
    async fn pod_on(
        &self,
        cfg: &cri::PodSandboxConfig,
        handler: &str,
        cmd: &[&str],
    ) -> (String, String);
    /// ExecSync (20 s): the exit code and stdout followed by stderr.
    async fn exec_out(&self, ctr: &str, cmd: &[&str]) -> (i32, String);
    async fn get(&self, ctr: &str, ip: &str, port: u16) -> String;
    async fn network_ready(&self) -> cri::RuntimeCondition;
    fn assert_clean(&self, net: &Net, pods: &[&str], ips: &[String]);
}

impl NetEnv for CriEnv {
    async fn server(&self, cfg: &cri::PodSandboxConfig) -> (String, String) {
        self.server_on(cfg, NS).await
    }

    async fn server_on(&self, cfg: &cri::PodSandboxConfig, handler: &str) -> (String, String) {
        let name = &cfg.metadata.as_ref().unwrap().name;
        let script = format!(
            "busybox mkdir -p /tmp/w && echo hi-{name} > /tmp/w/index.html && exec httpd -f -p 8080 -h /tmp/w"
        );
        self.pod_on(cfg, handler, &["sh", "-c", &script]).await
    }

    async fn pod_on(
        &self,
        cfg: &cri::PodSandboxConfig,
        handler: &str,
        cmd: &[&str],
    ) -> (String, String) {
        let pod = self
            .run_pod_on(cfg, handler)
            .await
            .unwrap_or_else(|e| panic!("run pod: {e:?}\n{}", self.d.log()));
        let id = self.run(&pod, &self.ctr("web", cmd), cfg).await;
        (pod, id)
    }

    async fn exec_out(&self, ctr: &str, cmd: &[&str]) -> (i32, String) {
        let r = self.exec(ctr, cmd, 20).await.unwrap();
        (
            r.exit_code,
            format!(
                "{}{}",
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            ),
        )
    }

    /// An HTTP GET from a container with busybox nc (its wget crashes in a
    /// static build without NSS files), retried briefly (httpd may still be
    /// starting); the body.
    async fn get(&self, ctr: &str, ip: &str, port: u16) -> String {
        let script = format!("busybox printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} {port}");
        let mut last = String::new();
        for _ in 0..50 {
            let (code, out) = self.exec_out(ctr, &["sh", "-c", &script]).await;
            if code == 0
                && let Some((_, body)) = out.split_once("\r\n\r\n")
            {
                return body.to_string();
            }
            last = format!("exit {code}: {out}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (_, diag) = self
            .exec_out(
                ctr,
                &[
                    "sh",
                    "-c",
                    "busybox ip addr; busybox ip route; busybox netstat -ltn",
                ],
            )
            .await;
        panic!(
            "GET {ip}:{port} from {ctr} failed: {last}\n{diag}\n{}",
            self.d.log()
        );
    }

    async fn network_ready(&self) -> cri::RuntimeCondition {
        self.c
            .runtime
            .clone()
            .status(cri::StatusRequest { verbose: false })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
            .conditions
            .into_iter()
            .find(|c| c.r#type == "NetworkReady")
            .unwrap()
    }

    /// Nothing of the pods' networks is left: no pinned netns, no veth on
    /// the bridge, no iptables rule naming a pod or its IPs, no IPAM
    /// allocation, no network record.
    fn assert_clean(&self, net: &Net, pods: &[&str], ips: &[String]) {
        let netns: Vec<_> = std::fs::read_dir(self.d.run_dir().join("netns"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            // The warm VM pools' own namespace lives as long as huskd.
            .filter(|p| !p.ends_with("pool"))
            .collect();
        assert!(netns.is_empty(), "netns left: {netns:?}");
        assert_eq!(net.veths().trim(), "", "veths left on {}", net.bridge);
        let rules = sh(&["iptables-save"]) + &sh(&["ip6tables-save"]);
        for needle in pods
            .iter()
            .map(|s| s.to_string())
            .chain(ips.iter().cloned())
        {
            let hits: Vec<&str> = rules.lines().filter(|l| l.contains(&needle)).collect();
            assert!(
                hits.is_empty(),
                "iptables rules left for {needle}: {hits:#?}"
            );
        }
        assert!(
            net.allocations().is_empty(),
            "IPAM allocations left: {:?}",
            net.allocations()
        );
        let records: Vec<_> = std::fs::read_dir(self.d.state_dir().join("network"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(records.is_empty(), "network records left: {records:?}");
    }
}

#[tokio::test]
async fn pods_reach_each_other_the_host_and_host_ports() {
    require!(env_ok(), NEEDS);
    let e = env("").await;
    let net = Net::new(e.d.dir.path());
    // No config yet: not ready, with the reason; pods keep a loopback-only namespace.
    let cond = e.network_ready().await;
    assert!(
        !cond.status && cond.reason == "NetworkPluginNotReady",
        "{cond:?}"
    );
    assert!(cond.message.contains("no network config"), "{cond:?}");
    net.install(&e.d, 24);
    let cond = e.network_ready().await;
    assert!(cond.status, "{cond:?}");
    assert!(cond.message.contains(&net.name), "{cond:?}");

    let host_port = husk_tests::free_port();
    let mut a_cfg = e.pod("net-a");
    a_cfg.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 8080,
        host_port: host_port as i32,
        host_ip: String::new(),
    }];
    a_cfg.dns_config = Some(cri::DnsConfig {
        servers: vec!["198.18.0.53".into()],
        searches: vec!["svc.husk.test".into()],
        options: vec!["ndots:3".into()],
    });
    let (a, a_ctr) = e.server(&a_cfg).await;
    let (b, b_ctr) = e.server(&e.pod("net-b")).await;

    // Status: one IPv4 and one IPv6 address each, from the test's ranges.
    let (a_ips, b_ips) = (e.pod_ips(&a).await, e.pod_ips(&b).await);
    for ips in [&a_ips, &b_ips] {
        assert_eq!(ips.len(), 2, "{ips:?}");
        assert!(ips[0].starts_with(&format!("198.18.{}.", net.x)), "{ips:?}");
        assert!(
            ips[1].starts_with(&format!("fd00:4b:{:x}:", net.x)),
            "{ips:?}"
        );
    }
    assert_ne!(a_ips, b_ips);
    // ... and they are what the container sees on eth0.
    let (_, addrs) = e
        .exec_out(&a_ctr, &["busybox", "ip", "-o", "addr", "show", "eth0"])
        .await;
    assert!(addrs.contains(&format!("{}/24", a_ips[0])), "{addrs}");
    assert!(addrs.contains(&format!("{}/64", a_ips[1])), "{addrs}");

    // Pod to pod by IP, both ways, IPv4 and IPv6.
    assert_eq!(e.get(&b_ctr, &a_ips[0], 8080).await.trim(), "hi-net-a");
    assert_eq!(e.get(&a_ctr, &b_ips[0], 8080).await.trim(), "hi-net-b");
    assert_eq!(e.get(&a_ctr, &b_ips[1], 8080).await.trim(), "hi-net-b");
    let (code, out) = e
        .exec_out(
            &a_ctr,
            &["busybox", "ping", "-c", "1", "-W", "5", &b_ips[0]],
        )
        .await;
    assert_eq!(code, 0, "ping: {out}");

    // A pod reaches a server on the host side of the bridge.
    let l = TcpListener::bind(format!("{}:0", net.gateway())).unwrap();
    let port = l.local_addr().unwrap().port();
    let got = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    let (code, out) = e
        .exec_out(
            &b_ctr,
            &[
                "sh",
                "-c",
                &format!("echo from-pod | nc -w 5 {} {port}", net.gateway()),
            ],
        )
        .await;
    assert_eq!(code, 0, "nc: {out}");
    assert_eq!(got.join().unwrap().trim(), "from-pod");

    // hostPort (portmap) from the host namespace.
    let mut s = TcpStream::connect((net.gateway().as_str(), host_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.contains("hi-net-a"), "{resp}");

    // The CRI DNS config is the container's resolv.conf.
    let (_, resolv) = e.exec_out(&a_ctr, &["cat", "/etc/resolv.conf"]).await;
    assert!(resolv.contains("nameserver 198.18.0.53"), "{resolv}");
    assert!(resolv.contains("search svc.husk.test"), "{resolv}");
    assert!(resolv.contains("options ndots:3"), "{resolv}");

    // While the pods run: their allocations and the hostPort rule exist.
    assert_eq!(net.allocations().len(), 4, "{:?}", net.allocations());
    let rules = sh(&["iptables-save"]);
    assert!(rules.contains(&format!("--dport {host_port}")));
    assert!(
        rules.contains(&a),
        "portmap's rules name the pod (what assert_clean looks for)"
    );

    e.stop_and_remove_pod(&a).await;
    e.stop_and_remove_pod(&b).await;
    // Idempotent.
    e.remove_pod(&a).await.unwrap();
    e.assert_clean(&net, &[&a, &b], &[a_ips, b_ips].concat());
    assert!(!sh(&["iptables-save"]).contains(&format!("--dport {host_port}")));
}

#[tokio::test]
async fn kill9_huskd_then_remove_is_clean() {
    require!(env_ok(), NEEDS);
    let mut e = env("").await;
    let net = Net::new(e.d.dir.path());
    net.install(&e.d, 24);
    let host_port = husk_tests::free_port();
    let mut cfg = e.pod("crash");
    cfg.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 8080,
        host_port: host_port as i32,
        host_ip: String::new(),
    }];
    let (pod, _ctr) = e.server(&cfg).await;
    let ips = e.pod_ips(&pod).await;
    assert_eq!(ips.len(), 2);
    e.d.crash_and_restart().await.unwrap();
    e.c = e.d.clients().await.unwrap();
    // The network survived the restart and is still reported, and CHECK
    // (cniVersion 1.0.0) ran at startup: bridge and host-local pass; the
    // portmap of containernetworking-plugins 1.1.1 fails its own CHECK on
    // any host with ip6tables (it looks for the IPv4 rules in the IPv6
    // table), which huskd logs as a warning and otherwise ignores.
    assert_eq!(e.pod_ips(&pod).await, ips);
    husk_tests::runtime::eventually("CHECK after restart", Duration::from_secs(20), || {
        let log = e.d.log();
        async move { log.contains("pod network checked") || log.contains("CHECK failed") }
    })
    .await;
    let log = e.d.log();
    if let Some(l) = log.lines().find(|l| l.contains("CHECK failed")) {
        assert!(
            l.contains("cni plugin portmap CHECK: could not check ipv6 dnat"),
            "{l}"
        );
    }
    let mut s = TcpStream::connect((net.gateway().as_str(), host_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.contains("hi-crash"), "{resp}");
    // Removing without a stop first, after the crash: DEL from the record.
    e.remove_pod(&pod)
        .await
        .unwrap_or_else(|err| panic!("remove: {err:?}\n{}", e.d.log()));
    e.assert_clean(&net, &[&pod], &ips);
}

#[tokio::test]
async fn failed_add_leaks_nothing() {
    require!(env_ok(), NEEDS);
    let e = env("").await;
    let net = Net::new(e.d.dir.path());
    // A /30: the gateway takes .1, one pod gets .2, the next ADD fails in IPAM.
    net.install(&e.d, 30);
    let (first, _) = e.server(&e.pod("only")).await;
    let first_ips = e.pod_ips(&first).await;
    let err = e.run_pod(&e.pod("one-too-many")).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(
        err.message().contains("host-local") || err.message().contains("no IP addresses available"),
        "{err:?}"
    );
    assert!(
        err.message().contains("bridge"),
        "names the plugin: {err:?}"
    );
    // Only the first pod's netns, veth and allocations remain.
    let netns: Vec<_> = std::fs::read_dir(e.d.run_dir().join("netns"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(netns.len(), 1);
    assert_eq!(net.veths().lines().count(), 1, "{}", net.veths());
    assert_eq!(net.allocations().len(), 2, "{:?}", net.allocations());
    let pods = e.pods().await;
    assert_eq!(pods.len(), 1);
    e.stop_and_remove_pod(&first).await;
    e.assert_clean(&net, &[&first], &first_ips);
}

#[tokio::test]
async fn host_network_pods_share_the_host_namespace_and_vm_refuses_them() {
    require!(env_ok(), NEEDS);
    let e = env("").await;
    let net = Net::new(e.d.dir.path());
    net.install(&e.d, 24);
    let mut cfg = e.pod("hostnet");
    cfg.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                network: cri::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    // The VM sandbox refuses, clearly, before doing anything.
    let err = e.run_pod_on(&cfg, "husk").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("host network"), "{err:?}");
    // The namespace sandbox runs it in the host's network namespace, without CNI.
    let (pod, ctr) = e.pod_on(&cfg, NS, &["sleep", "3600"]).await;
    let (_, theirs) = e
        .exec_out(&ctr, &["busybox", "readlink", "/proc/self/ns/net"])
        .await;
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_eq!(theirs.trim(), ours.to_string_lossy());
    assert!(e.pod_ips(&pod).await.is_empty());
    assert!(net.allocations().is_empty());
    e.stop_and_remove_pod(&pod).await;
    e.assert_clean(&net, &[&pod], &[]);
}

/// The VM sandbox (QEMU/TCG, the project's guest kernel and agent) on the
/// same CNI network: the tap and tc redirects carry the guest's traffic.
#[tokio::test]
async fn vm_pod_on_the_cni_network() {
    vm_pod_on_cni(0).await;
}

/// The same on a pooled VM (`[runtime.vm.pool]`): its tap, made before the pod existed,
/// moves into the pod's namespace and the agent gives the guest NIC the CNI MAC.
#[tokio::test]
async fn vm_pooled_pod_on_the_cni_network() {
    vm_pod_on_cni(1).await;
}

async fn vm_pod_on_cni(pool: u32) {
    require!(env_ok(), NEEDS);
    require!(
        husk_tests::runtime::vm_env_ok(),
        husk_tests::runtime::VM_NEEDS
    );
    let (Ok(kernel), Ok(initrd)) = (
        std::env::var("HUSK_GUEST_KERNEL"),
        std::env::var("HUSK_GUEST_INITRD"),
    ) else {
        eprintln!(
            "skipped: needs HUSK_GUEST_KERNEL/HUSK_GUEST_INITRD (tests/run.sh builds them) and qemu-system-x86_64"
        );
        return;
    };
    // The namespace pod's agent: 60 s to come up (10 s by default), as the husk-ns agent, a
    // debug binary read through the nested L1's virtio-fs root, once took longer under load.
    let e = env(&format!(
        "[runtime]\nagent_start_timeout_ms = 60000\n[runtime.handlers]\n{VM_HANDLERS}husk-ns = \"namespace\"\n\
         [runtime.vm]\nkernel = \"{kernel}\"\ninitrd = \"{initrd}\"\nboot_timeout_ms = 90000\nmemory_mib = 256\n\
         [runtime.vm.pool]\nsize = 0\nhandlers = {{ {handler} = {pool} }}\n",
        handler = husk_tests::runtime::vm_handler()
    ))
    .await;
    let net = Net::new(e.d.dir.path());
    net.install(&e.d, 24);
    if pool > 0 {
        wait_pool_ready(&e).await;
    }
    let host_port = husk_tests::free_port();
    let mut vm_cfg = e.pod("vm");
    vm_cfg.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 8080,
        host_port: host_port as i32,
        host_ip: String::new(),
    }];
    let (vm, vm_ctr) = e
        .server_on(&vm_cfg, husk_tests::runtime::vm_handler())
        .await;
    let (ns, ns_ctr) = e.server(&e.pod("ns")).await;
    let (vm_ips, ns_ips) = (e.pod_ips(&vm).await, e.pod_ips(&ns).await);
    assert_eq!(vm_ips.len(), 2, "{vm_ips:?}");
    // Inside the guest: eth0 with the CNI addresses (the agent configured it).
    let (_, addrs) = e
        .exec_out(&vm_ctr, &["busybox", "ip", "-o", "addr", "show", "eth0"])
        .await;
    assert!(addrs.contains(&format!("{}/24", vm_ips[0])), "{addrs}");
    // Both ways between the VM pod and a namespace pod, IPv4 and IPv6.
    assert_eq!(e.get(&ns_ctr, &vm_ips[0], 8080).await.trim(), "hi-vm");
    assert_eq!(e.get(&vm_ctr, &ns_ips[0], 8080).await.trim(), "hi-ns");
    assert_eq!(e.get(&ns_ctr, &vm_ips[1], 8080).await.trim(), "hi-vm");
    // The VM pod reaches the host side of the bridge.
    let l = TcpListener::bind(format!("{}:0", net.gateway())).unwrap();
    let port = l.local_addr().unwrap().port();
    let got = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    let (code, out) = e
        .exec_out(
            &vm_ctr,
            &[
                "sh",
                "-c",
                &format!("echo from-vm | nc -w 10 {} {port}", net.gateway()),
            ],
        )
        .await;
    assert_eq!(code, 0, "nc: {out}");
    assert_eq!(got.join().unwrap().trim(), "from-vm");
    // hostPort (portmap) into the VM.
    let mut s = TcpStream::connect((net.gateway().as_str(), host_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.contains("hi-vm"), "{resp}");
    if pool > 0 {
        // The guest NIC took the CNI interface's MAC.
        let (_, link) = e
            .exec_out(&vm_ctr, &["busybox", "ip", "-o", "link", "show", "eth0"])
            .await;
        let ns_path = e.d.run_dir().join("netns").join(&vm);
        let cni_link = sh(&[
            "nsenter",
            &format!("--net={}", ns_path.display()),
            "ip",
            "-o",
            "link",
            "show",
            "eth0",
        ]);
        let mac_of = |l: &str| {
            l.split_whitespace()
                .skip_while(|w| *w != "link/ether")
                .nth(1)
                .map(str::to_string)
        };
        assert!(mac_of(&cni_link).is_some(), "{cni_link}");
        assert_eq!(mac_of(&link), mac_of(&cni_link), "{link} / {cni_link}");
        assert!(e.d.log().contains("pooled VM claimed"), "{}", e.d.log());
    }
    e.stop_and_remove_pod(&vm).await;
    e.stop_and_remove_pod(&ns).await;
    e.assert_clean(&net, &[&vm, &ns], &[vm_ips, ns_ips].concat());
}

/// Waits until the husk-qemu pool has a VM ready (Status, verbose).
async fn wait_pool_ready(e: &CriEnv) {
    let t = std::time::Instant::now();
    loop {
        let st = e.status_verbose().await;
        let pools: serde_json::Value = serde_json::from_str(&st.info["vmPools"]).unwrap();
        if pools[0]["ready"].as_u64() >= Some(1) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(240),
            "pool never ready: {pools}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
