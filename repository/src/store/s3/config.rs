//! The S3 backend's settings: the standard AWS variables and files (so that a host already set up for the
//! `aws` command line needs nothing more), plus Backflow's own bounds. Read once, at open, through a lookup
//! function, so that tests (and callers with their own configuration) need not touch the process
//! environment.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{RepoError, Result};

/// Region used when neither the environment nor the profile names one (the AWS tools' default too).
pub const DEFAULT_REGION: &str = "us-east-1";
/// Requests in flight per store handle: enough to keep a multipart upload and a restore's readers busy,
/// few enough that a small self-hosted store is not flooded.
pub const DEFAULT_MAX_REQUESTS: usize = 16;
/// How long one request is retried (503/SlowDown, 429, other 5xx, timeouts, refused connections) before
/// the error reaches the caller: long enough to ride out a store's restart, short enough that a backup
/// window is not spent waiting.
pub const DEFAULT_RETRY_SECONDS: u64 = 120;
/// A lease not renewed for this long counts as gone (`BACKFLOW_LEASE_SECONDS`).
pub const DEFAULT_LEASE_SECONDS: u64 = 60;
/// The largest difference between this host's clock and the store's that leases tolerate
/// (`BACKFLOW_MAX_CLOCK_SKEW_SECONDS`); must stay well under the lease bound.
pub const DEFAULT_MAX_CLOCK_SKEW_SECONDS: u64 = 30;
/// Scratch root when `BACKFLOW_SCRATCH_DIR` is unset: on disk, not tmpfs, because packs being filled and
/// index files fetched whole can be large.
pub const DEFAULT_SCRATCH_DIR: &str = "/var/tmp/backflow";

/// Everything [`super::S3Store`] needs besides the bucket and prefix.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Settings {
    /// `scheme://host[:port]`, without the bucket (also for virtual-hosted style; the store adds it).
    pub endpoint: String,
    /// Whether the endpoint came from AWS itself (no endpoint configured).
    pub is_aws: bool,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    /// Bucket in the host name rather than in the path.
    pub virtual_hosted: bool,
    /// Plain `http://` endpoint (allowed for loopback or with `AWS_ALLOW_HTTP=true`).
    pub allow_http: bool,
    /// Request bodies are not hashed into the signature (`UNSIGNED-PAYLOAD`) where the transport already
    /// keeps them intact: TLS, or a loopback endpoint (no network). Plain HTTP to another host signs them.
    /// Hashing costs both the client and the store a SHA-256 pass over every byte uploaded.
    pub unsigned_payload: bool,
    pub max_requests: usize,
    pub retry_time: Duration,
    pub lease_bound: Duration,
    pub max_clock_skew: Duration,
    pub scratch_dir: PathBuf,
}

impl std::fmt::Debug for S3Settings {
    // Without the secret: settings end up in logs and error reports.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("virtual_hosted", &self.virtual_hosted)
            .field("max_requests", &self.max_requests)
            .field("retry_time", &self.retry_time)
            .field("lease_bound", &self.lease_bound)
            .field("max_clock_skew", &self.max_clock_skew)
            .field("scratch_dir", &self.scratch_dir)
            .finish_non_exhaustive()
    }
}

fn bad(msg: String) -> RepoError {
    RepoError::InvalidArgument(msg)
}

impl S3Settings {
    /// From the process environment and the AWS files it points to.
    pub fn from_env() -> Result<S3Settings> {
        S3Settings::from_lookup(|name| std::env::var(name).ok())
    }

    /// From `lookup` (a variable's value, `None` when unset) and the AWS files it points to.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<S3Settings> {
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let home = var("HOME").unwrap_or_else(|| "/root".into());
        let profile_given = var("AWS_PROFILE");
        let profile = profile_given.clone().unwrap_or_else(|| "default".into());

