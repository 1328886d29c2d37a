//! Key files: the master key of an encrypted repository, sealed under passphrases, and how a process gets
//! the passphrase.
//!
//! ## `keys/<id>.key`
//! JSON, written once (a new passphrase is a new file; `backflow key add|list|remove`):
//! ```text
//! {"format":"backflow-key","version":1,"id":"<16 hex>","repository":"<repository id>",
//!  "created":"2026-12-04T00:00:00Z","host":"kvm1",
//!  "kdf":{"algorithm":"argon2id","memory_kib":65536,"iterations":8,"parallelism":1,"salt":"<64 hex>"},
//!  "cipher":"xchacha20-poly1305","nonce":"<48 hex>","sealed":"<160 hex>","checksum":"<64 hex>"}
//! ```
//! The passphrase and the salt go through Argon2id with the file's parameters into a 32-byte key that opens
//! `sealed`: the 64-byte master key and its 16-byte tag, sealed with XChaCha20-Poly1305 under `nonce`, with
//! `backflow-key <id> <repository id>` as associated data (a key file copied from another repository, or
//! another file's id, does not open). `checksum` is BLAKE3 of the file's JSON with `checksum` empty: a file
//! that was damaged is told apart from a passphrase that is wrong, without spending Argon2id on it.
//!
//! Parameters: [`DEFAULT_KDF`] (64 MiB, 8 passes, one lane) takes about half a second on the machines we
//! test on: slow for a guesser, once per process for a user, since unlocked keys are kept per repository id
//! for the life of the process ([`unlock`]). They are stored in each file, so raising them later changes
//! only new files. Tests set [`WEAK_KDF_ENV`] to make new files with the smallest parameters.
//!
//! ## The passphrase
//! A file holding it (`--password-file` or `BACKFLOW_PASSWORD_FILE`: `backflow` calls
//! [`set_password_file`] once); one trailing line ending is not part of it (`echo secret > file` works), and
//! an empty passphrase is refused. Opening an encrypted repository tries every key file with it;
//! when none opens, the error says how many were tried, and names the damaged ones.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use crate::config::RepositoryConfig;
use crate::crypto::{CIPHER, ChunkHasher, EncryptionConfig, KDF, MASTER_KEY_LEN, MasterKey};
use crate::error::{RepoError, Result};
use crate::store::sealed::SealedStore;
use crate::store::{PutMode, Store};

/// The prefix of key files.
pub const KEYS_DIR: &str = "keys/";
/// Set (to anything) by tests only: new key files use the smallest Argon2id parameters, so that a test
/// suite that makes hundreds of repositories does not spend minutes deriving keys.
pub const WEAK_KDF_ENV: &str = "BACKFLOW_TEST_WEAK_KDF";
/// The variable that names the passphrase file, read by the command line.
pub const PASSWORD_FILE_ENV: &str = "BACKFLOW_PASSWORD_FILE";

/// Argon2id parameters of a key file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

/// New key files: 64 MiB (so that unlocking stays inside the 128 MiB a backup may use) and 8 passes, about
/// 0.4 s of one core on the test machines (3 passes measured 160 ms there).
pub const DEFAULT_KDF: KdfParams = KdfParams {
    memory_kib: 64 * 1024,
    iterations: 8,
    parallelism: 1,
};

/// What [`WEAK_KDF_ENV`] selects: Argon2's minimum.
pub const WEAK_KDF: KdfParams = KdfParams {
    memory_kib: 8,
    iterations: 1,
    parallelism: 1,
};

/// Largest memory a key file may ask for: a damaged or hostile file must not make `open` allocate
/// gigabytes.
const MAX_KDF_MEMORY_KIB: u32 = 4 * 1024 * 1024;
const MAX_KDF_ITERATIONS: u32 = 64;
const MAX_KDF_PARALLELISM: u32 = 64;
/// Largest key file read.
const MAX_KEY_FILE_LEN: usize = 16 * 1024;

