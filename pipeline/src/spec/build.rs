//! From the substituted tree to a [`Pipeline`]: pipeline-wide keys, each stage on its own, then
//! whether neighbouring stages fit.

use std::collections::{HashMap, HashSet};
use std::ops::RangeInclusive;
use std::sync::Arc;

use backflow_repository::Location;

use super::path::{self, Seg, stage_field};
use super::suggest::unknown;
use super::vars::Variables;
use super::yaml::{self, Entry, Loc, Node, Resolved, Value, describe};
use super::{Catalog, MAX_CHANNEL_CAPACITY, MAX_WORKERS, Options, Override, SpecError, SpecErrors};
use crate::runtime::{DEFAULT_CHANNEL_CAPACITY, Pipeline};
use crate::stage::{Finaliser, PlacedStage, Stage, StageIo};

const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "variables",
    "repository",
    "channel_capacity",
    "stages",
    "cleanup",
];

/// Keys of a stage mapping that are not options of its kind.
const STAGE_KEYS: &[&str] = &["kind", "name", "workers", "capacity"];
const FINALISER_KEYS: &[&str] = &["kind"];

pub(crate) fn load(
    file: &str,
    text: &str,
    cli: &[(String, String)],
    overrides: &[Override],
    catalog: &dyn Catalog,
) -> Result<Pipeline, SpecErrors> {
    let one = |loc: Loc, field: &str, message: String| {
        SpecErrors::new(vec![SpecError::new(file, loc, field.to_owned(), message)])
    };
    let parsed = yaml::parse(text).map_err(|p| one(p.loc, "", p.message))?;
    let mut problems = parsed.problems;
    let mut poisoned = parsed.poisoned;
    let Some(mut root) = parsed.root else {
        let mut errors = one(
            Loc::START,
            "",
            "the spec is empty: expected a mapping with at least `name` and `stages`".into(),
        );
        errors.0.extend(
            problems
                .into_iter()
                .map(|p| SpecError::new(file, p.loc, path::join("", &p.path), p.message)),
        );
        return Err(SpecErrors::new(errors.0));
    };
    let root_loc = root.loc;
    let Value::Map(entries) = &mut root.value else {
        return Err(one(
            root.loc,
            "",
            format!(
                "expected a mapping with keys {}, found {}",
                TOP_KEYS.join(", "),
                describe(&root)
            ),
        ));
    };

    let vars = Variables::collect(entries, cli, &mut problems);
    for entry in entries.iter_mut() {
        if entry.key_text() != "variables" {
            let mut at = vec![Seg::Key(entry.key_text().to_owned())];
            vars.substitute(&mut entry.value, &mut at, &mut problems, &mut poisoned);
        }
    }
    let kinds = catalog.kinds();
    if let Err(e) = apply_overrides(entries, overrides, &kinds) {
        return Err(one(Loc::START, "stages", e));
    }
    let entries: &[Entry] = entries;

    let labels = stage_labels(entries, &kinds);
    let mut cx = Cx {
        file,
        errors: problems
            .into_iter()
            .map(|p| SpecError::new(file, p.loc, path::render(&p.path, &labels), p.message))
            .collect(),
        poisoned,
    };

    for entry in entries {
        let key = entry.key_text();
        if !TOP_KEYS.contains(&key) {
            cx.error(
                entry.key.loc,
                key.to_owned(),
                unknown("key", key, "keys", TOP_KEYS),
            );
        }
    }

    let get = |key: &str| entries.iter().find(|e| e.key_text() == key);
    let name = match get("name") {
        Some(e) => cx.string(&e.value, "name"),
        None => {
            cx.error(
                root_loc,
                "name".into(),
                "missing required key `name` (the pipeline's name)".into(),
            );
            None
        }
    };
    if let Some(e) = get("description") {
        cx.string(&e.value, "description");
    }
    let repository = get("repository").and_then(|e| {
        if is_null(&e.value) {
            return None;
        }
        let text = cx.string(&e.value, "repository")?;
        if text.is_empty() {
            cx.error(
                e.value.loc,
                "repository".into(),
                "expected a path or s3://BUCKET/PREFIX, found an empty string".into(),
            );
            return None;
        }
        // Parsed here, where the line is known: a malformed `s3://` is this spec's error, and
        // never becomes a relative path (a directory `s3:` in the working directory).
        match Location::parse(&text) {
            Ok(location) => Some(location),
            Err(bad) => {
                cx.error(e.value.loc, "repository".into(), bad.to_string());
                None
            }
        }
    });
    let has_repository = get("repository").is_some_and(|e| !is_null(&e.value));
    let channel_capacity = get("channel_capacity")
        .and_then(|e| cx.integer(&e.value, "channel_capacity", 1..=MAX_CHANNEL_CAPACITY))
        .unwrap_or(DEFAULT_CHANNEL_CAPACITY);

    let mut drafts = Vec::new();
    match get("stages") {
        None => cx.error(
            root_loc,
            "stages".into(),
            "missing required key `stages` (the list of stages, a source first and a sink last)"
                .into(),
        ),
        Some(e) => match &e.value.value {
            Value::Seq(items) if !items.is_empty() => {
                for (index, item) in items.iter().enumerate() {
                    let label = labels.get(index).cloned().flatten();
                    drafts.push(cx.stage(catalog, &kinds, index, label, item, has_repository));
                }
            }
            Value::Seq(_) => cx.error(
                e.value.loc,
                "stages".into(),
                "expected at least one stage".into(),
            ),
            _ => cx.error(
                e.value.loc,
                "stages".into(),
                format!("expected a list of stages, found {}", describe(&e.value)),
            ),
        },
    }
    cx.unique_names(&drafts);
    cx.check_fit(&drafts);

    let finaliser = get("cleanup").and_then(|e| cx.finaliser(catalog, &e.value, has_repository));

    if !cx.errors.is_empty() {
        return Err(SpecErrors::new(cx.errors));
    }
    let mut stages = Vec::with_capacity(drafts.len());
    for draft in drafts {
        let Some(stage) = draft.stage else {
            return Err(one(
                draft.kind_loc,
                &draft.field,
                "internal error: stage not built".into(),
            ));
        };
        stages.push(PlacedStage {
            name: draft.name,
            kind: draft.kind,
            workers: draft.workers,
            capacity: draft.capacity.unwrap_or(channel_capacity),
            stage,
        });
    }
    Ok(Pipeline {
        name: name.unwrap_or_default(),
        repository,
        stages,
        finaliser,
    })
}

