//! The embedded broker's decoding of what reaches it: its gRPC wire messages (publish, consume
//! and settle requests) and what it reads back from its store (a stored message, a queue's policy
//! as JSON). Each decodes or fails; what decodes encodes back to what decodes the same.
#![no_main]

use causeway_core::queue_policy::QueuePolicy;
use causeway_proto::broker::v1 as pb;
use prost::Message;

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(message) = M::decode(data) {
        let again = M::decode(message.encode_to_vec().as_slice()).expect("re-encoded decodes");
        assert_eq!(message, again);
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    round_trip::<pb::PublishRequest>(data);
    if let Ok(publish) = pb::PublishRequest::decode(data) {
        // The checks the broker makes of a publish before it stores anything.
        if causeway_core::queue_policy::validate_queue_name(&publish.queue).is_ok() {
            let _ = QueuePolicy::default().validate_payload(&publish.payload);
        }
    }
    round_trip::<pb::ConsumeRequest>(data);
    round_trip::<pb::StoredMessage>(data);
    round_trip::<pb::DeclareRequest>(data);
    if let Ok(policy) = serde_json::from_slice::<QueuePolicy>(data) {
        let _ = policy.validate();
    }
});
