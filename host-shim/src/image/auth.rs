//! Registry credentials: from the CRI `AuthConfig` of a pull request first,
//! then from a docker `config.json` (`auths` entries), else anonymous.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth: {0}")]
    Invalid(String),
    #[error("read docker config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse docker config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Credentials as the CRI sends them (`runtime.v1.AuthConfig`).
#[derive(Debug, Default, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    pub auth: String,
    pub identity_token: String,
    pub registry_token: String,
}

impl Credentials {
    fn is_empty(&self) -> bool {
        self.username.is_empty()
            && self.password.is_empty()
            && self.auth.is_empty()
            && self.identity_token.is_empty()
            && self.registry_token.is_empty()
    }

    fn to_registry_auth(&self) -> Result<RegistryAuth, AuthError> {
        if !self.registry_token.is_empty() {
            return Ok(RegistryAuth::Bearer(self.registry_token.clone()));
        }
        if !self.identity_token.is_empty() {
            return Err(AuthError::Invalid(
                "identity_token (OAuth2 refresh token) credentials are not supported; use username/password or registry_token"
                    .into(),
            ));
        }
        if !self.auth.is_empty() {
            return decode_basic(&self.auth);
        }
        if self.username.is_empty() {
            return Err(AuthError::Invalid("password given without username".into()));
        }
        Ok(RegistryAuth::Basic(
            self.username.clone(),
            self.password.clone(),
        ))
    }
}

fn decode_basic(auth: &str) -> Result<RegistryAuth, AuthError> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| AuthError::Invalid("auth is not valid base64".into()))?;
    let s =
        String::from_utf8(raw).map_err(|_| AuthError::Invalid("auth is not valid UTF-8".into()))?;
    let (u, p) = s
        .split_once(':')
        .ok_or_else(|| AuthError::Invalid("auth must encode user:password".into()))?;
    Ok(RegistryAuth::Basic(u.to_string(), p.to_string()))
}

#[derive(Debug, Default, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, DockerAuth>,
}

#[derive(Debug, Default, Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default, rename = "identitytoken")]
    identity_token: String,
    #[serde(default, rename = "registrytoken")]
    registry_token: String,
}

/// The registry key a docker config entry names, without scheme and path.
fn config_key_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let k = k.split('/').next().unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        other => other,
    }
}

fn from_docker_config(path: &Path, registry: &str) -> Result<Option<Credentials>, AuthError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(AuthError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let cfg: DockerConfig = serde_json::from_slice(&text).map_err(|source| AuthError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(cfg
        .auths
        .into_iter()
        .find(|(k, _)| config_key_host(k) == registry)
        .map(|(_, a)| Credentials {
            username: a.username,
            password: a.password,
            auth: a.auth,
            identity_token: a.identity_token,
            registry_token: a.registry_token,
        }))
}

/// Picks the credentials for `registry`.
pub fn resolve(
    request: Option<&Credentials>,
    docker_config: Option<&Path>,
    registry: &str,
) -> Result<RegistryAuth, AuthError> {
    if let Some(c) = request.filter(|c| !c.is_empty()) {
        return c.to_registry_auth();
    }
    if let Some(path) = docker_config
        && let Some(c) = from_docker_config(path, registry)?.filter(|c| !c.is_empty())
    {
        return c.to_registry_auth();
    }
    Ok(RegistryAuth::Anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(a: &RegistryAuth) -> (String, String) {
        match a {
            RegistryAuth::Basic(u, p) => (u.clone(), p.clone()),
            other => panic!("not basic: {other:?}"),
        }
    }

    #[test]
    fn request_credentials_win() {
        let c = Credentials {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        };
        assert_eq!(
            basic(&resolve(Some(&c), None, "x").unwrap()),
            ("u".into(), "p".into())
        );
        let enc = base64::engine::general_purpose::STANDARD.encode("al:ice:pw");
        let c = Credentials {
            auth: enc,
            ..Default::default()
        };
        assert_eq!(
            basic(&resolve(Some(&c), None, "x").unwrap()),
            ("al".into(), "ice:pw".into())
        );
        let c = Credentials {
            registry_token: "tok".into(),
            ..Default::default()
        };
        assert!(
            matches!(resolve(Some(&c), None, "x").unwrap(), RegistryAuth::Bearer(t) if t == "tok")
        );
        let c = Credentials {
            auth: "!!!".into(),
            ..Default::default()
        };
        assert!(resolve(Some(&c), None, "x").is_err());
    }

    #[test]
    fn docker_config_lookup() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.json");
        let enc = base64::engine::general_purpose::STANDARD.encode("hub:secret");
        std::fs::write(
            &p,
            format!(
                r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{enc}"}},
                "127.0.0.1:5000":{{"username":"a","password":"b"}}}}}}"#
            ),
        )
        .unwrap();
        assert_eq!(
            basic(&resolve(None, Some(&p), "docker.io").unwrap()),
            ("hub".into(), "secret".into())
        );
        assert_eq!(
            basic(&resolve(None, Some(&p), "127.0.0.1:5000").unwrap()),
            ("a".into(), "b".into())
        );
        assert!(matches!(
            resolve(None, Some(&p), "other").unwrap(),
            RegistryAuth::Anonymous
        ));
        assert!(matches!(
            resolve(None, Some(&d.path().join("nope")), "x").unwrap(),
            RegistryAuth::Anonymous
        ));
        std::fs::write(&p, "{").unwrap();
        assert!(matches!(
            resolve(None, Some(&p), "x"),
            Err(AuthError::Parse { .. })
        ));
    }
}
