//! A JSON object read and written in file order (PEFT's `rank_pattern` / `alpha_pattern` are Python dicts whose
//! first matching key wins, so their order is part of their meaning).

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// String-keyed entries in insertion order, (de)serialized as a JSON object. Read like Python reads it into a
/// dict: file order, and a repeated key keeps its first place with its last value.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OrderedMap<T>(pub Vec<(String, T)>);

impl<T> OrderedMap<T> {
    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries in order.
    pub fn iter(&self) -> impl Iterator<Item = &(String, T)> {
        self.0.iter()
    }
}

impl<T: Serialize> Serialize for OrderedMap<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

struct OrderedVisitor<T>(std::marker::PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for OrderedVisitor<T> {
    type Value = OrderedMap<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        // As Python's `json.loads` builds a dict: a repeated key keeps its first position and takes the last value.
        let mut out: Vec<(String, T)> = Vec::new();
        while let Some((k, v)) = access.next_entry::<String, T>()? {
            match out.iter_mut().find(|(seen, _)| *seen == k) {
                Some(entry) => entry.1 = v,
                None => out.push((k, v)),
            }
        }
        Ok(OrderedMap(out))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(OrderedMap(Vec::new()))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OrderedMap<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(OrderedVisitor(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_order_kept_and_repeated_keys_read_as_python_does() {
        // json.loads('{"q_proj": 4, "layers.0.q_proj": 2, "q_proj": 8}') == {"q_proj": 8, "layers.0.q_proj": 2}
        let m: OrderedMap<usize> = serde_json::from_str(r#"{"q_proj": 4, "layers.0.q_proj": 2, "q_proj": 8}"#).unwrap();
        assert_eq!(m.0, vec![("q_proj".to_string(), 8), ("layers.0.q_proj".to_string(), 2)]);
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"q_proj":8,"layers.0.q_proj":2}"#);
        let z: OrderedMap<usize> = serde_json::from_str(r#"{"z": 1, "a": 2}"#).unwrap();
        assert_eq!(serde_json::to_string(&z).unwrap(), r#"{"z":1,"a":2}"#);
    }
}
