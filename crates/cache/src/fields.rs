//! Response header fields as stored: a compact list over one shared buffer that also holds
//! the fields encoded as HTTP/1 header lines.
//!
//! A `HeaderMap` costs about 1.5 KB for a typical origin response (hash index, buckets sized
//! for growth, one allocation per value); kept per object, that was most of the memory an
//! object cost beyond its body. Stored fields are read by linear scan (a response has a dozen
//! fields or so). An HTTP/1 hit writes the encoded lines as they are (building a `HeaderMap`
//! per hit and encoding it again was a seventh of a hit's instructions); other writers get a
//! right-sized `HeaderMap` whose values share the buffer.

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue};

#[derive(Debug, Clone, Default)]
pub struct StoredHeaders {
    /// `name: value\r\n` for every field but the framing ones, then the framing fields' values.
    /// Every value in `fields` is a slice of it.
    buffer: Bytes,
    /// Where the header lines end in `buffer`.
    lines_end: usize,
    fields: Box<[(HeaderName, HeaderValue)]>,
    /// Whether there is a `Date`: a writer adds one when not, so it is asked on every hit.
    has_date: bool,
}

/// Whether `HeaderValue::from_bytes` accepts these bytes (visible ASCII, space, tab and
/// obs-text: no control byte, so no CR or LF), without copying them into one.
pub fn is_field_value(bytes: &[u8]) -> bool {
    // Without early exit, so it vectorises.
    bytes
        .iter()
        .fold(true, |ok, &b| ok & ((b >= 0x20 && b != 0x7f) || b == b'\t'))
}

/// Fields that frame the message on one connection (Content-Length, Transfer-Encoding,
/// Connection): each writer decides them per response, so they are not in the encoded lines.
fn frames_the_message(name: &HeaderName) -> bool {
    name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == CONNECTION
}

/// Where a field goes in the stored buffer.
#[derive(Clone, Copy, PartialEq)]
enum Placed {
    Not,
    /// A `name: value` line.
    Line,
    /// A framing field's bare value, after the lines.
    Value,
}

impl StoredHeaders {
    /// Copies the fields `keep` accepts. Values are copied, not shared: as parsed, they are
    /// slices of the connection's read buffer, and keeping one would keep that whole buffer
    /// alive per object. Names are shared: every `HeaderName` owns its bytes (the http crate
    /// copies a name it parses; well-known ones are static).
    /// `keep` may be asked more than once about a field; it must answer the same each time.
    pub fn from_map(map: &HeaderMap, keep: impl Fn(&HeaderName) -> bool) -> StoredHeaders {
        // A `HeaderValue` holds a valid field value (`HeaderValue::from_bytes`'s rule, which
        // `is_field_value` states): the values are checked once, when the copies are made.
        Self::build(map, &keep, false)
    }

