//! HPACK (RFC 7541) for Larder's HTTP/2 server.
//!
//! The decoder keeps the dynamic table a client fills, with names already parsed: a client
//! repeats its fields, so most of a request is table indices, each a clone of a parsed field.
//! The encoder never indexes: a response's fields go out as literals under static-table names
//! (as nginx does), so encoding costs a copy and no table upkeep.

use std::collections::VecDeque;
use std::sync::LazyLock;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};

use super::huffman;

/// A request's pseudo-header fields (RFC 9113 §8.3.1), and the response's one a client may
/// not send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pseudo {
    Method,
    Scheme,
    Authority,
    Path,
    /// `:status`, `:protocol` or any other: malformed in a request.
    Other,
}

/// A field's name, parsed once when it enters the table.
#[derive(Debug, Clone)]
pub enum Name {
    Pseudo(Pseudo),
    Field(HeaderName),
    /// Not a valid lowercase field name: a request carrying it is malformed, but the
    /// table still holds it (the client's encoder counts on its place).
    Invalid,
}

/// One decoded field.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: Name,
    /// A regular field's value; None when it holds bytes no field value may (CR, LF, NUL,
    /// other controls), or for a pseudo-header field.
    pub value: Option<HeaderValue>,
    /// A pseudo-header field's value, as sent: the URI's and method's parsers check it.
    pub raw: Bytes,
}

impl Field {
    fn parse(name: &[u8], value: Bytes) -> Field {
        match name {
            [b':', pseudo @ ..] => Field::pseudo(
                match pseudo {
                    b"method" => Pseudo::Method,
                    b"scheme" => Pseudo::Scheme,
                    b"authority" => Pseudo::Authority,
                    b"path" => Pseudo::Path,
                    _ => Pseudo::Other,
                },
                value,
            ),
            // Only lowercase names are valid in HTTP/2 (§8.2.1): `from_lowercase` refuses others.
            _ => Field::regular(
                HeaderName::from_lowercase(name).map_or(Name::Invalid, Name::Field),
                value,
            ),
        }
    }

    fn pseudo(pseudo: Pseudo, value: Bytes) -> Field {
        Field {
            name: Name::Pseudo(pseudo),
            value: None,
            raw: value,
        }
    }

    fn regular(name: Name, value: Bytes) -> Field {
        Field {
            name,
            value: HeaderValue::from_maybe_shared(value).ok(),
            raw: Bytes::new(),
        }
    }

    /// The same name with another value.
    fn with_value(name: Name, value: Bytes) -> Field {
        match name {
            Name::Pseudo(pseudo) => Field::pseudo(pseudo, value),
            name => Field::regular(name, value),
        }
    }
}

/// A dynamic-table entry: the field and its size as RFC 7541 §4.1 counts it.
#[derive(Debug)]
struct Entry {
    field: Field,
    name_len: usize,
    size: usize,
}

/// Why a header block cannot be decoded: a connection error (COMPRESSION_ERROR), as the
/// table may now differ from the client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("an index beyond the tables")]
    BadIndex,
    #[error("an integer that overflows or is cut short")]
    BadInteger,
    #[error("a string cut short")]
    Truncated,
    #[error("a Huffman-coded string that is not one")]
    Huffman,
    #[error("a table size update above the limit, or after a field")]
    BadSizeUpdate,
}

/// RFC 7541 Appendix A, names and values.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The static table, parsed.
static STATIC_FIELDS: LazyLock<Vec<Field>> = LazyLock::new(|| {
    STATIC
        .iter()
        .map(|(name, value)| Field::parse(name.as_bytes(), Bytes::from_static(value.as_bytes())))
        .collect()
});

/// The decoding side of a connection's HPACK context.
#[derive(Debug)]
pub struct Decoder {
    /// Newest first, as indices count them.
    table: VecDeque<Entry>,
    size: usize,
    max_size: usize,
    /// What this server's SETTINGS_HEADER_TABLE_SIZE allows (the default, 4096).
    allowed_max: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: 4096,
            allowed_max: 4096,
        }
    }
}

