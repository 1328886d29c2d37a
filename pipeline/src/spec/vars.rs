//! Variables: `${name}` in any scalar value, set by `--var name=VALUE` over the spec's defaults.
//!
//! A plain scalar that is exactly one reference takes the value re-read as a plain YAML scalar, so
//! `workers: ${w}` with `w=4` is the integer 4 and `~` is null, but an empty value is the empty
//! string (so that `disk: ""` defaults fit `String` options); anything else (text
//! around the reference, several references, a quoted scalar) is a string. `$${` is a literal
//! `${`. Keys are never substituted.

use std::collections::{HashMap, HashSet};

use super::path::Seg;
use super::suggest::closest;
use super::yaml::{Entry, Loc, Node, Problem, Resolved, Scalar, Value, short};

pub(crate) struct Variables {
    /// Declared names in spec order, for messages.
    declared: Vec<String>,
    /// `None`: required and not set (already reported).
    values: HashMap<String, Option<String>>,
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

const NAME_RULE: &str =
    "a variable name starts with a letter or `_` and goes on with letters, digits, `_`, `-` or `.`";

impl Variables {
    /// Reads `variables:` and applies the `--var` pairs, reporting bad declarations, unknown
    /// `--var` keys and required variables left without a value.
    pub fn collect(root: &[Entry], cli: &[(String, String)], problems: &mut Vec<Problem>) -> Self {
        let mut vars = Variables {
            declared: Vec::new(),
            values: HashMap::new(),
        };
        let section = root.iter().find(|e| e.key_text() == "variables");
        let mut decl_locs = Vec::new();
        if let Some(section) = section {
            let here = |name: &str| vec![Seg::Key("variables".into()), Seg::Key(name.into())];
            match &section.value.value {
                Value::Map(entries) => {
                    for entry in entries {
                        let name = entry.key_text();
                        if !is_name(name) {
                            problems.push(Problem {
                                loc: entry.key.loc,
                                path: here(name),
                                message: format!("invalid variable name `{}`: {NAME_RULE}", short(name)),
                            });
                            continue;
                        }
                        let default = match &entry.value.value {
                            Value::Scalar(s) if s.resolve() == Resolved::Null => None,
                            Value::Scalar(s) => Some(s.text.clone()),
                            _ => {
                                problems.push(Problem {
                                    loc: entry.value.loc,
                                    path: here(name),
                                    message: format!(
                                        "expected a default value (a scalar), or `~` for a required variable, found {}",
                                        super::yaml::describe(&entry.value)
                                    ),
                                });
                                // Treated as set, so that uses are not reported again.
                                Some(String::new())
                            }
                        };
                        vars.declared.push(name.to_owned());
                        vars.values.insert(name.to_owned(), default);
                        decl_locs.push((name.to_owned(), entry.key.loc));
                    }
                }
                Value::Scalar(s) if s.resolve() == Resolved::Null => {}
                _ => problems.push(Problem {
                    loc: section.value.loc,
                    path: vec![Seg::Key("variables".into())],
                    message: format!(
                        "expected a mapping of variable names to default values (`~` for required), found {}",
                        super::yaml::describe(&section.value)
                    ),
                }),
            }
        }
        let cli_loc = section.map_or(Loc::START, |s| s.key.loc);
        for (key, value) in cli {
            match vars.values.get_mut(key) {
                Some(slot) => *slot = Some(value.clone()),
                None => problems.push(Problem {
                    loc: cli_loc,
                    path: vec![Seg::Key(format!("--var {}", short(key)))],
                    message: format!(
                        "`--var {}=...` sets a variable the spec does not declare{}",
                        short(key),
                        vars.listing(key)
                    ),
                }),
            }
        }
        for (name, loc) in decl_locs {
            if vars.values.get(&name) == Some(&None) {
                problems.push(Problem {
                    loc,
                    path: vec![Seg::Key("variables".into()), Seg::Key(name.clone())],
                    message: format!(
                        "variable `{name}` is required: set it with --var {name}=VALUE"
                    ),
                });
            }
        }
        vars
    }

