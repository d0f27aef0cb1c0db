//! The frame codec spoken between an agent and each Python worker over a Unix socket.
//!
//! ```text
//! frame   = length:u32be kind:u8 body          length counts kind + body
//! READY   kind 1  pid:u32be [reads:u8 = 1|3]  worker -> agent, after __init__ and warm-up
//! BATCH   kind 2  id:u64be count:u32be (len:u32be bytes){count}            agent -> worker
//! BATCH   kind 6  id:u64be count:u32be (len:u32be bytes rlen:u16be request_id
//!                 tlen:u16be trace_id){count}                               agent -> worker
//! BATCH   kind 7  id:u64be count:u32be (len:u32be bytes rlen:u16be request_id
//!                 tlen:u16be trace_id edge:u8){count}                       agent -> worker
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
//! Kind 7 is kind 6 with each item's edge: [`EDGE_FIRST`] when the item is at the first
//! stage of its own route (the worker decodes it from the HTTP body), [`EDGE_LAST`] at
//! the last (it encodes the answer), both or neither. Only a stage that several routes
//! share sends it, and only where those routes place it differently (first in one, in
//! the middle of another); every other batch's items stand where the worker's stage
//! does. A worker that reads it ends its READY with 3 (kind 6 and kind 7) instead of 1.
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
pub const KIND_BATCH_EDGES: u8 = 7;

/// A kind 7 item's edge bit: the item is at the first stage of its route.
pub const EDGE_FIRST: u8 = 1;
/// A kind 7 item's edge bit: the item is at the last stage of its route.
pub const EDGE_LAST: u8 = 2;
/// READY's optional last byte: which batch kinds beyond 2 the worker reads.
const READS_IDS: u8 = 1;
const READS_EDGES: u8 = 3;

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
    /// `reads_ids`: the worker reads BATCH kind 6, `reads_edges` kind 7 too (its
    /// READY's optional last byte: 1, or 3). `reads_edges` implies `reads_ids`.
    Ready {
        pid: u32,
        reads_ids: bool,
        reads_edges: bool,
    },
    /// `ids` is empty (kind 2) or has one entry per item (kind 6); `edges` is empty, or
    /// has one entry per item (kind 7, which carries `ids` as well).
    Batch {
        id: u64,
        items: Vec<Bytes>,
        ids: Vec<ItemIds>,
        edges: Vec<u8>,
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
                let (reads_ids, reads_edges) = match body.first().copied() {
                    None => (false, false),
                    Some(READS_IDS) => (true, false),
                    Some(READS_EDGES) => (true, true),
                    Some(_) => return Err(FrameError::Malformed("unknown READY feature")),
                };
                if !body.is_empty() {
                    body.advance(1);
                }
                finish(
                    &body,
                    Frame::Ready {
                        pid,
                        reads_ids,
                        reads_edges,
                    },
                )
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
                        edges: Vec::new(),
                    },
                )
            }
            KIND_BATCH_IDS | KIND_BATCH_EDGES => {
                let with_edges = kind == KIND_BATCH_EDGES;
                let id = take_u64(&mut body)?;
                let count = take_count(&mut body, 8 + usize::from(with_edges))?;
                if count == 0 {
                    // Without items it is kind 2: one frame, one encoding.
                    return Err(FrameError::Malformed("batch with ids of no item"));
                }
                let mut items = Vec::with_capacity(count);
                let mut ids = Vec::with_capacity(count);
                let mut edges = Vec::with_capacity(if with_edges { count } else { 0 });
                for _ in 0..count {
                    items.push(take_bytes(&mut body)?);
                    ids.push(ItemIds {
                        request_id: take_short(&mut body)?,
                        trace_id: take_short(&mut body)?,
                    });
                    if with_edges {
                        edges.push(take_edge(&mut body)?);
                    }
                }
                finish(
                    &body,
                    Frame::Batch {
                        id,
                        items,
                        ids,
                        edges,
                    },
                )
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
            Frame::Ready {
                pid,
                reads_ids,
                reads_edges,
            } => {
                out.put_u8(KIND_READY);
                out.put_u32(*pid);
                if *reads_edges {
                    out.put_u8(READS_EDGES);
                } else if *reads_ids {
                    out.put_u8(READS_IDS);
                }
            }
            Frame::Batch {
                id,
                items,
                ids,
                edges,
            } if ids.is_empty() && edges.is_empty() => {
                out.put_u8(KIND_BATCH);
                out.put_u64(*id);
                out.put_u32(items.len() as u32);
                for item in items {
                    out.put_u32(item.len() as u32);
                    out.put_slice(item);
                }
            }
            Frame::Batch {
                id,
                items,
                ids,
                edges,
            } => {
                out.put_u8(if edges.is_empty() {
                    KIND_BATCH_IDS
                } else {
                    KIND_BATCH_EDGES
                });
                out.put_u64(*id);
                out.put_u32(items.len() as u32);
                let none = ItemIds::default();
                for (i, item) in items.iter().enumerate() {
                    out.put_u32(item.len() as u32);
                    out.put_slice(item);
                    let ids = ids.get(i).unwrap_or(&none);
                    put_short(out, &ids.request_id);
                    put_short(out, &ids.trace_id);
                    if !edges.is_empty() {
                        out.put_u8(edges.get(i).copied().unwrap_or(0));
                    }
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

fn take_edge(buf: &mut Bytes) -> Result<u8, FrameError> {
    if buf.is_empty() {
        return Err(FrameError::Malformed("truncated edge"));
    }
    let edge = buf.get_u8();
    if edge & !(EDGE_FIRST | EDGE_LAST) != 0 {
        return Err(FrameError::Malformed("unknown edge bits"));
    }
    Ok(edge)
}

fn take_bytes(buf: &mut Bytes) -> Result<Bytes, FrameError> {
    let len = take_u32(buf)? as usize;
    if len > buf.remaining() {
        return Err(FrameError::Malformed("item length exceeds frame"));
    }
    Ok(buf.split_to(len))
}

#[cfg(test)]
mod tests;