impl Decoder {
    /// Decodes a whole header block, giving each field to `each` in order, with its size as
    /// SETTINGS_MAX_HEADER_LIST_SIZE counts it.
    pub fn decode(
        &mut self,
        mut block: &[u8],
        mut each: impl FnMut(Field, usize),
    ) -> Result<(), DecodeError> {
        // Size updates may only open a block (§4.2).
        let mut fields_seen = false;
        while let Some(&first) = block.first() {
            if first & 0x80 != 0 {
                let index = integer(&mut block, 7)?;
                let (field, _, size) = self.get(index)?;
                each(field, size);
                fields_seen = true;
            } else if first & 0xc0 == 0x40 {
                let (field, name_len, size) = self.literal(&mut block, 6)?;
                each(field.clone(), size);
                self.insert(Entry {
                    field,
                    name_len,
                    size,
                });
                fields_seen = true;
            } else if first & 0xe0 == 0x20 {
                if fields_seen {
                    return Err(DecodeError::BadSizeUpdate);
                }
                let max = integer(&mut block, 5)?;
                if max > self.allowed_max {
                    return Err(DecodeError::BadSizeUpdate);
                }
                self.max_size = max;
                self.evict_to(max);
            } else {
                // Without indexing (0000) or never indexed (0001): 4-bit prefix.
                let (field, _, size) = self.literal(&mut block, 4)?;
                each(field, size);
                fields_seen = true;
            }
        }
        Ok(())
    }

    /// A field from either table (1-based; the dynamic table follows the static one), with
    /// its name's length and its size.
    fn get(&self, index: usize) -> Result<(Field, usize, usize), DecodeError> {
        match index {
            0 => Err(DecodeError::BadIndex),
            1..=61 => {
                let (name, value) = STATIC[index - 1];
                Ok((
                    STATIC_FIELDS[index - 1].clone(),
                    name.len(),
                    name.len() + value.len() + 32,
                ))
            }
            _ => {
                let entry = self.table.get(index - 62).ok_or(DecodeError::BadIndex)?;
                Ok((entry.field.clone(), entry.name_len, entry.size))
            }
        }
    }

    /// A literal field: its name an index (non-zero prefix) or a string, then its value.
    /// Returns the field, its name's length and its size.
    fn literal(
        &mut self,
        block: &mut &[u8],
        prefix: u8,
    ) -> Result<(Field, usize, usize), DecodeError> {
        let index = integer(block, prefix)?;
        if index == 0 {
            let name = self.string(block)?;
            let value = self.string(block)?;
            let (name_len, size) = (name.len(), name.len() + value.len() + 32);
            return Ok((Field::parse(&name, value), name_len, size));
        }
        let (named, name_len, _) = self.get(index)?;
        let value = self.string(block)?;
        let size = name_len + value.len() + 32;
        Ok((Field::with_value(named.name, value), name_len, size))
    }

    /// A string literal (§5.2), Huffman-decoded if marked so.
    fn string(&self, block: &mut &[u8]) -> Result<Bytes, DecodeError> {
        let huffman = block.first().ok_or(DecodeError::Truncated)? & 0x80 != 0;
        let len = integer(block, 7)?;
        if block.len() < len {
            return Err(DecodeError::Truncated);
        }
        let (raw, rest) = block.split_at(len);
        *block = rest;
        if !huffman {
            return Ok(Bytes::copy_from_slice(raw));
        }
        // Huffman codes are at least 5 bits a byte.
        let mut decoded = Vec::with_capacity(raw.len() * 8 / 5 + 1);
        huffman::decode(raw, &mut decoded).map_err(|_| DecodeError::Huffman)?;
        Ok(Bytes::from(decoded))
    }

    fn insert(&mut self, entry: Entry) {
        // An entry larger than the table empties it and is not added (§4.4).
        self.evict_to(self.max_size.saturating_sub(entry.size));
        if entry.size <= self.max_size {
            self.size += entry.size;
            self.table.push_front(entry);
        }
    }

    fn evict_to(&mut self, max: usize) {
        while self.size > max {
            let Some(entry) = self.table.pop_back() else {
                break;
            };
            self.size -= entry.size;
        }
    }
}

impl Decoder {
    /// Panics unless the table's bookkeeping holds: its size is its entries' and within the
    /// maximum (`fuzz_checks::hpack`).
    pub(crate) fn check_table(&self) {
        let sum: usize = self.table.iter().map(|e| e.size).sum();
        assert_eq!(sum, self.size, "table size bookkeeping");
        assert!(
            self.size <= self.max_size,
            "{} over {}",
            self.size,
            self.max_size
        );
        assert!(self.max_size <= self.allowed_max);
    }
}