/// Sets each override's option in the stage it names (by the stage's label: its name, else its
/// kind), replacing the option if the spec sets it. The value is placed where the stage starts, so
/// errors about it point at that stage.
fn apply_overrides(
    entries: &mut [Entry],
    overrides: &[Override],
    kinds: &[&str],
) -> Result<(), String> {
    if overrides.is_empty() {
        return Ok(());
    }
    let labels = stage_labels(entries, kinds);
    let Some(Value::Seq(stages)) = entries
        .iter_mut()
        .find(|e| e.key_text() == "stages")
        .map(|e| &mut e.value.value)
    else {
        return Err("overrides need a `stages` list".into());
    };
    for o in overrides {
        let at = labels
            .iter()
            .position(|l| l.as_deref() == Some(o.stage.as_str()))
            .ok_or_else(|| {
                let known: Vec<&str> = labels.iter().flatten().map(String::as_str).collect();
                format!(
                    "override {}.{}: the spec has no stage `{}`; its stages: {}",
                    o.stage,
                    o.option,
                    o.stage,
                    known.join(", ")
                )
            })?;
        let stage = &mut stages[at];
        let loc = stage.loc;
        let value = yaml::parse(&o.value)
            .ok()
            .and_then(|p| p.root)
            .map(|mut node| {
                relocate(&mut node, loc);
                node
            })
            .ok_or_else(|| {
                format!(
                    "override {}.{}: `{}` is not a YAML value",
                    o.stage, o.option, o.value
                )
            })?;
        let Value::Map(fields) = &mut stage.value else {
            return Err(format!(
                "override {}.{}: the stage is not a mapping",
                o.stage, o.option
            ));
        };
        match fields.iter_mut().find(|e| e.key_text() == o.option) {
            Some(entry) => entry.value = value,
            None => fields.push(Entry {
                key: Node {
                    loc,
                    value: Value::Scalar(yaml::Scalar {
                        text: o.option.clone(),
                        typed: false,
                    }),
                },
                value,
            }),
        }
    }
    Ok(())
}

