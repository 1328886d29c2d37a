//! Pipeline specs: YAML in, a validated [`Pipeline`] out, or every error at once.
//!
//! A spec names the pipeline, declares variables, and lists stages by `kind` with their options:
//!
//! ```yaml
//! name: backup-image
//! variables: { source: ~, repo: ~, disk: "" }   # `~`: required, set with --var
//! repository: ${repo}                          # a path or s3://BUCKET/PREFIX (a Location)
//! channel_capacity: 16                          # default DEFAULT_CHANNEL_CAPACITY
//! stages:
//!   - kind: image                               # one of Catalog::kinds()
//!     name: source                              # default: the kind; unique
//!     workers: 1                                # 1..=MAX_WORKERS
//!     capacity: 32                              # of the channel into this stage
//!     path: ${source}                           # every other key is an option of the kind
//! cleanup: { kind: cleanup }                    # one of Catalog::finaliser_kinds()
//! ```
//!
//! Loading goes: parse into a tree that remembers where each key and value is (`spec/yaml.rs`),
//! substitute variables (`spec/vars.rs`), check the pipeline-wide keys, then each stage on its
//! own (its options deserialized by serde from the tree, `spec/de.rs`), then whether neighbouring
//! stages' message types fit. One bad stage does not hide errors in another, and every error says
//! `FILE:LINE:COL: FIELD: MESSAGE` with the valid choices. Nothing here panics on any input.
//!
//! Variables: `${name}` in any scalar value; `$${` is a literal `${`. A plain scalar that is
//! exactly `${name}` takes the value re-read as a plain YAML scalar (`workers: ${w}` with `w=4` is
//! the integer 4, `~` is null, an empty value is the empty string); any other use, or a quoted
//! `"${name}"`, is a string. YAML anchors, aliases and custom tags are rejected.

mod build;
mod de;
mod path;
mod suggest;
mod vars;
mod yaml;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::runtime::Pipeline;
use crate::stage::{Finaliser, Stage};

use self::de::{DeErrorKind, NodeDe};
use self::path::Seg;
use self::yaml::{Loc, Node, Value};

/// Most workers a stage may have: each is a thread, and more than the cores rarely helps.
pub const MAX_WORKERS: usize = 64;

/// Largest channel capacity a spec may ask for, in items. Channels allocate their capacity up
/// front; at 128 KiB chunks this bound is 8 GiB in flight on one edge, far past any useful buffer.
pub const MAX_CHANNEL_CAPACITY: usize = 65_536;

/// The closed set of stage kinds, given by the crate that knows them (`backflow-stages`).
pub trait Catalog {
    /// Stage kinds, in the order they are listed in messages.
    fn kinds(&self) -> Vec<&'static str>;
    fn finaliser_kinds(&self) -> Vec<&'static str>;
    /// Builds a stage's runtime value from its options (the stage mapping minus `kind`, `name`,
    /// `workers` and `capacity`). Only called with a kind from [`Catalog::kinds`].
    fn build_stage(
        &self,
        kind: &str,
        options: &Options<'_>,
    ) -> Result<Arc<dyn Stage>, Vec<SpecError>>;
    /// Builds the finaliser from the `cleanup:` mapping minus `kind`.
    fn build_finaliser(
        &self,
        kind: &str,
        options: &Options<'_>,
    ) -> Result<Arc<dyn Finaliser>, Vec<SpecError>>;
}

/// The options of one stage (or of the finaliser), with what errors about them need to say where.
pub struct Options<'a> {
    file: &'a str,
    /// `stages[2] (zstd)` or `cleanup`.
    field: String,
    /// Where the stage starts: errors about the stage as a whole, or a missing option.
    loc: Loc,
    /// Always a mapping.
    node: Node,
    has_repository: bool,
    /// The keys the loader takes before the options, listed as valid alongside them.
    generic_keys: &'static [&'static str],
    /// Where the values of those keys are, for errors about them (`kind` needs a repository).
    generic_locs: Vec<(String, Loc)>,
}