        let config_file = var("AWS_CONFIG_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(&home).join(".aws/config"));
        let credentials_file = var("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(&home).join(".aws/credentials"));
        // In the config file the default profile is `[default]`, the others `[profile NAME]`; in the
        // credentials file every profile is `[NAME]`.
        let config_section = if profile == "default" {
            "default".to_owned()
        } else {
            format!("profile {profile}")
        };
        let config = read_ini_section(&config_file, &config_section)?;
        let creds = read_ini_section(&credentials_file, &profile)?;
        if profile_given.is_some() && config.is_none() && creds.is_none() {
            return Err(bad(format!(
                "AWS_PROFILE={profile}: no [{config_section}] in {} and no [{profile}] in {}",
                config_file.display(),
                credentials_file.display()
            )));
        }
        let from_profile = |key: &str| {
            creds
                .as_ref()
                .and_then(|c| c.get(key))
                .or_else(|| config.as_ref().and_then(|c| c.get(key)))
                .filter(|v| !v.is_empty())
                .cloned()
        };

        let region = var("AWS_REGION")
            .or_else(|| var("AWS_DEFAULT_REGION"))
            .or_else(|| from_profile("region"))
            .unwrap_or_else(|| DEFAULT_REGION.into());

        let (access_key_id, secret_access_key, session_token) = match (
            var("AWS_ACCESS_KEY_ID"),
            var("AWS_SECRET_ACCESS_KEY"),
        ) {
            (Some(id), Some(secret)) => (id, secret, var("AWS_SESSION_TOKEN")),
            (Some(_), None) | (None, Some(_)) => {
                return Err(bad(
                        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together (one of them is \
                         empty or unset)"
                            .into(),
                    ));
            }
            (None, None) => match (
                from_profile("aws_access_key_id"),
                from_profile("aws_secret_access_key"),
            ) {
                (Some(id), Some(secret)) => (id, secret, from_profile("aws_session_token")),
                _ => {
                    return Err(bad(format!(
                        "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or \
                             aws_access_key_id and aws_secret_access_key in profile {profile:?} of {} \
                             (AWS_PROFILE, AWS_SHARED_CREDENTIALS_FILE)",
                        credentials_file.display()
                    )));
                }
            },
        };

        let (endpoint_var, endpoint) = match var("AWS_ENDPOINT_URL_S3") {
            Some(e) => ("AWS_ENDPOINT_URL_S3".to_owned(), Some(e)),
            None => match var("AWS_ENDPOINT_URL") {
                Some(e) => ("AWS_ENDPOINT_URL".to_owned(), Some(e)),
                None => (
                    format!("endpoint_url in {}", config_file.display()),
                    from_profile("endpoint_url"),
                ),
            },
        };
        let flag = |name: &str| -> Result<bool> {
            match var(name) {
                None => Ok(false),
                Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" => Ok(true),
                    "false" | "0" | "no" => Ok(false),
                    _ => Err(bad(format!("{name}={v:?}: expected true or false"))),
                },
            }
        };
        let allow_http_var = flag("AWS_ALLOW_HTTP")?;
        let (endpoint, is_aws) = match endpoint {
            Some(e) => (e.trim().trim_end_matches('/').to_owned(), false),
            None => (format!("https://s3.{region}.amazonaws.com"), true),
        };
        let (scheme, host) = split_endpoint(&endpoint).ok_or_else(|| {
            bad(format!(
                "{endpoint_var}={endpoint:?}: expected an URL such as https://s3.example.net or \
                 http://127.0.0.1:3900"
            ))
        })?;
        let unsigned_payload = scheme == "https" || is_loopback(host);
        let allow_http = match scheme {
            "https" => false,
            "http" if allow_http_var || is_loopback(host) => true,
            "http" => {
                return Err(bad(format!(
                    "{endpoint_var}={endpoint:?} is plain http to a host that is not loopback: keys and data \
                     would cross the network unencrypted; use https, or set AWS_ALLOW_HTTP=true to allow it"
                )));
            }
            _ => unreachable!("split_endpoint accepts only http and https"),
        };
        // Self-hosted stores rarely have wildcard DNS for bucket names: path style unless asked.
        let virtual_hosted = match var("AWS_VIRTUAL_HOSTED_STYLE_REQUEST") {
            Some(_) => flag("AWS_VIRTUAL_HOSTED_STYLE_REQUEST")?,
            None => is_aws,
        };

        let number = |name: &str, default: u64, min: u64| -> Result<u64> {
            match var(name) {
                None => Ok(default),
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(n) if n >= min => Ok(n),
                    _ => Err(bad(format!(
                        "{name}={v:?}: expected a whole number of at least {min}"
                    ))),
                },
            }
        };
        let max_requests = number("BACKFLOW_S3_MAX_REQUESTS", DEFAULT_MAX_REQUESTS as u64, 1)?;
        let retry_time = number("BACKFLOW_S3_RETRY_SECONDS", DEFAULT_RETRY_SECONDS, 0)?;
        let lease_bound = number("BACKFLOW_LEASE_SECONDS", DEFAULT_LEASE_SECONDS, 2)?;
        let max_clock_skew = number(
            "BACKFLOW_MAX_CLOCK_SKEW_SECONDS",
            DEFAULT_MAX_CLOCK_SKEW_SECONDS,
            0,
        )?;
        let scratch_dir = var("BACKFLOW_SCRATCH_DIR").unwrap_or_else(|| DEFAULT_SCRATCH_DIR.into());