/// Moves every position in `node` to `loc`.
fn relocate(node: &mut Node, loc: Loc) {
    node.loc = loc;
    match &mut node.value {
        Value::Scalar(_) => {}
        Value::Seq(items) => items.iter_mut().for_each(|n| relocate(n, loc)),
        Value::Map(entries) => entries.iter_mut().for_each(|e| {
            relocate(&mut e.key, loc);
            relocate(&mut e.value, loc);
        }),
    }
}

/// How each stage is named in error paths: its `name`, else its kind when that is a known one.
fn stage_labels(entries: &[Entry], kinds: &[&str]) -> Vec<Option<String>> {
    let Some(Value::Seq(items)) = entries
        .iter()
        .find(|e| e.key_text() == "stages")
        .map(|e| &e.value.value)
    else {
        return Vec::new();
    };
    items
        .iter()
        .map(|item| {
            let Value::Map(fields) = &item.value else {
                return None;
            };
            let text = |key: &str| {
                fields
                    .iter()
                    .find(|e| e.key_text() == key)
                    .and_then(|e| scalar_text(&e.value))
            };
            text("name")
                .filter(|n| !n.is_empty())
                .or_else(|| text("kind").filter(|k| kinds.contains(k)))
                .map(str::to_owned)
        })
        .collect()
}

fn generic_locs(entries: &[Entry], keys: &[&str]) -> Vec<(String, Loc)> {
    entries
        .iter()
        .filter(|e| keys.contains(&e.key_text()))
        .map(|e| (e.key_text().to_owned(), e.value.loc))
        .collect()
}

fn scalar_text(node: &Node) -> Option<&str> {
    match &node.value {
        Value::Scalar(s) if s.resolve() != Resolved::Null => Some(&s.text),
        _ => None,
    }
}

fn is_null(node: &Node) -> bool {
    matches!(&node.value, Value::Scalar(s) if s.resolve() == Resolved::Null)
}

/// A stage as validated so far; `stage` is `None` when it could not be built.
struct Draft {
    field: String,
    name: String,
    /// Whether `name` was given (else it is the kind).
    named: bool,
    name_loc: Loc,
    kind: String,
    kind_loc: Loc,
    workers: usize,
    capacity: Option<usize>,
    stage: Option<Arc<dyn Stage>>,
    io: Option<StageIo>,
}

struct Cx<'a> {
    file: &'a str,
    errors: Vec<SpecError>,
    /// Positions where a variable could not be substituted: other errors there only repeat it.
    poisoned: HashSet<Loc>,
}

