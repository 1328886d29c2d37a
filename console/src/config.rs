//! Where the console listens and who may use it: the address, TLS, and the tokens file.
//!
//! The rules (checked at start, before anything listens):
//! - a loopback address (`127.0.0.0/8`, `::1`) may go without TLS and without tokens: then every
//!   request is the local operator (`local`), and the address is all the protection there is;
//! - any other address needs TLS (`--tls-cert`, `--tls-key`) and a tokens file: without a valid
//!   token every endpoint but `/api/health` answers 401;
//! - with a tokens file, tokens are required on loopback too.
//!
//! The tokens file (YAML; errors name the file, line and field):
//! ```yaml
//! tokens:
//!   - name: alice                       # who: recorded with every action she asks for
//!     role: operator                    # operator (run, enable, verify, forget, restore) or read-only
//!     file: /etc/backflow/tokens/alice  # the secret: its first line, at least 32 characters
//!   - name: grafana
//!     role: read-only
//!     file: /etc/backflow/tokens/grafana
//! ```
//! Secrets live in files of their own (mode 0600 advised), never in the tokens file or on a
//! command line; only their BLAKE3 hashes are kept in memory, and a request's token is compared
//! by hash, so the comparison's time says nothing about the secret.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ConsoleError;

/// The default address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8420";
/// The shortest secret accepted.
pub const MIN_SECRET_LEN: usize = 32;
/// The largest tokens or secret file read.
const MAX_FILE: u64 = 1 << 20;

/// How the console is served.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    pub listen: SocketAddr,
    /// PEM certificate chain and private key; both or neither.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub tokens: Option<PathBuf>,
    /// Where restores asked through the API write (each into a directory of its own, named in
    /// the request).
    pub restore_dir: PathBuf,
}

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Reads everything the API shows.
    ReadOnly,
    /// Also runs jobs, enables and disables them, verifies, forgets and restores.
    Operator,
}

/// A token as kept in memory: its name, role and the hash of its secret.
#[derive(Clone, Debug)]
pub struct Token {
    pub name: String,
    pub role: Role,
    pub hash: blake3::Hash,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    role: Role,
    file: PathBuf,
}

impl HttpOptions {
    /// Checks the rules above and reads the tokens.
    pub fn check(&self) -> Result<Vec<Token>, ConsoleError> {
        let loopback = self.listen.ip().is_loopback();
        if !loopback && self.tls.is_none() {
            return Err(ConsoleError::Config(format!(
                "--http {}: an address other than loopback needs TLS (--tls-cert and --tls-key)",
                self.listen
            )));
        }
        if !loopback && self.tokens.is_none() {
            return Err(ConsoleError::Config(format!(
                "--http {}: an address other than loopback needs a tokens file (--tokens)",
                self.listen
            )));
        }
        match &self.tokens {
            Some(path) => load_tokens(path),
            None => Ok(Vec::new()),
        }
    }
}

