//! How a stage kind describes itself: one [`KindRow`] per kind, exported by the kind's crate,
//! from which the catalog, `backflow stages` and the README's stage table are all made.
//!
//! Why rows in the stage crates rather than a table in the catalog: the kind's name, summary,
//! message types and options live next to the code they describe, so adding a kind touches its
//! own crate and one line of the catalog, and the documentation cannot drift from what the
//! parser accepts (the option docs are the options struct's doc comments, via
//! `#[derive(OptionDocs)]`).

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::spec::{Options, SpecError};
use crate::{Finaliser, InvalidOption, MessageType, Stage};

pub use backflow_derive::OptionDocs;

/// The documentation of an options struct's fields, in declaration order: `(name, doc)`.
/// Derived from the doc comments with `#[derive(OptionDocs)]`; a doc containing `(required)`
/// marks an option without a default.
pub trait OptionDocs {
    const OPTION_DOCS: &'static [(&'static str, &'static str)];
}

/// Whether a kind needs the pipeline's `repository:`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepositoryUse {
    /// Works with or without one.
    No,
    /// Refused at validation without one.
    Required,
    /// Refused at validation without one unless the named boolean option is `false`: the stage
    /// checks this itself when it is built, since only it has parsed its options.
    RequiredUnless(&'static str),
}

/// What building a stage from a spec's options gives: the runtime value, or every error found.
pub type Built<T> = Result<Arc<T>, Vec<SpecError>>;

/// How a row builds its runtime value from a spec's options.
#[derive(Clone, Copy)]
pub enum Build {
    Stage(fn(&Options<'_>) -> Built<dyn Stage>),
    Finaliser(fn(&Options<'_>) -> Built<dyn Finaliser>),
}

/// One stage (or finaliser) kind, as its crate describes it.
#[derive(Clone, Copy)]
pub struct KindRow {
    /// The `kind:` of a spec.
    pub kind: &'static str,
    /// One line: what the kind does, for `backflow stages` and the README.
    pub summary: &'static str,
    /// Message type consumed (`None`: a source or a finaliser) with default options.
    pub input: Option<MessageType>,
    /// Message type produced (`None`: a sink or a finaliser) with default options.
    pub output: Option<MessageType>,
    pub repository: RepositoryUse,
    /// The options with their defaults and docs: [`option_docs`] of the options type.
    pub options: fn() -> Vec<OptionDoc>,
    pub build: Build,
}

impl std::fmt::Debug for KindRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KindRow").field("kind", &self.kind).finish()
    }
}

impl KindRow {
    pub fn is_finaliser(&self) -> bool {
        matches!(self.build, Build::Finaliser(_))
    }

    /// The documentation `backflow stages` prints.
    pub fn doc(&self) -> KindDoc {
        KindDoc {
            kind: self.kind,
            summary: self.summary,
            input: self.input,
            output: self.output,
            needs_repository: self.repository != RepositoryUse::No,
            needs_repository_unless: match self.repository {
                RepositoryUse::RequiredUnless(option) => Some(option),
                _ => None,
            },
            finaliser: self.is_finaliser(),
            options: (self.options)(),
        }
    }

    /// Refuses a kind that needs a repository in a pipeline without one.
    pub fn check_repository(&self, options: &Options<'_>) -> Result<(), Vec<SpecError>> {
        if self.repository == RepositoryUse::Required && !options.has_repository() {
            return Err(vec![options.error(
                "kind",
                format!(
                    "stage kind `{}` needs the pipeline's `repository:` to be set",
                    self.kind
                ),
            )]);
        }
        Ok(())
    }
}

/// Documentation of one kind, for `backflow stages` (`--json` serialises it).
#[derive(Clone, Debug, Serialize)]
pub struct KindDoc {
    pub kind: &'static str,
    pub summary: &'static str,
    pub input: Option<MessageType>,
    pub output: Option<MessageType>,
    pub needs_repository: bool,
    /// The boolean option that, set to false, lets the kind run without a repository.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub needs_repository_unless: Option<&'static str>,
    pub finaliser: bool,
    pub options: Vec<OptionDoc>,
}

#[derive(Clone, Debug, Serialize)]
pub struct OptionDoc {
    pub name: String,
    /// The default as YAML would write it; `required` when there is none and the doc says
    /// `(required)`, `-` (unset) when there is none otherwise.
    pub default: String,
    pub doc: &'static str,
}

/// The options of a kind with their defaults, read off the options type itself: its `Default`
/// serialised, and its doc comments.
pub fn option_docs<O: Default + Serialize + OptionDocs>() -> Vec<OptionDoc> {
    let defaults = serde_json::to_value(O::default()).unwrap_or_default();
    let map = defaults.as_object().cloned().unwrap_or_default();
    O::OPTION_DOCS
        .iter()
        .map(|&(name, doc)| {
            let default = match map.get(name) {
                None | Some(serde_json::Value::Null) if doc.contains("(required)") => {
                    "required".to_owned()
                }
                None | Some(serde_json::Value::Null) => "-".to_owned(),
                Some(serde_json::Value::String(s)) if s.is_empty() => "\"\"".to_owned(),
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            OptionDoc {
                name: name.to_owned(),
                default,
                doc,
            }
        })
        .collect()
}

/// Deserialises a stage's options and builds its runtime value; an invalid option is reported at
/// its line in the spec.
pub fn build_stage<O: DeserializeOwned, S: Stage>(
    options: &Options<'_>,
    new: impl FnOnce(O) -> Result<S, InvalidOption>,
) -> Result<Arc<dyn Stage>, Vec<SpecError>> {
    let parsed = options.deserialize::<O>()?;
    new(parsed)
        .map(|s| Arc::new(s) as Arc<dyn Stage>)
        .map_err(|e| vec![options.error(e.option, e.message)])
}

/// [`build_stage`] for finalisers.
pub fn build_finaliser<O: DeserializeOwned, F: Finaliser>(
    options: &Options<'_>,
    new: impl FnOnce(O) -> Result<F, InvalidOption>,
) -> Result<Arc<dyn Finaliser>, Vec<SpecError>> {
    let parsed = options.deserialize::<O>()?;
    new(parsed)
        .map(|f| Arc::new(f) as Arc<dyn Finaliser>)
        .map_err(|e| vec![options.error(e.option, e.message)])
}