        Ok(S3Settings {
            endpoint,
            is_aws,
            region,
            access_key_id,
            secret_access_key,
            session_token,
            virtual_hosted,
            allow_http,
            unsigned_payload,
            max_requests: usize::try_from(max_requests).unwrap_or(usize::MAX),
            retry_time: Duration::from_secs(retry_time),
            lease_bound: Duration::from_secs(lease_bound),
            max_clock_skew: Duration::from_secs(max_clock_skew),
            scratch_dir: PathBuf::from(scratch_dir),
        })
    }

    /// A copy with everything taken from `vars` instead (for tests: the names as in the environment).
    pub fn from_map(vars: &HashMap<String, String>) -> Result<S3Settings> {
        S3Settings::from_lookup(|name| vars.get(name).cloned())
    }
}

/// `(scheme, host)` of `http[s]://host[:port][/…]`, the host without the port.
pub(crate) fn split_endpoint(endpoint: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = endpoint.split_once("://")?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => "http",
        "https" => "https",
        _ => return None,
    };
    let authority = rest.split('/').next()?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.split(':').next()?
    };
    (!host.is_empty()).then_some((scheme, host))
}

/// Whether traffic to `host` stays on this machine.
pub(crate) fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => false,
    }
}

/// The `key = value` pairs of `[section]` in an INI file as the AWS tools write them; `None` when the file
/// or the section is missing. Keys are lowercased; `#` and `;` start comment lines; indented lines (nested
/// settings such as `s3 =` blocks) are skipped.
pub(crate) fn read_ini_section(
    path: &Path,
    section: &str,
) -> Result<Option<HashMap<String, String>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RepoError::io("read", path, e)),
    };
    parse_ini_section(&text, section, path)
}