const FORMAT: &str = "backflow-key";
const VERSION: u32 = 1;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    format: String,
    version: u32,
    id: String,
    repository: String,
    created: String,
    host: String,
    kdf: KdfDoc,
    cipher: String,
    nonce: String,
    sealed: String,
    checksum: String,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KdfDoc {
    algorithm: String,
    memory_kib: u32,
    iterations: u32,
    parallelism: u32,
    salt: String,
}

/// One key file, as `backflow key list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub created: String,
    pub host: String,
    /// Whether this process opened the repository with it.
    pub current: bool,
    /// Why the file cannot be used, when it is damaged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
}

impl KeyFile {
    fn checksum_of(&self) -> String {
        let mut body = self.clone();
        body.checksum.clear();
        blake3::hash(&serde_json::to_vec(&body).expect("key file serializes"))
            .to_hex()
            .to_string()
    }

    fn aad(&self) -> Vec<u8> {
        format!("backflow-key {} {}", self.id, self.repository).into_bytes()
    }

    /// Parses and checks a key file: `Err` says why it is damaged.
    fn parse(bytes: &[u8], name: &str) -> std::result::Result<KeyFile, String> {
        let file: KeyFile =
            serde_json::from_slice(bytes).map_err(|e| format!("not a key file: {e}"))?;
        if file.format != FORMAT {
            return Err(format!("format is {:?}, expected {FORMAT:?}", file.format));
        }
        if file.version != VERSION {
            return Err(format!(
                "key file version {}; this build reads {VERSION}",
                file.version
            ));
        }
        if file.checksum_of() != file.checksum {
            return Err("checksum mismatch: the file changed after it was written".to_owned());
        }
        if name != format!("{}.key", file.id) {
            return Err(format!("its id {:?} does not match its name", file.id));
        }
        if file.kdf.algorithm != KDF || file.cipher != CIPHER {
            return Err(format!(
                "kdf {:?} and cipher {:?}; this build knows {KDF:?} and {CIPHER:?}",
                file.kdf.algorithm, file.cipher
            ));
        }
        Ok(file)
    }

    fn params(&self) -> std::result::Result<KdfParams, String> {
        let p = KdfParams {
            memory_kib: self.kdf.memory_kib,
            iterations: self.kdf.iterations,
            parallelism: self.kdf.parallelism,
        };
        if p.memory_kib > MAX_KDF_MEMORY_KIB
            || p.iterations > MAX_KDF_ITERATIONS
            || p.parallelism > MAX_KDF_PARALLELISM
        {
            return Err(format!(
                "Argon2id parameters {p:?} exceed the limits of this build"
            ));
        }
        Ok(p)
    }

    /// The master key, when `passphrase` opens this file; `Err` when the file is damaged.
    fn open(&self, passphrase: &[u8]) -> std::result::Result<Option<MasterKey>, String> {
        let salt = hex_vec(&self.kdf.salt).ok_or("its salt is not hexadecimal")?;
        let nonce = crate::format::parse_hex::<24>(&self.nonce).ok_or("its nonce is malformed")?;
        let sealed = hex_vec(&self.sealed).ok_or("its sealed key is not hexadecimal")?;
        let kek = derive(passphrase, &salt, self.params()?)?;
        let cipher = XChaCha20Poly1305::new(Key::from_slice(&kek[..]));
        let aad = self.aad();
        let Ok(plain) = cipher.decrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &sealed,
                aad: &aad,
            },
        ) else {
            return Ok(None);
        };
        let plain = Zeroizing::new(plain);
        let bytes: [u8; MASTER_KEY_LEN] = plain[..]
            .try_into()
            .map_err(|_| "its sealed key has the wrong length")?;
        Ok(Some(MasterKey::from_bytes(bytes)))
    }

    fn info(&self, current: Option<&str>) -> KeyInfo {
        KeyInfo {
            id: self.id.clone(),
            created: self.created.clone(),
            host: self.host.clone(),
            current: current == Some(self.id.as_str()),
            damaged: None,
        }
    }
}