    /// `check_values` checks each value before it is laid out, for the map that broke the
    /// rule (a value made unchecked): the lines are never written with a CR or LF in them.
    fn build(map: &HeaderMap, keep: &impl Fn(&HeaderName) -> bool, check_values: bool) -> Self {
        // What becomes of each field is decided once, in the first pass, and remembered by
        // position (past `REMEMBERED` fields, asked again). A value that fails its check when
        // its copy is made sends the whole build round again with every value checked first,
        // so the lines and `fields` always hold the same fields. No list
        // is built on the way: a fill stores every response it admits.
        const REMEMBERED: usize = 64;
        let decide = |name: &HeaderName, value: &HeaderValue| {
            if !(keep(name) && (!check_values || is_field_value(value.as_bytes()))) {
                Placed::Not
            } else if frames_the_message(name) {
                Placed::Value
            } else {
                Placed::Line
            }
        };
        let mut decided = [Placed::Not; REMEMBERED];
        let (mut lines_len, mut values_len, mut count) = (0, 0, 0);
        for (i, (name, value)) in map.iter().enumerate() {
            let placed = decide(name, value);
            if let Some(slot) = decided.get_mut(i) {
                *slot = placed;
            }
            match placed {
                Placed::Not => continue,
                Placed::Value => values_len += value.len(),
                Placed::Line => lines_len += name.as_str().len() + 2 + value.len() + 2,
            }
            count += 1;
        }
        let placed = |i: usize, name: &HeaderName, value: &HeaderValue| {
            decided
                .get(i)
                .copied()
                .unwrap_or_else(|| decide(name, value))
        };
        // Lines first, then the framing fields' bare values; the same walk places each value
        // when the buffer is written and when it is sliced.
        let mut buffer = vec![0u8; lines_len + values_len];
        let (mut lines_at, mut values_at) = (0, lines_len);
        for (i, (name, value)) in map.iter().enumerate() {
            let len = value.len();
            match placed(i, name, value) {
                Placed::Not => {}
                Placed::Value => {
                    buffer[values_at..values_at + len].copy_from_slice(value.as_bytes());
                    values_at += len;
                }
                Placed::Line => {
                    let line = &mut buffer[lines_at..lines_at + name.as_str().len() + len + 4];
                    let (name_part, rest) = line.split_at_mut(name.as_str().len());
                    name_part.copy_from_slice(name.as_str().as_bytes());
                    rest[..2].copy_from_slice(b": ");
                    rest[2..2 + len].copy_from_slice(value.as_bytes());
                    rest[2 + len..].copy_from_slice(b"\r\n");
                    lines_at += line.len();
                }
            }
        }
        let buffer = Bytes::from(buffer);
        let mut fields = Vec::with_capacity(count);
        let (mut lines_at, mut values_at) = (0, lines_len);
        for (i, (name, value)) in map.iter().enumerate() {
            let len = value.len();
            let span = match placed(i, name, value) {
                Placed::Not => continue,
                Placed::Value => {
                    values_at += len;
                    values_at - len..values_at
                }
                Placed::Line => {
                    let start = lines_at + name.as_str().len() + 2;
                    lines_at = start + len + 2;
                    start..start + len
                }
            };
            let Ok(mut copy) = HeaderValue::from_maybe_shared(buffer.slice(span)) else {
                if check_values {
                    // Checked above by the same rule: never here.
                    continue;
                }
                return Self::build(map, keep, true);
            };
            copy.set_sensitive(value.is_sensitive());
            fields.push((name.clone(), copy));
        }
        let has_date = fields.iter().any(|(n, _)| n == DATE);
        StoredHeaders {
            buffer,
            lines_end: lines_len,
            fields: fields.into(),
            has_date,
        }
    }

    /// The fields as HTTP/1 header lines (`name: value\r\n` each, names in lower case), without
    /// Content-Length, Transfer-Encoding and Connection.
    pub fn http1_lines(&self) -> Bytes {
        self.buffer.slice(..self.lines_end)
    }

    pub fn has_date(&self) -> bool {
        self.has_date
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
    ///
    /// The values are copied, not shared: a shared value's clone and drop are two atomic
    /// operations on the stored buffer's count, which every worker serving the object bounces
    /// between cores. Copying a dozen short values was cheaper (HTTP/2 hits: 5.97 → 5.77 µs of
    /// CPU each, `bench/profile.sh stat h2c`).
    pub fn to_header_map(&self, extra: usize) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.fields.len() + extra);
        for (name, value) in self.fields.iter() {
            // Stored values were valid field values when stored; the fallback never runs.
            let copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
            map.append(name.clone(), copy);
        }
        map
    }

    /// The buffer's bytes and the names', for the object's weight.
    pub fn byte_len(&self) -> usize {
        self.buffer.len()
            + self
                .fields
                .iter()
                .map(|(n, _)| n.as_str().len())
                .sum::<usize>()
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

/// Maps with at most this many fields are searched by a scan, not a hashed lookup: most
/// requests carry a handful (a load generator's, only `Host`), a hashed lookup costs about 70
/// instructions, and a cache hit asks for a dozen fields, nearly all absent (callgrind hit:
/// 15.1k → 14.7k instructions per request once scanned).
const SCAN_UP_TO: usize = 6;

/// The first value of each of `names`, in one pass over a small map (for a request's
/// identity fields, read together on every request).
pub fn find_each<'h, const N: usize>(
    headers: &'h HeaderMap,
    names: [&HeaderName; N],
) -> [Option<&'h HeaderValue>; N] {
    if headers.len() > SCAN_UP_TO {
        return names.map(|name| headers.get(name));
    }
    let mut found = [None; N];
    for (name, value) in headers {
        if let Some(i) = names.iter().position(|wanted| *wanted == name) {
            found[i].get_or_insert(value);
        }
    }
    found
}

