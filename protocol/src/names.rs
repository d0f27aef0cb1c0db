//! Names derived from a namespace and a route: subjects, streams, consumers, buckets.
//!
//! A route such as `/v1/embed` becomes the slug `v1_embed`; stage `i` of it is served from
//! the work-queue stream `<ns>_work_<slug>_<i>` bound to the subject `<ns>.work.<slug>.<i>`.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("namespace {0:?} must be non-empty and use only letters, digits, '_' and '-'")]
    Namespace(String),
    #[error("route {0:?} must look like /name or /a/b, using only letters, digits, '_' and '-'")]
    Route(String),
}

/// The durable pull consumer every agent of a stage shares.
pub const CONSUMER: &str = "workers";

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The slug of a route: its path without the leading `/`, with `/` turned into `_`.
pub fn route_slug(route: &str) -> Result<String, NameError> {
    let rest = route
        .strip_prefix('/')
        .ok_or_else(|| NameError::Route(route.to_owned()))?;
    if !rest.split('/').all(is_token) {
        return Err(NameError::Route(route.to_owned()));
    }
    Ok(rest.replace('/', "_"))
}

/// All names of one natserve deployment, which a namespace keeps apart from others
/// sharing the same NATS server.
#[derive(Debug, Clone)]
pub struct Names {
    namespace: String,
}

