//! How `ztnet identity fetch` lays an SVID out on disk (file I/O only, no network).
//!
//! The default layout, [`Layout::Swap`], is the atomic directory swap of Kubernetes secret
//! volumes. Each write goes into a fresh hidden directory `DIR/..ztnet_<unix-ms>_<pid>/`
//! (every file fsynced, then the directory); a symlink `DIR/..data.tmp` to it is renamed over
//! `DIR/..data`, so one rename switches the certificate, the key and the bundle together; then
//! DIR is fsynced and older `..ztnet_*` directories are removed. The names a workload opens,
//! `DIR/<cert>`, `DIR/svid.key` and `DIR/bundle.pem`, are relative symlinks `..data/<name>`,
//! made once (in a fresh directory before the first `..data`, so that its rename is the last
//! step of every write). A reader watching DIR sees `IN_MOVED_TO` for `..data` at every
//! rotation. Each write holds an exclusive `flock` on DIR: one writer at a time.
//!
//! [`Layout::Flat`] is the older layout: three regular files replaced one rename at a time, so
//! for a moment the key on disk and the certificate on disk do not match.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;

use crate::output::noteln;

/// The symlink that names the directory in force.
pub const DATA: &str = "..data";
/// The private key's file name.
pub const KEY: &str = "svid.key";
/// The trust bundle's file name.
pub const BUNDLE: &str = "bundle.pem";
/// The symlink made beside `..data` and renamed over it.
const DATA_TMP: &str = "..data.tmp";
/// How the hidden directories' names start.
const STAGED_PREFIX: &str = "..ztnet_";
/// The hidden directories' mode. Whoever reaches it came through DIR, whose own mode is the
/// gate; a narrower mode would keep a reader of another uid (a sidecar layout) from the
/// certificate and the bundle, and the key is protected by its own 0600.
const STAGED_MODE: u32 = 0o755;
const CERT_MODE: u32 = 0o644;
const KEY_MODE: u32 = 0o600;
const BUNDLE_MODE: u32 = 0o644;

/// How the three files of an SVID are put on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Layout {
    /// Symlinks into `..data`, switched by one rename: the pair on disk always matches.
    #[default]
    Swap,
    /// Three regular files, replaced one at a time: the pair does not match for a moment.
    Flat,
}

/// The bytes of one SVID as they go to disk.
#[derive(Clone, Copy)]
pub struct Contents<'a> {
    /// The certificate chain, PEM, leaf first.
    pub cert: &'a [u8],
    /// The private key, PKCS#8 PEM.
    pub key: &'a [u8],
    /// The trust bundle, PEM.
    pub bundle: &'a [u8],
}

/// The directory an SVID is written to, and the names in it.
#[derive(Debug)]
pub struct SvidDir {
    dir: PathBuf,
    cert_name: OsString,
    layout: Layout,
}

impl SvidDir {
    /// Takes the certificate's path (`--output`): its directory must exist, and its name must
    /// not be taken by the key, the bundle or the layout's hidden names.
    pub fn beside(cert: &Path, layout: Layout) -> Result<SvidDir> {
        let dir = match cert.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let Some(cert_name) = cert.file_name() else {
            bail!("--output {} names no file", cert.display());
        };
        if cert_name == KEY || cert_name == BUNDLE {
            bail!(
                "--output {} would overwrite the {} written beside the certificate; name the \
                 certificate otherwise (svid.pem)",
                cert.display(),
                if cert_name == KEY { "key" } else { "bundle" }
            );
        }
        if cert_name.as_encoded_bytes().starts_with(b"..") {
            bail!(
                "--output {}: names starting with `..` are kept for the directory swap",
                cert.display()
            );
        }
        if !dir.is_dir() {
            bail!("the output directory {} does not exist", dir.display());
        }
        Ok(SvidDir {
            dir,
            cert_name: cert_name.to_os_string(),
            layout,
        })
    }

