//! The frame codec spoken between an agent and each Python worker over a Unix socket.
//!
//! ```text
//! frame   = length:u32be kind:u8 body          length counts kind + body
//! READY   kind 1  pid:u32be [ids:u8 = 1]      worker -> agent, after __init__ and warm-up
//! BATCH   kind 2  id:u64be count:u32be (len:u32be bytes){count}            agent -> worker
//! BATCH   kind 6  id:u64be count:u32be (len:u32be bytes rlen:u16be request_id
//!                 tlen:u16be trace_id){count}                               agent -> worker
//! RESULTS kind 3  id:u64be count:u32be (status:u8 len:u32be bytes){count}   worker -> agent
//! STREAM  kind 4  id:u64be index:u32be len:u32be bytes      worker -> agent, before RESULTS
//! CANCEL  kind 5  id:u64be index:u32be                      agent -> worker, while it runs
//! ```
//!
//! A streaming worker sends any number of `STREAM` frames for item `index` of batch `id`
//! while it runs it, then the batch's one `RESULTS` frame, which ends every item's stream.
//! The agent sends `CANCEL` when the requester of item `index` went away; the worker may
//! get it after it already answered the batch, and then ignores it.
//!
//! Kind 6 is a batch that carries each item's request id and trace id (empty when it has
//! none), so the worker can log them. A worker that reads it says so with the optional
//! last byte of its READY (1); the agent sends kind 6 only to such a worker, and kind 2,
//! the same without ids, to any other (one written against the frames before ids), and
//! for a batch without ids. Ids are UTF-8; one longer than 65535 bytes travels
//! empty. A kind 6 batch has at least one item (without items it is kind 2).
//!
//! Item status: 0 ok, 1 validation error, 2 client error, 3 server error. The declared
//! length is checked against a maximum before anything is allocated, and every inner
//! length against what is left of the frame. `tests/golden/frames.json` holds byte vectors
//! that both this codec and the Python one are tested against.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::Outcome;

pub const KIND_READY: u8 = 1;
pub const KIND_BATCH: u8 = 2;
pub const KIND_RESULTS: u8 = 3;
pub const KIND_STREAM: u8 = 4;
pub const KIND_CANCEL: u8 = 5;
pub const KIND_BATCH_IDS: u8 = 6;

/// Largest frame accepted by default: big enough for a batch of large NATS payloads.
pub const DEFAULT_MAX_FRAME: usize = 256 * 1024 * 1024;

/// What a worker can say of one item: the four statuses a `RESULTS` frame holds. The
/// other outcomes (timeout, overloaded, unavailable) are the agent's to give, so a frame
/// cannot carry them by construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ItemStatus {
    Ok = 0,
    ValidationError = 1,
    ClientError = 2,
    ServerError = 3,
}

impl ItemStatus {
    pub fn from_code(code: u8) -> Option<ItemStatus> {
        match code {
            0 => Some(ItemStatus::Ok),
            1 => Some(ItemStatus::ValidationError),
            2 => Some(ItemStatus::ClientError),
            3 => Some(ItemStatus::ServerError),
            _ => None,
        }
    }

    pub fn code(self) -> u8 {
        self as u8
    }
}

impl From<ItemStatus> for Outcome {
    fn from(status: ItemStatus) -> Outcome {
        match status {
            ItemStatus::Ok => Outcome::Ok,
            ItemStatus::ValidationError => Outcome::ValidationError,
            ItemStatus::ClientError => Outcome::ClientError,
            ItemStatus::ServerError => Outcome::ServerError,
        }
    }
}

impl TryFrom<Outcome> for ItemStatus {
    type Error = Outcome;