fn hex_vec(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn derive(
    passphrase: &[u8],
    salt: &[u8],
    p: KdfParams,
) -> std::result::Result<Zeroizing<[u8; 32]>, String> {
    let params = Params::new(p.memory_kib, p.iterations, p.parallelism, Some(32))
        .map_err(|e| format!("invalid Argon2id parameters {p:?}: {e}"))?;
    let mut out = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase, salt, &mut out[..])
        .map_err(|e| format!("Argon2id failed: {e}"))?;
    Ok(out)
}

fn params_override() -> &'static RwLock<Option<KdfParams>> {
    static SLOT: RwLock<Option<KdfParams>> = RwLock::new(None);
    &SLOT
}

/// Sets the parameters of new key files in this process (`None`: the default, or [`WEAK_KDF_ENV`]'s). For
/// tests in one process, which cannot set an environment variable safely; never called by `backflow`.
#[doc(hidden)]
pub fn set_new_key_params(params: Option<KdfParams>) {
    *params_override().write().unwrap_or_else(|p| p.into_inner()) = params;
}

/// The parameters of new key files in this process.
fn new_params() -> KdfParams {
    if let Some(p) = *params_override().read().unwrap_or_else(|p| p.into_inner()) {
        return p;
    }
    if std::env::var_os(WEAK_KDF_ENV).is_some() {
        WEAK_KDF
    } else {
        DEFAULT_KDF
    }
}

/// A new key file sealing `master` under `passphrase`: (id, file contents).
fn new_key_file(master: &MasterKey, passphrase: &[u8], repo_id: &str) -> Result<(String, Vec<u8>)> {
    let params = new_params();
    let salt: [u8; 32] = rand::random();
    let nonce: [u8; 24] = rand::random();
    let mut file = KeyFile {
        format: FORMAT.to_owned(),
        version: VERSION,
        id: crate::format::hex(&rand::random::<[u8; 8]>()),
        repository: repo_id.to_owned(),
        created: crate::ids::rfc3339(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        ),
        host: crate::session::hostname(),
        kdf: KdfDoc {
            algorithm: KDF.to_owned(),
            memory_kib: params.memory_kib,
            iterations: params.iterations,
            parallelism: params.parallelism,
            salt: crate::format::hex(&salt),
        },
        cipher: CIPHER.to_owned(),
        nonce: crate::format::hex(&nonce),
        sealed: String::new(),
        checksum: String::new(),
    };
    let kek = derive(passphrase, &salt, params).map_err(RepoError::InvalidArgument)?;
    let sealed = XChaCha20Poly1305::new(Key::from_slice(&kek[..]))
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: master.as_bytes(),
                aad: &file.aad(),
            },
        )
        .expect("sealing 64 bytes cannot fail");
    file.sealed = crate::format::hex(&sealed);
    file.checksum = file.checksum_of();
    let mut text = serde_json::to_vec_pretty(&file).expect("key file serializes");
    text.push(b'\n');
    Ok((file.id, text))
}

/// Every key file: (name, parsed file or why it is damaged).
fn read_all(store: &dyn Store) -> Result<Vec<(String, std::result::Result<KeyFile, String>)>> {
    let mut out = Vec::new();
    for entry in store.list(KEYS_DIR)? {
        if !entry.name.ends_with(".key") {
            continue;
        }
        let key = format!("{KEYS_DIR}{}", entry.name);
        let parsed = match store.read(&key)? {
            // Removed between the listing and the read (`key remove` in another process).
            None => continue,
            Some(b) if b.len() > MAX_KEY_FILE_LEN => {
                Err(format!("{} bytes is too long for a key file", b.len()))
            }
            Some(b) => KeyFile::parse(&b, &entry.name),
        };
        out.push((entry.name, parsed));
    }
    Ok(out)
}

