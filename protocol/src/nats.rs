//! How every natserve process reaches NATS: the credentials and TLS it connects with,
//! the first connect with retries, then reconnect forever, logging what the client
//! reports (a slow consumer there means messages were dropped).
//!
//! Secrets never reach a log: every URL this module logs or puts in an error goes
//! through [`redact`] first, and credentials are taken out of the server addresses
//! before the client sees them (async-nats 0.51 ignores credentials in a URL anyway:
//! they become explicit connect options here).

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event, ServerAddr};
use tokio::time::Instant;
use tracing::{info, warn};

/// Messages a subscription buffers before the client drops them as a slow consumer. An
/// ingress's reply subscription carries every reply in flight, so it is generous; the
/// channel allocates as it fills, not up front.
pub const SUBSCRIPTION_CAPACITY: usize = 1 << 20;
/// Pause between first-connect attempts.
pub const RETRY_DELAY: Duration = Duration::from_millis(250);

/// How a process authenticates to NATS and checks its certificate, beside the user and
/// password (`nats://user:pw@host`) or token (`nats://token@host`) a URL may carry. The
/// same flags and variables in both binaries and the Python launcher.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct NatsSecurity {
    /// NATS credentials file (`.creds`: a user JWT and its nkey seed).
    #[arg(long = "nats-creds", env = "NATSERVE_NATS_CREDS", value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// File holding an nkey seed (`SU...`) to authenticate with.
    #[arg(long = "nats-nkey", env = "NATSERVE_NATS_NKEY", value_name = "FILE")]
    pub nkey: Option<PathBuf>,
    /// CA certificate (PEM) that signed the NATS server's certificate; turns TLS on.
    #[arg(
        long = "nats-tls-ca",
        env = "NATSERVE_NATS_TLS_CA",
        value_name = "FILE"
    )]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --nats-tls-key.
    #[arg(
        long = "nats-tls-cert",
        env = "NATSERVE_NATS_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --nats-tls-cert.
    #[arg(
        long = "nats-tls-key",
        env = "NATSERVE_NATS_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
}

/// Who a process is on the NATS connection: its client name and the prefix of its
/// inboxes (JetStream acks, pulled messages and KV watches arrive there), so a server's
/// permissions can let each role read only its own (`<ns>.inbox.<role>.>`).
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub inbox_prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("--nats {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("{flag} {path}: {reason}")]
    File {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("nats at {url} refused this process's credentials: {source}")]
    Refused {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("could not connect to nats at {url} within {waited_ms} ms: {source}")]
    Unreachable {
        url: String,
        waited_ms: u128,
        source: async_nats::ConnectError,
    },
}

/// `text` with the password or token of every URL in it replaced by `***`:
/// `nats://user:***@host:4222`, `nats://***@host:4222`. Works on a URL, a comma-separated
/// list of them, or a whole message quoting one, parsed or not, so it is safe on any
/// error text.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let Some(i) = rest.find("://") else {
            out.push_str(rest);
            return out;
        };
        let (before, after) = rest.split_at(i + 3);
        out.push_str(before);
        let end = after
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | ',' | '\'' | '"' | '`') || c.is_whitespace()
            })
            .unwrap_or(after.len());
        let (authority, tail) = after.split_at(end);
        match authority.rfind('@') {
            Some(at) => {
                let (userinfo, host) = authority.split_at(at);
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push_str(":***");
                    }
                    None => out.push_str("***"),
                }
                out.push_str(host);
            }
            None => out.push_str(authority),
        }
        rest = tail;
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a URL's user info stands for.
#[derive(Clone, PartialEq, Eq)]
enum UrlAuth {
    UserPassword(String, String),
    Token(String),
}

/// The server addresses of `--nats` without their credentials, and those credentials.
struct Servers {
    addrs: Vec<ServerAddr>,
    auth: Option<UrlAuth>,
}

