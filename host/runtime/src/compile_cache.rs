//! Compiled components on disk, by digest: a host start, a swap to a known
//! version and `refold test` load what an earlier run compiled instead of
//! compiling it again (seconds for a large Python or JavaScript component).
//!
//! An entry is keyed by the component's digest and by the engine it was
//! compiled for (wasmtime's own compatibility hash, which covers its version
//! and configuration), so another wasmtime or another setting never loads a
//! stale entry. An entry starts with the digest of the rest of the file, and
//! is deserialised only when that digest matches: a truncated or altered file
//! is a miss (and is removed), never native code run as is. Writes go to a
//! temporary file renamed into place, so concurrent hosts sharing the
//! directory never see half an entry. Every failure of the cache is a miss
//! and a warning, never a failed load.

use std::hash::{Hash as _, Hasher as _};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use wasmtime::component::Component;

use crate::digest_of;

/// Length of an entry's header: the hex sha256 of the rest, and a newline.
const HEADER: usize = 65;

/// A directory of compiled components.
pub struct CompileCache {
    dir: PathBuf,
    /// The engine's part of each entry's name.
    engine_key: String,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl CompileCache {
    /// The cache in `dir` (created when first written) for components
    /// compiled by `engine`.
    pub fn new(dir: impl Into<PathBuf>, engine: &wasmtime::Engine) -> Self {
        // std's hasher with its fixed keys: the same within a build, and a
        // build that hashes otherwise only misses, since wasmtime checks
        // compatibility again when deserialising.
        let mut h = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        CompileCache {
            dir: dir.into(),
            engine_key: format!("{:016x}", h.finish()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Components loaded from the cache, and compiled for want of an entry.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}-{}.cwasm", self.engine_key))
    }

    /// The compiled component of `digest`, if an intact entry is there.
    pub fn load(&self, engine: &wasmtime::Engine, digest: &str) -> Option<Component> {
        let path = self.path(digest);
        let found = std::fs::read(&path).ok().and_then(|bytes| {
            let (header, body) = bytes.split_at_checked(HEADER)?;
            if header[..HEADER - 1] != *digest_of(body).as_bytes() {
                tracing::warn!(path = %path.display(), "a compiled component in the cache does not match its digest; compiling again");
                let _ = std::fs::remove_file(&path);
                return None;
            }
            // SAFETY (the one `unsafe` of the workspace): the bytes are what `Component::serialize` wrote for
            // this engine's configuration (the name says which), checked
            // whole against the digest written with them; wasmtime checks
            // its version and settings again before using them.
            #[allow(unsafe_code)]
            let loaded = unsafe { Component::deserialize(engine, body) };
            match loaded {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "a compiled component in the cache cannot be loaded; compiling again");
                    let _ = std::fs::remove_file(&path);
                    None
                }
            }
        });
        match &found {
            Some(_) => self.hits.fetch_add(1, Ordering::Relaxed),
            None => self.misses.fetch_add(1, Ordering::Relaxed),
        };
        found
    }

    /// Keep `component` (of `digest`) for the next load.
    pub fn store(&self, digest: &str, component: &Component) {
        if let Err(e) = self.try_store(digest, component) {
            tracing::warn!(dir = %self.dir.display(), error = %format!("{e:#}"), "could not keep a compiled component in the cache");
        }
    }

    fn try_store(&self, digest: &str, component: &Component) -> anyhow::Result<()> {
        let body = component
            .serialize()
            .map_err(|e| anyhow::anyhow!("serialising: {e:#}"))?;
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(digest);
        let tmp = self.dir.join(format!(
            ".{digest}-{}.{:08x}.tmp",
            std::process::id(),
            rand::random::<u32>()
        ));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(digest_of(&body).as_bytes())?;
            f.write_all(b"\n")?;
            f.write_all(&body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        Ok(written?)
    }
}

/// Where compiled components are kept unless configured otherwise:
/// `$XDG_CACHE_HOME/refold/compiled`, else `$HOME/.cache/refold/compiled`;
/// none when neither is set.
pub fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("refold").join("compiled"))
}

#[cfg(test)]
mod tests {
    use crate::{Engine, Limits, Plugin};

    fn bank() -> Vec<u8> {
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/bank/bank.wasm"
        ))
        .unwrap()
    }

    #[test]
    fn a_component_compiled_once_is_loaded_from_the_cache_after() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = bank();
        let first = Engine::new().unwrap().with_compile_cache(dir.path());
        let p = Plugin::load(&first, &bytes, Limits::default()).unwrap();
        assert_eq!(first.compile_cache().unwrap().counts(), (0, 1));
        // A new engine, as after a restart: loaded, not compiled, and the
        // same plugin.
        let again = Engine::new().unwrap().with_compile_cache(dir.path());
        let q = Plugin::load(&again, &bytes, Limits::default()).unwrap();
        assert_eq!(again.compile_cache().unwrap().counts(), (1, 0));
        // Loading ran `describe()` in an instance of the cached code.
        assert_eq!((q.digest.as_str(), &q.info), (p.digest.as_str(), &p.info));
    }

    #[test]
    fn an_altered_entry_is_compiled_again_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = bank();
        let engine = Engine::new().unwrap().with_compile_cache(dir.path());
        Plugin::load(&engine, &bytes, Limits::default()).unwrap();
        let entry = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .unwrap();
        for damage in [Damage::Flip, Damage::Truncate] {
            let mut b = std::fs::read(&entry).unwrap();
            match damage {
                Damage::Flip => {
                    let at = b.len() / 2;
                    b[at] ^= 0xff;
                }
                Damage::Truncate => b.truncate(10),
            }
            std::fs::write(&entry, b).unwrap();
            let fresh = Engine::new().unwrap().with_compile_cache(dir.path());
            Plugin::load(&fresh, &bytes, Limits::default()).unwrap();
            assert_eq!(fresh.compile_cache().unwrap().counts(), (0, 1));
            let next = Engine::new().unwrap().with_compile_cache(dir.path());
            Plugin::load(&next, &bytes, Limits::default()).unwrap();
            assert_eq!(next.compile_cache().unwrap().counts(), (1, 0));
        }
    }

    #[derive(Clone, Copy)]
    enum Damage {
        Flip,
        Truncate,
    }

    #[test]
    fn a_cache_that_cannot_be_written_only_costs_compiling() {
        let file = tempfile::NamedTempFile::new().unwrap();
        // A file where the directory should be.
        let engine = Engine::new().unwrap().with_compile_cache(file.path());
        assert!(Plugin::load(&engine, &bank(), Limits::default()).is_ok());
        assert!(Plugin::load(&engine, &bank(), Limits::default()).is_ok());
        assert_eq!(engine.compile_cache().unwrap().counts(), (0, 2));
    }
}
