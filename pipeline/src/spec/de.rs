//! A serde `Deserializer` over a spanned node, so that stage options are plain serde structs and
//! their errors still say where: each error carries the path below the node it started from and
//! the position of the node (or, for an unknown field, the key) concerned.

use std::fmt;

use serde::de::{self, DeserializeSeed, Expected, Unexpected, Visitor};

use super::path::Seg;
use super::yaml::{Entry, Loc, Node, Resolved, Value};

#[derive(Debug)]
pub(crate) struct DeError {
    pub kind: DeErrorKind,
    /// From the node deserialization started at down to the node concerned.
    pub path: Vec<Seg>,
    pub loc: Option<Loc>,
}

#[derive(Debug)]
pub(crate) enum DeErrorKind {
    Message(String),
    UnknownField {
        field: String,
        expected: &'static [&'static str],
    },
    MissingField(&'static str),
}

impl DeError {
    fn message(message: String) -> Self {
        DeError {
            kind: DeErrorKind::Message(message),
            path: Vec::new(),
            loc: None,
        }
    }

    /// Sets the position if no deeper node set it already.
    fn at(mut self, loc: Loc) -> Self {
        self.loc.get_or_insert(loc);
        self
    }

    fn under(mut self, seg: Seg) -> Self {
        self.path.insert(0, seg);
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            DeErrorKind::Message(m) => f.write_str(m),
            DeErrorKind::UnknownField { field, .. } => write!(f, "unknown field `{field}`"),
            DeErrorKind::MissingField(field) => write!(f, "missing field `{field}`"),
        }
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError::message(msg.to_string())
    }

    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        DeError::message(format!(
            "expected {}, found {}",
            expected(exp),
            unexpected(unexp)
        ))
    }

    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Self::invalid_type(unexp, exp)
    }

    fn invalid_length(len: usize, exp: &dyn Expected) -> Self {
        DeError::message(format!("expected {}, found {len} elements", expected(exp)))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DeError::message(super::suggest::unknown(
            "value", variant, "values", expected,
        ))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        DeError {
            kind: DeErrorKind::UnknownField {
                field: field.to_owned(),
                expected,
            },
            path: Vec::new(),
            loc: None,
        }
    }

    fn missing_field(field: &'static str) -> Self {
        DeError {
            kind: DeErrorKind::MissingField(field),
            path: Vec::new(),
            loc: None,
        }
    }
}

/// serde's names for what a visitor expects, in the spec's terms.
fn expected(exp: &dyn Expected) -> String {
    let text = exp.to_string();
    let range = |min: i128, max: i128| format!("an integer {min}..={max}");
    match text.as_str() {
        "u8" => range(0, u8::MAX.into()),
        "u16" => range(0, u16::MAX.into()),
        "u32" => range(0, u32::MAX.into()),
        "u64" | "u128" | "usize" => "a non-negative integer".to_owned(),
        "i8" => range(i8::MIN.into(), i8::MAX.into()),
        "i16" => range(i16::MIN.into(), i16::MAX.into()),
        "i32" => range(i32::MIN.into(), i32::MAX.into()),
        "i64" | "i128" | "isize" => "an integer".to_owned(),
        "f32" | "f64" => "a number".to_owned(),
        "path string" => "a path".to_owned(),
        _ if text.starts_with("struct ") => "a mapping".to_owned(),
        _ if text.starts_with("enum ") => "one of the allowed values".to_owned(),
        _ => text,
    }
}

fn unexpected(unexp: Unexpected<'_>) -> String {
    match unexp {
        Unexpected::Bool(b) => format!("boolean {b}"),
        Unexpected::Unsigned(i) => format!("integer {i}"),
        Unexpected::Signed(i) => format!("integer {i}"),
        Unexpected::Float(f) => format!("float {f}"),
        Unexpected::Str(s) => format!("string {:?}", super::yaml::short(s)),
        Unexpected::Unit => "null".to_owned(),
        Unexpected::Map => "a mapping".to_owned(),
        Unexpected::Seq => "a sequence".to_owned(),
        other => other.to_string(),
    }
}

