//! Writing key material safely: private keys are created with mode 0600 from
//! the first byte (never chmod-ed after the fact), existing files are never
//! replaced unless asked, and replacements are atomic (write, fsync, rename)
//! so that a crash leaves either the old file or the new one, never half.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::CaError;

/// Mode of private keys and token secrets.
pub(crate) const SECRET: u32 = 0o600;
/// Mode of certificates and bundles: public, but only the owner writes.
pub(crate) const PUBLIC: u32 = 0o644;

/// Creates `dir` (and parents) with mode 0700 when missing.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), CaError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CaError::io("create directory", dir, e))
}

/// Writes a file that must not exist yet; with `force`, replaces it atomically.
pub(crate) fn write_new(path: &Path, data: &[u8], mode: u32, force: bool) -> Result<(), CaError> {
    if force {
        return write_atomic(path, data, mode);
    }
    // `create_new` makes the existence check and the creation one step, so
    // two concurrent `init`s cannot both believe they created the key.
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => CaError::Exists(path.to_owned()),
            _ => CaError::io("create", path, e),
        })?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| CaError::io("write", path, e))
}

/// Replaces `path` with `data` atomically.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| CaError::io("write", path, e))
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nonce: u64 = rand::random();
    path.with_file_name(format!(".{name}.{nonce:016x}.tmp"))
}

/// The most read from one file of keys, certificates or tokens: a bundle of
/// thousands of roots fits many times over. Reading stops there, so that a
/// device such as `/dev/zero` given by mistake ends in an error instead of
/// taking every byte of memory. Pipes stay allowed (`<(...)` in a shell).
const MAX_MATERIAL: u64 = 64 << 20;

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, CaError> {
    use std::io::Read;
    let file = fs::File::open(path).map_err(|e| CaError::io("read", path, e))?;
    let mut data = Vec::new();
    file.take(MAX_MATERIAL + 1)
        .read_to_end(&mut data)
        .map_err(|e| CaError::io("read", path, e))?;
    if data.len() as u64 > MAX_MATERIAL {
        return Err(CaError::material(
            path,
            format!(
                "more than {} MiB; that is no key, certificate or token: check the path",
                MAX_MATERIAL >> 20
            ),
        ));
    }
    Ok(data)
}

pub(crate) fn read_string(path: &Path) -> Result<String, CaError> {
    String::from_utf8(read(path)?).map_err(|_| CaError::material(path, "not text (UTF-8)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_device_that_never_ends_is_refused_not_read_to_the_end() {
        let e = read(Path::new("/dev/zero"))
            .expect_err("endless")
            .to_string();
        assert!(e.contains("more than 64 MiB"), "{e}");
    }

    #[test]
    fn secrets_are_0600_and_never_silently_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_new(&p, b"one", SECRET, false).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            write_new(&p, b"two", SECRET, false),
            Err(CaError::Exists(_))
        ));
        assert_eq!(fs::read(&p).unwrap(), b"one");
        write_new(&p, b"two", SECRET, true).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