    /// The path a workload opens for the certificate.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(&self.cert_name)
    }

    /// Puts `c` on disk. On an error the SVID that was in force stays in force, and no
    /// temporary file or directory is left behind.
    pub fn write(&self, c: Contents<'_>) -> Result<()> {
        // One writer at a time per directory: two `--watch` would share `..data.tmp`.
        let lock =
            fs::File::open(&self.dir).with_context(|| format!("opening {}", self.dir.display()))?;
        lock.lock()
            .with_context(|| format!("locking {}", self.dir.display()))?;
        match self.layout {
            Layout::Swap => {
                self.keep_what_is_there()?;
                self.swap(c)
            }
            Layout::Flat => self.write_flat(c),
        }
    }

    /// The public names, in the order they are linked: the certificate last, so that its
    /// appearance in a fresh directory means the other two are there.
    fn names(&self) -> [&OsStr; 3] {
        [OsStr::new(BUNDLE), OsStr::new(KEY), &self.cert_name]
    }

    /// Before the first swap over files that are not yet links into `..data` (an older ztnet,
    /// or the user): the pair they show now is copied into a hidden directory first, so that
    /// replacing the names one at a time by links never shows a mixed pair.
    fn keep_what_is_there(&self) -> Result<()> {
        let linked = self
            .names()
            .iter()
            .all(|n| fs::read_link(self.dir.join(n)).is_ok_and(|t| t == Path::new(DATA).join(n)));
        if linked {
            return Ok(());
        }
        let now: Option<Vec<Vec<u8>>> = self
            .names()
            .iter()
            .map(|n| fs::read(self.dir.join(n)).ok())
            .collect();
        let Some(now) = now else {
            // Nothing complete to keep: the links appear after the first swap.
            return Ok(());
        };
        self.swap(Contents {
            bundle: &now[0],
            key: &now[1],
            cert: &now[2],
        })
        .context("moving the SVID already on disk into the directory swap layout")
    }

    /// Stages `c` in a new hidden directory, switches `..data` to it, links the public names,
    /// then removes the older hidden directories.
    fn swap(&self, c: Contents<'_>) -> Result<()> {
        let staged = self.stage(c)?;
        // In a fresh directory the links come first (dangling, as good as no file), so that
        // the `..data` rename is the last event of every write, the first one included.
        let published = self
            .link_names(Absent::Only)
            .and_then(|()| self.publish(&staged));
        if let Err(e) = published {
            let _ = fs::remove_dir_all(self.dir.join(&staged));
            return Err(e);
        }
        // From here on the new pair is in force, whatever fails below.
        sync_dir(&self.dir)?;
        self.link_names(Absent::AndReplace)?;
        self.remove_stale(Some(&staged));
        Ok(())
    }

    /// Writes the three files into a new `..ztnet_<unix-ms>_<pid>` directory, each fsynced,
    /// then the directory; returns its name. Removes it again on an error.
    fn stage(&self, c: Contents<'_>) -> Result<OsString> {
        let (name, path) = self.new_staged_dir()?;
        let written = (|| -> Result<()> {
            fs::set_permissions(&path, fs::Permissions::from_mode(STAGED_MODE))
                .with_context(|| format!("setting the mode of {}", path.display()))?;
            write_new(&path.join(BUNDLE), c.bundle, BUNDLE_MODE)?;
            write_new(&path.join(KEY), c.key, KEY_MODE)?;
            write_new(&path.join(&self.cert_name), c.cert, CERT_MODE)?;
            sync_dir(&path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_dir_all(&path);
            return Err(e);
        }
        Ok(name)
    }

    /// Creates an empty hidden directory under a name no other write has used.
    fn new_staged_dir(&self) -> Result<(OsString, PathBuf)> {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let pid = std::process::id();
        // Two writes in the same millisecond (the first swap over old files, then the new
        // SVID) take the next free millisecond.
        for bump in 0..1000 {
            let name = format!("{STAGED_PREFIX}{}_{pid}", ms + bump);
            let path = self.dir.join(&name);
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok((name.into(), path)),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("creating {}", path.display()));
                }
            }
        }
        bail!(
            "no free name for a new {STAGED_PREFIX}* directory in {}",
            self.dir.display()
        )
    }

    /// Points `..data` at `staged` with one rename; `Ok` means it is in force.
    fn publish(&self, staged: &OsStr) -> Result<()> {
        let tmp = self.dir.join(DATA_TMP);
        clear_link(&tmp)?;
        std::os::unix::fs::symlink(staged, &tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        let data = self.dir.join(DATA);
        if let Err(e) = fs::rename(&tmp, &data) {
            let _ = fs::remove_file(&tmp);
            return Err(e).with_context(|| {
                format!(
                    "renaming {} over {} (it must be a symlink, if it exists)",
                    tmp.display(),
                    data.display()
                )
            });
        }
        Ok(())
    }

    /// Makes public names links `..data/<name>` where they are not yet, each by a rename over
    /// whatever was there (`which` says whether something there is replaced).
    fn link_names(&self, which: Absent) -> Result<()> {
        let mut changed = false;
        for name in self.names() {
            let path = self.dir.join(name);
            let target = Path::new(DATA).join(name);
            if fs::read_link(&path).is_ok_and(|t| t == target) {
                continue;
            }
            if which == Absent::Only && fs::symlink_metadata(&path).is_ok() {
                continue;
            }
            let mut tmp_name = OsString::from("..");
            tmp_name.push(name);
            tmp_name.push(".tmp");
            let tmp = self.dir.join(tmp_name);
            clear_link(&tmp)?;
            std::os::unix::fs::symlink(&target, &tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            if let Err(e) = fs::rename(&tmp, &path) {
                let _ = fs::remove_file(&tmp);
                return Err(e).with_context(|| {
                    format!(
                        "replacing {} by a link to {}",
                        path.display(),
                        target.display()
                    )
                });
            }
            changed = true;
        }
        if changed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Removes every hidden directory but `keep`; a failure is said, not fatal (the next
    /// write tries again).
    fn remove_stale(&self, keep: Option<&OsStr>) {
        for old in self.staged_dirs() {
            if keep.is_some() && old.file_name() == keep {
                continue;
            }
            if let Err(e) = fs::remove_dir_all(&old) {
                noteln!("warning: cannot remove the old {}: {e}", old.display());
            }
        }
    }

    /// The hidden `..ztnet_*` directories in DIR.
    fn staged_dirs(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| {
                e.file_name()
                    .as_encoded_bytes()
                    .starts_with(STAGED_PREFIX.as_bytes())
                    && e.file_type().is_ok_and(|t| t.is_dir())
            })
            .map(|e| e.path())
            .collect()
    }

    /// The flat layout: bundle, key, certificate, each replaced by its own rename; then what a
    /// swap layout left behind is removed, as nothing points into it any more.
    fn write_flat(&self, c: Contents<'_>) -> Result<()> {
        replace(&self.dir.join(BUNDLE), c.bundle, BUNDLE_MODE)?;
        replace(&self.dir.join(KEY), c.key, KEY_MODE)?;
        replace(&self.cert_path(), c.cert, CERT_MODE)?;
        sync_dir(&self.dir)?;
        if fs::symlink_metadata(self.dir.join(DATA)).is_ok_and(|m| m.file_type().is_symlink()) {
            let _ = fs::remove_file(self.dir.join(DATA));
            self.remove_stale(None);
        }
        Ok(())
    }
}

/// Which public names [`SvidDir::link_names`] makes links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Absent {
    /// Only the names that do not exist at all.
    Only,
    /// Those, and every name that is something else (a file of an older ztnet or the user).
    AndReplace,
}

/// Removes a leftover temporary symlink at `path`; anything else there is an error.
fn clear_link(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("looking at {}", path.display())),
        Ok(m) if m.file_type().is_symlink() => {
            fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
        }
        Ok(_) => bail!(
            "{} is in the way: it is not a symlink (ztnet makes it only as one); remove it",
            path.display()
        ),
    }
}