fn parse(urls: &str) -> Result<Servers, ConnectError> {
    let bad = |url: &str, reason: String| ConnectError::Url {
        url: redact(url),
        reason,
    };
    let mut addrs = Vec::new();
    let mut auth: Option<UrlAuth> = None;
    for url in urls.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let addr = url.parse::<ServerAddr>().map_err(|e| {
            // The parser's message may quote the URL: keep only what names no secret.
            let reason = if url.contains('@') {
                "not a valid NATS URL".to_owned()
            } else {
                e.to_string()
            };
            bad(url, reason)
        })?;
        let mut inner = addr.into_inner();
        let found = match (inner.username(), inner.password()) {
            ("", None) => None,
            (user, Some(password)) => Some(UrlAuth::UserPassword(
                percent_decode(user),
                percent_decode(password),
            )),
            (token, None) => Some(UrlAuth::Token(percent_decode(token))),
        };
        if let Some(found) = found {
            if auth.as_ref().is_some_and(|a| *a != found) {
                return Err(bad(
                    urls,
                    "the servers carry different credentials: give the same on every URL"
                        .to_owned(),
                ));
            }
            auth = Some(found);
        }
        // Setting empty credentials on a nats:// URL cannot fail.
        let _ = inner.set_username("");
        let _ = inner.set_password(None);
        addrs.push(ServerAddr::from_url(inner).map_err(|e| bad(url, e.to_string()))?);
    }
    if addrs.is_empty() {
        return Err(bad(urls, "no server url given".to_owned()));
    }
    Ok(Servers { addrs, auth })
}

/// Checks `--nats`: one URL or a comma-separated list. The error names no secret.
pub fn parse_servers(urls: &str) -> Result<Vec<ServerAddr>, String> {
    parse(urls).map(|s| s.addrs).map_err(|e| e.to_string())
}

