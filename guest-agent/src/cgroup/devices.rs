//! The device allow-list of a container (cgroup v1 `devices` controller).
//!
//! Deny everything, then the spec's `linux.resources.devices` rules in order,
//! then allow the devices every container gets, mknod of any char/block
//! device (as runc: creating a node does not open it), and the spec's
//! `linux.devices`. v1 writes them to `devices.allow`/`devices.deny`; v2
//! compiles them to an eBPF program ([`super::bpf`]).

use oci_spec::runtime::Spec;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRule {
    pub allow: bool,
    /// 'a', 'b' or 'c'.
    pub typ: char,
    pub major: Option<i64>,
    pub minor: Option<i64>,
    pub access: String,
}

impl DeviceRule {
    fn allow(typ: char, major: Option<i64>, minor: Option<i64>, access: &str) -> Self {
        Self {
            allow: true,
            typ,
            major,
            minor,
            access: access.into(),
        }
    }

    /// The line written to devices.allow / devices.deny.
    pub fn v1_line(&self) -> String {
        if self.typ == 'a' && self.major.is_none() && self.minor.is_none() {
            return "a".into();
        }
        let n = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "*".into());
        let access = if self.access.is_empty() {
            "rwm"
        } else {
            &self.access
        };
        format!(
            "{} {}:{} {}",
            self.typ,
            n(self.major),
            n(self.minor),
            access
        )
    }
}

/// null, zero, full, random, urandom, tty, console, ptmx, and the pts devices.
const DEFAULT_ALLOWED: [(i64, Option<i64>); 9] = [
    (1, Some(3)),
    (1, Some(5)),
    (1, Some(7)),
    (1, Some(8)),
    (1, Some(9)),
    (5, Some(0)),
    (5, Some(1)),
    (5, Some(2)),
    (136, None),
];

pub fn rules(spec: &Spec) -> Vec<DeviceRule> {
    let mut out = vec![DeviceRule {
        allow: false,
        typ: 'a',
        major: None,
        minor: None,
        access: "rwm".into(),
    }];
    let linux = spec.linux().as_ref();
    for d in linux
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.devices().as_ref())
        .into_iter()
        .flatten()
    {
        let typ = d
            .typ()
            .map(|t| t.as_str().chars().next().unwrap_or('a'))
            .unwrap_or('a');
        out.push(DeviceRule {
            allow: d.allow(),
            typ,
            major: d.major(),
            minor: d.minor(),
            access: d.access().clone().unwrap_or_else(|| "rwm".into()),
        });
    }
    // After the spec's rules, so a leading "deny all" there cannot take the
    // devices every container needs.
    out.push(DeviceRule::allow('c', None, None, "m"));
    out.push(DeviceRule::allow('b', None, None, "m"));
    for (major, minor) in DEFAULT_ALLOWED {
        out.push(DeviceRule::allow('c', Some(major), minor, "rwm"));
    }
    for d in linux
        .and_then(|l| l.devices().as_ref())
        .into_iter()
        .flatten()
    {
        let typ = d.typ().as_str().chars().next().unwrap_or('c');
        if typ == 'b' || typ == 'c' {
            out.push(DeviceRule::allow(
                typ,
                Some(d.major()),
                Some(d.minor()),
                "rwm",
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_deny_then_allows_in_order() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {
                "resources": {"devices": [{"allow": false, "access": "rwm"}, {"allow": true, "type": "c", "major": 10, "minor": 200, "access": "rw"}]},
                "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]
            }
        }))
        .expect("spec");
        let lines: Vec<(bool, String)> = rules(&spec)
            .iter()
            .map(|r| (r.allow, r.v1_line()))
            .collect();
        assert_eq!(lines[0], (false, "a".to_string()));
        // The spec's rules next, in order.
        assert_eq!(lines[1], (false, "a".to_string()));
        assert_eq!(lines[2], (true, "c 10:200 rw".to_string()));
        // Then the defaults (after the spec's deny-all) and the spec's devices.
        let pos = |l: &str| {
            lines
                .iter()
                .position(|x| x == &(true, l.to_string()))
                .unwrap_or_else(|| panic!("{l}"))
        };
        assert!(pos("c 1:3 rwm") > 2 && pos("c 136:* rwm") > 2 && pos("b *:* m") > 2);
        assert_eq!(lines.last(), Some(&(true, "c 10:229 rwm".to_string())));
    }
}