/// Writes the first key file of a new repository; returns its id.
pub fn create_first(
    store: &dyn Store,
    master: &MasterKey,
    repo_id: &str,
    passphrase: &[u8],
) -> Result<String> {
    let (id, text) = new_key_file(master, passphrase, repo_id)?;
    store.put(&format!("{KEYS_DIR}{id}.key"), &text, PutMode::Create)?;
    Ok(id)
}

/// Adds a key file sealing `master` under `passphrase`.
pub fn add(
    store: &dyn Store,
    master: &MasterKey,
    repo_id: &str,
    passphrase: &[u8],
) -> Result<KeyInfo> {
    let id = create_first(store, master, repo_id, passphrase)?;
    let key = format!("{KEYS_DIR}{id}.key");
    let bytes = store.read(&key)?.unwrap_or_default();
    let file = KeyFile::parse(&bytes, &format!("{id}.key"))
        .map_err(|d| RepoError::corrupt(store.display_key(&key), d))?;
    Ok(file.info(None))
}

/// The key files, oldest first; `current` is the id this process unlocked with.
pub fn list(store: &dyn Store, current: Option<&str>) -> Result<Vec<KeyInfo>> {
    let mut out: Vec<KeyInfo> = read_all(store)?
        .into_iter()
        .map(|(name, parsed)| match parsed {
            Ok(f) => f.info(current),
            Err(why) => KeyInfo {
                id: name.trim_end_matches(".key").to_owned(),
                created: String::new(),
                host: String::new(),
                current: false,
                damaged: Some(why),
            },
        })
        .collect();
    out.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
    Ok(out)
}

/// Removes key file `id`. Refused for the key this process unlocked with (open the repository with
/// another passphrase to remove it: so a typo cannot lock everyone out) and for the last intact one.
pub fn remove(store: &dyn Store, id: &str, current: Option<&str>) -> Result<()> {
    let keys = list(store, current)?;
    let Some(k) = keys.iter().find(|k| k.id == id) else {
        return Err(RepoError::InvalidArgument(format!(
            "no key {id:?} in {}; `backflow key list` shows the ids",
            store.location()
        )));
    };
    if k.current {
        return Err(RepoError::InvalidArgument(format!(
            "key {id} is the one this passphrase opened; open the repository with another key's \
             passphrase to remove it"
        )));
    }
    let intact_others = keys
        .iter()
        .filter(|o| o.id != id && o.damaged.is_none())
        .count();
    if intact_others == 0 {
        return Err(RepoError::InvalidArgument(format!(
            "key {id} is the last intact key of {}; removing it would lose the repository's data",
            store.location()
        )));
    }
    store.delete(&format!("{KEYS_DIR}{id}.key"))?;
    // A process that removed a key cannot go on opening the repository with it.
    forget_unlocked(&store.location().to_string());
    Ok(())
}

/// Master keys unlocked in this process, by repository id and a hash of the passphrase that opened them,
/// with the id of the key file: many handles in one run pay Argon2id once.
type Unlocked = HashMap<(String, [u8; 32]), (Arc<MasterKey>, String)>;

fn unlocked() -> &'static Mutex<Unlocked> {
    static CACHE: std::sync::OnceLock<Mutex<Unlocked>> = std::sync::OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The entry of a passphrase in [`unlocked`]: a hash, so that the cache holds no passphrase.
fn cache_key(store: &dyn Store, repo_id: &str, passphrase: &[u8]) -> (String, [u8; 32]) {
    (
        format!("{}\u{0}{repo_id}", store.location()),
        *blake3::keyed_hash(&[7u8; 32], passphrase).as_bytes(),
    )
}

fn forget_unlocked(location: &str) {
    let mut cache = unlocked().lock().unwrap_or_else(|p| p.into_inner());
    cache.retain(|(repo, _), _| !repo.starts_with(&format!("{location}\u{0}")));
}