impl Names {
    pub fn new(namespace: &str) -> Result<Self, NameError> {
        if !is_token(namespace) {
            return Err(NameError::Namespace(namespace.to_owned()));
        }
        Ok(Self {
            namespace: namespace.to_owned(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn work_subject(&self, slug: &str, stage: u32) -> String {
        format!("{}.work.{slug}.{stage}", self.namespace)
    }

    pub fn stream(&self, slug: &str, stage: u32) -> String {
        format!("{}_work_{slug}_{stage}", self.namespace)
    }

    /// The stream of the queue at `at` (see [`crate::StageAt`]): the stream of a shared
    /// stage's home serves each of its places.
    pub fn stream_at(&self, at: &crate::StageAt) -> Result<String, NameError> {
        Ok(self.stream(&route_slug(&at.route)?, at.stage))
    }

    pub fn routes_bucket(&self) -> String {
        format!("{}_routes", self.namespace)
    }

    pub fn agents_bucket(&self) -> String {
        format!("{}_agents", self.namespace)
    }

    /// KV bucket of asynchronous jobs' results, keyed by result id.
    pub fn results_bucket(&self) -> String {
        format!("{}_results", self.namespace)
    }

    /// Object store of bodies larger than a NATS message ([`crate::payloads`]).
    pub fn payloads_bucket(&self) -> String {
        format!("{}_payloads", self.namespace)
    }

    /// Core NATS subject on which an ingress names a queued request whose client went
    /// away (payload: the request id, header `X-Deadline`); agents drop it unrun.
    pub fn cancel_subject(&self) -> String {
        format!("{}.cancel", self.namespace)
    }

    /// Prefix of one ingress's reply subjects; it subscribes to `<prefix>.*`.
    pub fn reply_prefix(&self, ingress_id: &str) -> String {
        format!("{}.reply.{ingress_id}", self.namespace)
    }

    /// Whether an agent may publish a reply to `subject` (a work message's `X-Reply-To`).
    /// Only subjects under `<ns>.reply.` are trusted: an agent publishes replies with its
    /// own NATS rights, so a submitter naming any other subject (`$KV.<ns>_routes.<slug>`,
    /// `<ns>.work.<slug>.<i>`, `$JS.API...`) could make it write there. Ingresses use
    /// `<ns>.reply.<ingress id>.<request id>`, `natserve.Client` `<ns>.reply.<client id>.<id>`.
    /// Each token after the prefix must be non-empty, without wildcards or whitespace.
    pub fn is_reply_subject(&self, subject: &str) -> bool {
        let Some(rest) = subject
            .strip_prefix(self.namespace.as_str())
            .and_then(|s| s.strip_prefix(".reply."))
        else {
            return false;
        };
        rest.split('.').all(|token| {
            !token.is_empty()
                && token != "*"
                && token != ">"
                && !token
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        })
    }

    /// Prefix of the NATS inboxes of one role (`ingress`, `agent`, a client's id), where
    /// its JetStream acks, pulled messages and KV watch updates arrive: a server can let
    /// each role subscribe to its own (`<prefix>.>`) and no one read another's.
    pub fn inbox_prefix(&self, role: &str) -> String {
        format!("{}.inbox.{role}", self.namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_routes() {
        assert_eq!(route_slug("/inference").unwrap(), "inference");
        assert_eq!(route_slug("/v1/embed-text").unwrap(), "v1_embed-text");
        for bad in ["", "/", "inference", "/a//b", "/a.b", "/a b", "/a/*", "/a/"] {
            assert_eq!(route_slug(bad), Err(NameError::Route(bad.into())), "{bad}");
        }
    }

    /// `tests/golden/names.json`, which the Python side is tested against too.
    #[test]
    fn golden_names() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/golden/names.json");
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let text = |v: &serde_json::Value| v.as_str().unwrap().to_owned();
        for case in golden["cases"].as_array().unwrap() {
            let n = Names::new(case["namespace"].as_str().unwrap()).unwrap();
            let slug = route_slug(case["route"].as_str().unwrap()).unwrap();
            assert_eq!(slug, text(&case["slug"]));
            for (stage, want) in case["work_subjects"].as_array().unwrap().iter().enumerate() {
                assert_eq!(n.work_subject(&slug, stage as u32), text(want));
            }
            for (stage, want) in case["streams"].as_array().unwrap().iter().enumerate() {
                assert_eq!(n.stream(&slug, stage as u32), text(want));
            }
            assert_eq!(n.routes_bucket(), text(&case["routes_bucket"]));
            assert_eq!(n.agents_bucket(), text(&case["agents_bucket"]));
            assert_eq!(n.results_bucket(), text(&case["results_bucket"]));
            assert_eq!(n.payloads_bucket(), text(&case["payloads_bucket"]));
            assert_eq!(n.cancel_subject(), text(&case["cancel_subject"]));
            let reply = &case["reply_prefix"];
            assert_eq!(
                n.reply_prefix(reply["id"].as_str().unwrap()),
                text(&reply["prefix"])
            );
            let inbox = &case["inbox_prefix"];
            assert_eq!(
                n.inbox_prefix(inbox["role"].as_str().unwrap()),
                text(&inbox["prefix"])
            );
        }
        for bad in golden["invalid_routes"].as_array().unwrap() {
            assert!(route_slug(bad.as_str().unwrap()).is_err(), "{bad}");
        }
        for bad in golden["invalid_namespaces"].as_array().unwrap() {
            assert!(Names::new(bad.as_str().unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn derives_names() {
        let n = Names::new("prod").unwrap();
        assert_eq!(n.work_subject("inference", 1), "prod.work.inference.1");
        assert_eq!(n.stream("inference", 1), "prod_work_inference_1");
        assert_eq!(n.routes_bucket(), "prod_routes");
        assert_eq!(n.agents_bucket(), "prod_agents");
        assert_eq!(n.results_bucket(), "prod_results");
        assert_eq!(n.reply_prefix("abc"), "prod.reply.abc");
        assert_eq!(n.cancel_subject(), "prod.cancel");
        assert_eq!(n.inbox_prefix("agent"), "prod.inbox.agent");
        assert!(Names::new("a.b").is_err());
        assert!(Names::new("").is_err());
    }

    #[test]
    fn replies_are_trusted_only_under_the_reply_prefix() {
        let n = Names::new("prod").unwrap();
        for ok in ["prod.reply.abc.r1", "prod.reply.client-1.x", "prod.reply.a"] {
            assert!(n.is_reply_subject(ok), "{ok}");
        }
        for bad in [
            "$KV.prod_routes.inference",
            "prod.work.inference.0",
            "$JS.API.STREAM.DELETE.prod_work_inference_0",
            "prod.reply",
            "prod.reply.",
            "prod.reply..x",
            "prod.reply.*",
            "prod.reply.>",
            "prod.reply.a b",
            "prod.replyx.a",
            "other.reply.a.b",
            "prodx.reply.a.b",
            "_INBOX.abc",
            "",
        ] {
            assert!(!n.is_reply_subject(bad), "{bad:?}");
        }
        assert!(Names::new("").is_err());
    }
}
