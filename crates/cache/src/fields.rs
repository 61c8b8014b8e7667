//! Response header fields as stored: a compact list with every value in one shared buffer.
//!
//! A `HeaderMap` costs about 1.5 KB for a typical origin response (hash index, buckets sized
//! for growth, one allocation per value); kept per object, that was most of the memory an
//! object cost beyond its body. Stored fields are read by linear scan (a response has a dozen
//! fields or so) and copied into a right-sized `HeaderMap` only when a response is served,
//! sharing the value buffer rather than copying it.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

#[derive(Debug, Clone, Default)]
pub struct StoredHeaders {
    fields: Box<[(HeaderName, HeaderValue)]>,
}

impl StoredHeaders {
    /// Copies the fields `keep` accepts. Names and values are copied, not shared: as parsed,
    /// they are slices of the connection's read buffer, and keeping one would keep that whole
    /// buffer alive per object.
    pub fn from_map(map: &HeaderMap, mut keep: impl FnMut(&HeaderName) -> bool) -> StoredHeaders {
        let kept: Vec<(&HeaderName, &HeaderValue)> = map.iter().filter(|(n, _)| keep(n)).collect();
        let mut buffer = BytesMut::with_capacity(kept.iter().map(|(_, v)| v.len()).sum());
        for (_, value) in &kept {
            buffer.extend_from_slice(value.as_bytes());
        }
        let buffer: Bytes = buffer.freeze();
        let mut offset = 0;
        let mut fields = Vec::with_capacity(kept.len());
        for (name, value) in kept {
            let end = offset + value.len();
            let slice = buffer.slice(offset..end);
            offset = end;
            // Re-validating bytes that came from a valid value cannot fail.
            let (Ok(name), Ok(mut copy)) = (
                HeaderName::from_bytes(name.as_str().as_bytes()),
                HeaderValue::from_maybe_shared(slice),
            ) else {
                continue;
            };
            copy.set_sensitive(value.is_sensitive());
            fields.push((name, copy));
        }
        StoredHeaders {
            fields: fields.into(),
        }
    }

    pub fn get<K: ?Sized>(&self, name: &K) -> Option<&HeaderValue>
    where
        HeaderName: PartialEq<K>,
    {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    pub fn get_all<'a, K: ?Sized>(&'a self, name: &'a K) -> impl Iterator<Item = &'a HeaderValue>
    where
        HeaderName: PartialEq<K>,
    {
        self.fields
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v)
    }

    pub fn contains_key<K: ?Sized>(&self, name: &K) -> bool
    where
        HeaderName: PartialEq<K>,
    {
        self.get(name).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.fields.iter().map(|(n, v)| (n, v))
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// A `HeaderMap` of these fields with room for `extra` more without growing (the fields a
    /// response gains on its way out: Age, Via, Content-Length, Cache-Status, X-Request-Id…).
    pub fn to_header_map(&self, extra: usize) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.fields.len() + extra);
        for (name, value) in self.fields.iter() {
            map.append(name.clone(), value.clone());
        }
        map
    }

    /// Name and value bytes, for the object's weight.
    pub fn byte_len(&self) -> usize {
        self.fields
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum()
    }
}

/// Read access to header fields, stored or not, for rules that apply to both.
pub trait Fields {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a HeaderValue> + 'a;

    fn first<'a>(&'a self, name: &'a HeaderName) -> Option<&'a HeaderValue> {
        self.values(name).next()
    }

    fn has(&self, name: &HeaderName) -> bool {
        self.values(name).next().is_some()
    }
}

impl Fields for HeaderMap {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a HeaderValue> + 'a {
        self.get_all(name).iter()
    }
}

impl Fields for StoredHeaders {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a HeaderValue> + 'a {
        self.get_all(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_kept_fields_in_order_with_one_value_buffer() {
        let mut map = HeaderMap::new();
        map.append("content-type", HeaderValue::from_static("text/plain"));
        map.append("x-a", HeaderValue::from_static("1"));
        map.append("x-a", HeaderValue::from_static("2"));
        map.append("age", HeaderValue::from_static("5"));
        let mut secret = HeaderValue::from_static("s");
        secret.set_sensitive(true);
        map.append("x-secret", secret);
        let stored = StoredHeaders::from_map(&map, |n| n != "age");
        assert_eq!(stored.len(), 4);
        assert!(!stored.contains_key("age"));
        assert_eq!(stored.get("X-A").unwrap(), "1");
        assert_eq!(stored.get_all("x-a").collect::<Vec<_>>(), ["1", "2"]);
        assert!(stored.get("x-secret").unwrap().is_sensitive());
        let served = stored.to_header_map(4);
        assert_eq!(served.len(), 4);
        assert!(served.capacity() >= 8);
        assert_eq!(served.get_all("x-a").iter().collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(
            stored.byte_len(),
            "content-type".len() + 10 + 3 + 1 + 3 + 1 + 8 + 1
        );
    }
}