impl Cx<'_> {
    fn error(&mut self, loc: Loc, field: String, message: String) {
        self.push(SpecError::new(self.file, loc, field, message));
    }

    fn push(&mut self, error: SpecError) {
        let loc = Loc {
            line: error.line,
            column: error.column,
        };
        if !self.poisoned.contains(&loc) {
            self.errors.push(error);
        }
    }

    fn string(&mut self, node: &Node, field: &str) -> Option<String> {
        match scalar_text(node) {
            Some(text) => Some(text.to_owned()),
            None => {
                self.error(
                    node.loc,
                    field.to_owned(),
                    format!("expected a string, found {}", describe(node)),
                );
                None
            }
        }
    }

    fn integer(&mut self, node: &Node, field: &str, range: RangeInclusive<usize>) -> Option<usize> {
        if let Value::Scalar(s) = &node.value
            && let Resolved::Int(i) = s.resolve()
            && let Ok(i) = usize::try_from(i)
            && range.contains(&i)
        {
            return Some(i);
        }
        self.error(
            node.loc,
            field.to_owned(),
            format!(
                "expected an integer {}..={}, found {}",
                range.start(),
                range.end(),
                describe(node)
            ),
        );
        None
    }

    fn stage(
        &mut self,
        catalog: &dyn Catalog,
        kinds: &[&'static str],
        index: usize,
        label: Option<String>,
        item: &Node,
        has_repository: bool,
    ) -> Draft {
        let field = stage_field(index, label.as_deref());
        let sub = |key: &str| format!("{field}.{key}");
        let mut draft = Draft {
            field: field.clone(),
            name: String::new(),
            named: false,
            name_loc: item.loc,
            kind: String::new(),
            kind_loc: item.loc,
            workers: 1,
            capacity: None,
            stage: None,
            io: None,
        };
        let Value::Map(entries) = &item.value else {
            self.error(
                item.loc,
                field,
                format!(
                    "expected a stage (a mapping with `kind` and its options), found {}",
                    describe(item)
                ),
            );
            return draft;
        };
        let get = |key: &str| entries.iter().find(|e| e.key_text() == key);

        let mut kind_ok = false;
        match get("kind") {
            None => self.error(
                item.loc,
                field.clone(),
                format!(
                    "missing required key `kind`; valid kinds: {}",
                    kinds.join(", ")
                ),
            ),
            Some(e) => {
                draft.kind_loc = e.value.loc;
                if let Some(kind) = self.string(&e.value, &sub("kind")) {
                    if kinds.contains(&kind.as_str()) {
                        kind_ok = true;
                    } else {
                        self.error(
                            e.value.loc,
                            sub("kind"),
                            unknown("stage kind", &kind, "kinds", kinds),
                        );
                    }
                    draft.kind = kind;
                }
            }
        }
        draft.name = draft.kind.clone();
        draft.name_loc = draft.kind_loc;
        if let Some(e) = get("name")
            && let Some(name) = self.string(&e.value, &sub("name"))
        {
            if name.is_empty() {
                self.error(e.value.loc, sub("name"), "expected a non-empty name".into());
            }
            draft.name = name;
            draft.named = true;
            draft.name_loc = e.value.loc;
        }
        if let Some(e) = get("workers") {
            draft.workers = self
                .integer(&e.value, &sub("workers"), 1..=MAX_WORKERS)
                .unwrap_or(1);
        }
        if let Some(e) = get("capacity") {
            draft.capacity = self.integer(&e.value, &sub("capacity"), 1..=MAX_CHANNEL_CAPACITY);
        }

        if kind_ok {
            let options = Options {
                file: self.file,
                field,
                loc: item.loc,
                node: Node {
                    loc: item.loc,
                    value: Value::Map(
                        entries
                            .iter()
                            .filter(|e| !STAGE_KEYS.contains(&e.key_text()))
                            .cloned()
                            .collect(),
                    ),
                },
                has_repository,
                generic_keys: STAGE_KEYS,
                generic_locs: generic_locs(entries, STAGE_KEYS),
            };
            match catalog.build_stage(&draft.kind, &options) {
                Ok(stage) => {
                    draft.io = Some(stage.io());
                    draft.stage = Some(stage);
                }
                Err(errors) => {
                    if errors.is_empty() {
                        self.error(
                            draft.kind_loc,
                            options.field,
                            "the stage could not be built".into(),
                        );
                    }
                    for error in errors {
                        self.push(error);
                    }
                }
            }
        }
        draft
    }

    fn unique_names(&mut self, drafts: &[Draft]) {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (index, draft) in drafts.iter().enumerate() {
            if draft.name.is_empty() {
                continue;
            }
            if let Some(first) = seen.get(draft.name.as_str()) {
                let how = if draft.named {
                    "give this stage another `name:`"
                } else {
                    "give one of them a `name:`"
                };
                self.error(
                    draft.name_loc,
                    format!("{}.name", draft.field),
                    format!(
                        "stage name `{}` is already used by stages[{first}]: names must be unique; {how}",
                        yaml::short(&draft.name)
                    ),
                );
            } else {
                seen.insert(&draft.name, index);
            }
        }
    }

    /// Sources first, sinks last, and each stage consuming what the previous one produces.
    fn check_fit(&mut self, drafts: &[Draft]) {
        let last = drafts.len().saturating_sub(1);
        for (index, draft) in drafts.iter().enumerate() {
            let Some(io) = draft.io else { continue };
            let (loc, field, kind) = (draft.kind_loc, draft.field.clone(), &draft.kind);
            match io.input {
                None if index != 0 => self.error(
                    loc,
                    field.clone(),
                    format!("`{kind}` is a source (it consumes nothing): only the first stage may be a source"),
                ),
                Some(input) if index == 0 => self.error(
                    loc,
                    field.clone(),
                    format!("the first stage must be a source (consume nothing), but `{kind}` consumes {input}"),
                ),
                Some(input) => {
                    let prev = &drafts[index - 1];
                    if let Some(StageIo {
                        output: Some(produced),
                        ..
                    }) = prev.io
                        && !input.accepts(produced)
                    {
                        self.error(
                            loc,
                            field.clone(),
                            format!(
                                "consumes {input} but the previous stage `{}` ({}) produces {produced}",
                                yaml::short(&prev.name),
                                prev.kind
                            ),
                        );
                    }
                }
                None => {}
            }
            match io.output {
                None if index != last => self.error(
                    loc,
                    field,
                    format!("`{kind}` is a sink (it produces nothing): only the last stage may be a sink"),
                ),
                Some(output) if index == last => self.error(
                    loc,
                    field,
                    format!("the last stage must be a sink (produce nothing), but `{kind}` produces {output}"),
                ),
                _ => {}
            }
        }
    }

    fn finaliser(
        &mut self,
        catalog: &dyn Catalog,
        node: &Node,
        has_repository: bool,
    ) -> Option<Arc<dyn Finaliser>> {
        let kinds = catalog.finaliser_kinds();
        let entries = match &node.value {
            Value::Map(entries) => entries,
            Value::Scalar(s) if s.resolve() == Resolved::Null => return None,
            _ => {
                self.error(
                    node.loc,
                    "cleanup".into(),
                    format!(
                        "expected a mapping with `kind` (one of: {}) and its options, found {}",
                        kinds.join(", "),
                        describe(node)
                    ),
                );
                return None;
            }
        };
        let Some(kind_entry) = entries.iter().find(|e| e.key_text() == "kind") else {
            self.error(
                node.loc,
                "cleanup".into(),
                format!(
                    "missing required key `kind`; valid kinds: {}",
                    kinds.join(", ")
                ),
            );
            return None;
        };
        let kind = self.string(&kind_entry.value, "cleanup.kind")?;
        if !kinds.contains(&kind.as_str()) {
            self.error(
                kind_entry.value.loc,
                "cleanup.kind".into(),
                unknown("finaliser kind", &kind, "kinds", &kinds),
            );
            return None;
        }
        let options = Options {
            file: self.file,
            field: "cleanup".into(),
            loc: node.loc,
            node: Node {
                loc: node.loc,
                value: Value::Map(
                    entries
                        .iter()
                        .filter(|e| !FINALISER_KEYS.contains(&e.key_text()))
                        .cloned()
                        .collect(),
                ),
            },
            has_repository,
            generic_keys: FINALISER_KEYS,
            generic_locs: generic_locs(entries, FINALISER_KEYS),
        };
        match catalog.build_finaliser(&kind, &options) {
            Ok(finaliser) => Some(finaliser),
            Err(errors) => {
                if errors.is_empty() {
                    self.error(
                        kind_entry.value.loc,
                        "cleanup".into(),
                        "the finaliser could not be built".into(),
                    );
                }
                for error in errors {
                    self.push(error);
                }
                None
            }
        }
    }
}