fn parse_ini_section(
    text: &str,
    section: &str,
    path: &Path,
) -> Result<Option<HashMap<String, String>>> {
    let mut current: Option<String> = None;
    let mut found: Option<HashMap<String, String>> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim_end();
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        if let Some(head) = trimmed.strip_prefix('[') {
            let Some(name) = head.strip_suffix(']') else {
                return Err(bad(format!(
                    "{}, line {}: a section header is written [NAME]; found {trimmed:?}",
                    path.display(),
                    n + 1
                )));
            };
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            if name == section {
                found.get_or_insert_with(HashMap::new);
            }
            current = Some(name);
            continue;
        }
        if line.starts_with(char::is_whitespace) {
            continue;
        }
        let Some((key, value)) = trimmed.split_once('=') else {
            return Err(bad(format!(
                "{}, line {}: expected `key = value`; found {trimmed:?}",
                path.display(),
                n + 1
            )));
        };
        if current.as_deref() == Some(section)
            && let Some(map) = found.as_mut()
        {
            map.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Result<S3Settings> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([("HOME".to_string(), "/nonexistent-home".to_string())])
            .collect();
        S3Settings::from_map(&map)
    }

    const KEYS: [(&str, &str); 2] = [
        ("AWS_ACCESS_KEY_ID", "id"),
        ("AWS_SECRET_ACCESS_KEY", "secret"),
    ];

    #[test]
    fn aws_defaults() {
        let s = settings(&KEYS).unwrap();
        assert_eq!(s.endpoint, "https://s3.us-east-1.amazonaws.com");
        assert!(s.is_aws && s.virtual_hosted && !s.allow_http);
        assert_eq!(s.lease_bound, Duration::from_secs(DEFAULT_LEASE_SECONDS));
    }

    #[test]
    fn endpoints_are_path_style_and_http_only_on_loopback() {
        for ep in [
            "http://127.0.0.1:3900",
            "http://localhost:9000/",
            "http://[::1]:3900",
        ] {
            let s = settings(&[KEYS[0], KEYS[1], ("AWS_ENDPOINT_URL", ep)]).unwrap();
            assert!(s.allow_http && !s.virtual_hosted && !s.is_aws, "{ep}");
            // No network between: bodies need no hash in the signature.
            assert!(s.unsigned_payload, "{ep}");
        }
        let e = settings(&[
            KEYS[0],
            KEYS[1],
            ("AWS_ENDPOINT_URL_S3", "http://10.1.2.3:3900"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("AWS_ENDPOINT_URL_S3") && e.contains("AWS_ALLOW_HTTP"),
            "{e}"
        );
        let s = settings(&[
            KEYS[0],
            KEYS[1],
            ("AWS_ENDPOINT_URL", "http://10.1.2.3:3900"),
            ("AWS_ALLOW_HTTP", "true"),
        ])
        .unwrap();
        // Plain HTTP across a network: the signature covers the bodies too.
        assert!(s.allow_http && !s.unsigned_payload);
        for ep in ["https://10.1.2.3:3900", "https://s3.example.net"] {
            let s = settings(&[KEYS[0], KEYS[1], ("AWS_ENDPOINT_URL", ep)]).unwrap();
            assert!(s.unsigned_payload, "TLS keeps bodies intact: {ep}");
        }
        let e = settings(&[KEYS[0], KEYS[1], ("AWS_ENDPOINT_URL", "ftp://x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("AWS_ENDPOINT_URL"), "{e}");
    }

    #[test]
    fn missing_credentials_name_the_variables() {
        let e = settings(&[]).unwrap_err().to_string();
        assert!(
            e.contains("AWS_ACCESS_KEY_ID") && e.contains("AWS_SECRET_ACCESS_KEY"),
            "{e}"
        );
        let e = settings(&[KEYS[0]]).unwrap_err().to_string();
        assert!(e.contains("together"), "{e}");
    }

    #[test]
    fn bad_numbers_name_the_variable() {
        let e = settings(&[KEYS[0], KEYS[1], ("BACKFLOW_LEASE_SECONDS", "soon")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("BACKFLOW_LEASE_SECONDS=\"soon\""), "{e}");
    }

    #[test]
    fn profiles_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        let config = dir.path().join("config");
        std::fs::write(
            &creds,
            "[default]\naws_access_key_id = d\naws_secret_access_key = ds\n\n[site]\n# comment\n\
             aws_access_key_id = GK1\naws_secret_access_key = s1\n",
        )
        .unwrap();
        std::fs::write(
            &config,
            "[profile site]\nregion = garage\nendpoint_url = http://127.0.0.1:3900\ns3 =\n  addressing_style = path\n",
        )
        .unwrap();
        let c = creds.to_str().unwrap();
        let f = config.to_str().unwrap();
        let s = settings(&[
            ("AWS_PROFILE", "site"),
            ("AWS_SHARED_CREDENTIALS_FILE", c),
            ("AWS_CONFIG_FILE", f),
        ])
        .unwrap();
        assert_eq!(
            (
                &s.access_key_id[..],
                &s.secret_access_key[..],
                &s.region[..]
            ),
            ("GK1", "s1", "garage")
        );
        assert_eq!(s.endpoint, "http://127.0.0.1:3900");
        let d = settings(&[("AWS_SHARED_CREDENTIALS_FILE", c), ("AWS_CONFIG_FILE", f)]).unwrap();
        assert_eq!(d.access_key_id, "d");
        let e = settings(&[
            ("AWS_PROFILE", "nope"),
            ("AWS_SHARED_CREDENTIALS_FILE", c),
            ("AWS_CONFIG_FILE", f),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("AWS_PROFILE=nope"), "{e}");
        std::fs::write(&creds, "[site]\nno equals sign\n").unwrap();
        let e = settings(&[("AWS_PROFILE", "site"), ("AWS_SHARED_CREDENTIALS_FILE", c)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("credentials"), "{e}");
    }
}