/// Deserializes one node.
pub(crate) struct NodeDe<'de> {
    pub node: &'de Node,
}

impl<'de> NodeDe<'de> {
    fn invalid<T>(&self, exp: &dyn Expected) -> Result<T, DeError> {
        let unexp = match &self.node.value {
            Value::Scalar(s) => match s.resolve() {
                Resolved::Null => Unexpected::Unit,
                Resolved::Bool(b) => Unexpected::Bool(b),
                Resolved::Int(i) => match i64::try_from(i) {
                    Ok(i) => Unexpected::Signed(i),
                    Err(_) => Unexpected::Other("a large integer"),
                },
                Resolved::Float(f) => Unexpected::Float(f),
                Resolved::Str(s) => Unexpected::Str(s),
            },
            Value::Seq(_) => Unexpected::Seq,
            Value::Map(_) => Unexpected::Map,
        };
        Err(de::Error::invalid_type(unexp, exp))
    }

    fn any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Scalar(s) => match s.resolve() {
                Resolved::Null => visitor.visit_unit(),
                Resolved::Bool(b) => visitor.visit_bool(b),
                Resolved::Int(i) => {
                    if let Ok(i) = i64::try_from(i) {
                        visitor.visit_i64(i)
                    } else if let Ok(u) = u64::try_from(i) {
                        visitor.visit_u64(u)
                    } else {
                        visitor.visit_i128(i)
                    }
                }
                Resolved::Float(f) => visitor.visit_f64(f),
                Resolved::Str(_) => visitor.visit_borrowed_str(&s.text),
            },
            Value::Seq(items) => visitor.visit_seq(SeqDe {
                items: items.iter().enumerate(),
            }),
            Value::Map(entries) => visitor.visit_map(MapDe {
                entries: entries.iter(),
                current: None,
            }),
        }
    }

    fn string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Scalar(s) if s.resolve() != Resolved::Null => {
                visitor.visit_borrowed_str(&s.text)
            }
            _ => self.invalid(&visitor),
        }
    }
}