/// Opens the master key of the repository in `store` (id `repo_id`) with `passphrase`: the key and the id of
/// the key file that opened it.
pub fn unlock(
    store: &dyn Store,
    repo_id: &str,
    passphrase: &[u8],
) -> Result<(Arc<MasterKey>, String)> {
    let cache_key = cache_key(store, repo_id, passphrase);
    if let Some(hit) = unlocked()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&cache_key)
    {
        return Ok(hit.clone());
    }
    let files = read_all(store)?;
    let mut damaged = Vec::new();
    let mut tried = 0;
    for (name, parsed) in &files {
        let shown = store.display_key(&format!("{KEYS_DIR}{name}"));
        let file = match parsed {
            Ok(f) if f.repository == repo_id => f,
            Ok(f) => {
                damaged.push(format!(
                    "{} belongs to repository {}",
                    shown.display(),
                    f.repository
                ));
                continue;
            }
            Err(why) => {
                damaged.push(format!("{} is damaged: {why}", shown.display()));
                continue;
            }
        };
        tried += 1;
        match file.open(passphrase) {
            Ok(Some(master)) => {
                let hit = (Arc::new(master), file.id.clone());
                unlocked()
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(cache_key, hit.clone());
                return Ok(hit);
            }
            Ok(None) => {}
            Err(why) => damaged.push(format!("{} is damaged: {why}", shown.display())),
        }
    }
    let repo = store.location().to_string();
    if tried == 0 && !damaged.is_empty() {
        return Err(RepoError::corrupt(
            store.display_key(KEYS_DIR),
            format!(
                "no intact key file, so the repository cannot be opened: {}",
                damaged.join("; ")
            ),
        ));
    }
    if files.is_empty() {
        return Err(RepoError::corrupt(
            store.display_key(KEYS_DIR),
            "the repository is encrypted but holds no key file",
        ));
    }
    let mut detail = format!(
        "no key in {repo} opens with this passphrase (tried {tried} key file{})",
        if tried == 1 { "" } else { "s" }
    );
    if !damaged.is_empty() {
        detail.push_str(&format!("; also: {}", damaged.join("; ")));
    }
    Err(RepoError::Passphrase {
        path: PathBuf::from(repo),
        detail,
    })
}

fn password_file_slot() -> &'static RwLock<Option<PathBuf>> {
    static SLOT: RwLock<Option<PathBuf>> = RwLock::new(None);
    &SLOT
}

/// Where this process reads passphrases from (`--password-file`, `BACKFLOW_PASSWORD_FILE`); set once by
/// the command line, or by a test.
pub fn set_password_file(path: Option<PathBuf>) {
    *password_file_slot()
        .write()
        .unwrap_or_else(|p| p.into_inner()) = path;
}

pub fn password_file() -> Option<PathBuf> {
    password_file_slot()
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// Reads a passphrase file (see the module docs).
pub fn read_passphrase(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let mut bytes = Zeroizing::new(std::fs::read(path).map_err(|e| RepoError::Passphrase {
        path: path.to_owned(),
        detail: format!("cannot read the passphrase file {}: {e}", path.display()),
    })?);
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    if bytes.is_empty() {
        return Err(RepoError::Passphrase {
            path: path.to_owned(),
            detail: format!(
                "the passphrase file {} is empty; an encrypted repository needs a passphrase",
                path.display()
            ),
        });
    }
    Ok(bytes)
}

fn per_repository() -> &'static RwLock<HashMap<String, PathBuf>> {
    static MAP: std::sync::OnceLock<RwLock<HashMap<String, PathBuf>>> = std::sync::OnceLock::new();
    MAP.get_or_init(Default::default)
}

/// The passphrase file of one repository (its location as written, a path or `s3://…`), over the
/// process's: a job file's `password_file`.
pub fn set_password_file_for(repo: &str, path: PathBuf) {
    per_repository()
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(repo.to_owned(), path);
}

/// The passphrase file this process uses for the repository at `repo`: its own (a job file's
/// `password_file`), else the process's; `None` when neither was given. For a child process that
/// opens the same repository (an export started for instant recovery).
pub fn password_file_for(repo: &str) -> Option<PathBuf> {
    per_repository()
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(repo)
        .cloned()
        .or_else(password_file)
}