impl Options<'_> {
    /// Deserializes the options into a (`deny_unknown_fields`) serde type. Errors carry the
    /// position of the value concerned (of the key, for an unknown option) and the field path.
    /// After an error on one option, that option is set aside and the rest tried again, so that
    /// one call reports every unknown or mistyped option.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, Vec<SpecError>> {
        let mut node = self.node.clone();
        let mut errors = Vec::new();
        let mut set_aside: Vec<String> = Vec::new();
        loop {
            let error = match T::deserialize(NodeDe { node: &node }) {
                Ok(value) if errors.is_empty() => return Ok(value),
                Ok(_) => return Err(errors),
                Err(error) => error,
            };
            if let DeErrorKind::MissingField(field) = &error.kind
                && error.path.is_empty()
                && set_aside.iter().any(|k| k == field)
            {
                return Err(errors);
            }
            let key = match error.path.first() {
                Some(Seg::Key(key)) => Some(key.clone()),
                _ => None,
            };
            errors.push(self.render(error));
            let Value::Map(entries) = &mut node.value else {
                return Err(errors);
            };
            let Some(position) = key.and_then(|k| entries.iter().position(|e| e.key_text() == k))
            else {
                return Err(errors);
            };
            set_aside.push(entries.remove(position).key_text().to_owned());
        }
    }

    fn render(&self, error: de::DeError) -> SpecError {
        let top = error.path.len() <= 1;
        let message = match &error.kind {
            DeErrorKind::Message(message) => message.clone(),
            DeErrorKind::UnknownField { field, expected } if top => {
                let mut valid: Vec<&str> = expected.to_vec();
                valid.extend(self.generic_keys.iter().filter(|k| !expected.contains(k)));
                suggest::unknown("option", field, "options", &valid)
            }
            DeErrorKind::UnknownField { field, expected } => {
                suggest::unknown("field", field, "fields", expected)
            }
            DeErrorKind::MissingField(field) if error.path.is_empty() => {
                format!("missing required option `{field}`")
            }
            DeErrorKind::MissingField(field) => format!("missing required field `{field}`"),
        };
        let loc = error.loc.unwrap_or(self.loc);
        SpecError::new(
            self.file,
            loc,
            path::join(&self.field, &error.path),
            message,
        )
    }

    /// An error about one option (or about `kind`, `name`, `workers`, `capacity`), at its value
    /// if it is set, else at the stage.
    pub fn error(&self, option: &str, message: impl Into<String>) -> SpecError {
        let in_options = match &self.node.value {
            Value::Map(entries) => entries
                .iter()
                .find(|e| e.key_text() == option)
                .map(|e| e.value.loc),
            _ => None,
        };
        let loc = in_options
            .or_else(|| {
                self.generic_locs
                    .iter()
                    .find(|(key, _)| key == option)
                    .map(|(_, loc)| *loc)
            })
            .unwrap_or(self.loc);
        SpecError::new(
            self.file,
            loc,
            path::join(&self.field, &[Seg::Key(option.to_owned())]),
            message,
        )
    }

    /// Whether the spec sets `repository:` (stages that read or write one need it).
    pub fn has_repository(&self) -> bool {
        self.has_repository
    }

    /// The field errors about these options start with: `stages[2] (zstd)`, `cleanup`.
    pub fn field(&self) -> &str {
        &self.field
    }
}