/// Reads a tokens file and every secret it names.
pub fn load_tokens(path: &Path) -> Result<Vec<Token>, ConsoleError> {
    let shown = path.display().to_string();
    let text = read_small(path)?;
    let file: TokensFile =
        serde_saphyr::from_str(&text).map_err(|e| ConsoleError::Config(format!("{shown}: {e}")))?;
    if file.tokens.is_empty() {
        return Err(ConsoleError::Config(format!(
            "{shown}: `tokens` lists no token: expected at least one {{name, role, file}}"
        )));
    }
    let mut tokens: Vec<Token> = Vec::new();
    for (i, entry) in file.tokens.into_iter().enumerate() {
        let at = format!("{shown}: tokens[{i}]");
        if entry.name.is_empty()
            || !entry
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
        {
            return Err(ConsoleError::Config(format!(
                "{at}.name: `{}` is not a name: expected letters, digits, `.`, `_`, `-` or `@`",
                entry.name
            )));
        }
        if tokens.iter().any(|t| t.name == entry.name) {
            return Err(ConsoleError::Config(format!(
                "{at}.name: a second token named {}",
                entry.name
            )));
        }
        let secret_path = if entry.file.is_relative() {
            path.parent().unwrap_or(Path::new(".")).join(&entry.file)
        } else {
            entry.file.clone()
        };
        let secret = read_small(&secret_path)
            .map_err(|e| ConsoleError::Config(format!("{at}.file: {e}")))?;
        let secret = secret.lines().next().unwrap_or("").trim();
        if secret.len() < MIN_SECRET_LEN {
            return Err(ConsoleError::Config(format!(
                "{at}.file: {}: the secret is {} characters: expected at least {MIN_SECRET_LEN} \
                 (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
                secret_path.display(),
                secret.len()
            )));
        }
        let hash = blake3::hash(secret.as_bytes());
        if tokens.iter().any(|t| t.hash == hash) {
            return Err(ConsoleError::Config(format!(
                "{at}.file: the same secret as another token: each token needs its own"
            )));
        }
        tokens.push(Token {
            name: entry.name,
            role: entry.role,
            hash,
        });
    }
    Ok(tokens)
}

fn read_small(path: &Path) -> Result<String, ConsoleError> {
    let shown = path.display();
    let meta = std::fs::metadata(path)
        .map_err(|e| ConsoleError::Config(format!("{shown}: cannot read it: {e}")))?;
    if !meta.is_file() || meta.len() > MAX_FILE {
        return Err(ConsoleError::Config(format!(
            "{shown}: expected a regular file of at most {MAX_FILE} bytes"
        )));
    }
    std::fs::read_to_string(path)
        .map_err(|e| ConsoleError::Config(format!("{shown}: cannot read it: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(listen: &str, tls: bool, tokens: Option<PathBuf>) -> HttpOptions {
        HttpOptions {
            listen: listen.parse().unwrap(),
            tls: tls.then(|| (PathBuf::from("c.pem"), PathBuf::from("k.pem"))),
            tokens,
            restore_dir: PathBuf::from("/tmp"),
        }
    }

    #[test]
    fn other_addresses_need_tls_and_tokens() {
        assert!(options("127.0.0.1:1", false, None).check().is_ok());
        assert!(options("[::1]:1", false, None).check().is_ok());
        let e = options("0.0.0.0:1", false, None).check().unwrap_err();
        assert!(e.to_string().contains("needs TLS"), "{e}");
        let e = options("10.0.0.1:1", true, None).check().unwrap_err();
        assert!(e.to_string().contains("needs a tokens file"), "{e}");
    }

    #[test]
    fn tokens_are_read_and_bad_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "s".repeat(40);
        std::fs::write(dir.path().join("alice"), format!("{secret}\n")).unwrap();
        std::fs::write(dir.path().join("short"), "abc\n").unwrap();
        let file = dir.path().join("tokens.yaml");
        std::fs::write(
            &file,
            "tokens:\n  - {name: alice, role: operator, file: alice}\n",
        )
        .unwrap();
        let tokens = load_tokens(&file).unwrap();
        assert_eq!(tokens[0].role, Role::Operator);
        assert_eq!(tokens[0].hash, blake3::hash(secret.as_bytes()));

        std::fs::write(
            &file,
            "tokens:\n  - {name: bob, role: admin, file: alice}\n",
        )
        .unwrap();
        let e = load_tokens(&file).unwrap_err().to_string();
        assert!(e.contains("tokens.yaml") && e.contains("line 2"), "{e}");
        assert!(e.contains("read-only") || e.contains("operator"), "{e}");

        std::fs::write(
            &file,
            "tokens:\n  - {name: bob, role: read-only, file: short}\n",
        )
        .unwrap();
        let e = load_tokens(&file).unwrap_err().to_string();
        assert!(
            e.contains("tokens[0].file") && e.contains("at least 32"),
            "{e}"
        );
    }
}
