//! A spanned YAML tree built from the parser's events.
//!
//! Only what specs need: mappings with scalar keys, sequences and scalars, each with the 1-based
//! line and column where it starts. Duplicate keys, anchors, aliases and tags other than the core
//! schema's are reported (anchors and aliases are rejected: a spec repeats a value or uses a
//! variable instead). A syntax error ends parsing: the tree after it would be guesswork.

use std::collections::{HashMap, HashSet};

use serde_saphyr::granit_parser::{Event, Marker, Parser, ScalarStyle, Tag};

use super::path::Seg;

/// A position in the spec file, both 1-based. Columns count characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Loc {
    pub line: usize,
    pub column: usize,
}

impl Loc {
    pub const START: Loc = Loc { line: 1, column: 1 };

    fn of(marker: &Marker) -> Loc {
        Loc {
            line: marker.line().max(1),
            column: marker.col() + 1,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub loc: Loc,
    pub value: Value,
}

#[derive(Clone, Debug)]
pub(crate) enum Value {
    Scalar(Scalar),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

/// One `key: value` pair; the key is always a scalar node.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub key: Node,
    pub value: Node,
}

impl Entry {
    pub fn key_text(&self) -> &str {
        match &self.key.value {
            Value::Scalar(s) => &s.text,
            _ => "",
        }
    }
}

/// A scalar's text and whether YAML's core schema gives it a type (plain, untagged or tagged with
/// a core type) or it is a string whatever it looks like (quoted, block, or `!!str`).
#[derive(Clone, Debug)]
pub(crate) struct Scalar {
    pub text: String,
    pub typed: bool,
}

/// What a scalar means under YAML 1.2's core schema.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Resolved<'a> {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a str),
}

impl Scalar {
    pub fn resolve(&self) -> Resolved<'_> {
        if !self.typed {
            return Resolved::Str(&self.text);
        }
        resolve_plain(&self.text)
    }
}

/// Core-schema resolution of a plain scalar (YAML 1.2, section 10.3.2).
pub(crate) fn resolve_plain(text: &str) -> Resolved<'_> {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Resolved::Null,
        "true" | "True" | "TRUE" => return Resolved::Bool(true),
        "false" | "False" | "FALSE" => return Resolved::Bool(false),
        ".nan" | ".NaN" | ".NAN" => return Resolved::Float(f64::NAN),
        _ => {}
    }
    let (negative, unsigned) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if matches!(unsigned, ".inf" | ".Inf" | ".INF") {
        return Resolved::Float(if negative {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        });
    }
    if unsigned.len() == text.len() {
        let radix = if let Some(hex) = text.strip_prefix("0x") {
            Some((hex, 16))
        } else {
            text.strip_prefix("0o").map(|oct| (oct, 8))
        };
        if let Some((digits, radix)) = radix {
            if !digits.is_empty() && digits.chars().all(|c| c.is_digit(radix)) {
                return match i128::from_str_radix(digits, radix) {
                    Ok(v) => Resolved::Int(v),
                    Err(_) => Resolved::Str(text),
                };
            }
            return Resolved::Str(text);
        }
    }
    if !unsigned.is_empty() && unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<i128>() {
            Ok(v) => Resolved::Int(v),
            Err(_) => text
                .parse::<f64>()
                .map_or(Resolved::Str(text), Resolved::Float),
        };
    }
    if is_core_float(unsigned)
        && let Ok(v) = text.parse::<f64>()
    {
        return Resolved::Float(v);
    }
    Resolved::Str(text)
}

/// `( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?`, sign already removed.
fn is_core_float(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |mut i: usize| {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        (i, i - start)
    };
    let (mut i, int_digits) = digits(0);
    let mut frac_digits = 0;
    if i < b.len() && b[i] == b'.' {
        (i, frac_digits) = digits(i + 1);
    }
    if int_digits == 0 && frac_digits == 0 {
        return false;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'-' || b[i] == b'+') {
            i += 1;
        }
        let (end, exp_digits) = digits(i);
        if exp_digits == 0 {
            return false;
        }
        i = end;
    }
    i == b.len()
}