    /// `" (did you mean `x`?); declared variables: a, b"`.
    fn listing(&self, word: &str) -> String {
        if self.declared.is_empty() {
            return "; the spec declares no variables (declare them under `variables:`)".to_owned();
        }
        let names: Vec<&str> = self.declared.iter().map(String::as_str).collect();
        let hint = closest(word, &names)
            .map(|c| format!(" (did you mean `{c}`?)"))
            .unwrap_or_default();
        format!("{hint}; declared variables: {}", names.join(", "))
    }

    /// Substitutes references in every scalar value under `node`. A scalar with a bad reference is
    /// left as it was and its position marked poisoned.
    pub fn substitute(
        &self,
        node: &mut Node,
        path: &mut Vec<Seg>,
        problems: &mut Vec<Problem>,
        poisoned: &mut HashSet<Loc>,
    ) {
        match &mut node.value {
            Value::Scalar(scalar) => {
                if !scalar.text.contains('$') {
                    return;
                }
                match self.expand(scalar) {
                    Ok(Some(new)) => *scalar = new,
                    Ok(None) => {}
                    Err(messages) => {
                        poisoned.insert(node.loc);
                        for message in messages {
                            problems.push(Problem {
                                loc: node.loc,
                                path: path.clone(),
                                message,
                            });
                        }
                    }
                }
            }
            Value::Seq(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    path.push(Seg::Index(i));
                    self.substitute(item, path, problems, poisoned);
                    path.pop();
                }
            }
            Value::Map(entries) => {
                for entry in entries {
                    path.push(Seg::Key(entry.key_text().to_owned()));
                    self.substitute(&mut entry.value, path, problems, poisoned);
                    path.pop();
                }
            }
        }
    }

    /// The scalar after substitution; `Ok(None)` when nothing changes. `Err` holds the messages
    /// (an empty list when only a required variable without value is used: reported elsewhere).
    fn expand(&self, scalar: &Scalar) -> Result<Option<Scalar>, Vec<String>> {
        let text = scalar.text.as_str();
        let mut out = String::with_capacity(text.len());
        let mut errors = Vec::new();
        let mut missing = false;
        let mut changed = false;
        let mut refs = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let tail = &rest[at..];
            if let Some(after) = tail.strip_prefix("$${") {
                out.push_str("${");
                changed = true;
                rest = after;
            } else if let Some(after) = tail.strip_prefix("${") {
                changed = true;
                let Some(end) = after.find('}') else {
                    errors.push(format!(
                        "unterminated `${{` in {:?}: close it with `}}`, or write `$${{` for a literal `${{`",
                        short(text)
                    ));
                    rest = "";
                    break;
                };
                let name = &after[..end];
                rest = &after[end + 1..];
                refs.push(name);
                if !is_name(name) {
                    errors.push(format!(
                        "invalid variable reference `${{{}}}`: {NAME_RULE}",
                        short(name)
                    ));
                    continue;
                }
                match self.values.get(name) {
                    Some(Some(value)) => out.push_str(value),
                    Some(None) => missing = true,
                    None => errors.push(format!(
                        "variable `{}` is not declared{}",
                        short(name),
                        self.listing(name)
                    )),
                }
            } else {
                out.push('$');
                rest = &tail[1..];
            }
        }
        out.push_str(rest);
        if !errors.is_empty() || missing {
            return Err(errors);
        }
        if !changed {
            return Ok(None);
        }
        let exact = refs.len() == 1 && text.len() == refs[0].len() + 3 && text.starts_with("${");
        let empty = out.is_empty();
        Ok(Some(Scalar {
            text: out,
            // An empty value stays an empty string: `disk: ${disk}` with `disk: ""` is "".
            typed: exact && scalar.typed && !empty,
        }))
    }
}
