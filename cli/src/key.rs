//! `key list|add|remove`: the passphrases of an encrypted repository. Each passphrase is a key file
//! sealing the one master key, so adding or removing one re-encrypts nothing. The repository is
//! opened with the global `--password-file`; `add` reads the new passphrase from its own file.

use std::path::PathBuf;

use anyhow::Result;
use backflow_repository::{RepoError, Repository};

use crate::{BadInput, open_repo, repo_location};

#[derive(clap::Subcommand)]
pub enum KeyCommand {
    /// The key files: id, when and on which host each was made, and which one opened the
    /// repository now (`*`).
    List {
        #[arg(long, env = crate::REPO_ENV, value_name = "LOCATION", help = crate::REPO_HELP)]
        repo: std::ffi::OsString,
        #[arg(long)]
        json: bool,
    },
    /// Add a passphrase: a new key file, opened by the passphrase in --new-password-file.
    Add {
        #[arg(long, env = crate::REPO_ENV, value_name = "LOCATION", help = crate::REPO_HELP)]
        repo: std::ffi::OsString,
        /// A file holding the new passphrase.
        #[arg(long, value_name = "FILE")]
        new_password_file: PathBuf,
    },
    /// Remove a key file by id. Refused for the last one, and for the one whose passphrase
    /// opened the repository now (open it with another passphrase to remove that one).
    Remove {
        #[arg(long, env = crate::REPO_ENV, value_name = "LOCATION", help = crate::REPO_HELP)]
        repo: std::ffi::OsString,
        /// The key's id, as `key list` shows it.
        id: String,
    },
}

pub fn run(command: KeyCommand) -> Result<()> {
    match command {
        KeyCommand::List { repo, json } => {
            let keys = encrypted(&open_repo(&repo_location(&repo)?)?)?.list_keys()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
                return Ok(());
            }
            for k in keys {
                let mark = if k.current { "*" } else { " " };
                match &k.damaged {
                    None => println!("{mark} {}  {}  {}", k.id, k.created, k.host),
                    Some(why) => println!("{mark} {}  damaged: {why}", k.id),
                }
            }
            Ok(())
        }
        KeyCommand::Add {
            repo,
            new_password_file,
        } => {
            let repository = open_repo(&repo_location(&repo)?)?;
            let passphrase = backflow_repository::keys::read_passphrase(&new_password_file)
                .map_err(bad_input)?;
            let key = encrypted(&repository)?.add_key(&passphrase)?;
            println!("added key {} to {}", key.id, repository.location());
            Ok(())
        }
        KeyCommand::Remove { repo, id } => {
            let repository = open_repo(&repo_location(&repo)?)?;
            encrypted(&repository)?.remove_key(&id).map_err(bad_input)?;
            println!("removed key {id} from {}", repository.location());
            Ok(())
        }
    }
}

/// The repository, when it is encrypted (keys of a plain one are a mistake of the command line).
fn encrypted(repository: &Repository) -> Result<&Repository> {
    if !repository.is_encrypted() {
        return Err(BadInput::new(format!(
            "{} is not encrypted: it has no keys (`backflow init --encryption` makes an encrypted \
             repository)",
            repository.location()
        ))
        .into());
    }
    Ok(repository)
}

/// What the operator asked for cannot be done as asked (a missing or empty passphrase file, the
/// last key, an unknown id): exit code 2.
fn bad_input(e: RepoError) -> anyhow::Error {
    match e {
        RepoError::InvalidArgument(m) => BadInput::new(m).into(),
        RepoError::Passphrase { .. } => BadInput::new(e.to_string()).into(),
        other => other.into(),
    }
}
