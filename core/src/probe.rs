//! Which parameters of a handler's `Params<T>` a caller must pass: Python's split between
//! `args` (no default) and `kwargs` (a default), for target details.
//!
//! Works like [`parameter_names`](crate::params::parameter_names): it runs `T`'s
//! `Deserialize` impl against a deserializer of its own. That deserializer offers the struct
//! the fields found required so far, each with a placeholder value (zero, empty string, empty
//! sequence, `None`, the first enum variant, ...), and records the field serde reports missing;
//! it repeats until serde is satisfied. Fields serde never asks for are optional (`Option`,
//! `#[serde(default)]`).
//!
//! What it does not do: it gives up (`None`) when a field's own `Deserialize` rejects its
//! placeholder (a validated newtype, a non-empty check), when nesting is deeper than 32, or
//! when `T` is not a struct with named fields.

use std::fmt;

use serde::Deserialize;
use serde::de::value::StrDeserializer;
use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// The names of `T`'s required fields, in declaration order of discovery (serde reports the
/// first missing field in declaration order, so this is declaration order). `None` when the
/// probe gives up (see the module docs).
pub(crate) fn required_fields<T: for<'de> Deserialize<'de>>(
    all: &[&'static str],
) -> Option<Vec<&'static str>> {
    let mut required: Vec<&'static str> = Vec::new();
    for _ in 0..=all.len() {
        match T::deserialize(Top { given: &required }) {
            Ok(_) => return Some(required),
            Err(Probe::Missing(name)) => {
                let known = all.iter().find(|f| **f == name)?;
                if required.contains(known) {
                    return None;
                }
                required.push(known);
            }
            Err(Probe::Other) => return None,
        }
    }
    None
}

/// Why a probe run stopped.
#[derive(Debug)]
enum Probe {
    Missing(String),
    Other,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Missing(name) => write!(f, "missing field {name}"),
            Probe::Other => f.write_str("probe stopped"),
        }
    }
}

impl std::error::Error for Probe {}

impl de::Error for Probe {
    fn custom<M: fmt::Display>(_msg: M) -> Self {
        Probe::Other
    }

    fn missing_field(field: &'static str) -> Self {
        Probe::Missing(field.to_owned())
    }
}

const MAX_DEPTH: u32 = 32;

/// The top level: the parameter struct (through `Option`, `Box` and newtype wrappers).
struct Top<'a> {
    given: &'a [&'static str],
}

impl<'de> Deserializer<'de> for Top<'_> {
    type Error = Probe;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Probe> {
        Err(Probe::Other)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Probe> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Probe> {
        visitor.visit_map(Fields { names: self.given.iter(), depth: 1 })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

/// A map of field names to placeholders.
struct Fields<I> {
    names: I,
    depth: u32,
}

impl<'de, 'n, I: Iterator<Item = &'n &'static str>> MapAccess<'de> for Fields<I> {
    type Error = Probe;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Probe> {
        match self.names.next() {
            Some(name) => seed.deserialize(StrDeserializer::<Probe>::new(name)).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Probe> {
        seed.deserialize(Placeholder(self.depth))
    }
}

/// `len` placeholders in a row.
struct Items {
    left: usize,
    depth: u32,
}

impl<'de> SeqAccess<'de> for Items {
    type Error = Probe;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Probe> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(Placeholder(self.depth)).map(Some)
    }
}

/// Deserializes any type's simplest value; the number is the nesting depth.
struct Placeholder(u32);

impl Placeholder {
    fn deeper(&self) -> Result<u32, Probe> {
        if self.0 >= MAX_DEPTH { Err(Probe::Other) } else { Ok(self.0 + 1) }
    }
}

impl<'de> Deserializer<'de> for Placeholder {
    type Error = Probe;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_unit()
    }
    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_bool(false)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_i64(0)
    }
    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_u64(0)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_f64(0.0)
    }
    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_char('a')
    }
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_str("")
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_bytes(&[])
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_none()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Probe> {
        let depth = self.deeper()?;
        visitor.visit_newtype_struct(Placeholder(depth))
    }
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_seq(Items { left: 0, depth: self.0 })
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Probe> {
        let depth = self.deeper()?;
        visitor.visit_seq(Items { left: len, depth })
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Probe> {
        self.deserialize_tuple(len, visitor)
    }
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_map(Fields { names: [].iter(), depth: self.0 })
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Probe> {
        let depth = self.deeper()?;
        visitor.visit_map(Fields { names: fields.iter(), depth })
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Probe> {
        let depth = self.deeper()?;
        visitor.visit_enum(FirstVariant(depth))
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_u64(0)
    }

    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_i64(0)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_i64(0)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_i64(0)
    }
    fn deserialize_i128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_i64(0)
    }
    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_u64(0)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_u64(0)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_u64(0)
    }
    fn deserialize_u128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_u64(0)
    }
    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_f64(0.0)
    }
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_str("")
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_bytes(&[])
    }
    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_unit()
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Probe> {
        visitor.visit_unit()
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_unit()
    }
}

/// An enum's first variant, its content placeholders.
struct FirstVariant(u32);

impl<'de> EnumAccess<'de> for FirstVariant {
    type Error = Probe;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), Probe> {
        let variant = seed.deserialize(Placeholder(self.0))?;
        Ok((variant, self))
    }
}

impl<'de> VariantAccess<'de> for FirstVariant {
    type Error = Probe;

    fn unit_variant(self) -> Result<(), Probe> {
        Ok(())
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Probe> {
        seed.deserialize(Placeholder(self.0))
    }
    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Probe> {
        visitor.visit_seq(Items { left: len, depth: self.0 })
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Probe> {
        visitor.visit_map(Fields { names: fields.iter(), depth: self.0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::parameter_names;
    use serde_json::Value;

    fn required<T: for<'de> Deserialize<'de>>() -> Option<Vec<&'static str>> {
        required_fields::<T>(parameter_names::<T>()?)
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    enum Kind {
        Plain,
        Other(u8),
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct Inner {
        x: String,
        y: Option<i64>,
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct Mixed {
        a: i64,
        b: Option<String>,
        #[serde(default)]
        c: Vec<u8>,
        #[serde(rename = "dee")]
        d: (u8, char),
        e: Inner,
        f: Kind,
        g: Value,
        h: std::collections::HashMap<String, f32>,
        i: Box<Inner>,
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct Wrapper(Mixed);

    #[test]
    fn finds_required_fields_in_declaration_order() {
        let expected = vec!["a", "dee", "e", "f", "g", "h", "i"];
        assert_eq!(required::<Mixed>(), Some(expected.clone()));
        assert_eq!(required::<Wrapper>(), Some(expected.clone()));
        assert_eq!(required::<Option<Box<Mixed>>>(), Some(expected));
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct Validated {
        #[serde(deserialize_with = "non_empty")]
        name: String,
    }

    fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() { Err(de::Error::custom("empty")) } else { Ok(s) }
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct Recursive {
        next: Box<Recursive>,
    }

    #[test]
    fn gives_up_rather_than_guessing() {
        assert_eq!(required::<Validated>(), None);
        assert_eq!(required::<Recursive>(), None);
        assert_eq!(required_fields::<i64>(&[]), None);
    }
}
