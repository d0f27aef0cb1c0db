//! The outcome a reply carries in its `X-Status` header.
//!
//! This is the protocol's status, not HTTP's: agents and clients speak outcomes, and only
//! the ingress turns them into HTTP status codes.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The body is the serialized result.
    Ok,
    /// The worker raised `ValidationError`.
    ValidationError,
    /// The worker raised `DecodingError` / `ClientError`: the input could not be used.
    ClientError,
    /// The worker raised anything else, or crashed.
    ServerError,
    /// The deadline passed before the request ran (or while it ran).
    Timeout,
    /// A stage's queue was full when the request was handed to it.
    Overloaded,
    /// No worker can take the request (e.g. a stage is not served).
    Unavailable,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Ok,
        Outcome::ValidationError,
        Outcome::ClientError,
        Outcome::ServerError,
        Outcome::Timeout,
        Outcome::Overloaded,
        Outcome::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ValidationError => "validation_error",
            Outcome::ClientError => "client_error",
            Outcome::ServerError => "server_error",
            Outcome::Timeout => "timeout",
            Outcome::Overloaded => "overloaded",
            Outcome::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Outcome {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Outcome {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown outcome {0:?}")]
pub struct UnknownOutcome(pub String);

impl FromStr for Outcome {
    type Err = UnknownOutcome;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Outcome::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| UnknownOutcome(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        for o in Outcome::ALL {
            assert_eq!(o.as_str().parse::<Outcome>().unwrap(), o);
        }
        assert!("teapot".parse::<Outcome>().is_err());
    }
}
