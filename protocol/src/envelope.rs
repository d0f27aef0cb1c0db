//! Several NATS messages carried in one: an envelope of letters, each with its own
//! headers and body, so one broker message does the work of many.
//!
//! ```text
//! envelope = count:u16be letter{count}                     count >= 1
//! letter   = nhead:u16be (klen:u16be key vlen:u16be value){nhead} blen:u32be body
//! ```
//!
//! Keys and values are NATS header names and values (UTF-8, no CR or LF, names without
//! `:`); a key repeated is a header with several values, in order. The message carrying an
//! envelope has the header [`crate::headers::ENVELOPE`] with its letter count, and no
//! other meaning: each letter is what would have been a message of its own.
//!
//! Replies travel this way today: an agent answering several requests of one ingress at
//! once (a batch's) sends them as one envelope to the reply subject of the first, when
//! the ingress said it reads envelopes ([`crate::headers::REPLY_ENVELOPE`]).
//! `tests/golden/envelopes.json` holds byte vectors both this codec and the Python one
//! are tested against.

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// One message of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Letter {
    /// `(name, value)` in order; a name may repeat.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
    #[error("envelope of {0} letters: at most {max} fit", max = u16::MAX)]
    TooMany(usize),
}

impl Letter {
    /// The letter a message with `headers` and `body` would be.
    pub fn new(headers: &HeaderMap, body: Bytes) -> Self {
        let mut pairs: Vec<(String, String)> = headers
            .iter()
            .flat_map(|(name, values)| {
                values
                    .iter()
                    .map(move |v| (name.to_string(), v.as_str().to_owned()))
            })
            .collect();
        // A header map has no order of its own: sorting makes one map one encoding.
        pairs.sort();
        Self {
            headers: pairs,
            body,
        }
    }

    /// The letter's headers as a NATS header map; a name or value NATS would refuse is
    /// an error.
    pub fn header_map(&self) -> Result<HeaderMap, EnvelopeError> {
        let mut map = HeaderMap::new();
        for (name, value) in &self.headers {
            let name: HeaderName = name
                .parse()
                .map_err(|_| EnvelopeError::Malformed("invalid header name"))?;
            let value: HeaderValue = value
                .parse()
                .map_err(|_| EnvelopeError::Malformed("invalid header value"))?;
            map.append(name, value);
        }
        Ok(map)
    }

