//! Claim checks: a body larger than one NATS message (a request, an intermediate result,
//! a final result) travels through the payloads object store. The message then carries
//! an empty body and the object's name in [`headers::PAYLOAD_OBJECT`]; whoever consumes
//! the message fetches the object and deletes it once the message is settled. The
//! bucket's [`PAYLOADS_MAX_AGE`] is the backstop for anything orphaned (a consumer that
//! died, a put that failed half-way).
//!
//! A body that fits ([`fits_inline`]) never touches the store: the check is a length
//! comparison against the `max_payload` the server announced, so the hot path pays
//! nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::object_store::{self, GetErrorKind, ObjectMetadata, ObjectStore};
use async_nats::jetstream::{self, stream};
use base64::engine::general_purpose::URL_SAFE;
use base64::Engine;
use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tracing::{info, warn};

use crate::{headers, replicas, Names};

/// Bytes of `max_payload` left for the headers of a message: a body up to
/// `max_payload - HEADER_RESERVE` goes inline.
pub const HEADER_RESERVE: usize = 4 * 1024;
/// How long the bucket keeps an object nobody deleted. Every object is consumed within
/// its request's deadline (work past it is answered, never run), so this only has to
/// outlast the longest `--timeout`; a request whose deadline is further out than this
/// may find its payload gone (answered `server_error`).
pub const PAYLOADS_MAX_AGE: Duration = Duration::from_secs(15 * 60);
/// Largest chunk an object is stored in (each chunk is one JetStream message): large
/// enough that a 20 MB body is 40 round trips; smaller where `max_payload` is (a chunk
/// is at most [`inline_limit`]).
pub const MAX_CHUNK: usize = 512 * 1024;

/// The largest body a message may carry inline under the server's `max_payload`.
pub fn inline_limit(max_payload: usize) -> usize {
    max_payload.saturating_sub(HEADER_RESERVE)
}

/// Whether a body of `len` bytes goes inline on `client`'s connection, under the
/// `max_payload` its server announced (NATS's default before it did). Asked for every
/// message: `Client::max_payload` is one atomic load, where `server_info` would copy
/// the server's whole `INFO`, a dozen strings.
pub fn fits_inline(client: &async_nats::Client, len: usize) -> bool {
    match client.max_payload() {
        0 => true,
        max => len <= inline_limit(max),
    }
}

/// What an object holds: the input of stage `i` of a request, or its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    Stage(u32),
    Reply,
}

/// The name of a new object for `request_id`'s `hop`: `<request id>.<stage>.<nonce>` or
/// `<request id>.reply.<nonce>`. The nonce keeps a rerun (a redelivered message) from
/// overwriting an object another process may be reading.
pub fn object_name(request_id: &str, hop: Hop) -> String {
    let nonce = &uuid::Uuid::new_v4().simple().to_string()[..12];
    match hop {
        Hop::Stage(i) => format!("{request_id}.{i}.{nonce}"),
        Hop::Reply => format!("{request_id}.reply.{nonce}"),
    }
}

/// The object a message refers to, if its body is in the store.
pub fn claim(headers: Option<&async_nats::HeaderMap>) -> Option<&str> {
    headers::get(headers, headers::PAYLOAD_OBJECT).filter(|name| !name.is_empty())
}

/// The payloads bucket: memory storage (what it holds is in flight, like the default
/// work queues), objects dropped after [`PAYLOADS_MAX_AGE`], kept on `replicas` servers
/// of a JetStream cluster (0: as many as it has, one when made). Its stream is
/// `OBJ_<bucket>`.
pub fn payloads_bucket_config(names: &Names, replicas: usize) -> object_store::Config {
    object_store::Config {
        bucket: names.payloads_bucket(),
        description: Some("natserve bodies larger than a NATS message, until consumed".into()),
        max_age: PAYLOADS_MAX_AGE,
        storage: stream::StorageType::Memory,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Why a body could not go through the store. The text is what the requester reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("could not store {size} bytes in object store {bucket}: {message}")]
    Store {
        bucket: String,
        size: usize,
        message: String,
    },
    #[error(
        "object {name} of store {bucket} is gone (consumed, expired, or lost with its server)"
    )]
    Gone { bucket: String, name: String },
    #[error("could not fetch object {name} from store {bucket}: {message}")]
    Fetch {
        bucket: String,
        name: String,
        message: String,
    },
}

