//! Unpacks one layer tar into its own directory, in the form overlayfs
//! reads as a lower dir: OCI whiteouts (`.wh.name`) become 0:0 character
//! devices, opaque markers (`.wh..wh..opq`) become `trusted.overlay.opaque=y`.
//!
//! Safety: entry paths are relative and never contain `..`; every parent is
//! checked with `lstat` to be a real directory inside the layer dir (a
//! symlink as a parent rejects the layer), and files are created with
//! `O_NOFOLLOW | O_EXCL`, so nothing is ever written outside `dest`.
//! Symlink targets are stored as data and never followed on the host.

use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// Longest path (bytes) accepted in a layer.
const MAX_PATH: usize = 4096;
/// Largest PAX extension block accepted (names, xattrs).
const MAX_PAX: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer is not a valid tar stream: {0}")]
    Tar(#[source] io::Error),
    #[error("entry {path:?}: {why}")]
    Rejected { path: String, why: &'static str },
    #[error("entry {path:?}: {source}")]
    Io { path: String, source: io::Error },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    pub entries: u64,
    pub bytes: u64,
}

/// Unpacks the (decompressed) tar stream `reader` into `dest`, which must be
/// an existing empty directory.
pub fn unpack_layer<R: Read>(reader: R, dest: &Path) -> Result<UnpackStats, UnpackError> {
    let mut archive = tar::Archive::new(reader);
    let mut stats = UnpackStats::default();
    // Directory mtimes are set last: creating children changes them.
    let mut dir_times: Vec<(PathBuf, i64)> = Vec::new();

    for entry in archive.entries().map_err(UnpackError::Tar)? {
        let mut entry = entry.map_err(UnpackError::Tar)?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let rejected = |why| UnpackError::Rejected {
            path: shown.clone(),
            why,
        };
        let io_err = |source| UnpackError::Io {
            path: shown.clone(),
            source,
        };

        let rel = clean_path(&raw).map_err(rejected)?;
        let Some(rel) = rel else { continue }; // the root itself ("./")
        let name = rel.file_name().map(OsStr::to_os_string).unwrap_or_default();
        let parent_rel = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        let parent = ensure_parent_dirs(dest, &parent_rel).map_err(|e| match e {
            ParentError::Rejected(why) => rejected(why),
            ParentError::Io(source) => io_err(source),
        })?;
        stats.entries += 1;

        let name_str = name.to_string_lossy();
        if name_str == OPAQUE_MARKER {
            set_xattr(&parent, "trusted.overlay.opaque", b"y").map_err(io_err)?;
            continue;
        }
        if let Some(hidden) = name_str.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(rejected("invalid whiteout name"));
            }
            let target = parent.join(hidden);
            remove_existing(&target).map_err(io_err)?;
            mknod(&target, libc::S_IFCHR, 0).map_err(io_err)?;
            continue;
        }

        let path = parent.join(&name);
        let header = entry.header().clone();
        let kind = header.entry_type();
        let mode = header.mode().map_err(UnpackError::Tar)? & 0o7777;
        // Empty numeric fields read as 0, as Go's archive/tar does.
        let uid = header.uid().unwrap_or(0);
        let gid = header.gid().unwrap_or(0);
        let mtime = header.mtime().unwrap_or(0) as i64;
        let xattrs = read_xattrs(&mut entry).map_err(|e| match e {
            PaxError::TooLarge => rejected("PAX extension block too large"),
            PaxError::Io(e) => UnpackError::Tar(e),
        })?;

        match kind {
            EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_existing(&path).map_err(io_err)?;
                        fs::create_dir(&path).map_err(io_err)?;
                    }
                    Err(_) => fs::create_dir(&path).map_err(io_err)?,
                }
                dir_times.push((path.clone(), mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                remove_existing(&path).map_err(io_err)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io_err)?;
                stats.bytes += io::copy(&mut entry, &mut f).map_err(UnpackError::Tar)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| rejected("symlink without target"))?
                    .into_owned();
                if target.len() > MAX_PATH {
                    return Err(rejected("symlink target too long"));
                }
                remove_existing(&path).map_err(io_err)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path).map_err(io_err)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| rejected("hard link without target"))?
                    .into_owned();
                let target_rel = clean_path(&target)
                    .map_err(rejected)?
                    .ok_or_else(|| rejected("hard link to the root"))?;
                let target_parent = target_rel
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                check_existing_parent_dirs(dest, &target_parent).map_err(|e| match e {
                    ParentError::Rejected(why) => rejected(why),
                    ParentError::Io(source) => io_err(source),
                })?;
                let target_abs = dest.join(&target_rel);
                match fs::symlink_metadata(&target_abs) {
                    Ok(m) if m.is_dir() => return Err(rejected("hard link to a directory")),
                    Ok(_) => {}
                    Err(_) => return Err(rejected("hard link target is not in this layer")),
                }
                if target_abs == path {
                    continue;
                }
                remove_existing(&path).map_err(io_err)?;
                // linkat(2) without AT_SYMLINK_FOLLOW: a link to a symlink
                // links the symlink itself.
                fs::hard_link(&target_abs, &path).map_err(io_err)?;
                continue; // metadata is shared with the target
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let (major, minor) = if kind == EntryType::Fifo {
                    (0, 0)
                } else {
                    (
                        header
                            .device_major()
                            .map_err(UnpackError::Tar)?
                            .unwrap_or(0),
                        header
                            .device_minor()
                            .map_err(UnpackError::Tar)?
                            .unwrap_or(0),
                    )
                };
                let fmt = match kind {
                    EntryType::Char => libc::S_IFCHR,
                    EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                remove_existing(&path).map_err(io_err)?;
                mknod(&path, fmt | 0o600, libc::makedev(major, minor)).map_err(io_err)?;
            }
            // PAX/GNU metadata entries are consumed by the tar reader; other
            // kinds (e.g. XGlobalHeader) carry nothing to write.
            _ => continue,
        }

        lchown(&path, uid as u32, gid as u32).map_err(io_err)?;
        for (k, v) in &xattrs {
            set_xattr(&path, k, v).map_err(io_err)?;
        }
        if kind != EntryType::Symlink {
            // After chown: chown clears set-id bits.
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(io_err)?;
        }
        if kind != EntryType::Directory {
            set_mtime(&path, mtime).map_err(io_err)?;
        }
    }
    for (dir, mtime) in dir_times.iter().rev() {
        set_mtime(dir, *mtime).map_err(|source| UnpackError::Io {
            path: dir.display().to_string(),
            source,
        })?;
    }
    Ok(stats)
}