    /// The value of header `name`, if the letter has it (the first, if repeated).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Bytes a message with `headers` and a body of `body` bytes adds to an envelope as a
/// letter, so a sender can stop before an envelope outgrows one NATS message.
pub fn letter_size(headers: &HeaderMap, body: usize) -> usize {
    6 + body
        + headers
            .iter()
            .map(|(name, values)| {
                values
                    .iter()
                    .map(|v| 4 + AsRef::<str>::as_ref(name).len() + v.as_str().len())
                    .sum::<usize>()
            })
            .sum::<usize>()
}

/// The envelope carrying `letters` (at least one, at most 65535; headers and names
/// under 64 KiB each, as NATS headers are).
pub fn encode(letters: &[Letter]) -> Result<Bytes, EnvelopeError> {
    let count = u16::try_from(letters.len()).map_err(|_| EnvelopeError::TooMany(letters.len()))?;
    if count == 0 {
        return Err(EnvelopeError::Malformed(
            "an envelope holds at least one letter",
        ));
    }
    let size: usize = letters
        .iter()
        .map(|l| {
            6 + l.body.len()
                + l.headers
                    .iter()
                    .map(|(k, v)| 4 + k.len() + v.len())
                    .sum::<usize>()
        })
        .sum();
    let mut out = BytesMut::with_capacity(2 + size);
    out.put_u16(count);
    for letter in letters {
        let nhead = u16::try_from(letter.headers.len())
            .map_err(|_| EnvelopeError::Malformed("too many headers in one letter"))?;
        out.put_u16(nhead);
        for (name, value) in &letter.headers {
            put_short(&mut out, name)?;
            put_short(&mut out, value)?;
        }
        let len = u32::try_from(letter.body.len())
            .map_err(|_| EnvelopeError::Malformed("letter body over 4 GiB"))?;
        out.put_u32(len);
        out.put_slice(&letter.body);
    }
    Ok(out.freeze())
}

/// The letters of an envelope; anything but one whole envelope is an error, never a
/// panic, and no length is trusted before it is checked against what is left.
pub fn decode(envelope: &Bytes) -> Result<Vec<Letter>, EnvelopeError> {
    let mut buf = envelope.clone();
    let count = take_u16(&mut buf)? as usize;
    if count == 0 {
        return Err(EnvelopeError::Malformed(
            "an envelope holds at least one letter",
        ));
    }
    // Each letter is at least 6 bytes: a lying count cannot make us allocate.
    if count.saturating_mul(6) > buf.remaining() {
        return Err(EnvelopeError::Malformed(
            "letter count exceeds the envelope",
        ));
    }
    let mut letters = Vec::with_capacity(count);
    for _ in 0..count {
        let nhead = take_u16(&mut buf)? as usize;
        if nhead.saturating_mul(4) > buf.remaining() {
            return Err(EnvelopeError::Malformed(
                "header count exceeds the envelope",
            ));
        }
        let mut headers = Vec::with_capacity(nhead);
        for _ in 0..nhead {
            let name = take_short(&mut buf)?;
            let value = take_short(&mut buf)?;
            headers.push((name, value));
        }
        if buf.remaining() < 4 {
            return Err(EnvelopeError::Malformed("truncated body length"));
        }
        let len = buf.get_u32() as usize;
        if len > buf.remaining() {
            return Err(EnvelopeError::Malformed("body length exceeds the envelope"));
        }
        letters.push(Letter {
            headers,
            body: buf.split_to(len),
        });
    }
    if buf.has_remaining() {
        return Err(EnvelopeError::Malformed("trailing bytes"));
    }
    Ok(letters)
}

fn put_short(out: &mut BytesMut, text: &str) -> Result<(), EnvelopeError> {
    let len =
        u16::try_from(text.len()).map_err(|_| EnvelopeError::Malformed("header over 64 KiB"))?;
    out.put_u16(len);
    out.put_slice(text.as_bytes());
    Ok(())
}

fn take_u16(buf: &mut Bytes) -> Result<u16, EnvelopeError> {
    if buf.remaining() < 2 {
        return Err(EnvelopeError::Malformed("truncated u16"));
    }
    Ok(buf.get_u16())
}

fn take_short(buf: &mut Bytes) -> Result<String, EnvelopeError> {
    let len = take_u16(buf)? as usize;
    if len > buf.remaining() {
        return Err(EnvelopeError::Malformed(
            "header length exceeds the envelope",
        ));
    }
    let text = buf.split_to(len);
    String::from_utf8(text.to_vec()).map_err(|_| EnvelopeError::Malformed("header not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn golden() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/golden/envelopes.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn letters(v: &Value) -> Vec<Letter> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| Letter {
                headers: l["headers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| {
                        (
                            p[0].as_str().unwrap().to_owned(),
                            p[1].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect(),
                body: Bytes::from(l["body"].as_str().unwrap().as_bytes().to_vec()),
            })
            .collect()
    }

    #[test]
    fn golden_vectors_encode_and_decode() {
        let g = golden();
        for case in g["valid"].as_array().unwrap() {
            let bytes = Bytes::from(hex(case["hex"].as_str().unwrap()));
            let want = letters(&case["letters"]);
            assert_eq!(encode(&want).unwrap(), bytes, "{}", case["name"]);
            assert_eq!(decode(&bytes).unwrap(), want, "{}", case["name"]);
        }
    }

    #[test]
    fn golden_invalid_vectors_are_rejected() {
        let g = golden();
        for case in g["invalid"].as_array().unwrap() {
            let bytes = Bytes::from(hex(case["hex"].as_str().unwrap()));
            assert!(decode(&bytes).is_err(), "{} was accepted", case["name"]);
        }
    }

    #[test]
    fn a_letter_keeps_its_message_headers() {
        let mut h = HeaderMap::new();
        h.insert("X-Status", "ok");
        h.insert("X-Request-Id", "r-1");
        h.append("X-Many", "1");
        h.append("X-Many", "2");
        let letter = Letter::new(&h, Bytes::from_static(b"{}"));
        assert_eq!(letter.header("x-status"), Some("ok"));
        let back = decode(&encode(std::slice::from_ref(&letter)).unwrap()).unwrap();
        let map = back[0].header_map().unwrap();
        assert_eq!(map.get("X-Request-Id").map(|v| v.as_str()), Some("r-1"));
        let many: Vec<&str> = map.get_all("X-Many").map(|v| v.as_str()).collect();
        assert_eq!(many, ["1", "2"]);
        let bad = Letter {
            headers: vec![("X:Bad".into(), "v".into())],
            body: Bytes::new(),
        };
        assert!(bad.header_map().is_err());
    }

    #[test]
    fn every_cut_of_an_envelope_is_an_error() {
        let letter = Letter {
            headers: vec![("X-Status".into(), "ok".into())],
            body: Bytes::from_static(b"abc"),
        };
        let whole = encode(&[letter.clone(), letter]).unwrap();
        for cut in 0..whole.len() {
            assert!(decode(&whole.slice(..cut)).is_err(), "cut at {cut}");
        }
        assert!(encode(&[]).is_err());
    }
}