impl Options<'static> {
    /// Options parsed from a YAML mapping on their own, without variables: for testing a stage's
    /// options type. Errors name the file `<options>` and the field `options`.
    pub fn from_yaml(text: &str, has_repository: bool) -> Result<Self, SpecErrors> {
        const FILE: &str = "<options>";
        let parsed = yaml::parse(text).map_err(|p| {
            SpecErrors::new(vec![SpecError::new(FILE, p.loc, String::new(), p.message)])
        })?;
        let mut errors: Vec<SpecError> = parsed
            .problems
            .into_iter()
            .map(|p| SpecError::new(FILE, p.loc, path::join("options", &p.path), p.message))
            .collect();
        let node = match parsed.root {
            None => Node {
                loc: Loc::START,
                value: Value::Map(Vec::new()),
            },
            Some(
                node @ Node {
                    value: Value::Map(_),
                    ..
                },
            ) => node,
            Some(other) => {
                errors.push(SpecError::new(
                    FILE,
                    other.loc,
                    "options".into(),
                    format!(
                        "expected a mapping of options, found {}",
                        yaml::describe(&other)
                    ),
                ));
                other
            }
        };
        if !errors.is_empty() {
            return Err(SpecErrors::new(errors));
        }
        Ok(Options {
            file: FILE,
            field: "options".into(),
            loc: node.loc,
            node,
            has_repository,
            generic_keys: &[],
            generic_locs: Vec::new(),
        })
    }
}

/// One problem in a spec. `line` and `column` are 1-based; columns count characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Where in the spec: `stages[2] (zstd).level`, `variables.source`; empty for a syntax error.
    pub field: String,
    pub message: String,
}

impl SpecError {
    fn new(file: &str, loc: Loc, field: String, message: impl Into<String>) -> Self {
        SpecError {
            file: file.to_owned(),
            line: loc.line,
            column: loc.column,
            field,
            message: message.into(),
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for SpecError {}

/// Every problem found in a spec, sorted by position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<SpecError>);

impl SpecErrors {
    /// Sorts by file and position (keeping the order of errors at the same place) and drops
    /// exact repeats.
    pub fn new(mut errors: Vec<SpecError>) -> Self {
        errors.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        errors.dedup();
        SpecErrors(errors)
    }
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sorted: Vec<&SpecError> = self.0.iter().collect();
        sorted.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        for (i, error) in sorted.into_iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// A stage option set from outside the spec (a job file), over what the spec says: `stage` is the
/// stage's name (its kind when it has no name), `value` YAML text (`3`, `"text"`, `[a, b]`).
/// Overrides are applied after variables are substituted and validated like the spec's own
/// options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Override {
    pub stage: String,
    pub option: String,
    pub value: String,
}

/// Loads a spec file. A file that cannot be read, is not a regular file, is larger than
/// [`MAX_SPEC_SIZE`](crate::input::MAX_SPEC_SIZE) or is not UTF-8 is one error at 1:1; a FIFO or a
/// device is refused before it is opened, so that none can block or read without end.
pub fn load_file(
    path: &Path,
    vars: &[(String, String)],
    catalog: &dyn Catalog,
) -> Result<Pipeline, SpecErrors> {
    load_file_with(path, vars, &[], catalog)
}

/// [`load_file`] with stage options overridden.
pub fn load_file_with(
    path: &Path,
    vars: &[(String, String)],
    overrides: &[Override],
    catalog: &dyn Catalog,
) -> Result<Pipeline, SpecErrors> {
    let file = path.display().to_string();
    let fail = |message: String| {
        SpecErrors(vec![SpecError::new(
            &file,
            Loc::START,
            String::new(),
            message,
        )])
    };
    let text = crate::input::read_text_file(path, crate::input::MAX_SPEC_SIZE).map_err(|e| {
        fail(match e {
            crate::input::InputError::Io(e) => format!("cannot read the spec: {e}"),
            other => format!("the spec {other}"),
        })
    })?;
    load_str_with(&file, &text, vars, overrides, catalog)
}

/// Loads a spec from text; `file_name` is what errors call the file.
pub fn load_str(
    file_name: &str,
    text: &str,
    vars: &[(String, String)],
    catalog: &dyn Catalog,
) -> Result<Pipeline, SpecErrors> {
    build::load(file_name, text, vars, &[], catalog)
}

/// [`load_str`] with stage options overridden.
pub fn load_str_with(
    file_name: &str,
    text: &str,
    vars: &[(String, String)],
    overrides: &[Override],
    catalog: &dyn Catalog,
) -> Result<Pipeline, SpecErrors> {
    build::load(file_name, text, vars, overrides, catalog)
}