/// The first value of `name` in `headers`, as [`HeaderMap::get`] gives it.
pub fn find<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h HeaderValue> {
    if headers.len() > SCAN_UP_TO {
        return headers.get(name);
    }
    headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
}

/// Whether `headers` has `name`, as [`HeaderMap::contains_key`] says.
pub fn has(headers: &HeaderMap, name: &HeaderName) -> bool {
    if headers.keys_len() > SCAN_UP_TO {
        return headers.contains_key(name);
    }
    // Names only: no value to find, so no walk through each name's extra values.
    headers.keys().any(|n| n == name)
}

/// Every value of `name` in `headers`, in order, as [`HeaderMap::get_all`] gives them.
pub fn find_all<'h>(headers: &'h HeaderMap, name: &'h HeaderName) -> FieldValues<'h> {
    if headers.len() > SCAN_UP_TO {
        return FieldValues::Hashed(headers.get_all(name).iter());
    }
    FieldValues::Scanned(headers.iter(), name)
}

/// The values [`find_all`] found.
pub enum FieldValues<'h> {
    Hashed(http::header::ValueIter<'h, HeaderValue>),
    Scanned(http::header::Iter<'h, HeaderValue>, &'h HeaderName),
}

impl<'h> Iterator for FieldValues<'h> {
    type Item = &'h HeaderValue;

    fn next(&mut self) -> Option<&'h HeaderValue> {
        match self {
            FieldValues::Hashed(values) => values.next(),
            FieldValues::Scanned(fields, name) => fields.find(|(n, _)| *n == *name).map(|(_, v)| v),
        }
    }
}