    /// The item status for an outcome a worker can report; the outcome back otherwise.
    fn try_from(outcome: Outcome) -> Result<ItemStatus, Outcome> {
        match outcome {
            Outcome::Ok => Ok(ItemStatus::Ok),
            Outcome::ValidationError => Ok(ItemStatus::ValidationError),
            Outcome::ClientError => Ok(ItemStatus::ClientError),
            Outcome::ServerError => Ok(ItemStatus::ServerError),
            other => Err(other),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemResult {
    pub status: ItemStatus,
    pub body: Bytes,
}

/// The ids one batch item's log lines carry: its request id and its trace id (the
/// trace-id field of the `traceparent` it came with), each empty when it has none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ItemIds {
    pub request_id: Bytes,
    pub trace_id: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `reads_ids`: the worker reads BATCH kind 6 (its READY's optional last byte).
    Ready {
        pid: u32,
        reads_ids: bool,
    },
    /// `ids` is empty (kind 2) or has one entry per item (kind 6).
    Batch {
        id: u64,
        items: Vec<Bytes>,
        ids: Vec<ItemIds>,
    },
    Results {
        id: u64,
        items: Vec<ItemResult>,
    },
    /// One event of item `index`'s stream (the text a worker passed to
    /// `send_stream_event`, UTF-8 by contract, not checked here).
    Stream {
        id: u64,
        index: u32,
        body: Bytes,
    },
    /// The requester of item `index` of the running batch `id` went away.
    Cancel {
        id: u64,
        index: u32,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("unknown item status {0}")]
    UnknownStatus(u8),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

impl Frame {
    /// Checks whether `buf` starts with a whole frame: `Ok(Some(n))` with its total size,
    /// `Ok(None)` when more bytes are needed. Rejects an oversized declared length before
    /// the caller allocates room for it.
    pub fn check(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        if len == 0 {
            return Err(FrameError::Empty);
        }
        Ok((buf.len() >= 4 + len).then_some(4 + len))
    }

    /// Parses one whole frame (length prefix included), as sized by [`Frame::check`]. Any
    /// other input is an error, never a panic: the prefix must match the slice's length.
    pub fn parse(frame: &[u8]) -> Result<Frame, FrameError> {
        let Some((prefix, rest)) = frame.split_first_chunk::<4>() else {
            return Err(FrameError::Malformed("shorter than a length prefix"));
        };
        if u32::from_be_bytes(*prefix) as usize != rest.len() {
            return Err(FrameError::Malformed(
                "length prefix does not match the frame",
            ));
        }
        if rest.is_empty() {
            return Err(FrameError::Empty);
        }
        let mut body = Bytes::copy_from_slice(rest);
        let kind = body.get_u8();
        match kind {
            KIND_READY => {
                let pid = take_u32(&mut body)?;
                let reads_ids = match body.first() {
                    None => false,
                    Some(1) => {
                        body.advance(1);
                        true
                    }
                    Some(_) => return Err(FrameError::Malformed("unknown READY feature")),
                };
                finish(&body, Frame::Ready { pid, reads_ids })
            }
            KIND_BATCH => {
                let id = take_u64(&mut body)?;
                let count = take_count(&mut body, 4)?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(take_bytes(&mut body)?);
                }
                finish(
                    &body,
                    Frame::Batch {
                        id,
                        items,
                        ids: Vec::new(),
                    },
                )
            }
            KIND_BATCH_IDS => {
                let id = take_u64(&mut body)?;
                let count = take_count(&mut body, 8)?;
                if count == 0 {
                    // Without items it is kind 2: one frame, one encoding.
                    return Err(FrameError::Malformed("batch with ids of no item"));
                }
                let mut items = Vec::with_capacity(count);
                let mut ids = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(take_bytes(&mut body)?);
                    ids.push(ItemIds {
                        request_id: take_short(&mut body)?,
                        trace_id: take_short(&mut body)?,
                    });
                }
                finish(&body, Frame::Batch { id, items, ids })
            }
            KIND_RESULTS => {
                let id = take_u64(&mut body)?;
                let count = take_count(&mut body, 5)?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    if body.is_empty() {
                        return Err(FrameError::Malformed("truncated item"));
                    }
                    let code = body.get_u8();
                    let status =
                        ItemStatus::from_code(code).ok_or(FrameError::UnknownStatus(code))?;
                    items.push(ItemResult {
                        status,
                        body: take_bytes(&mut body)?,
                    });
                }
                finish(&body, Frame::Results { id, items })
            }
            KIND_STREAM => {
                let id = take_u64(&mut body)?;
                let index = take_u32(&mut body)?;
                let event = take_bytes(&mut body)?;
                finish(
                    &body,
                    Frame::Stream {
                        id,
                        index,
                        body: event,
                    },
                )
            }
            KIND_CANCEL => {
                let id = take_u64(&mut body)?;
                let index = take_u32(&mut body)?;
                finish(&body, Frame::Cancel { id, index })
            }
            other => Err(FrameError::UnknownKind(other)),
        }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0); // patched below, once the body's size is known
        match self {
            Frame::Ready { pid, reads_ids } => {
                out.put_u8(KIND_READY);
                out.put_u32(*pid);
                if *reads_ids {
                    out.put_u8(1);
                }
            }
            Frame::Batch { id, items, ids } if ids.is_empty() => {
                out.put_u8(KIND_BATCH);
                out.put_u64(*id);
                out.put_u32(items.len() as u32);
                for item in items {
                    out.put_u32(item.len() as u32);
                    out.put_slice(item);
                }
            }
            Frame::Batch { id, items, ids } => {
                out.put_u8(KIND_BATCH_IDS);
                out.put_u64(*id);
                out.put_u32(items.len() as u32);
                let none = ItemIds::default();
                for (i, item) in items.iter().enumerate() {
                    out.put_u32(item.len() as u32);
                    out.put_slice(item);
                    let ids = ids.get(i).unwrap_or(&none);
                    put_short(out, &ids.request_id);
                    put_short(out, &ids.trace_id);
                }
            }
            Frame::Results { id, items } => {
                out.put_u8(KIND_RESULTS);
                out.put_u64(*id);
                out.put_u32(items.len() as u32);
                for item in items {
                    out.put_u8(item.status.code());
                    out.put_u32(item.body.len() as u32);
                    out.put_slice(&item.body);
                }
            }
            Frame::Stream { id, index, body } => {
                out.put_u8(KIND_STREAM);
                out.put_u64(*id);
                out.put_u32(*index);
                out.put_u32(body.len() as u32);
                out.put_slice(body);
            }
            Frame::Cancel { id, index } => {
                out.put_u8(KIND_CANCEL);
                out.put_u64(*id);
                out.put_u32(*index);
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out.freeze()
    }
}

fn finish(rest: &Bytes, frame: Frame) -> Result<Frame, FrameError> {
    if rest.is_empty() {
        Ok(frame)
    } else {
        Err(FrameError::Malformed("trailing bytes"))
    }
}

fn take_u32(buf: &mut Bytes) -> Result<u32, FrameError> {
    if buf.remaining() < 4 {
        return Err(FrameError::Malformed("truncated u32"));
    }
    Ok(buf.get_u32())
}

fn take_u64(buf: &mut Bytes) -> Result<u64, FrameError> {
    if buf.remaining() < 8 {
        return Err(FrameError::Malformed("truncated u64"));
    }
    Ok(buf.get_u64())
}

/// Reads an item count and rejects one that could not fit in what is left, so a lying
/// count cannot make `Vec::with_capacity` allocate.
fn take_count(buf: &mut Bytes, min_item_size: usize) -> Result<usize, FrameError> {
    let count = take_u32(buf)? as usize;
    if count.saturating_mul(min_item_size) > buf.remaining() {
        return Err(FrameError::Malformed("item count exceeds frame"));
    }
    Ok(count)
}

/// An id with a u16 length; one that does not fit travels empty.
fn put_short(out: &mut BytesMut, id: &[u8]) {
    match u16::try_from(id.len()) {
        Ok(len) => {
            out.put_u16(len);
            out.put_slice(id);
        }
        Err(_) => out.put_u16(0),
    }
}

fn take_short(buf: &mut Bytes) -> Result<Bytes, FrameError> {
    if buf.remaining() < 2 {
        return Err(FrameError::Malformed("truncated u16"));
    }
    let len = buf.get_u16() as usize;
    if len > buf.remaining() {
        return Err(FrameError::Malformed("id length exceeds frame"));
    }
    let id = buf.split_to(len);
    if std::str::from_utf8(&id).is_err() {
        return Err(FrameError::Malformed("id is not UTF-8"));
    }
    Ok(id)
}

fn take_bytes(buf: &mut Bytes) -> Result<Bytes, FrameError> {
    let len = take_u32(buf)? as usize;
    if len > buf.remaining() {
        return Err(FrameError::Malformed("item length exceeds frame"));
    }
    Ok(buf.split_to(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn golden() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/golden/frames.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn frame_from_json(v: &Value) -> Frame {
        let text = |x: &Value| Bytes::from(x.as_str().unwrap().as_bytes().to_vec());
        match v["kind"].as_str().unwrap() {
            "ready" => Frame::Ready {
                pid: v["pid"].as_u64().unwrap() as u32,
                reads_ids: v["reads_ids"].as_bool().unwrap_or(false),
            },
            "batch" => Frame::Batch {
                id: v["id"].as_u64().unwrap(),
                items: v["items"].as_array().unwrap().iter().map(text).collect(),
                ids: v
                    .get("ids")
                    .map(|ids| {
                        ids.as_array()
                            .unwrap()
                            .iter()
                            .map(|pair| ItemIds {
                                request_id: text(&pair[0]),
                                trace_id: text(&pair[1]),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            },
            "results" => Frame::Results {
                id: v["id"].as_u64().unwrap(),
                items: v["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|it| ItemResult {
                        status: it["status"]
                            .as_str()
                            .unwrap()
                            .parse::<Outcome>()
                            .unwrap()
                            .try_into()
                            .unwrap(),
                        body: text(&it["body"]),
                    })
                    .collect(),
            },
            "stream" => Frame::Stream {
                id: v["id"].as_u64().unwrap(),
                index: v["index"].as_u64().unwrap() as u32,
                body: text(&v["body"]),
            },
            "cancel" => Frame::Cancel {
                id: v["id"].as_u64().unwrap(),
                index: v["index"].as_u64().unwrap() as u32,
            },
            other => panic!("unknown kind {other}"),
        }
    }

    #[test]
    fn golden_vectors_encode_and_decode() {
        let g = golden();
        for case in g["valid"].as_array().unwrap() {
            let bytes = hex(case["hex"].as_str().unwrap());
            let frame = frame_from_json(&case["frame"]);
            assert_eq!(frame.to_bytes().as_ref(), &bytes[..], "{}", case["name"]);
            assert_eq!(
                Frame::check(&bytes, DEFAULT_MAX_FRAME),
                Ok(Some(bytes.len()))
            );
            assert_eq!(Frame::parse(&bytes).unwrap(), frame, "{}", case["name"]);
        }
    }

    #[test]
    fn golden_invalid_vectors_are_rejected() {
        let g = golden();
        let max = g["max_frame"].as_u64().unwrap() as usize;
        for case in g["invalid"].as_array().unwrap() {
            let bytes = hex(case["hex"].as_str().unwrap());
            let name = case["name"].as_str().unwrap();
            let result = Frame::check(&bytes, max).and_then(|n| match n {
                Some(n) => Frame::parse(&bytes[..n]).map(|_| ()),
                None => Err(FrameError::Malformed("incomplete")),
            });
            assert!(result.is_err(), "{name} was accepted");
        }
    }

    #[test]
    fn partial_frames_need_more_bytes() {
        let bytes = Frame::Batch {
            id: 7,
            items: vec![Bytes::from_static(b"abc")],
            ids: vec![ItemIds::default()],
        }
        .to_bytes();
        for cut in 0..bytes.len() {
            assert_eq!(Frame::check(&bytes[..cut], DEFAULT_MAX_FRAME), Ok(None));
        }
    }

    #[test]
    fn parse_rejects_what_check_would_not_have_sized() {
        let ready = Frame::Ready {
            pid: 9,
            reads_ids: false,
        }
        .to_bytes();
        for cut in 0..ready.len() {
            assert!(Frame::parse(&ready[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = ready.to_vec();
        longer.push(0);
        assert!(Frame::parse(&longer).is_err());
        assert_eq!(Frame::parse(&[0, 0, 0, 0]), Err(FrameError::Empty));
    }

    #[test]
    fn item_statuses_are_the_four_a_worker_can_report() {
        for code in 0..=3 {
            let status = ItemStatus::from_code(code).unwrap();
            assert_eq!(status.code(), code);
            assert_eq!(ItemStatus::try_from(Outcome::from(status)), Ok(status));
        }
        assert_eq!(ItemStatus::from_code(4), None);
        for agent_only in [Outcome::Timeout, Outcome::Overloaded, Outcome::Unavailable] {
            assert_eq!(ItemStatus::try_from(agent_only), Err(agent_only));
        }
    }

    #[test]
    fn oversized_length_is_rejected_before_allocation() {
        let bytes = [0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            Frame::check(&bytes, 1024),
            Err(FrameError::TooLarge {
                len: 0xffff_ffff,
                max: 1024
            })
        );
    }
}
