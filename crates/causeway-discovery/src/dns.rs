//! The authoritative DNS server for the zone, answering from the registry.
//!
//! Names served (zone `internal.`):
//! - `internal.` SOA and NS; `ns.internal.` A/AAAA: the DNS listen address.
//! - `<service>.internal.` A/AAAA: the distinct IPs of the service's live instances.
//! - `<instance>.<service>.internal.` A/AAAA: that instance's IP.
//! - `_https._tcp.<service>.internal.` SRV: one per live instance, to its `addr` port.
//! - `_admin._tcp.<service>.internal.` SRV: one per live instance with an `admin_addr`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use causeway_core::registry_api::RegisteredInstance;
use hickory_proto::op::{Edns, Header, HeaderCounts, LowerQuery, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::DiscoveryError;
use crate::registry::Registry;

/// The label of the name server's own host name, `ns.<zone>`.
pub(crate) const NS_LABEL: &str = "ns";

/// SOA timers. There are no secondaries, so refresh/retry/expire only need to be plausible.
const SOA_REFRESH: i32 = 3600;
const SOA_RETRY: i32 = 600;
const SOA_EXPIRE: i32 = 86_400;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct QueryLabels {
    pub qtype: String,
    pub rcode: String,
    pub protocol: String,
}

/// The zone's fixed facts.
#[derive(Debug)]
pub(crate) struct Zone {
    /// Lowercase, fully qualified.
    origin: Name,
    ttl: u32,
    /// What `ns.<zone>` resolves to.
    ns_ip: IpAddr,
}

impl Zone {
    pub(crate) fn new(zone: &str, ttl: u32, dns_ip: IpAddr) -> Result<Self, DiscoveryError> {
        let invalid = |message: String| DiscoveryError::InvalidZone {
            zone: zone.to_string(),
            message,
        };
        let trimmed = zone.trim_end_matches('.');
        if trimmed.is_empty() {
            return Err(invalid("the root zone cannot be served".into()));
        }
        let mut origin = Name::from_ascii(trimmed).map_err(|err| invalid(err.to_string()))?;
        origin.set_fqdn(true);
        // Listening on the unspecified address still needs a reachable address for `ns`.
        let ns_ip = match dns_ip {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Ok(Self {
            origin: origin.to_lowercase(),
            ttl,
            ns_ip,
        })
    }

    /// `<label>.<zone>` for labels from the registry (DNS labels, so this does not fail).
    fn name(&self, labels: &[&str]) -> Option<Name> {
        let relative = Name::from_labels(labels.iter().map(|l| l.as_bytes())).ok()?;
        relative.append_domain(&self.origin).ok()
    }

    fn soa(&self, serial: u32) -> Record {
        let mname = self
            .name(&[NS_LABEL])
            .unwrap_or_else(|| self.origin.clone());
        let rname = self
            .name(&["hostmaster"])
            .unwrap_or_else(|| self.origin.clone());
        let soa = SOA::new(
            mname,
            rname,
            serial,
            SOA_REFRESH,
            SOA_RETRY,
            SOA_EXPIRE,
            // Negative answers are cached for min(SOA TTL, minimum): keep them as short-lived
            // as positive ones, so a newly registered service shows up within one TTL.
            self.ttl,
        );
        Record::from_rdata(self.origin.clone(), self.ttl, RData::SOA(soa))
    }

    fn address(&self, name: &Name, ip: IpAddr) -> Record {
        let data = match ip {
            IpAddr::V4(ip) => RData::A(A(ip)),
            IpAddr::V6(ip) => RData::AAAA(AAAA(ip)),
        };
        Record::from_rdata(name.clone(), self.ttl, data)
    }
}

/// What to send back for one question.
#[derive(Debug, Default)]
pub(crate) struct Answer {
    pub rcode: ResponseCode,
    pub authoritative: bool,
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
    pub additionals: Vec<Record>,
}

impl Answer {
    fn error(rcode: ResponseCode) -> Self {
        Self {
            rcode,
            ..Self::default()
        }
    }
}

/// The records that exist at one name (of every type), and the addresses of any SRV targets.
struct Node {
    records: Vec<Record>,
    additionals: Vec<Record>,
}

impl Node {
    fn empty() -> Self {
        Self {
            records: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

/// Which listener an SRV name points at.
#[derive(Clone, Copy)]
enum SrvKind {
    Https,
    Admin,
}

/// Answers DNS questions from the registry; used by hickory's UDP and TCP loops alike.
pub(crate) struct DnsHandler {
    zone: Zone,
    registry: Registry,
    queries: Family<QueryLabels, Counter>,
}

impl DnsHandler {
    pub(crate) fn new(
        zone: Zone,
        registry: Registry,
        queries: Family<QueryLabels, Counter>,
    ) -> Self {
        Self {
            zone,
            registry,
            queries,
        }
    }

    /// The answer to one question; pure apart from reading the registry.
    pub(crate) fn answer(&self, query: &LowerQuery) -> Answer {
        // Lowercased by hickory, so matching is case-insensitive.
        let name: Name = query.name().into();
        if !self.zone.origin.zone_of(&name) {
            return Answer::error(ResponseCode::Refused);
        }
        if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
            return Answer::error(ResponseCode::Refused);
        }
        let relative = usize::from(name.num_labels() - self.zone.origin.num_labels());
        let labels: Option<Vec<&str>> = name
            .iter()
            .take(relative)
            .map(|label| std::str::from_utf8(label).ok())
            .collect();
        // Answer records carry the name as the client spelled it (some clients check case).
        let owner = query.original().name().clone();
        let node = labels.and_then(|labels| self.node(&labels, &owner));
        let serial = self.registry.serial();
        let Some(node) = node else {
            return Answer {
                rcode: ResponseCode::NXDomain,
                authoritative: true,
                authority: vec![self.zone.soa(serial)],
                ..Answer::default()
            };
        };
        let qtype = query.query_type();
        let answers: Vec<Record> = node
            .records
            .into_iter()
            .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
            .collect();
        if answers.is_empty() {
            // NODATA: the name exists, but not with this type.
            return Answer {
                rcode: ResponseCode::NoError,
                authoritative: true,
                authority: vec![self.zone.soa(serial)],
                ..Answer::default()
            };
        }
        let wants_glue = answers
            .iter()
            .any(|r| matches!(r.record_type(), RecordType::SRV | RecordType::NS));
        Answer {
            rcode: ResponseCode::NoError,
            authoritative: true,
            answers,
            authority: Vec::new(),
            additionals: if wants_glue {
                node.additionals
            } else {
                Vec::new()
            },
        }
    }

    /// The records at a name below the zone apex (`labels` are relative to it, leftmost first);
    /// None if the name does not exist.
    fn node(&self, labels: &[&str], owner: &Name) -> Option<Node> {
        let zone = &self.zone;
        match labels {
            [] => {
                let ns_name = zone.name(&[NS_LABEL])?;
                let ns =
                    Record::from_rdata(owner.clone(), zone.ttl, RData::NS(NS(ns_name.clone())));
                Some(Node {
                    records: vec![zone.soa(self.registry.serial()), ns],
                    additionals: vec![zone.address(&ns_name, zone.ns_ip)],
                })
            }
            [NS_LABEL] => Some(Node {
                records: vec![zone.address(owner, zone.ns_ip)],
                additionals: Vec::new(),
            }),
            [service] => {
                let live = self.live(service)?;
                let ips: BTreeSet<IpAddr> = live.iter().map(|i| i.record.addr.ip()).collect();
                Some(Node {
                    records: ips.into_iter().map(|ip| zone.address(owner, ip)).collect(),
                    additionals: Vec::new(),
                })
            }
            // An empty non-terminal: exists (NODATA) while the service has SRV names below it.
            ["_tcp", service] => self.live(service).map(|_| Node::empty()),
            ["_https", "_tcp", service] => self.srv(service, owner, SrvKind::Https),
            ["_admin", "_tcp", service] => self.srv(service, owner, SrvKind::Admin),
            [instance, service] => {
                let live = self.live(service)?;
                let found = live.iter().find(|i| i.record.instance == *instance)?;
                Some(Node {
                    records: vec![zone.address(owner, found.record.addr.ip())],
                    additionals: Vec::new(),
                })
            }
            _ => None,
        }
    }

    /// The live instances of a service; None (the name does not exist) if there are none.
    fn live(&self, service: &str) -> Option<Vec<RegisteredInstance>> {
        let live = self.registry.live(service);
        (!live.is_empty()).then_some(live)
    }

    fn srv(&self, service: &str, owner: &Name, kind: SrvKind) -> Option<Node> {
        let zone = &self.zone;
        let mut node = Node::empty();
        for instance in self.live(service)? {
            let record = &instance.record;
            let addr = match kind {
                SrvKind::Https => record.addr,
                SrvKind::Admin => match record.admin_addr {
                    Some(addr) => addr,
                    None => continue,
                },
            };
            let Some(target) = zone.name(&[&record.instance, &record.service]) else {
                continue;
            };
            let srv = SRV::new(0, 1, addr.port(), target.clone());
            node.records
                .push(Record::from_rdata(owner.clone(), zone.ttl, RData::SRV(srv)));
            // The target resolves to the instance's `addr` IP (its name's A/AAAA record).
            node.additionals
                .push(zone.address(&target, record.addr.ip()));
        }
        // No instance with such a listener: nothing exists at this name.
        (!node.records.is_empty()).then_some(node)
    }

    fn count(&self, request: &Request, rcode: ResponseCode) {
        let qtype = request
            .queries
            .queries()
            .first()
            .map_or("none", |q| qtype_label(q.query_type()));
        self.queries
            .get_or_create(&QueryLabels {
                qtype: qtype.to_string(),
                rcode: rcode_label(rcode),
                protocol: request.protocol().as_str().to_string(),
            })
            .inc();
    }
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        // RFC 6891: a request with OPT gets an OPT back; we speak EDNS version 0 only.
        let response_edns = request.edns.as_ref().map(|edns| {
            let mut ours = Edns::new();
            ours.set_max_payload(edns.max_payload().max(512));
            ours.set_version(0);
            ours
        });
        let answer = if request.metadata.op_code != OpCode::Query {
            Answer::error(ResponseCode::NotImp)
        } else if request.edns.as_ref().is_some_and(|edns| edns.version() > 0) {
            Answer::error(ResponseCode::BADVERS)
        } else {
            match request.queries.queries() {
                [query] => self.answer(query),
                _ => Answer::error(ResponseCode::FormErr),
            }
        };
        self.count(request, answer.rcode);

        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = answer.authoritative;
        metadata.response_code = answer.rcode;
        let response = MessageResponseBuilder::new(&request.queries, response_edns.as_ref()).build(
            metadata,
            answer.answers.iter(),
            answer.authority.iter(),
            std::iter::empty(),
            answer.additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(err) => {
                tracing::warn!(src = %request.src(), error = %err, "cannot send DNS response");
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

/// Query types as metric labels; anything unusual is lumped together to bound the label set.
fn qtype_label(qtype: RecordType) -> &'static str {
    match qtype {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::SRV => "SRV",
        RecordType::SOA => "SOA",
        RecordType::NS => "NS",
        RecordType::ANY => "ANY",
        RecordType::CNAME => "CNAME",
        RecordType::MX => "MX",
        RecordType::TXT => "TXT",
        RecordType::PTR => "PTR",
        RecordType::HTTPS => "HTTPS",
        _ => "other",
    }
}

/// The conventional mnemonic (`NXDOMAIN`), as dig prints it.
fn rcode_label(rcode: ResponseCode) -> String {
    match rcode {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::BADVERS => "BADVERS".into(),
        other => u16::from(other).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use causeway_core::registry_api::InstanceRecord;
    use hickory_proto::op::Query;

    use super::*;

    fn handler() -> DnsHandler {
        let registry = Registry::new(Duration::from_secs(60));
        for (instance, port, admin) in [
            ("order-service-1", 9001, Some(9101)),
            ("order-service-2", 9002, None),
        ] {
            registry.upsert(InstanceRecord {
                service: "order-service".into(),
                instance: instance.into(),
                addr: ([127, 0, 0, 1], port).into(),
                admin_addr: admin.map(|port| ([127, 0, 0, 1], port).into()),
                pid: None,
            });
        }
        registry.upsert(InstanceRecord {
            service: "user-service".into(),
            instance: "user-service-1".into(),
            addr: "[::1]:9200".parse().unwrap(),
            admin_addr: None,
            pid: None,
        });
        let zone = Zone::new("internal", 5, IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        DnsHandler::new(zone, registry, Family::default())
    }

    fn ask(handler: &DnsHandler, name: &str, qtype: RecordType) -> Answer {
        let query = Query::query(Name::from_ascii(name).unwrap(), qtype);
        handler.answer(&LowerQuery::query(query))
    }

    fn rdata(records: &[Record]) -> Vec<String> {
        records.iter().map(|r| r.data.to_string()).collect()
    }

    #[test]
    fn service_names_resolve_to_distinct_ips() {
        let handler = handler();
        let answer = ask(&handler, "Order-Service.Internal.", RecordType::A);
        assert_eq!(answer.rcode, ResponseCode::NoError);
        assert!(answer.authoritative);
        assert_eq!(rdata(&answer.answers), ["127.0.0.1"]);
        assert_eq!(answer.answers[0].ttl, 5);
        // Answers keep the client's spelling of the name.
        assert_eq!(answer.answers[0].name.to_ascii(), "Order-Service.Internal.");

        let answer = ask(&handler, "user-service.internal.", RecordType::AAAA);
        assert_eq!(rdata(&answer.answers), ["::1"]);
    }

    #[test]
    fn srv_lists_every_instance_with_glue() {
        let handler = handler();
        let answer = ask(
            &handler,
            "_https._tcp.order-service.internal.",
            RecordType::SRV,
        );
        assert_eq!(
            rdata(&answer.answers),
            [
                "0 1 9001 order-service-1.order-service.internal.",
                "0 1 9002 order-service-2.order-service.internal."
            ]
        );
        assert_eq!(answer.additionals.len(), 2);
        assert_eq!(
            answer.additionals[1].name.to_ascii(),
            "order-service-2.order-service.internal."
        );

        let admin = ask(
            &handler,
            "_admin._tcp.order-service.internal.",
            RecordType::SRV,
        );
        assert_eq!(
            rdata(&admin.answers),
            ["0 1 9101 order-service-1.order-service.internal."]
        );
        let none = ask(
            &handler,
            "_admin._tcp.user-service.internal.",
            RecordType::SRV,
        );
        assert_eq!(none.rcode, ResponseCode::NXDomain);
    }

    #[test]
    fn missing_names_and_types_carry_the_soa() {
        let handler = handler();
        let nx = ask(&handler, "nobody.internal.", RecordType::A);
        assert_eq!(nx.rcode, ResponseCode::NXDomain);
        assert_eq!(nx.authority[0].record_type(), RecordType::SOA);
        let nx = ask(
            &handler,
            "order-service-9.order-service.internal.",
            RecordType::A,
        );
        assert_eq!(nx.rcode, ResponseCode::NXDomain);

        let nodata = ask(&handler, "order-service.internal.", RecordType::AAAA);
        assert_eq!(nodata.rcode, ResponseCode::NoError);
        assert!(nodata.answers.is_empty());
        assert_eq!(nodata.authority[0].record_type(), RecordType::SOA);
        let nodata = ask(&handler, "_tcp.order-service.internal.", RecordType::SRV);
        assert_eq!(nodata.rcode, ResponseCode::NoError);
        assert!(nodata.answers.is_empty());

        let refused = ask(&handler, "example.com.", RecordType::A);
        assert_eq!(refused.rcode, ResponseCode::Refused);
        assert!(!refused.authoritative);
    }

    #[test]
    fn apex_has_soa_and_ns() {
        let handler = handler();
        let soa = ask(&handler, "internal.", RecordType::SOA);
        assert_eq!(soa.answers.len(), 1);
        assert!(rdata(&soa.answers)[0].starts_with("ns.internal. hostmaster.internal. "));
        let ns = ask(&handler, "internal.", RecordType::NS);
        assert_eq!(rdata(&ns.answers), ["ns.internal."]);
        assert_eq!(rdata(&ns.additionals), ["127.0.0.1"]);
        let ns_a = ask(&handler, "ns.internal.", RecordType::A);
        assert_eq!(rdata(&ns_a.answers), ["127.0.0.1"]);
    }

    #[test]
    fn zone_names_are_validated() {
        let ip = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        assert!(Zone::new("", 1, ip).is_err());
        assert!(Zone::new(".", 1, ip).is_err());
        let zone = Zone::new("Internal.", 1, ip).unwrap();
        assert_eq!(zone.origin.to_ascii(), "internal.");
        assert_eq!(zone.ns_ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
}
