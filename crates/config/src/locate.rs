//! Key path → source position, for messages about values that parsed but are invalid.
//!
//! The document is read a second time into an untyped tree of `Spanned` nodes. Doing this
//! separately keeps spans out of the typed model entirely, and config files are small enough
//! that parsing twice costs nothing noticeable.

use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Location, Spanned};

/// 1-based line and column.
pub(crate) type Pos = (u64, u64);

#[derive(Debug, Default)]
pub(crate) struct Locations {
    positions: HashMap<String, Pos>,
}

impl Locations {
    /// Locations are best effort: a document that the typed pass accepted but this pass
    /// cannot read just yields messages without positions.
    pub(crate) fn from_text(text: &str) -> Self {
        let mut locations = Locations::default();
        if let Ok(root) = serde_saphyr::from_str::<Spanned<Node>>(text) {
            locations.record(String::new(), &root, None);
        }
        locations
    }

    /// A scalar is located at its value, which is what is wrong with it; a list or mapping
    /// at its key, since its value may start lines later.
    fn record(&mut self, path: String, node: &Spanned<Node>, key: Option<Pos>) {
        match &node.value {
            Node::Map(entries) => {
                for (k, value) in entries {
                    let child = if path.is_empty() {
                        k.value.0.clone()
                    } else {
                        format!("{path}.{}", k.value.0)
                    };
                    self.record(child, value, pos(k.referenced));
                }
            }
            Node::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.record(format!("{path}[{i}]"), item, None);
                }
            }
            Node::Leaf => {}
        }
        let at = match node.value {
            Node::Leaf => pos(node.referenced),
            _ => key.or_else(|| pos(node.referenced)),
        };
        if let Some(at) = at {
            self.positions.insert(path, at);
        }
    }

    /// Position of the value at `path`, or of its nearest ancestor that is in the file
    /// (for a missing key, that is the mapping that should have contained it).
    pub(crate) fn find(&self, path: &str) -> Option<Pos> {
        let mut path = path;
        loop {
            if let Some(pos) = self.positions.get(path) {
                return Some(*pos);
            }
            if path.is_empty() {
                return None;
            }
            path = parent(path);
        }
    }
}

fn parent(path: &str) -> &str {
    match path.rfind(['.', '[']) {
        Some(i) => &path[..i],
        None => "",
    }
}

pub(crate) fn pos(location: Location) -> Option<Pos> {
    (location != Location::UNKNOWN && location.line() > 0)
        .then(|| (location.line(), location.column()))
}

enum Node {
    Map(Vec<(Spanned<Key>, Spanned<Node>)>),
    Seq(Vec<Spanned<Node>>),
    Leaf,
}

/// Map keys are read as text whatever their YAML type, since paths are text.
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scalar mapping key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Key, E> {
                Ok(Key("null".to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML node")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_i128<E: de::Error>(self, _: i128) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_u128<E: de::Error>(self, _: u128) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_none<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Node::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key()? {
                    entries.push((key, map.next_value()?));
                }
                Ok(Node::Map(entries))
            }
        }
        d.deserialize_any(V)
    }
}