/// An HPACK integer with an `prefix`-bit prefix (§5.1), at the front of `block`.
fn integer(block: &mut &[u8], prefix: u8) -> Result<usize, DecodeError> {
    let mask = (1u16 << prefix) as usize - 1;
    let (&first, mut rest) = block.split_first().ok_or(DecodeError::BadInteger)?;
    let mut value = first as usize & mask;
    if value == mask {
        let mut shift = 0u32;
        loop {
            let (&byte, tail) = rest.split_first().ok_or(DecodeError::BadInteger)?;
            rest = tail;
            // Four continuation bytes reach 2^28 + 127: more than any size or index here.
            if shift > 21 {
                return Err(DecodeError::BadInteger);
            }
            value += ((byte & 0x7f) as usize) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
    }
    *block = rest;
    Ok(value)
}

#[inline]
fn put_integer(out: &mut Vec<u8>, mut value: usize, prefix: u8, first_bits: u8) {
    let mask = (1usize << prefix) - 1;
    if value < mask {
        out.push(first_bits | value as u8);
        return;
    }
    out.push(first_bits | mask as u8);
    value -= mask;
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// How a response field's name is sent.
enum Named {
    /// By its static-table index.
    Static(u8),
    /// As a string.
    Literal,
    /// Not at all: connection-specific fields never travel in HTTP/2 (RFC 9113 §8.2.2).
    Skipped,
}

/// One match on the name decides both its static index and whether it is sent.
fn named(name: &[u8]) -> Named {
    Named::Static(match name {
        b"accept-charset" => 15,
        b"accept-encoding" => 16,
        b"accept-language" => 17,
        b"accept-ranges" => 18,
        b"accept" => 19,
        b"access-control-allow-origin" => 20,
        b"age" => 21,
        b"allow" => 22,
        b"authorization" => 23,
        b"cache-control" => 24,
        b"content-disposition" => 25,
        b"content-encoding" => 26,
        b"content-language" => 27,
        b"content-length" => 28,
        b"content-location" => 29,
        b"content-range" => 30,
        b"content-type" => 31,
        b"cookie" => 32,
        b"date" => 33,
        b"etag" => 34,
        b"expect" => 35,
        b"expires" => 36,
        b"from" => 37,
        b"host" => 38,
        b"if-match" => 39,
        b"if-modified-since" => 40,
        b"if-none-match" => 41,
        b"if-range" => 42,
        b"if-unmodified-since" => 43,
        b"last-modified" => 44,
        b"link" => 45,
        b"location" => 46,
        b"max-forwards" => 47,
        b"proxy-authenticate" => 48,
        b"proxy-authorization" => 49,
        b"range" => 50,
        b"referer" => 51,
        b"refresh" => 52,
        b"retry-after" => 53,
        b"server" => 54,
        b"set-cookie" => 55,
        b"strict-transport-security" => 56,
        b"user-agent" => 58,
        b"vary" => 59,
        b"via" => 60,
        b"www-authenticate" => 61,
        b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding" | b"upgrade" => {
            return Named::Skipped;
        }
        _ => return Named::Literal,
    })
}

/// Appends a dynamic-table size update to 0: Larder never indexes, and a client that lowered
/// SETTINGS_HEADER_TABLE_SIZE expects an update in the next block (§4.2).
pub fn encode_table_size_zero(out: &mut Vec<u8>) {
    out.push(0x20);
}

/// Appends `:status`.
pub fn encode_status(status: StatusCode, out: &mut Vec<u8>) {
    let indexed = match status.as_u16() {
        200 => 8,
        204 => 9,
        206 => 10,
        304 => 11,
        400 => 12,
        404 => 13,
        500 => 14,
        _ => 0,
    };
    if indexed != 0 {
        out.push(0x80 | indexed);
        return;
    }
    // Literal without indexing, name `:status` (8).
    out.push(0x08);
    out.push(3);
    out.extend_from_slice(status.as_str().as_bytes());
}

/// Appends a field as a literal without indexing (never indexed when marked sensitive), its
/// name by static index when it has one, its value as is. Connection-specific fields are left
/// out.
pub fn encode_field(name: &HeaderName, value: &HeaderValue, out: &mut Vec<u8>) {
    encode_bytes(
        name.as_str().as_bytes(),
        value.as_bytes(),
        value.is_sensitive(),
        out,
    );
}

/// [`encode_field`] for a lowercase name and a valid value as bytes (a stored line's).
pub fn encode_bytes(name: &[u8], value: &[u8], sensitive: bool, out: &mut Vec<u8>) {
    let first_bits = if sensitive { 0x10 } else { 0x00 };
    out.reserve(name.len() + value.len() + 8);
    match named(name) {
        Named::Static(index) if index < 15 => out.push(first_bits | index),
        Named::Static(index) => out.extend_from_slice(&[first_bits | 0x0f, index - 15]),
        Named::Literal => {
            out.push(first_bits);
            put_integer(out, name.len(), 7, 0);
            out.extend_from_slice(name);
        }
        Named::Skipped => return,
    }
    put_integer(out, value.len(), 7, 0);
    out.extend_from_slice(value);
}

/// Appends the fields of HTTP/1 lines (`name: value\r\n` each, names in lower case, as
/// Larder encodes them when storing a response).
pub fn encode_lines(mut lines: &[u8], out: &mut Vec<u8>) {
    while let Some(colon) = memchr::memchr(b':', lines) {
        let name = &lines[..colon];
        let rest = &lines[colon + 1..];
        let end = memchr::memchr(b'\r', rest).unwrap_or(rest.len());
        let value = rest[..end].trim_ascii_start();
        encode_bytes(name, value, false, out);
        lines = rest.get(end + 2..).unwrap_or_default();
    }
}

/// Appends a `date` field; `append_value` writes its 29-byte IMF-fixdate value.
pub fn encode_date(out: &mut Vec<u8>, append_value: impl FnOnce(&mut Vec<u8>)) {
    // `date` is static index 33: above the 4-bit prefix's 15.
    out.extend_from_slice(&[0x0f, 33 - 15]);
    let len_at = out.len();
    out.push(0);
    append_value(out);
    let len = out.len() - len_at - 1;
    debug_assert!(len < 127);
    out[len_at] = len as u8;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(
        decoder: &mut Decoder,
        block: &[u8],
    ) -> Result<Vec<(String, String)>, DecodeError> {
        let mut fields = Vec::new();
        decoder.decode(block, |field, _| {
            let name = match &field.name {
                Name::Pseudo(Pseudo::Method) => ":method".to_owned(),
                Name::Pseudo(Pseudo::Scheme) => ":scheme".to_owned(),
                Name::Pseudo(Pseudo::Authority) => ":authority".to_owned(),
                Name::Pseudo(Pseudo::Path) => ":path".to_owned(),
                Name::Pseudo(Pseudo::Other) => ":other".to_owned(),
                Name::Field(name) => name.as_str().to_owned(),
                Name::Invalid => "!invalid".to_owned(),
            };
            let value = match (&field.name, field.value) {
                (Name::Pseudo(_), _) => String::from_utf8(field.raw.to_vec()).unwrap(),
                (_, Some(v)) => String::from_utf8(v.as_bytes().to_vec()).unwrap(),
                (_, None) => "!invalid".to_owned(),
            };
            fields.push((name, value));
        })?;
        Ok(fields)
    }

    fn pairs(fields: &[(&str, &str)]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn rfc_7541_c3_requests_without_huffman() {
        let mut d = Decoder::default();
        let first = decode_all(
            &mut d,
            &hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"),
        )
        .unwrap();
        assert_eq!(
            first,
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        let second = decode_all(&mut d, &hex("8286 84be 5808 6e6f 2d63 6163 6865")).unwrap();
        assert_eq!(
            second,
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache")
            ])
        );
        let third = decode_all(
            &mut d,
            &hex("8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65"),
        )
        .unwrap();
        assert_eq!(
            third,
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ])
        );
        assert_eq!(d.size, 164);
    }

    #[test]
    fn rfc_7541_c4_requests_with_huffman() {
        let mut d = Decoder::default();
        decode_all(&mut d, &hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff")).unwrap();
        decode_all(&mut d, &hex("8286 84be 5886 a8eb 1064 9cbf")).unwrap();
        let third = decode_all(
            &mut d,
            &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
        )
        .unwrap();
        assert_eq!(
            third[4],
            ("custom-key".to_owned(), "custom-value".to_owned())
        );
        assert_eq!(d.size, 164);
    }

    #[test]
    fn eviction_follows_the_table_size() {
        let mut d = Decoder::default();
        // Size update to 50, then a literal with indexing of 10 + 10 + 32 = 52 bytes: too big,
        // so the table is empty afterwards and index 62 is unknown.
        let mut block = vec![0x3f, 50 - 31];
        block.extend_from_slice(&[0x40, 10]);
        block.extend_from_slice(b"aaaaaaaaaa");
        block.push(10);
        block.extend_from_slice(b"bbbbbbbbbb");
        decode_all(&mut d, &block).unwrap();
        assert_eq!(d.size, 0);
        assert_eq!(decode_all(&mut d, &[0xbe]), Err(DecodeError::BadIndex));
    }

    #[test]
    fn malformed_blocks_are_errors() {
        let mut d = Decoder::default();
        assert_eq!(decode_all(&mut d, &[0x80]), Err(DecodeError::BadIndex));
        assert_eq!(decode_all(&mut d, &[0xff]), Err(DecodeError::BadInteger));
        assert_eq!(
            decode_all(&mut d, &[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            Err(DecodeError::BadInteger)
        );
        assert_eq!(
            decode_all(&mut d, &[0x04, 0x05, b'a']),
            Err(DecodeError::Truncated)
        );
        // A size update after a field, and one above the limit.
        assert_eq!(
            decode_all(&mut d, &[0x82, 0x20]),
            Err(DecodeError::BadSizeUpdate)
        );
        assert_eq!(
            decode_all(&mut d, &[0x3f, 0xe2, 0x1f]),
            Err(DecodeError::BadSizeUpdate)
        );
    }

    #[test]
    fn uppercase_names_and_bad_values_are_marked() {
        let mut d = Decoder::default();
        let mut block = vec![0x00, 3];
        block.extend_from_slice(b"Foo");
        block.extend_from_slice(&[1, b'x']);
        block.extend_from_slice(&[0x00, 3]);
        block.extend_from_slice(b"foo");
        block.extend_from_slice(&[1, b'\n']);
        let fields = decode_all(&mut d, &block).unwrap();
        assert_eq!(fields, pairs(&[("!invalid", "x"), ("foo", "!invalid")]));
    }

    #[test]
    fn stored_lines_encode_as_their_fields() {
        let mut out = Vec::new();
        encode_lines(b"content-type: text/plain\r\nx-custom: a b\r\nconnection: close\r\nvia: 1.1 larder\r\n", &mut out);
        encode_date(&mut out, |v| {
            v.extend_from_slice(b"Mon, 07 Dec 2026 05:29:19 GMT")
        });
        let fields = decode_all(&mut Decoder::default(), &out).unwrap();
        assert_eq!(
            fields,
            pairs(&[
                ("content-type", "text/plain"),
                ("x-custom", "a b"),
                ("via", "1.1 larder"),
                ("date", "Mon, 07 Dec 2026 05:29:19 GMT")
            ])
        );
    }

    #[test]
    fn encoded_responses_decode_back() {
        let mut out = Vec::new();
        encode_table_size_zero(&mut out);
        encode_status(StatusCode::OK, &mut out);
        encode_status(StatusCode::IM_A_TEAPOT, &mut out);
        encode_field(
            &http::header::CONTENT_TYPE,
            &HeaderValue::from_static("text/plain"),
            &mut out,
        );
        let mut secret = HeaderValue::from_static("s3cr3t");
        secret.set_sensitive(true);
        encode_field(&HeaderName::from_static("x-custom"), &secret, &mut out);
        // Connection-specific: never sent.
        encode_field(
            &http::header::TRANSFER_ENCODING,
            &HeaderValue::from_static("chunked"),
            &mut out,
        );
        encode_field(
            &http::header::CONNECTION,
            &HeaderValue::from_static("close"),
            &mut out,
        );
        let long = "v".repeat(300);
        encode_field(
            &http::header::VIA,
            &HeaderValue::from_str(&long).unwrap(),
            &mut out,
        );
        let mut d = Decoder::default();
        let fields = decode_all(&mut d, &out).unwrap();
        assert_eq!(
            fields,
            pairs(&[
                (":other", "200"),
                (":other", "418"),
                ("content-type", "text/plain"),
                ("x-custom", "s3cr3t"),
                ("via", &long)
            ])
        );
        assert_eq!(d.size, 0);
        // Never indexed: 0001 and the literal name.
        assert!(out.windows(10).any(|w| w == b"\x10\x08x-custom"));
    }
}
