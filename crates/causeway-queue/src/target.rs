use std::path::PathBuf;
use std::time::Duration;

use crate::QueueError;

/// Which kind of broker a backend talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Embedded,
    Amqp,
    Mqtt,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Embedded => "embedded",
            BackendKind::Amqp => "amqp",
            BackendKind::Mqtt => "mqtt",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the broker is, from a URL:
/// - `causeway://127.0.0.1:5390`: Causeway's embedded broker (gRPC over TLS);
/// - `amqp://guest:guest@127.0.0.1:5672/%2f`: RabbitMQ;
/// - `mqtt://127.0.0.1:1883`: an MQTT 5 broker such as Mosquitto.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerTarget {
    Embedded {
        host: String,
        port: u16,
    },
    /// The URL as lapin takes it.
    Amqp {
        url: String,
    },
    Mqtt {
        host: String,
        port: u16,
    },
}

impl BrokerTarget {
    pub fn parse(url: &str) -> Result<Self, QueueError> {
        let invalid = |reason: &str| QueueError::InvalidUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("expected causeway://, amqp:// or mqtt://"))?;
        let host_port = |default_port: u16| -> Result<(String, u16), QueueError> {
            let authority = rest.split(['/', '?']).next().unwrap_or_default();
            if authority.contains('@') {
                return Err(invalid("credentials are not supported for this scheme"));
            }
            let (host, port) = match authority.rsplit_once(':') {
                Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
                    let port = port
                        .parse::<u16>()
                        .map_err(|_| invalid("the port is not a number from 1 to 65535"))?;
                    (host, port)
                }
                _ => (authority, default_port),
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() || port == 0 {
                return Err(invalid("expected host:port"));
            }
            Ok((host.to_string(), port))
        };
        match scheme {
            "causeway" => {
                let (host, port) = host_port(5390)?;
                Ok(BrokerTarget::Embedded { host, port })
            }
            "amqp" => {
                if rest.is_empty() {
                    return Err(invalid("expected a host"));
                }
                Ok(BrokerTarget::Amqp {
                    url: url.to_string(),
                })
            }
            "mqtt" => {
                let (host, port) = host_port(1883)?;
                Ok(BrokerTarget::Mqtt { host, port })
            }
            "amqps" | "mqtts" => Err(invalid(
                "TLS to external brokers is not supported yet; use amqp:// or mqtt:// on a trusted network",
            )),
            _ => Err(invalid("expected causeway://, amqp:// or mqtt://")),
        }
    }

    pub fn kind(&self) -> BackendKind {
        match self {
            BrokerTarget::Embedded { .. } => BackendKind::Embedded,
            BrokerTarget::Amqp { .. } => BackendKind::Amqp,
            BrokerTarget::Mqtt { .. } => BackendKind::Mqtt,
        }
    }

    /// The URL without credentials, for logs and messages.
    pub fn display(&self) -> String {
        match self {
            BrokerTarget::Embedded { host, port } => format!("causeway://{host}:{port}"),
            BrokerTarget::Amqp { url } => match url.split_once('@') {
                Some((_, after)) => format!("amqp://***@{after}"),
                None => url.clone(),
            },
            BrokerTarget::Mqtt { host, port } => format!("mqtt://{host}:{port}"),
        }
    }
}

impl std::fmt::Display for BrokerTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display())
    }
}

/// How a client connects, whatever the backend.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Identifies this client to the broker (AMQP connection name, MQTT client id prefix, the
    /// embedded broker's logs). Unique per process.
    pub client_name: String,
    /// The CA that signed the embedded broker's certificate (the run's local CA).
    pub ca_cert: Option<PathBuf>,
    /// The name the embedded broker's certificate must carry.
    pub server_name: String,
    pub connect_timeout: Duration,
    /// How long a publish waits for the broker's confirmation.
    pub confirm_timeout: Duration,
}

impl ConnectOptions {
    pub fn new(client_name: impl Into<String>) -> Self {
        Self {
            client_name: client_name.into(),
            ca_cert: None,
            server_name: "broker.internal".into(),
            connect_timeout: Duration::from_secs(3),
            confirm_timeout: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_pick_the_backend() {
        assert_eq!(
            BrokerTarget::parse("causeway://127.0.0.1:7000").unwrap(),
            BrokerTarget::Embedded {
                host: "127.0.0.1".into(),
                port: 7000
            }
        );
        assert_eq!(
            BrokerTarget::parse("mqtt://localhost").unwrap(),
            BrokerTarget::Mqtt {
                host: "localhost".into(),
                port: 1883
            }
        );
        assert_eq!(
            BrokerTarget::parse("mqtt://[::1]:1884").unwrap(),
            BrokerTarget::Mqtt {
                host: "::1".into(),
                port: 1884
            }
        );
        let amqp = BrokerTarget::parse("amqp://guest:secret@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(amqp.kind(), BackendKind::Amqp);
        assert_eq!(amqp.display(), "amqp://***@127.0.0.1:5672/%2f");
    }

    #[test]
    fn bad_urls_say_why() {
        for bad in [
            "127.0.0.1:5672",
            "http://x",
            "mqtt://host:notaport",
            "mqtt://host:0",
            "causeway://",
            "mqtts://host",
        ] {
            let err = BrokerTarget::parse(bad).unwrap_err();
            assert!(matches!(err, QueueError::InvalidUrl { .. }), "{bad}: {err}");
        }
    }
}
