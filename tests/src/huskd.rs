//! A real huskd process with its own config, state dir and socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use husk_host::client::Clients;

pub struct Huskd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config: PathBuf,
    /// Extra environment for the next (re)start.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

pub struct Options {
    /// `(registry, hosts.toml text)` pairs written under certs.d.
    pub hosts: Vec<(String, String)>,
    /// docker config.json content.
    pub docker_config: Option<String>,
}

impl Options {
    /// Plain-HTTP access to a loopback registry.
    pub fn plain_http(addr: &str) -> Self {
        Self {
            hosts: vec![(addr.to_string(), format!("server = \"http://{addr}\"\n"))],
            docker_config: None,
        }
    }
}

impl Huskd {
    pub async fn start(opts: Options) -> anyhow::Result<Self> {
        Self::start_with(opts, "").await
    }

    /// Like [`Self::start`], with `extra` TOML appended to the config (e.g. a `[runtime]` table).
    pub async fn start_with(opts: Options, extra: &str) -> anyhow::Result<Self> {
        Self::start_with_env(opts, extra, &[]).await
    }

    /// Like [`Self::start_with`], with `env` added to huskd's environment.
    pub async fn start_with_env(
        opts: Options,
        extra: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let certs = dir.path().join("certs.d");
        for (reg, text) in &opts.hosts {
            std::fs::create_dir_all(certs.join(reg))?;
            std::fs::write(certs.join(reg).join("hosts.toml"), text)?;
        }
        let docker = dir.path().join("docker-config.json");
        if let Some(c) = &opts.docker_config {
            std::fs::write(&docker, c)?;
        }
        let socket = dir.path().join("run/huskd.sock");
        let config = dir.path().join("config.toml");
        // Hermetic CNI: an empty conf dir of the test's own (tests that want
        // pod networking write a config list into `cni_conf_dir()`).
        let cni = dir.path().join("cni/net.d");
        std::fs::create_dir_all(&cni)?;
        // No warm VM pool unless the test asks for one: pooled VMs boot in the background
        // and would change what the other tests measure and count.
        let pool = if extra.contains("runtime.vm.pool") {
            ""
        } else {
            "\n[runtime.vm.pool]\nsize = 0\n"
        };
        std::fs::write(
            &config,
            format!(
                "socket = \"{}\"\nstate_dir = \"{}\"\nrun_dir = \"{}\"\nlog_level = \"info,husk_host=debug\"\n[image]\nregistry_config_dir = \"{}\"\ndocker_config = \"{}\"\n[network]\ncni_conf_dir = \"{}\"\n{extra}{pool}",
                socket.display(),
                dir.path().join("state").display(),
                dir.path().join("run").display(),
                certs.display(),
                docker.display(),
                cni.display()
            ),
        )?;
        let mut d = Self {
            dir,
            socket,
            config,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        d.spawn().await?;
        Ok(d)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// The CNI config directory this huskd reads (empty at start).
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.path().join("cni/net.d")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.state_dir().join("images")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("huskd.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("huskd.log"))?;
        let child = Command::new(crate::bin_path("huskd"))
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        wait_socket(&self.socket)
            .await
            .map_err(|e| anyhow::anyhow!("{e}; huskd log:\n{}", self.log()))
    }

    pub async fn clients(&self) -> anyhow::Result<Clients> {
        Ok(Clients::connect(&self.socket).await?)
    }

    /// `kill -9`, then start again on the same state.
    pub async fn crash_and_restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn().await
    }

    /// Starts huskd again (after it died or was killed) on the same state.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn().await
    }

    /// Waits up to `timeout` for huskd to exit by itself; its status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        let t = std::time::Instant::now();
        while t.elapsed() < timeout {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        for _ in 0..200 {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = c.kill();
        c.wait().ok()
    }
}

impl Drop for Huskd {
    fn drop(&mut self) {
        self.terminate();
    }
}

async fn wait_socket(path: &Path) -> anyhow::Result<()> {
    // 60 s: a restart recovers every pod first, slow in a nested L1 under TCG.
    for _ in 0..2400 {
        if path.exists() && Clients::connect(path).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("huskd did not open {}", path.display())
}