fn readable(flag: &'static str, path: &Path) -> Result<(), ConnectError> {
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|e| ConnectError::File {
            flag,
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// The connect options for `servers` and `security`, all files read and checked, so a
/// wrong path fails at once instead of on every retry.
async fn options(
    identity: &Identity,
    auth: Option<&UrlAuth>,
    security: &NatsSecurity,
) -> Result<ConnectOptions, ConnectError> {
    let given = [
        auth.map(|a| match a {
            UrlAuth::UserPassword(..) => "a user and password in --nats",
            UrlAuth::Token(_) => "a token in --nats",
        }),
        security.creds.as_ref().map(|_| "--nats-creds"),
        security.nkey.as_ref().map(|_| "--nats-nkey"),
    ];
    let given: Vec<&str> = given.into_iter().flatten().collect();
    if given.len() > 1 {
        return Err(ConnectError::Conflict(format!(
            "give one way to authenticate to nats, not {}",
            given.join(" and ")
        )));
    }
    let mut options = ConnectOptions::new()
        .name(&identity.name)
        .custom_inbox_prefix(&identity.inbox_prefix)
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .connection_timeout(Duration::from_secs(2))
        // Once connected, never give up: without NATS an ingress answers 503 and an agent
        // pulls nothing until it heals.
        .max_reconnects(None)
        .event_callback(|event| async move { log_event(event) });
    match auth {
        Some(UrlAuth::UserPassword(user, password)) => {
            options = options.user_and_password(user.clone(), password.clone());
        }
        Some(UrlAuth::Token(token)) => options = options.token(token.clone()),
        None => {}
    }
    if let Some(path) = &security.creds {
        let file_error = |reason: String| ConnectError::File {
            flag: "--nats-creds",
            path: path.clone(),
            reason,
        };
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| file_error(e.to_string()))?;
    }
    if let Some(path) = &security.nkey {
        let seed = std::fs::read_to_string(path).map_err(|e| ConnectError::File {
            flag: "--nats-nkey",
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let seed = seed.trim();
        if !seed.starts_with('S') {
            return Err(ConnectError::File {
                flag: "--nats-nkey",
                path: path.clone(),
                reason: "expected an nkey seed (a line starting with S, e.g. SU...)".to_owned(),
            });
        }
        options = options.nkey(seed.to_owned());
    }
    if let Some(ca) = &security.tls_ca {
        readable("--nats-tls-ca", ca)?;
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&security.tls_cert, &security.tls_key) {
        readable("--nats-tls-cert", cert)?;
        readable("--nats-tls-key", key)?;
        options = options
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    Ok(options)
}

fn log_event(event: Event) {
    match event {
        Event::Connected => info!("nats connected"),
        Event::Disconnected => warn!("nats disconnected, reconnecting"),
        Event::SlowConsumer(sid) => {
            warn!(
                sid,
                "nats slow consumer: messages were dropped, replies may be lost"
            )
        }
        Event::LameDuckMode => warn!("nats server entered lame duck mode"),
        Event::Draining => info!("nats client draining"),
        Event::Closed => info!("nats connection closed"),
        Event::ServerError(e) => warn!(error = %e, "nats server error"),
        Event::ClientError(e) => warn!(error = %e, "nats client error"),
    }
}

/// How long start-up retries the answers a JetStream cluster gives while it settles: a
/// cluster just formed may not know all its peers yet ("no suitable peers for placement"),
/// and a stream or bucket another process has just made may have no leader for a moment
/// (its reads answer "no responders", its requests time out).
pub const SETTLE_WITHIN: Duration = Duration::from_secs(20);

/// Runs start-up `step` again while it fails with an error `may_pass` says NATS may get
/// over, for up to [`SETTLE_WITHIN`]; every process's start-up steps go through it, so
/// natserve and a JetStream cluster can be started together.
pub async fn settled<T, E, F, Fut>(
    step_name: &str,
    may_pass: impl Fn(&E) -> bool,
    mut step: F,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    loop {
        match step().await {
            Err(e) if may_pass(&e) && started.elapsed() < SETTLE_WITHIN => {
                warn!(step = step_name, error = %e, "jetstream not settled yet, retrying");
                tokio::time::sleep(RETRY_DELAY).await;
            }
            done => return done,
        }
    }
}

/// Connects to `urls` as `identity`, retrying the first connection for up to `within`.
///
/// Fails at once on a bad URL, unreadable credential or certificate files, or two ways
/// to authenticate; an authentication the server refuses fails once `within` is over.
pub async fn connect(
    urls: &str,
    security: &NatsSecurity,
    identity: &Identity,
    within: Duration,
) -> Result<Client, ConnectError> {
    let shown = redact(urls);
    let servers = parse(urls)?;
    if security.tls_cert.is_some() != security.tls_key.is_some() {
        return Err(ConnectError::Conflict(
            "--nats-tls-cert and --nats-tls-key go together: give both or neither".to_owned(),
        ));
    }
    let options = options(identity, servers.auth.as_ref(), security).await?;
    let started = Instant::now();
    let mut last_warned: Option<Instant> = None;
    loop {
        match options.clone().connect(servers.addrs.clone()).await {
            Ok(client) => {
                info!(url = %shown, "connected to nats");
                return Ok(client);
            }
            // Retrying cannot fix credentials: say so at once.
            Err(source) if source.kind() == ConnectErrorKind::AuthorizationViolation => {
                return Err(ConnectError::Refused { url: shown, source });
            }
            Err(e) if started.elapsed() + RETRY_DELAY < within => {
                if !matches!(last_warned, Some(t) if t.elapsed() < Duration::from_secs(2)) {
                    warn!(url = %shown, error = %e, "nats not reachable yet, retrying");
                    last_warned = Some(Instant::now());
                }
                tokio::time::sleep(RETRY_DELAY).await;
            }
            Err(source) => {
                return Err(ConnectError::Unreachable {
                    url: shown,
                    waited_ms: within.as_millis(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            name: "t".to_owned(),
            inbox_prefix: "natserve.inbox.t".to_owned(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn start_up_retries_what_may_pass_and_not_the_rest() {
        let tries = std::cell::Cell::new(0);
        let passing = settled(
            "t",
            |e: &&str| *e == "settling",
            || {
                tries.set(tries.get() + 1);
                let n = tries.get();
                async move {
                    if n < 3 {
                        Err("settling")
                    } else {
                        Ok(n)
                    }
                }
            },
        );
        assert_eq!(passing.await, Ok(3));
        tries.set(0);
        let refused = settled(
            "t",
            |e: &&str| *e == "settling",
            || {
                tries.set(tries.get() + 1);
                async { Err::<(), _>("bad setting") }
            },
        );
        assert_eq!((refused.await, tries.get()), (Err("bad setting"), 1));
        // A cluster that never settles is given up on after SETTLE_WITHIN.
        let started = Instant::now();
        let never = settled("t", |_: &&str| true, || async { Err::<(), _>("settling") });
        assert_eq!(never.await, Err("settling"));
        assert!(started.elapsed() >= SETTLE_WITHIN);
        assert!(started.elapsed() < SETTLE_WITHIN + 2 * RETRY_DELAY);
    }

    #[test]
    fn parses_one_or_many_servers() {
        assert_eq!(parse_servers("nats://127.0.0.1:4222").unwrap().len(), 1);
        assert_eq!(parse_servers("nats://a:1, nats://b:2").unwrap().len(), 2);
        assert!(parse_servers("").is_err());
        assert!(parse_servers("nats://a:notaport").is_err());
    }

    #[test]
    fn redacts_passwords_and_tokens() {
        assert_eq!(redact("nats://u:s3cret@h:4222"), "nats://u:***@h:4222");
        assert_eq!(redact("nats://t0ken@h:4222/x"), "nats://***@h:4222/x");
        assert_eq!(redact("nats://h:4222"), "nats://h:4222");
        assert_eq!(
            redact("error: invalid value 'nats://u:pw@h:x' for '--nats <NATS>'"),
            "error: invalid value 'nats://u:***@h:x' for '--nats <NATS>'"
        );
        assert_eq!(
            redact("nats://a:x@h1:1, tls://b:y@h2:2"),
            "nats://a:***@h1:1, tls://b:***@h2:2"
        );
        // The password may itself hold an '@' (unencoded): nothing of it shows.
        assert_eq!(redact("nats://u:p@ss@h:1"), "nats://u:***@h:1");
    }

    #[test]
    fn takes_credentials_out_of_the_url() {
        let s = parse("nats://ingress:p%40ss@127.0.0.1:4222").unwrap();
        assert!(s.auth == Some(UrlAuth::UserPassword("ingress".into(), "p@ss".into())));
        assert_eq!(s.addrs[0].as_url_str(), "nats://127.0.0.1:4222");
        let s = parse("nats://tok@127.0.0.1:4222, nats://tok@127.0.0.2:4222").unwrap();
        assert!(s.auth == Some(UrlAuth::Token("tok".into())));
        assert!(s.addrs.iter().all(|a| !a.has_user_pass()));
        let err = parse("nats://a:x@h:1,nats://b:y@h:2").err().unwrap();
        assert!(!err.to_string().contains(":x@"), "{err}");
        assert!(err.to_string().contains("different credentials"), "{err}");
    }

    #[test]
    fn url_errors_name_no_secret() {
        let err = parse_servers("nats://u:s3cret@h:notaport").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(err.contains("nats://u:***@h:notaport"), "{err}");
    }

    #[tokio::test]
    async fn refuses_two_ways_to_authenticate_and_missing_files() {
        let security = NatsSecurity {
            nkey: Some("/nonexistent/seed".into()),
            ..NatsSecurity::default()
        };
        let within = Duration::from_millis(100);
        let err = connect("nats://u:p@127.0.0.1:1", &security, &identity(), within)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("not a user and password in --nats and --nats-nkey"),
            "{err}"
        );
        let err = connect("nats://127.0.0.1:1", &security, &identity(), within)
            .await
            .unwrap_err();
        assert!(
            err.to_string().starts_with("--nats-nkey /nonexistent/seed"),
            "{err}"
        );
        let security = NatsSecurity {
            tls_cert: Some("/x".into()),
            ..NatsSecurity::default()
        };
        let err = connect("nats://127.0.0.1:1", &security, &identity(), within)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("go together"), "{err}");
    }

    #[tokio::test]
    async fn unusable_credential_files_fail_naming_their_flag() {
        let dir = std::env::temp_dir().join(format!("natserve-nats-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("garbage");
        std::fs::write(&garbage, "not a credential\n").unwrap();
        let within = Duration::from_millis(100);
        for (security, flag) in [
            (
                NatsSecurity {
                    creds: Some(garbage.clone()),
                    ..NatsSecurity::default()
                },
                "--nats-creds",
            ),
            (
                NatsSecurity {
                    nkey: Some(garbage.clone()),
                    ..NatsSecurity::default()
                },
                "--nats-nkey",
            ),
            (
                NatsSecurity {
                    tls_ca: Some(dir.join("missing.pem")),
                    ..NatsSecurity::default()
                },
                "--nats-tls-ca",
            ),
        ] {
            let err = connect("nats://127.0.0.1:1", &security, &identity(), within)
                .await
                .unwrap_err();
            assert!(err.to_string().starts_with(flag), "{err}");
            assert!(!err.to_string().contains("not a credential"), "{err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn gives_up_after_the_first_connect_window() {
        // Nothing listens on port 1.
        let started = std::time::Instant::now();
        let err = connect(
            "nats://u:s3cret@127.0.0.1:1",
            &NatsSecurity::default(),
            &identity(),
            Duration::from_millis(600),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("within 600 ms"), "{err}");
        assert!(
            err.to_string().contains("nats://u:***@127.0.0.1:1"),
            "{err}"
        );
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
