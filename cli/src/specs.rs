//! The specs of `specs/`, compiled into the binary, so that `backflow run backup-vm` works from any
//! directory and an installed binary needs no copy of the source tree; and `backflow specs`, which
//! lists them with their variables.
//!
//! A spec argument is a path when it names an existing file (not a directory), contains `/` or
//! ends in `.yaml` or `.yml`; otherwise it is the name of a built-in spec. So a file in the current directory always
//! wins over a built-in spec of the same name, and `./backup-vm` forces the file.
//!
//! The variables' defaults and comments shown by `backflow specs` are read from the spec's text
//! (`  name: default   # comment` under `variables:`), the form every file of `specs/` uses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use crate::BadInput;

/// One spec of `specs/`, as compiled into the binary.
pub struct BuiltinSpec {
    /// What `backflow run NAME` takes: the file name without `.yaml`.
    pub name: &'static str,
    /// What errors call it (`specs/NAME.yaml`, its path in the source tree).
    pub file: &'static str,
    pub text: &'static str,
}

macro_rules! builtin {
    ($name:literal) => {
        BuiltinSpec {
            name: $name,
            file: concat!("specs/", $name, ".yaml"),
            text: include_str!(concat!("../../specs/", $name, ".yaml")),
        }
    };
}

/// The specs that `backflow` runs itself (`restore`, `demo`).
pub const BACKUP_VM: BuiltinSpec = builtin!("backup-vm");
pub const RESTORE: BuiltinSpec = builtin!("restore");
pub const RESTORE_VM: BuiltinSpec = builtin!("restore-vm");

/// Every file of `specs/`, by name. A test compares this list with the directory.
pub const BUILTIN: &[BuiltinSpec] = &[
    builtin!("backup-image"),
    builtin!("backup-qcow2"),
    BACKUP_VM,
    RESTORE,
    RESTORE_VM,
    builtin!("tune-compress"),
    builtin!("tune-dedup"),
    builtin!("verify-restore-point"),
];

/// The built-in spec of that name.
pub fn builtin(name: &str) -> Option<&'static BuiltinSpec> {
    BUILTIN.iter().find(|s| s.name == name)
}

/// Where a spec comes from.
pub enum SpecSource {
    File(PathBuf),
    Builtin(&'static BuiltinSpec),
}

impl SpecSource {
    /// What messages call it.
    pub fn display(&self) -> String {
        match self {
            SpecSource::File(p) => p.display().to_string(),
            SpecSource::Builtin(s) => s.name.to_owned(),
        }
    }
}

/// Reads a `run`/`validate` argument: a path, or a built-in spec's name (see the module docs).
pub fn resolve(arg: &str) -> Result<SpecSource> {
    let path = Path::new(arg);
    let looks_like_path = arg.contains('/') || arg.ends_with(".yaml") || arg.ends_with(".yml");
    // A directory of that name (`restore/`, where images are restored to) is no spec file.
    if looks_like_path || (path.exists() && !path.is_dir()) {
        return Ok(SpecSource::File(path.to_owned()));
    }
    match builtin(arg) {
        Some(spec) => Ok(SpecSource::Builtin(spec)),
        None => {
            let names: Vec<&str> = BUILTIN.iter().map(|s| s.name).collect();
            Err(BadInput::new(format!(
                "no spec `{arg}`: no such file, and not a built-in spec ({}); `backflow specs` \
                 lists them",
                names.join(", ")
            ))
            .into())
        }
    }
}

/// The names a spec declares under `variables:`, or `None` when the text does not parse (the
/// loader then reports why).
pub fn declared_variables(text: &str) -> Option<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Declared {
        #[serde(default)]
        variables: Option<BTreeMap<String, serde::de::IgnoredAny>>,
    }
    let declared: Declared = serde_saphyr::from_str(text).ok()?;
    Some(declared.variables.unwrap_or_default().into_keys().collect())
}

/// The `--var` pairs, with `repo` taken from `BACKFLOW_REPOSITORY` when the spec declares `repo`
/// and no `--var repo=` was given: the same default as every command's `--repo`. A malformed
/// `s3:` location in the variable is said naming the variable (a `--var` one is the spec's error,
/// at its `repository:` line).
pub fn with_repo_default(
    text: Option<&str>,
    mut vars: Vec<(String, String)>,
) -> Result<Vec<(String, String)>> {
    const REPO_VAR: &str = "repo";
    if vars.iter().any(|(k, _)| k == REPO_VAR) {
        return Ok(vars);
    }
    let Some(repo) = std::env::var_os(crate::REPO_ENV).filter(|v| !v.is_empty()) else {
        return Ok(vars);
    };
    let declares = text
        .and_then(declared_variables)
        .is_some_and(|names| names.iter().any(|n| n == REPO_VAR));
    if declares {
        let location = crate::repo_location(&repo)?;
        vars.push((REPO_VAR.to_owned(), location.to_string()));
    }
    Ok(vars)
}

