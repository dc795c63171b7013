//! User resolution against the container's /etc/passwd and /etc/group.
//!
//! Decision: huskd passes numeric ids when the CRI gives `run_as_user`, and the
//! name in `process.user.username` when it gives `run_as_username`; the agent
//! resolves names here, inside the container after pivot_root, because only the
//! guest can read a block-device rootfs. A gid of [`GID_FROM_PASSWD`] (no group
//! given) is the user's primary group from /etc/passwd. Supplementary groups are
//! the user's groups from /etc/group plus `additionalGids`.

use std::path::Path;

use husk_proto::GID_FROM_PASSWD;

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user {0} not found in /etc/passwd")]
    UnknownUser(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub home: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

pub fn parse_passwd(content: &str) -> Vec<PasswdEntry> {
    content
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 6 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

/// (group name, gid, members)
pub fn parse_group(content: &str) -> Vec<(String, u32, Vec<String>)> {
    content
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 3 {
                return None;
            }
            let members = f.get(3).map(|m| {
                m.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            });
            Some((
                f[0].to_string(),
                f[2].parse().ok()?,
                members.unwrap_or_default(),
            ))
        })
        .collect()
}

/// Resolve from file contents (pure, unit-tested).
///
/// `gid` [`GID_FROM_PASSWD`] (the CRI named no group) means the user's primary group from
/// /etc/passwd, or 0 when the uid has no entry; any other gid is kept, also for a
/// username. The supplementary groups are `additional` plus every /etc/group entry that
/// lists the user by name (containerd's semantics).
pub fn resolve_from(
    passwd: &str,
    group: &str,
    username: Option<&str>,
    uid: u32,
    gid: u32,
    additional: &[u32],
) -> Result<ResolvedUser, UserError> {
    let users = parse_passwd(passwd);
    let entry = match username.filter(|n| !n.is_empty()) {
        Some(name) => Some(
            users
                .iter()
                .find(|e| e.name == name)
                .ok_or_else(|| UserError::UnknownUser(name.to_string()))?,
        ),
        None => users.iter().find(|e| e.uid == uid),
    };
    let uid = entry.map_or(uid, |e| e.uid);
    let gid = match (gid, entry) {
        (GID_FROM_PASSWD, Some(e)) => e.gid,
        (GID_FROM_PASSWD, None) => 0,
        (gid, _) => gid,
    };
    let home = entry.map_or_else(|| "/".to_string(), |e| e.home.clone());
    let mut groups: Vec<u32> = additional.to_vec();
    if let Some(e) = entry {
        for (_, g, members) in parse_group(group) {
            if members.contains(&e.name) && !groups.contains(&g) {
                groups.push(g);
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids: groups,
        home,
    })
}

/// Resolve against the current root's /etc (call after pivot_root).
pub fn resolve(
    username: Option<&str>,
    uid: u32,
    gid: u32,
    additional: &[u32],
) -> Result<ResolvedUser, UserError> {
    let passwd = std::fs::read_to_string(Path::new("/etc/passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(Path::new("/etc/group")).unwrap_or_default();
    resolve_from(&passwd, &group, username, uid, gid, additional)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n# c\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\nalice:x:1000:1000::/home/alice:/bin/sh\nbroken\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:alice,bob\nusers:x:100:alice\nalice:x:1000:\n";

    #[test]
    fn resolves_username_with_groups() {
        let u =
            resolve_from(PASSWD, GROUP, Some("alice"), 0, GID_FROM_PASSWD, &[5]).expect("alice");
        assert_eq!(
            u,
            ResolvedUser {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![5, 10, 100],
                home: "/home/alice".into()
            }
        );
    }

    #[test]
    fn numeric_uid_keeps_given_gid_and_finds_home() {
        let u = resolve_from(PASSWD, GROUP, None, 65534, 7, &[]).expect("nobody");
        assert_eq!((u.uid, u.gid, u.home.as_str()), (65534, 7, "/nonexistent"));
        let u = resolve_from(PASSWD, GROUP, None, 4242, 4242, &[]).expect("unknown uid is fine");
        assert_eq!(u.home, "/");
    }

    #[test]
    fn group_from_passwd_unless_given() {
        // run_as_user 1000 without a group: primary group from /etc/passwd, the CRI's
        // supplemental groups plus /etc/group's.
        let u = resolve_from(PASSWD, GROUP, None, 1000, GID_FROM_PASSWD, &[1234]).expect("1000");
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.additional_gids, vec![1234, 10, 100]);
        // An explicit group wins, also over a username's.
        let u = resolve_from(PASSWD, GROUP, Some("alice"), 0, 50, &[]).expect("alice:50");
        assert_eq!((u.uid, u.gid), (1000, 50));
        // No passwd entry: group 0.
        let u = resolve_from(PASSWD, GROUP, None, 4242, GID_FROM_PASSWD, &[]).expect("4242");
        assert_eq!((u.uid, u.gid, u.additional_gids.len()), (4242, 0, 0));
    }

    #[test]
    fn unknown_username_is_an_error() {
        assert!(matches!(
            resolve_from(PASSWD, GROUP, Some("mallory"), 0, 0, &[]),
            Err(UserError::UnknownUser(_))
        ));
    }
}