/// A problem found before stage labels are known: rendered into a `SpecError` later.
#[derive(Debug)]
pub(crate) struct Problem {
    pub loc: Loc,
    pub path: Vec<Seg>,
    pub message: String,
}

pub(crate) struct Parsed {
    /// `None` for an empty document (or only comments).
    pub root: Option<Node>,
    pub problems: Vec<Problem>,
    /// Positions of placeholder nodes (aliases): later errors there would only repeat the cause.
    pub poisoned: HashSet<Loc>,
}

enum Frame {
    Seq {
        loc: Loc,
        items: Vec<Node>,
    },
    Map {
        loc: Loc,
        entries: Vec<Entry>,
        /// Where each key was first set, to report duplicates.
        seen: HashMap<String, Loc>,
        /// The key waiting for its value, and whether that value is to be dropped (duplicate or
        /// non-scalar key).
        key: Option<(Node, bool)>,
    },
}

const CORE_TAG_PREFIX: &str = "tag:yaml.org,2002:";

/// Parses one YAML document. `Err` is a syntax error, the only problem reported in that case.
pub(crate) fn parse(text: &str) -> Result<Parsed, Problem> {
    let mut builder = Builder {
        stack: Vec::new(),
        root: None,
        problems: Vec::new(),
        poisoned: HashSet::new(),
    };
    let mut documents = 0;
    for item in Parser::new_from_str(text) {
        let (event, span) = item.map_err(|e| {
            let info = e.info();
            Problem {
                loc: Loc::of(e.marker()),
                path: Vec::new(),
                message: if info.is_empty() {
                    "invalid YAML".to_owned()
                } else {
                    format!("invalid YAML: {info}")
                },
            }
        })?;
        let loc = Loc::of(&span.start);
        match event {
            Event::DocumentStart(..) => {
                documents += 1;
                if documents > 1 {
                    builder.problems.push(Problem {
                        loc,
                        path: Vec::new(),
                        message: "a spec is one YAML document; remove the second one (after `---`)"
                            .to_owned(),
                    });
                    break;
                }
            }
            Event::Alias(_) | Event::UnresolvedAlias(_) => {
                builder.problem(
                    loc,
                    "YAML aliases (`*name`) are not supported in specs; repeat the value or use a variable",
                );
                builder.poisoned.insert(loc);
                builder.push(Node {
                    loc,
                    value: Value::Scalar(Scalar {
                        text: String::new(),
                        typed: true,
                    }),
                });
            }
            Event::Scalar(value, style, anchor, tag) => {
                builder.check_anchor(loc, anchor);
                let typed = match tag.as_deref() {
                    None => style == ScalarStyle::Plain,
                    Some(tag) => builder.scalar_tag(loc, tag, style == ScalarStyle::Plain),
                };
                builder.push(Node {
                    loc,
                    value: Value::Scalar(Scalar {
                        text: value.into_owned(),
                        typed,
                    }),
                });
            }
            Event::SequenceStart(_, anchor, tag) => {
                builder.check_anchor(loc, anchor);
                builder.collection_tag(loc, tag.as_deref(), "seq");
                builder.stack.push(Frame::Seq {
                    loc,
                    items: Vec::new(),
                });
            }
            Event::MappingStart(_, anchor, tag) => {
                builder.check_anchor(loc, anchor);
                builder.collection_tag(loc, tag.as_deref(), "map");
                builder.stack.push(Frame::Map {
                    loc,
                    entries: Vec::new(),
                    seen: HashMap::new(),
                    key: None,
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match builder.stack.pop() {
                    Some(Frame::Seq { loc, items }) => Node {
                        loc,
                        value: Value::Seq(items),
                    },
                    Some(Frame::Map { loc, entries, .. }) => Node {
                        loc,
                        value: Value::Map(entries),
                    },
                    None => continue,
                };
                builder.push(node);
            }
            _ => {}
        }
    }
    Ok(Parsed {
        root: builder.root,
        problems: builder.problems,
        poisoned: builder.poisoned,
    })
}

struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    problems: Vec<Problem>,
    poisoned: HashSet<Loc>,
}

impl Builder {
    /// The path of the node about to be added.
    fn path(&self) -> Vec<Seg> {
        self.stack
            .iter()
            .filter_map(|frame| match frame {
                Frame::Seq { items, .. } => Some(Seg::Index(items.len())),
                Frame::Map { key, .. } => key.as_ref().map(|(k, _)| Seg::Key(scalar_text(k))),
            })
            .collect()
    }

    fn problem(&mut self, loc: Loc, message: impl Into<String>) {
        let path = self.path();
        self.problems.push(Problem {
            loc,
            path,
            message: message.into(),
        });
    }

    fn check_anchor(&mut self, loc: Loc, anchor: usize) {
        if anchor != 0 {
            self.problem(
                loc,
                "YAML anchors (`&name`) are not supported in specs; repeat the value or use a variable",
            );
        }
    }

    /// Whether a tagged scalar is typed; unsupported tags are reported.
    fn scalar_tag(&mut self, loc: Loc, tag: &Tag, plain: bool) -> bool {
        if tag.handle() == CORE_TAG_PREFIX {
            match tag.suffix() {
                "str" => return false,
                "null" | "bool" | "int" | "float" => return true,
                _ => {}
            }
        } else if tag.handle().is_empty() && tag.suffix() == "!" {
            // The non-specific tag `!`: a string.
            return false;
        }
        self.problem(loc, unsupported_tag(tag));
        plain
    }

    fn collection_tag(&mut self, loc: Loc, tag: Option<&Tag>, core: &str) {
        if let Some(tag) = tag
            && !(tag.handle() == CORE_TAG_PREFIX && tag.suffix() == core)
        {
            self.problem(loc, unsupported_tag(tag));
        }
    }

    fn push(&mut self, node: Node) {
        let Some(frame) = self.stack.last_mut() else {
            // A second root cannot happen within one document; keep the first.
            if self.root.is_none() {
                self.root = Some(node);
            }
            return;
        };
        match frame {
            Frame::Seq { items, .. } => items.push(node),
            Frame::Map {
                entries, seen, key, ..
            } => match key.take() {
                Some((key, drop)) => {
                    if !drop {
                        entries.push(Entry { key, value: node });
                    }
                }
                None => {
                    let problem = match &node.value {
                        Value::Scalar(s) => match seen.get(&s.text) {
                            Some(first) => Some(format!(
                                "duplicate key `{}` (first set at line {}, column {})",
                                short(&s.text),
                                first.line,
                                first.column
                            )),
                            None => {
                                seen.insert(s.text.clone(), node.loc);
                                None
                            }
                        },
                        _ => Some("mapping keys must be plain scalars".to_owned()),
                    };
                    let drop = problem.is_some();
                    let loc = node.loc;
                    *key = Some((node, drop));
                    if let Some(message) = problem {
                        self.problem(loc, message);
                    }
                }
            },
        }
    }
}

fn unsupported_tag(tag: &Tag) -> String {
    let shown = if tag.handle() == CORE_TAG_PREFIX {
        format!("!!{}", tag.suffix())
    } else {
        format!("{}{}", tag.handle(), tag.suffix())
    };
    format!(
        "unsupported YAML tag `{}`: specs use plain values (`!!str` may force a string)",
        short(&shown)
    )
}

fn scalar_text(node: &Node) -> String {
    match &node.value {
        Value::Scalar(s) => s.text.clone(),
        _ => "?".to_owned(),
    }
}

/// A user-supplied word as shown in a message: at most 60 characters, on one line.
pub(crate) fn short(text: &str) -> String {
    const MAX: usize = 60;
    let mut out: String = text
        .chars()
        .take(MAX)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > MAX {
        out.push('…');
    }
    out
}

/// How a node is described after "found": `string "many"`, `integer 5`, `a mapping`.
pub(crate) fn describe(node: &Node) -> String {
    match &node.value {
        Value::Scalar(s) => match s.resolve() {
            Resolved::Null => "null".to_owned(),
            Resolved::Bool(b) => format!("boolean {b}"),
            Resolved::Int(i) => format!("integer {i}"),
            Resolved::Float(f) => format!("float {f}"),
            Resolved::Str(text) => format!("string {:?}", short(text)),
        },
        Value::Seq(_) => "a sequence".to_owned(),
        Value::Map(_) => "a mapping".to_owned(),
    }
}
