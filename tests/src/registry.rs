//! A real OCI registry (Debian's `docker-registry`, distribution 2.8) on a
//! loopback port, optionally with htpasswd basic auth.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Registry {
    pub addr: String,
    pub dir: tempfile::TempDir,
    child: Child,
    pub log: PathBuf,
}

pub const BINARY: &str = "/usr/bin/docker-registry";

pub fn available() -> bool {
    Path::new(BINARY).exists()
}

impl Registry {
    /// Starts a registry; with `auth = Some((user, password))` it requires
    /// basic auth (htpasswd with bcrypt from apache2-utils).
    pub fn start(auth: Option<(&str, &str)>) -> anyhow::Result<Self> {
        Self::start_with(auth, false)
    }

    /// With `tls`, serves HTTPS with a fresh self-signed certificate for
    /// 127.0.0.1, written to [`Self::cert`].
    pub fn start_with(auth: Option<(&str, &str)>, tls: bool) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = crate::free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut auth_yaml = String::new();
        if let Some((u, p)) = auth {
            let out = Command::new("htpasswd").args(["-Bbn", u, p]).output()?;
            anyhow::ensure!(
                out.status.success(),
                "htpasswd failed (apt-get install apache2-utils)"
            );
            let f = dir.path().join("htpasswd");
            std::fs::write(&f, &out.stdout)?;
            auth_yaml = format!(
                "auth:\n  htpasswd:\n    realm: husk-test\n    path: {}\n",
                f.display()
            );
        }
        let mut tls_yaml = String::new();
        if tls {
            let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            make_certs(dir.path())?;
            tls_yaml = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            );
        }
        let cfg = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{tls_yaml}{auth_yaml}",
            dir.path().join("data").display()
        );
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg)?;
        let log = dir.path().join("registry.log");
        let child = Command::new(BINARY)
            .arg("serve")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("registry.out"))?)
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let r = Self {
            addr,
            dir,
            child,
            log,
        };
        r.wait_ready()?;
        Ok(r)
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        // 60 s: a Go binary's first start is slow in a nested L1 under TCG on a loaded host.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(&self.addr).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        anyhow::bail!(
            "registry on {} did not start; log:\n{}",
            self.addr,
            std::fs::read_to_string(&self.log)?
        )
    }

    /// The CA that signed a TLS registry's certificate.
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Path of a blob's data file in the registry's storage (for tampering).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir.path().join(format!(
            "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }

    /// How many times the registry served `GET` for this blob (from its log).
    pub fn blob_gets(&self, digest: &str) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter(|l| {
                l.contains("response completed")
                    && l.contains("http.request.method=GET")
                    && l.contains(digest)
            })
            .count()
    }
}

/// A test CA (`ca.pem`) and a server certificate for 127.0.0.1 signed by
/// it (`cert.pem`, `key.pem`) in `dir`.
fn make_certs(dir: &Path) -> anyhow::Result<()> {
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let st = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(st.success(), "openssl {args:?} failed");
        Ok(())
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=husk-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ])?;
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "key.pem",
        "-out",
        "server.csr",
    ])?;
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n",
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ])
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