/// One process's handle on the payloads bucket, opened (or created) on first use and
/// again after a failure, so a broker that restarted without it gets it back.
#[derive(Clone)]
pub struct Payloads {
    js: jetstream::Context,
    config: object_store::Config,
    open: Arc<Mutex<Option<Opened>>>,
}

#[derive(Clone)]
struct Opened {
    store: ObjectStore,
    /// The bucket's stream, to purge a consumed object's metadata.
    stream: stream::Stream,
}

impl std::fmt::Debug for Payloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payloads")
            .field("bucket", &self.config.bucket)
            .finish()
    }
}

impl Payloads {
    /// A handle that makes the bucket with one copy and keeps the copies a bucket it finds
    /// has; [`Payloads::with_replicas`] names them.
    pub fn new(js: jetstream::Context, names: &Names) -> Self {
        Self {
            js,
            config: payloads_bucket_config(names, 0),
            open: Arc::default(),
        }
    }

    /// The same handle, making the bucket on `replicas` servers, and raising one it finds
    /// with fewer ([`replicas::raise`]).
    pub fn with_replicas(mut self, replicas: usize) -> Self {
        self.config.num_replicas = replicas;
        self
    }

    pub fn bucket(&self) -> &str {
        &self.config.bucket
    }

    fn cached(&self) -> Option<Opened> {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn forget(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The bucket, from the cache or opened now; true when it had to be created.
    async fn opened(&self) -> Result<(Opened, bool), String> {
        if let Some(open) = self.cached() {
            return Ok((open, false));
        }
        let bucket = self.config.bucket.as_str();
        let (store, created) = match self.js.get_object_store(bucket).await {
            Ok(store) => (store, false),
            Err(get) => match self.js.create_object_store(self.config.clone()).await {
                Ok(store) => {
                    info!(bucket, "created object store");
                    (store, true)
                }
                // Lost a race with another process: open what it made.
                Err(create) => match self.js.get_object_store(bucket).await {
                    Ok(store) => (store, false),
                    Err(_) => return Err(format!("open failed ({get}), create failed ({create})")),
                },
            },
        };
        let stream = self
            .js
            .get_stream(format!("OBJ_{bucket}"))
            .await
            .map_err(|e| format!("cannot read its stream: {e}"))?;
        if !created {
            replicas::raise(&self.js, stream.cached_info(), self.config.num_replicas).await;
        }
        let open = Opened { store, stream };
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = Some(open.clone());
        Ok((open, created))
    }

    /// Stores `body` as object `name`. A put that fails because the bucket is gone (a
    /// broker restarted with memory storage) makes it again and tries once more.
    pub async fn put(&self, name: &str, body: &[u8]) -> Result<(), PayloadError> {
        let failed = |message: String| PayloadError::Store {
            bucket: self.config.bucket.clone(),
            size: body.len(),
            message,
        };
        let (open, _) = self.opened().await.map_err(failed)?;
        let chunk = match self.js.client().max_payload() {
            0 => MAX_CHUNK,
            max => MAX_CHUNK.min(inline_limit(max)).max(1),
        };
        let first = match put_once(&open.store, name, body, chunk).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        self.forget();
        match self.opened().await {
            Ok((open, true)) => put_once(&open.store, name, body, chunk)
                .await
                .map_err(failed),
            Ok((_, false)) | Err(_) => Err(failed(first)),
        }
    }

    /// The whole body of object `name`.
    pub async fn fetch(&self, name: &str) -> Result<Bytes, PayloadError> {
        let bucket = self.config.bucket.clone();
        let failed = |message: String| PayloadError::Fetch {
            bucket: bucket.clone(),
            name: name.to_owned(),
            message,
        };
        let (open, created) = self.opened().await.map_err(failed)?;
        if created {
            return Err(PayloadError::Gone {
                bucket: bucket.clone(),
                name: name.to_owned(),
            });
        }
        let mut object = match open.store.get(name).await {
            Ok(object) => object,
            Err(e) if e.kind() == GetErrorKind::NotFound => {
                return Err(PayloadError::Gone {
                    bucket: bucket.clone(),
                    name: name.to_owned(),
                })
            }
            Err(e) => {
                self.forget();
                return Err(failed(e.to_string()));
            }
        };
        let mut body = Vec::with_capacity(object.info.size);
        object
            .read_to_end(&mut body)
            .await
            .map_err(|e| failed(e.to_string()))?;
        Ok(Bytes::from(body))
    }

    /// Deletes object `name` and everything it left in the bucket's stream (its chunks
    /// and its metadata, tombstone included), so a consumed object leaves nothing behind.
    /// A failure is logged: the bucket's max age removes the object later.
    pub async fn delete(&self, name: &str) {
        let removed = async {
            let (open, _) = self.opened().await?;
            let info = match open.store.info(name).await {
                Ok(info) => info,
                Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            let bucket = &self.config.bucket;
            for subject in [
                format!("$O.{bucket}.C.{}", info.nuid),
                format!("$O.{bucket}.M.{}", URL_SAFE.encode(name)),
            ] {
                open.stream
                    .purge()
                    .filter(subject)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        };
        if let Err(e) = removed.await {
            warn!(bucket = %self.config.bucket, object = name, error = %e, "could not delete a consumed payload; it expires with the bucket's max age");
            self.forget();
        }
    }
}

async fn put_once(
    store: &ObjectStore,
    name: &str,
    mut body: &[u8],
    chunk: usize,
) -> Result<(), String> {
    let meta = ObjectMetadata {
        name: name.to_owned(),
        chunk_size: Some(chunk),
        ..Default::default()
    };
    store
        .put(meta, &mut body)
        .await
        .map(|_| ())
        .map_err(|e| match std::error::Error::source(&e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_over_the_limit_go_to_the_store() {
        assert_eq!(inline_limit(1024 * 1024), 1024 * 1024 - HEADER_RESERVE);
        assert_eq!(inline_limit(100), 0);
    }

    #[test]
    fn objects_are_named_by_request_and_hop() {
        let a = object_name("r1", Hop::Stage(1));
        let b = object_name("r1", Hop::Stage(1));
        assert!(
            a.starts_with("r1.1.") && a.len() == "r1.1.".len() + 12,
            "{a}"
        );
        assert_ne!(a, b, "a rerun never overwrites an object in use");
        assert!(object_name("r1", Hop::Reply).starts_with("r1.reply."));
    }

    #[test]
    fn a_claim_is_a_non_empty_header() {
        let mut h = async_nats::HeaderMap::new();
        assert_eq!(claim(None), None);
        assert_eq!(claim(Some(&h)), None);
        h.insert(headers::PAYLOAD_OBJECT, "");
        assert_eq!(claim(Some(&h)), None);
        h.insert(headers::PAYLOAD_OBJECT, "r1.0.abc");
        assert_eq!(claim(Some(&h)), Some("r1.0.abc"));
    }

    /// `tests/golden/payloads.json`, which the Python side is tested against too.
    #[test]
    fn golden_payloads() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/golden/payloads.json");
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(golden["header"], headers::PAYLOAD_OBJECT);
        assert_eq!(golden["header_reserve"], HEADER_RESERVE as u64);
        assert_eq!(golden["max_age_s"], PAYLOADS_MAX_AGE.as_secs());
        assert_eq!(golden["storage"], "memory");
        for case in golden["buckets"].as_array().unwrap() {
            let names = Names::new(case["namespace"].as_str().unwrap()).unwrap();
            let config = payloads_bucket_config(&names, 1);
            assert_eq!(config.bucket, case["bucket"].as_str().unwrap());
            assert_eq!(format!("OBJ_{}", config.bucket), case["stream"]);
            assert_eq!(config.storage, stream::StorageType::Memory);
        }
        for case in golden["inline"].as_array().unwrap() {
            let max = case["max_payload"].as_u64().unwrap() as usize;
            assert_eq!(inline_limit(max) as u64, case["limit"].as_u64().unwrap());
        }
        for case in golden["object_names"].as_array().unwrap() {
            let id = case["request_id"].as_str().unwrap();
            let hop = match case["hop"].as_u64() {
                Some(i) => Hop::Stage(i as u32),
                None => Hop::Reply,
            };
            let name = object_name(id, hop);
            let tag = case["hop"]
                .as_u64()
                .map_or("reply".to_owned(), |i| i.to_string());
            let nonce = name
                .strip_prefix(&format!("{id}.{tag}."))
                .unwrap_or_else(|| panic!("{name}"));
            assert!(
                nonce.len() == 12 && nonce.bytes().all(|b| b.is_ascii_hexdigit()),
                "{name}"
            );
        }
    }
}
