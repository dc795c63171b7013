//! Image references the way kubelet and docker users write them:
//! `busybox` → `docker.io/library/busybox:latest`, `reg:5000/a/b:tag`,
//! `name@sha256:…`, `name:tag@sha256:…`.

use std::fmt;

/// The registry unqualified names resolve to.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// Tag used when a reference has neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("empty image reference")]
    Empty,
    #[error("invalid image reference {reference:?}: bad {part} {value:?}: {why}")]
    Invalid {
        reference: String,
        part: &'static str,
        value: String,
        why: &'static str,
    },
}

/// A fully qualified image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// `docker.io`, `localhost:5000`, …
    pub registry: String,
    /// `library/busybox`
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<hex>`
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses and normalizes a reference. A bare name gets `docker.io`,
    /// `library/` (for single-component docker.io names) and `:latest`.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let bad = |part, value: &str, why| ReferenceError::Invalid {
            reference: input.to_string(),
            part,
            value: value.to_string(),
            why,
        };

        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (s, None),
        };
        if let Some(d) = digest {
            validate_digest(d).map_err(|why| bad("digest", d, why))?;
        }
        // A tag follows the last ':' after the last '/'.
        let last_slash = name_tag.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => {
                let i = last_slash + i;
                (&name_tag[..i], Some(&name_tag[i + 1..]))
            }
            None => (name_tag, None),
        };
        if let Some(t) = tag {
            validate_tag(t).map_err(|why| bad("tag", t, why))?;
        }
        if name.is_empty() {
            return Err(bad("name", name, "is empty"));
        }

        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        validate_registry(&registry).map_err(|why| bad("registry", &registry, why))?;
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DEFAULT_REGISTRY.to_string(),
            _ => registry,
        };
        for comp in path.split('/') {
            validate_path_component(comp)
                .map_err(|why| bad("repository path component", comp, why))?;
        }
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if repository.len() > 255 {
            return Err(bad(
                "repository",
                &repository,
                "is longer than 255 characters",
            ));
        }
        let tag = match (tag, digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (t, _) => t.map(str::to_string),
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest: digest.map(str::to_string),
        })
    }

    /// `registry/repository`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// `registry/repository:tag`, if the reference has a tag.
    pub fn tagged(&self) -> Option<String> {
        self.tag.as_ref().map(|t| format!("{}:{t}", self.name()))
    }

    /// `registry/repository@digest` for a given digest.
    pub fn with_digest(&self, digest: &str) -> String {
        format!("{}@{digest}", self.name())
    }

    /// The oci-client reference for this image on `host` (the upstream
    /// registry or a mirror).
    pub fn to_oci(&self, host: &str) -> oci_client::Reference {
        let mut r = match (&self.digest, &self.tag) {
            (Some(d), Some(t)) => oci_client::Reference::with_tag_and_digest(
                self.registry.clone(),
                self.repository.clone(),
                t.clone(),
                d.clone(),
            ),
            (Some(d), None) => oci_client::Reference::with_digest(
                self.registry.clone(),
                self.repository.clone(),
                d.clone(),
            ),
            (None, t) => oci_client::Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                t.clone().unwrap_or_else(|| DEFAULT_TAG.to_string()),
            ),
        };
        if host != self.registry {
            r.set_mirror_registry(host.to_string());
        }
        r
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// True for an image id: `sha256:<64 hex>` or a bare 64-hex string.
pub fn as_image_id(s: &str) -> Option<String> {
    let hex = s.strip_prefix("sha256:").unwrap_or(s);
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then(|| format!("sha256:{hex}"))
}

pub fn validate_digest(d: &str) -> Result<(), &'static str> {
    let (algo, hex) = d.split_once(':').ok_or("must be algorithm:hex")?;
    if algo != "sha256" {
        return Err("only sha256 digests are supported");
    }
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err("must be 64 lowercase hex characters");
    }
    Ok(())
}

fn validate_tag(t: &str) -> Result<(), &'static str> {
    if t.is_empty() || t.len() > 128 {
        return Err("must be 1 to 128 characters");
    }
    let mut bytes = t.bytes();
    let first = bytes.next().unwrap_or(b'.');
    if !(first.is_ascii_alphanumeric() || first == b'_') {
        return Err("must start with a letter, digit or '_'");
    }
    if !bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
        return Err("may only contain letters, digits, '_', '.' and '-'");
    }
    Ok(())
}

fn validate_registry(r: &str) -> Result<(), &'static str> {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || r.starts_with('[') => (h, Some(p)),
        _ => (r, None),
    };
    if let Some(p) = port
        && p.parse::<u16>().is_err()
    {
        return Err("port must be a number up to 65535");
    }
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
    {
        return Err("must be a host name or address");
    }
    Ok(())
}

fn validate_path_component(c: &str) -> Result<(), &'static str> {
    if c.is_empty() {
        return Err("is empty");
    }
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return Err("must start and end with a lowercase letter or digit");
    }
    // Separators: '.', '_', '__', or one or more '-'.
    let mut i = 0;
    while i < b.len() {
        let x = b[i];
        if alnum(x) {
            i += 1;
            continue;
        }
        match x {
            b'.' => {
                if !alnum(b[i + 1]) {
                    return Err("separators must be between lowercase letters or digits");
                }
            }
            b'_' => {
                if b[i + 1] == b'_' {
                    i += 1;
                }
                if !alnum(b[i + 1]) {
                    return Err("separators must be between lowercase letters or digits");
                }
            }
            b'-' => {
                while b[i + 1] == b'-' {
                    i += 1;
                }
                if !alnum(b[i + 1]) {
                    return Err("separators must be between lowercase letters or digits");
                }
            }
            _ => return Err("may only contain lowercase letters, digits and separators"),
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_docker_hub_names() {
        let r = ImageRef::parse("busybox").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        let r = ImageRef::parse("foo/bar:1.0").unwrap();
        assert_eq!(r.to_string(), "docker.io/foo/bar:1.0");
        let r = ImageRef::parse("index.docker.io/library/alpine").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
    }

    #[test]
    fn registries_with_ports_and_digests() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("localhost:5000/a/b@{d}")).unwrap();
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository, "a/b");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        let r = ImageRef::parse(&format!("127.0.0.1:5000/x:v1@{d}")).unwrap();
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/x:v1@{d}"));
    }

    #[test]
    fn errors_name_the_bad_part() {
        let e = ImageRef::parse("Busybox").unwrap_err().to_string();
        assert!(
            e.contains("repository path component") && e.contains("Busybox"),
            "{e}"
        );
        let e = ImageRef::parse("busybox:-bad").unwrap_err().to_string();
        assert!(e.contains("bad tag"), "{e}");
        let e = ImageRef::parse("busybox@sha256:abc")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad digest"), "{e}");
        let e = ImageRef::parse("localhost:99999/x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad registry"), "{e}");
        let e = ImageRef::parse("a//b").unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
        assert_eq!(ImageRef::parse("  "), Err(ReferenceError::Empty));
        assert!(ImageRef::parse("a..b").is_err());
        assert!(ImageRef::parse("a_").is_err());
        assert!(ImageRef::parse("a__b").is_ok());
        assert!(ImageRef::parse("a---b").is_ok());
    }

    #[test]
    fn image_ids() {
        let hex = "b".repeat(64);
        assert_eq!(as_image_id(&hex), Some(format!("sha256:{hex}")));
        assert_eq!(
            as_image_id(&format!("sha256:{hex}")),
            Some(format!("sha256:{hex}"))
        );
        assert_eq!(as_image_id("busybox"), None);
    }
}
