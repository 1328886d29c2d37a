//! Field paths in error messages: `stages[2] (zstd).level`, `cleanup.kind`, `variables.source`.

use std::fmt::Write as _;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// Appends segments to a rendered prefix (which may be empty).
pub(crate) fn join(prefix: &str, path: &[Seg]) -> String {
    let mut out = prefix.to_owned();
    for seg in path {
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&super::yaml::short(key));
            }
            Seg::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
        }
    }
    out
}

/// Renders a path from the root of the spec, naming stages by their label where known:
/// `stages[2] (zstd).level`.
pub(crate) fn render(path: &[Seg], stage_labels: &[Option<String>]) -> String {
    if let [Seg::Key(top), Seg::Index(i), rest @ ..] = path
        && top == "stages"
    {
        return join(
            &stage_field(*i, stage_labels.get(*i).cloned().flatten().as_deref()),
            rest,
        );
    }
    join("", path)
}

/// `stages[2]`, or `stages[2] (zstd)` when the stage has a name or a known kind.
pub(crate) fn stage_field(index: usize, label: Option<&str>) -> String {
    match label {
        Some(label) => format!("stages[{index}] ({})", super::yaml::short(label)),
        None => format!("stages[{index}]"),
    }
}