/// A declared variable, as `backflow specs` shows it.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct VariableDoc {
    pub name: String,
    /// `None`: required (`~`).
    pub default: Option<String>,
    /// The comment after the declaration.
    pub doc: String,
}

/// A built-in spec, as `backflow specs` shows it.
#[derive(Serialize)]
pub struct SpecDoc {
    pub name: &'static str,
    pub description: String,
    pub variables: Vec<VariableDoc>,
}

/// The top-level `description:` of a spec.
fn description(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("description:"))
        .map(|d| unquote(d.trim()).to_owned())
        .unwrap_or_default()
}

fn unquote(value: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = value.strip_prefix(q).and_then(|v| v.strip_suffix(q)) {
            return inner;
        }
    }
    value
}

/// The entries of the block `variables:` mapping, each `name: default  # comment` on its line.
pub fn variables(text: &str) -> Vec<VariableDoc> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if !inside {
            inside = line.trim_end() == "variables:";
            continue;
        }
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        if !line.starts_with([' ', '\t']) {
            break;
        }
        let (decl, comment) = match line.find(" #") {
            Some(i) => (&line[..i], line[i + 2..].trim()),
            None => (line, ""),
        };
        let Some((name, value)) = decl.split_once(':') else {
            continue;
        };
        let value = value.trim();
        out.push(VariableDoc {
            name: name.trim().to_owned(),
            default: (!matches!(value, "~" | "null" | "")).then(|| unquote(value).to_owned()),
            doc: comment.to_owned(),
        });
    }
    out
}

pub fn docs() -> Vec<SpecDoc> {
    BUILTIN
        .iter()
        .map(|s| SpecDoc {
            name: s.name,
            description: description(s.text),
            variables: variables(s.text),
        })
        .collect()
}

#[derive(clap::Args)]
pub struct Args {
    /// Print this built-in spec's YAML (to copy and change it) instead of the list.
    pub name: Option<String>,
    /// JSON: an array of specs with their description and variables.
    #[arg(long, conflicts_with = "name")]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(name) = args.name {
        let Some(spec) = builtin(&name) else {
            return Err(BadInput::new(format!(
                "no built-in spec `{name}`; `backflow specs` lists them"
            ))
            .into());
        };
        print!("{}", spec.text);
        return Ok(());
    }
    let docs = docs();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&docs)?);
        return Ok(());
    }
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!("{}  {}", d.name, d.description);
        let width = d.variables.iter().map(|v| v.name.len()).max().unwrap_or(0);
        for v in &d.variables {
            let default = v.default.as_deref().map_or("required".to_owned(), |d| {
                if d.is_empty() {
                    "\"\"".to_owned()
                } else {
                    d.to_owned()
                }
            });
            println!("    {:<width$}  {:<16}  {}", v.name, default, v.doc);
        }
    }
    println!(
        "\n(`backflow run NAME --var KEY=VALUE` runs one; `backflow specs NAME` prints its YAML; a \
         path instead of NAME runs a spec file)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_reader_finds_every_declared_variable_of_every_builtin_spec() {
        for spec in BUILTIN {
            let listed: Vec<String> = variables(spec.text).into_iter().map(|v| v.name).collect();
            let mut declared = declared_variables(spec.text).expect(spec.name);
            let mut sorted = listed.clone();
            sorted.sort();
            declared.sort();
            assert_eq!(sorted, declared, "{}", spec.name);
            assert!(!description(spec.text).is_empty(), "{}", spec.name);
        }
    }

    #[test]
    fn defaults_and_comments_are_read() {
        let text = "name: x\nvariables:\n  a: ~   # the a (required)\n  b: \"\"  # empty\n  c: 7\nstages: []\n";
        assert_eq!(
            variables(text),
            vec![
                VariableDoc {
                    name: "a".into(),
                    default: None,
                    doc: "the a (required)".into()
                },
                VariableDoc {
                    name: "b".into(),
                    default: Some(String::new()),
                    doc: "empty".into()
                },
                VariableDoc {
                    name: "c".into(),
                    default: Some("7".into()),
                    doc: String::new()
                },
            ]
        );
    }
}