/// The passphrase of this process, for the repository at `repo` (named in the error when none was given).
pub fn passphrase_for(repo: &str) -> Result<Zeroizing<Vec<u8>>> {
    let own = per_repository()
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(repo)
        .cloned();
    match own.or_else(password_file) {
        Some(p) => read_passphrase(&p),
        None => Err(RepoError::Passphrase {
            path: PathBuf::from(repo),
            detail: format!(
                "{repo} is encrypted: give its passphrase in a file with --password-file FILE or \
                 {PASSWORD_FILE_ENV}"
            ),
        }),
    }
}

/// A repository's store as its handle uses it, after [`open_encrypted`].
#[derive(Debug)]
pub struct Opened {
    /// Sealed when the repository is encrypted, else the store as it was.
    pub store: Arc<dyn Store>,
    pub hasher: ChunkHasher,
    /// The key file that opened it, when encrypted (`key list` marks it, `key remove` refuses it).
    pub key_id: Option<String>,
    pub master: Option<Arc<MasterKey>>,
}

/// What a handle opens on `store` given its `config`: for an encrypted repository the master key is
/// unlocked with this process's passphrase ([`set_password_file`]) and the store wrapped in
/// [`SealedStore`]; otherwise nothing changes.
pub fn open_encrypted(store: Arc<dyn Store>, config: &RepositoryConfig) -> Result<Opened> {
    let Some(enc) = &config.encryption else {
        return Ok(Opened {
            store,
            hasher: ChunkHasher::plain(),
            key_id: None,
            master: None,
        });
    };
    let passphrase = passphrase_for(&store.location().to_string())?;
    let (master, key_id) = unlock(&*store, &config.id, &passphrase)?;
    let scratch = SealedStore::scratch_for(&*store, &config.id);
    let sealed = SealedStore::new(store, &master, enc.segment, scratch)?;
    Ok(Opened {
        store: Arc::new(sealed),
        hasher: master.hasher(),
        key_id: Some(key_id),
        master: Some(master),
    })
}

/// The part of `init` that makes a repository encrypted: a new master key and its first key file under
/// this process's passphrase, written before `config` (a store without `config` is no repository, so an
/// interrupted init can be repeated). Sets `config.encryption`.
pub fn init_encrypted(store: &dyn Store, config: &mut RepositoryConfig) -> Result<()> {
    let passphrase = passphrase_for(&store.location().to_string())?;
    let master = MasterKey::generate();
    let id = create_first(store, &master, &config.id, &passphrase)?;
    // The handle `init` opens next needs no second Argon2id.
    unlocked().lock().unwrap_or_else(|p| p.into_inner()).insert(
        cache_key(store, &config.id, &passphrase),
        (Arc::new(master), id),
    );
    config.encryption = Some(EncryptionConfig::default());
    Ok(())
}

/// What key management needs of a handle: its store, the id of the key file it opened with, the master
/// key.
pub(crate) type KeyAccess = (Arc<dyn Store>, Option<String>, Arc<MasterKey>);

/// Key management on an open handle (`backflow key add|list|remove`).
impl crate::Repository {
    pub fn is_encrypted(&self) -> bool {
        self.config().encryption.is_some()
    }

    /// The key files, oldest first, the one this handle opened with marked `current`.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let (store, current, _) = self.key_access()?;
        list(&*store, current.as_deref())
    }

    /// Adds a key file: the master key sealed under `passphrase`.
    pub fn add_key(&self, passphrase: &[u8]) -> Result<KeyInfo> {
        let (store, _, master) = self.key_access()?;
        add(&*store, &master, &self.config().id, passphrase)
    }

    /// Removes key file `id` (see [`remove`] for what is refused).
    pub fn remove_key(&self, id: &str) -> Result<()> {
        let (store, current, _) = self.key_access()?;
        remove(&*store, id, current.as_deref())
    }
}