macro_rules! forward_to_any {
    ($($method:ident)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
                let loc = self.node.loc;
                self.any(visitor).map_err(|e| e.at(loc))
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for NodeDe<'de> {
    type Error = DeError;

    forward_to_any! {
        deserialize_any deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_u128 deserialize_f32 deserialize_f64 deserialize_seq deserialize_map
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let loc = self.node.loc;
        match &self.node.value {
            Value::Scalar(s) => match s.resolve() {
                Resolved::Bool(b) => visitor.visit_bool(b),
                _ => self.invalid(&visitor),
            },
            _ => self.invalid(&visitor),
        }
        .map_err(|e| e.at(loc))
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let loc = self.node.loc;
        self.string(visitor).map_err(|e| e.at(loc))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let loc = self.node.loc;
        match &self.node.value {
            Value::Scalar(s) if s.resolve() != Resolved::Null => {
                visitor.visit_borrowed_bytes(s.text.as_bytes())
            }
            _ => self.invalid(&visitor),
        }
        .map_err(|e| e.at(loc))
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let loc = self.node.loc;
        match &self.node.value {
            Value::Scalar(s) if s.resolve() == Resolved::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
        .map_err(|e| e.at(loc))
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let loc = self.node.loc;
        match &self.node.value {
            Value::Scalar(s) if s.resolve() == Resolved::Null => visitor.visit_unit(),
            _ => self.invalid(&visitor),
        }
        .map_err(|e| e.at(loc))
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let loc = self.node.loc;
        visitor.visit_newtype_struct(self).map_err(|e| e.at(loc))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let loc = self.node.loc;
        match &self.node.value {
            Value::Map(_) => self.any(visitor),
            _ => self.invalid(&visitor),
        }
        .map_err(|e| e.at(loc))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let loc = self.node.loc;
        match &self.node.value {
            Value::Scalar(s) if s.resolve() != Resolved::Null => visitor.visit_enum(EnumDe {
                variant: &s.text,
                variant_loc: loc,
                content: None,
            }),
            Value::Map(entries) if entries.len() == 1 => {
                let entry = &entries[0];
                visitor
                    .visit_enum(EnumDe {
                        variant: entry.key_text(),
                        variant_loc: entry.key.loc,
                        content: Some(&entry.value),
                    })
                    .map_err(|e| e.under(Seg::Key(entry.key_text().to_owned())))
            }
            _ => self.invalid(&"a value name, or a mapping with one key (the value name)"),
        }
        .map_err(|e| e.at(loc))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

struct SeqDe<'de> {
    items: std::iter::Enumerate<std::slice::Iter<'de, Node>>,
}

impl<'de> de::SeqAccess<'de> for SeqDe<'de> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.items.next() {
            None => Ok(None),
            Some((i, node)) => seed
                .deserialize(NodeDe { node })
                .map(Some)
                .map_err(|e| e.at(node.loc).under(Seg::Index(i))),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapDe<'de> {
    entries: std::slice::Iter<'de, Entry>,
    current: Option<&'de Entry>,
}

impl<'de> de::MapAccess<'de> for MapDe<'de> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some(entry) = self.entries.next() else {
            return Ok(None);
        };
        self.current = Some(entry);
        seed.deserialize(NodeDe { node: &entry.key })
            .map(Some)
            .map_err(|e| {
                e.at(entry.key.loc)
                    .under(Seg::Key(entry.key_text().to_owned()))
            })
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let Some(entry) = self.current.take() else {
            return Err(de::Error::custom(
                "a map value was asked for before its key",
            ));
        };
        seed.deserialize(NodeDe { node: &entry.value })
            .map_err(|e| {
                e.at(entry.value.loc)
                    .under(Seg::Key(entry.key_text().to_owned()))
            })
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

struct EnumDe<'de> {
    variant: &'de str,
    variant_loc: Loc,
    content: Option<&'de Node>,
}

impl<'de> de::EnumAccess<'de> for EnumDe<'de> {
    type Error = DeError;
    type Variant = VariantDe<'de>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, VariantDe<'de>), DeError> {
        let de = de::value::BorrowedStrDeserializer::<'de, DeError>::new(self.variant);
        let value = seed.deserialize(de).map_err(|e| e.at(self.variant_loc))?;
        Ok((
            value,
            VariantDe {
                variant_loc: self.variant_loc,
                content: self.content,
            },
        ))
    }
}

struct VariantDe<'de> {
    variant_loc: Loc,
    content: Option<&'de Node>,
}

impl<'de> VariantDe<'de> {
    fn content(&self, what: &str) -> Result<&'de Node, DeError> {
        self.content.ok_or_else(|| {
            DeError::message(format!(
                "expected a mapping with this value name as its key and {what}"
            ))
            .at(self.variant_loc)
        })
    }
}

impl<'de> de::VariantAccess<'de> for VariantDe<'de> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        match self.content {
            None => Ok(()),
            Some(node) => match &node.value {
                Value::Scalar(s) if s.resolve() == Resolved::Null => Ok(()),
                _ => Err(DeError::message(format!(
                    "this value takes no options, found {}",
                    super::yaml::describe(node)
                ))
                .at(node.loc)),
            },
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        let node = self.content("its value")?;
        seed.deserialize(NodeDe { node })
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        let node = self.content("a sequence")?;
        de::Deserializer::deserialize_seq(NodeDe { node }, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let node = self.content("its fields")?;
        de::Deserializer::deserialize_struct(NodeDe { node }, "", fields, visitor)
    }
}
