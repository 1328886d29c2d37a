//! Encrypted repositories in command-line tests: passphrase files, the commands that use them, and
//! source images that carry known plaintext for the tests to look for in the repository.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory of passphrase files (`NAME.pass`) and scratch, and the commands run with them.
/// `first` is written at creation.
pub struct Passphrases {
    dir: tempfile::TempDir,
}

impl Passphrases {
    pub fn new() -> Passphrases {
        let env = Passphrases {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir(env.scratch()).unwrap();
        env.passphrase("first", "correct horse battery staple\n");
        env
    }

    /// `name` in the directory (images, restores, repositories of the test).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The local scratch of every command, inside the test's directory (so a search of the
    /// directory for plaintext covers it too).
    pub fn scratch(&self) -> PathBuf {
        self.path("scratch")
    }

    /// Writes the passphrase file `name` and returns its path.
    pub fn passphrase(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(&format!("{name}.pass"));
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `backflow` with the passphrase file `NAME.pass` in `BACKFLOW_PASSWORD_FILE` (None: no
    /// passphrase at all), cheap key derivation and scratch in the test's directory.
    pub fn bf(&self, pass: Option<&str>) -> Command {
        let mut cmd = super::backflow();
        cmd.env(backflow_repository::keys::WEAK_KDF_ENV, "1")
            .env("BACKFLOW_SCRATCH_DIR", self.scratch());
        match pass {
            Some(name) => cmd.env(
                backflow_repository::keys::PASSWORD_FILE_ENV,
                self.path(&format!("{name}.pass")),
            ),
            None => cmd.env_remove(backflow_repository::keys::PASSWORD_FILE_ENV),
        };
        cmd
    }
}

/// Writes `size` bytes of random data (stored as is by zstd, so that a plain repository shows
/// what is written into it) from `seed`, with each `(text, first, step)` of `marks` at `first`,
/// `first + step`, ... up to the end.
pub fn marked_image(path: &Path, size: usize, seed: u64, marks: &[(&[u8], usize, usize)]) {
    let mut state = seed;
    let mut data: Vec<u8> = (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    for (text, first, step) in marks {
        for at in (*first..size - text.len()).step_by(*step) {
            data[at..at + text.len()].copy_from_slice(text);
        }
    }
    std::fs::write(path, data).unwrap();
}