impl Fields for HeaderMap {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a HeaderValue> + 'a {
        find_all(self, name)
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
    fn stored_fields_and_lines_hold_what_keep_accepts_in_order() {
        // Framing fields among the others, a sensitive value, a field dropped, repeated names,
        // and maps past the number of fields whose fate is remembered.
        for padding in [0, 300] {
            let mut map = HeaderMap::new();
            map.append("x-first", HeaderValue::from_static("1"));
            map.append(CONTENT_LENGTH, HeaderValue::from_static("1234"));
            map.append("age", HeaderValue::from_static("7"));
            let mut secret = HeaderValue::from_static("s3cr\tet");
            secret.set_sensitive(true);
            map.append("x-secret", secret);
            for i in 0..padding {
                let name = HeaderName::from_bytes(format!("x-pad-{i}").as_bytes()).unwrap();
                map.append(name, HeaderValue::from_str(&i.to_string()).unwrap());
            }
            map.append(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            // obs-text is a valid field value.
            map.append("x-first", HeaderValue::from_bytes(b"2 \xe9").unwrap());
            map.append(
                DATE,
                HeaderValue::from_static("Mon, 07 Dec 2026 18:00:00 GMT"),
            );
            // Every third padding field, and Age, are left out.
            let left_out = |name: &HeaderName| {
                name == "age"
                    || name
                        .as_str()
                        .strip_prefix("x-pad-")
                        .is_some_and(|i| i.parse::<usize>().unwrap() % 3 == 0)
            };
            let stored = StoredHeaders::from_map(&map, |name| !left_out(name));
            let kept: Vec<_> = map.iter().filter(|(n, _)| !left_out(n)).collect();
            assert_eq!(stored.iter().collect::<Vec<_>>(), kept);
            let lines: Vec<u8> = kept
                .iter()
                .filter(|(n, _)| !frames_the_message(n))
                .flat_map(|(n, v)| [n.as_str().as_bytes(), b": ", v.as_bytes(), b"\r\n"].concat())
                .collect();
            assert_eq!(&stored.http1_lines()[..], &lines[..]);
            assert!(stored.get("x-secret").unwrap().is_sensitive());
            assert!(!stored.get("x-first").unwrap().is_sensitive());
            assert_eq!(stored.get(&CONTENT_LENGTH).unwrap(), "1234");
            assert_eq!(stored.get(&TRANSFER_ENCODING).unwrap(), "chunked");
            assert!(stored.has_date());
            assert_eq!(stored.len(), kept.len());
        }
    }

    #[test]
    fn small_and_large_maps_are_searched_alike() {
        for extra in [0, 10] {
            let mut map = HeaderMap::new();
            map.append("x-a", HeaderValue::from_static("1"));
            map.append("host", HeaderValue::from_static("h"));
            map.append("x-a", HeaderValue::from_static("2"));
            for i in 0..extra {
                map.append(
                    HeaderName::from_bytes(format!("x-pad-{i}").as_bytes()).unwrap(),
                    HeaderValue::from_static("p"),
                );
            }
            let a = HeaderName::from_static("x-a");
            let all: Vec<_> = find_all(&map, &a).collect();
            assert_eq!(all, map.get_all(&a).iter().collect::<Vec<_>>());
            assert_eq!(all, ["1", "2"]);
            assert_eq!(find(&map, &a), map.get(&a));
            assert_eq!(find(&map, &http::header::HOST).unwrap(), "h");
            assert!(has(&map, &http::header::HOST));
            assert!(!has(&map, &http::header::RANGE));
            let [host, x_a, range] =
                find_each(&map, [&http::header::HOST, &a, &http::header::RANGE]);
            assert_eq!((host, x_a, range), (map.get("host"), map.get(&a), None));
            assert_eq!(find_all(&map, &http::header::RANGE).count(), 0);
        }
    }

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
        map.append("content-length", HeaderValue::from_static("12"));
        let stored = StoredHeaders::from_map(&map, |n| n != "age");
        assert_eq!(stored.len(), 5);
        assert!(!stored.contains_key("age"));
        assert_eq!(stored.get("X-A").unwrap(), "1");
        assert_eq!(stored.get_all("x-a").collect::<Vec<_>>(), ["1", "2"]);
        assert!(stored.get("x-secret").unwrap().is_sensitive());
        assert_eq!(stored.get("content-length").unwrap(), "12");
        assert!(!stored.has_date());
        map.append(
            "date",
            HeaderValue::from_static("Thu, 03 Dec 2026 10:00:00 GMT"),
        );
        assert!(StoredHeaders::from_map(&map, |_| true).has_date());
        let served = stored.to_header_map(4);
        assert_eq!(served.len(), 5);
        assert!(served.capacity() >= 9);
        assert_eq!(served.get_all("x-a").iter().collect::<Vec<_>>(), ["1", "2"]);
        // Framing is each writer's own: Content-Length is not among the lines.
        let lines = "content-type: text/plain\r\nx-a: 1\r\nx-a: 2\r\nx-secret: s\r\n";
        assert_eq!(&stored.http1_lines()[..], lines.as_bytes());
        let names = "content-type".len() + 3 + 3 + 8 + "content-length".len();
        assert_eq!(stored.byte_len(), lines.len() + 2 + names);
    }
}
