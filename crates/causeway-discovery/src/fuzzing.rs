//! Entry points for the fuzz targets in `fuzz/` (not an API): the DNS server's handling of one
//! message, from wire bytes to the wire bytes of each answer, without sockets.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::LazyLock;
use std::time::Duration;

use causeway_core::registry_api::InstanceRecord;
use hickory_proto::op::{LowerQuery, Message, MessageType, OpCode};
use hickory_proto::serialize::binary::BinDecodable;
use prometheus_client::metrics::family::Family;

use crate::dns::{DnsHandler, Zone};
use crate::registry::Registry;

static HANDLER: LazyLock<DnsHandler> = LazyLock::new(|| {
    let registry = Registry::new(Duration::from_secs(3600));
    for (instance, addr, admin) in [
        ("order-service-1", "127.0.0.1:9001", Some("127.0.0.1:9101")),
        ("order-service-2", "[::1]:9002", None),
        ("user-service-1", "127.0.0.2:9200", Some("127.0.0.2:9300")),
    ] {
        let service = instance
            .rsplit_once('-')
            .map(|(service, _)| service)
            .unwrap_or(instance);
        registry.upsert(InstanceRecord {
            service: service.into(),
            instance: instance.into(),
            addr: addr.parse().expect("a literal address"),
            admin_addr: admin.map(|admin| admin.parse().expect("a literal address")),
            pid: None,
        });
    }
    let zone = Zone::new("internal", 5, IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("a valid zone");
    DnsHandler::new(zone, registry, Family::default())
});

/// Parses `data` as a DNS message; answers each question as the server would and encodes the
/// response. Returns how many responses were encoded (a parse failure answers none).
pub fn dns_message(data: &[u8]) -> usize {
    let Ok(request) = Message::from_bytes(data) else {
        return 0;
    };
    let mut encoded = 0;
    for query in request.queries.iter() {
        let answer = HANDLER.answer(&LowerQuery::query(query.clone()));
        let mut response = Message::response(request.metadata.id, OpCode::Query);
        response.metadata.message_type = MessageType::Response;
        response.metadata.response_code = answer.rcode;
        response.add_query(query.clone());
        response.add_answers(answer.answers);
        response.add_authorities(answer.authority);
        response.add_additionals(answer.additionals);
        // Every answer the server builds must encode: a panic or an error here is a bug.
        let bytes = response.to_vec().expect("an answer that encodes");
        let _ = Message::from_vec(&bytes).expect("an answer that decodes");
        encoded += 1;
    }
    encoded
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;
    use hickory_proto::rr::{Name, RecordType};

    use super::*;

    #[test]
    fn a_real_query_is_answered_and_garbage_is_not() {
        let mut query = Message::query();
        query.add_query(Query::query(
            Name::from_ascii("_admin._tcp.order-service.internal.").unwrap(),
            RecordType::SRV,
        ));
        assert_eq!(dns_message(&query.to_vec().unwrap()), 1);
        assert_eq!(dns_message(b"\x00\x01garbage"), 0);
    }
}