/// Normalizes an entry path to a relative path without `.`/`..`.
/// `Ok(None)` is the layer root itself.
fn clean_path(raw: &[u8]) -> Result<Option<PathBuf>, &'static str> {
    if raw.len() > MAX_PATH {
        return Err("path too long");
    }
    if raw.contains(&0) {
        return Err("path contains NUL");
    }
    let mut out = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err("path contains '..'"),
            Component::Prefix(_) => return Err("path has a prefix"),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

enum ParentError {
    Rejected(&'static str),
    Io(io::Error),
}

/// Walks `rel` below `dest`, creating missing directories; every existing
/// component must be a real directory (never a symlink).
fn ensure_parent_dirs(dest: &Path, rel: &Path) -> Result<PathBuf, ParentError> {
    let mut cur = dest.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(ParentError::Rejected("a parent directory is a symlink"));
            }
            Ok(_) => return Err(ParentError::Rejected("a parent is not a directory")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(ParentError::Io)?;
                fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))
                    .map_err(ParentError::Io)?;
            }
            Err(e) => return Err(ParentError::Io(e)),
        }
    }
    Ok(cur)
}

fn check_existing_parent_dirs(dest: &Path, rel: &Path) -> Result<(), ParentError> {
    let mut cur = dest.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ParentError::Rejected(
                    "hard link target goes through a non-directory",
                ));
            }
            Err(_) => {
                return Err(ParentError::Rejected(
                    "hard link target is not in this layer",
                ));
            }
        }
    }
    Ok(())
}

fn remove_existing(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

enum PaxError {
    TooLarge,
    Io(io::Error),
}

fn read_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Vec<(String, Vec<u8>)>, PaxError> {
    let mut out = Vec::new();
    let Some(exts) = entry.pax_extensions().map_err(PaxError::Io)? else {
        return Ok(out);
    };
    let mut total = 0u64;
    for ext in exts {
        let ext = ext.map_err(PaxError::Io)?;
        total += ext.value_bytes().len() as u64;
        if total > MAX_PAX {
            return Err(PaxError::TooLarge);
        }
        if let Ok(key) = ext.key()
            && let Some(name) = key.strip_prefix("SCHILY.xattr.")
        {
            out.push((name.to_string(), ext.value_bytes().to_vec()));
        }
    }
    Ok(out)
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::mknod(c.as_ptr(), mode, dev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c = cpath(path)?;
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C strings and a value buffer of the given length.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_mtime(path: &Path, mtime: i64) -> io::Result<()> {
    let c = cpath(path)?;
    let ts = libc::timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    // SAFETY: valid path and a two-element timespec array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