/// Creates `path` (it must not exist) with exactly `mode`, writes `bytes` and fsyncs it.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    (|| -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        // The umask may have narrowed the mode; set it exactly before any byte lands.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()
    })()
    .with_context(|| format!("writing {}", path.display()))
}

/// Writes `bytes` to a temporary file beside `path` with `mode`, fsyncs it, renames it over.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let name = path
        .file_name()
        .context("the path names no file")?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let written = write_new(&tmp, bytes, mode).and_then(|()| {
        fs::rename(&tmp, path).with_context(|| format!("renaming over {}", path.display()))
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// Generation `n` of a fake SVID: each file says which generation it belongs to.
    struct Fake {
        cert: String,
        key: String,
        bundle: String,
    }

    impl Fake {
        fn new(n: u64) -> Fake {
            Fake {
                cert: format!("cert {n}"),
                key: format!("key {n}"),
                bundle: format!("bundle {n}"),
            }
        }

        fn contents(&self) -> Contents<'_> {
            Contents {
                cert: self.cert.as_bytes(),
                key: self.key.as_bytes(),
                bundle: self.bundle.as_bytes(),
            }
        }
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn staged_in(dir: &Path) -> Vec<String> {
        names_in(dir)
            .into_iter()
            .filter(|n| n.starts_with(STAGED_PREFIX))
            .collect()
    }

    fn read(dir: &Path, name: &str) -> String {
        fs::read_to_string(dir.join(name)).expect("read")
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("meta").permissions().mode() & 0o777
    }

    #[test]
    fn swaps_leave_one_hidden_directory_and_links_into_data() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        let out = SvidDir::beside(&dir.join("svid.pem"), Layout::Swap).expect("dir");

        for n in 1..=3 {
            out.write(Fake::new(n).contents()).expect("write");
        }

        let staged = staged_in(dir);
        assert_eq!(staged.len(), 1, "{:?}", names_in(dir));
        assert_eq!(
            fs::read_link(dir.join(DATA)).expect("..data"),
            Path::new(&staged[0])
        );
        for name in ["svid.pem", KEY, BUNDLE] {
            assert_eq!(
                fs::read_link(dir.join(name)).expect("a link"),
                Path::new("..data").join(name)
            );
        }
        assert_eq!(read(dir, "svid.pem"), "cert 3");
        assert_eq!(read(dir, KEY), "key 3");
        assert_eq!(read(dir, BUNDLE), "bundle 3");
        assert_eq!(mode(&dir.join(KEY)), 0o600);
        assert_eq!(mode(&dir.join("svid.pem")), 0o644);
        assert_eq!(mode(&dir.join(&staged[0])), STAGED_MODE);
        assert_eq!(
            names_in(dir),
            [DATA, &staged[0], BUNDLE, KEY, "svid.pem"],
            "no temporary name is left"
        );
    }

    #[test]
    fn the_certificate_keeps_the_name_chosen_with_output() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let out = SvidDir::beside(&tmp.path().join("tls.crt"), Layout::Swap).expect("dir");

        out.write(Fake::new(1).contents()).expect("write");

        assert_eq!(out.cert_path(), tmp.path().join("tls.crt"));
        assert_eq!(read(tmp.path(), "tls.crt"), "cert 1");
        assert_eq!(
            fs::read_link(tmp.path().join("tls.crt")).expect("link"),
            Path::new("..data/tls.crt")
        );
        assert!(!tmp.path().join("svid.pem").exists());
    }

    #[test]
    fn regular_files_from_an_older_ztnet_are_replaced_by_links() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        fs::write(dir.join("svid.pem"), "cert 0").expect("write");
        fs::write(dir.join(KEY), "key 0").expect("write");
        fs::write(dir.join(BUNDLE), "bundle 0").expect("write");
        let out = SvidDir::beside(&dir.join("svid.pem"), Layout::Swap).expect("dir");

        // The first step alone: the old pair moves behind the links unchanged, so that
        // replacing the three names one by one never shows a new key beside an old certificate.
        out.keep_what_is_there().expect("keep");
        for name in ["svid.pem", KEY, BUNDLE] {
            let meta = fs::symlink_metadata(dir.join(name)).expect("meta");
            assert!(meta.file_type().is_symlink(), "{name} is a link now");
        }
        assert_eq!(read(dir, "svid.pem"), "cert 0");
        assert_eq!(read(dir, KEY), "key 0");
        assert_eq!(read(dir, BUNDLE), "bundle 0");
        out.write(Fake::new(1).contents()).expect("write");

        assert_eq!(read(dir, "svid.pem"), "cert 1");
        assert_eq!(read(dir, KEY), "key 1");
        assert_eq!(staged_in(dir).len(), 1, "{:?}", names_in(dir));
    }

    #[test]
    fn a_failed_write_keeps_the_old_pair_and_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        let out = SvidDir::beside(&dir.join("svid.pem"), Layout::Swap).expect("dir");
        out.write(Fake::new(1).contents()).expect("write");
        let before = names_in(dir);
        // Something that is not ztnet's symlink sits where the swap makes its temporary link.
        fs::create_dir(dir.join(DATA_TMP)).expect("mkdir");
        fs::write(dir.join(DATA_TMP).join("x"), "user's").expect("write");

        let e = out
            .write(Fake::new(2).contents())
            .expect_err("the swap fails");

        let text = format!("{e:#}");
        assert!(text.contains("..data.tmp is in the way"), "{text}");
        assert_eq!(read(dir, "svid.pem"), "cert 1");
        assert_eq!(read(dir, KEY), "key 1");
        assert_eq!(read(dir, BUNDLE), "bundle 1");
        fs::remove_dir_all(dir.join(DATA_TMP)).expect("rm");
        assert_eq!(names_in(dir), before, "no staged directory is left");

        out.write(Fake::new(3).contents())
            .expect("write once the way is clear");
        assert_eq!(read(dir, "svid.pem"), "cert 3");
        assert_eq!(staged_in(dir).len(), 1);
    }

    #[test]
    fn in_a_fresh_directory_the_links_are_made_before_data() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        let out = SvidDir::beside(&dir.join("svid.pem"), Layout::Swap).expect("dir");
        // The first write fails at the `..data` rename, after the links were made.
        fs::create_dir(dir.join(DATA_TMP)).expect("mkdir");

        out.write(Fake::new(1).contents())
            .expect_err("the swap fails");

        for name in ["svid.pem", KEY, BUNDLE] {
            let link = fs::read_link(dir.join(name)).expect("linked before the swap");
            assert_eq!(link, Path::new(DATA).join(name));
            assert!(
                !dir.join(name).exists(),
                "{name} dangles: as good as no file"
            );
        }
        assert!(staged_in(dir).is_empty(), "{:?}", names_in(dir));
    }

    #[test]
    fn readers_never_see_a_mixed_pair_through_a_migration_and_many_swaps() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        fs::write(dir.join("svid.pem"), "cert 0").expect("write");
        fs::write(dir.join(KEY), "key 0").expect("write");
        fs::write(dir.join(BUNDLE), "bundle 0").expect("write");
        let stop = Arc::new(AtomicBool::new(false));
        let checks = Arc::new(AtomicU64::new(0));
        let reader = {
            let (dir, stop, checks) = (dir.clone(), stop.clone(), checks.clone());
            std::thread::spawn(move || {
                let generation = |s: &str| s.rsplit(' ').next().map(str::to_string);
                while !stop.load(Ordering::Relaxed) {
                    let before = fs::read_link(dir.join(DATA)).ok();
                    let files: Vec<_> = ["svid.pem", KEY, BUNDLE]
                        .iter()
                        .map(|n| fs::read_to_string(dir.join(n)).ok())
                        .collect();
                    if fs::read_link(dir.join(DATA)).ok() != before {
                        continue; // a swap between the reads: read again
                    }
                    let gens: Vec<_> = files
                        .iter()
                        .map(|f| f.as_deref().and_then(generation))
                        .collect();
                    assert!(
                        gens.iter().all(|g| g.is_some() && *g == gens[0]),
                        "a mixed or missing pair: {files:?}"
                    );
                    checks.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let out = SvidDir::beside(&dir.join("svid.pem"), Layout::Swap).expect("dir");

        for n in 1..=300 {
            out.write(Fake::new(n).contents()).expect("write");
        }
        stop.store(true, Ordering::Relaxed);

        reader.join().expect("the reader saw only whole pairs");
        assert!(checks.load(Ordering::Relaxed) > 0);
        assert_eq!(read(&dir, KEY), "key 300");
    }

    #[test]
    fn the_flat_layout_writes_regular_files_and_removes_the_swap_leftovers() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        let swap = SvidDir::beside(&dir.join("svid.pem"), Layout::Swap).expect("dir");
        swap.write(Fake::new(1).contents()).expect("write");
        let flat = SvidDir::beside(&dir.join("svid.pem"), Layout::Flat).expect("dir");

        flat.write(Fake::new(2).contents()).expect("write");

        assert_eq!(names_in(dir), [BUNDLE, KEY, "svid.pem"]);
        for name in ["svid.pem", KEY, BUNDLE] {
            assert!(
                fs::symlink_metadata(dir.join(name))
                    .expect("meta")
                    .is_file()
            );
        }
        assert_eq!(read(dir, "svid.pem"), "cert 2");
        assert_eq!(mode(&dir.join(KEY)), 0o600);
    }

    #[test]
    fn output_names_that_clash_are_refused() {
        let tmp = tempfile::tempdir().expect("temp dir");
        for name in ["svid.key", "bundle.pem", "..data", "..ztnet_1_1"] {
            let e = SvidDir::beside(&tmp.path().join(name), Layout::Swap).expect_err(name);
            assert!(e.to_string().contains(name), "{e}");
        }
        let e = SvidDir::beside(Path::new("/nonexistent-ztnet-dir/svid.pem"), Layout::Swap)
            .expect_err("no directory");
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn replace_writes_the_key_owner_only_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = dir.path().join("svid.key");
        fs::write(&key, "old").expect("write");

        replace(&key, b"new", 0o600).expect("replace");

        assert_eq!(fs::read_to_string(&key).expect("read"), "new");
        assert_eq!(mode(&key), 0o600);
        assert_eq!(names_in(dir.path()), ["svid.key"]);
    }
}
