//! The Protocol Buffers contracts of Causeway's gRPC services, as Rust: messages (prost), a client
//! and a server trait (tonic) for `pricing.v1.PricingService`, the embedded broker's
//! `causeway.broker.v1.Broker` and the mesh control plane's `causeway.mesh.v1.MeshControl`, and
//! each package's encoded file descriptor set for server reflection. The `.proto` files live in `proto/` at the workspace root, so that clients in other
//! languages generate their stubs from the same source; `build.rs` compiles them with protox (a
//! protobuf compiler in Rust) because a fresh machine has no `protoc`.

/// `package pricing.v1;` from `proto/pricing/v1/pricing.proto`.
pub mod pricing {
    pub mod v1 {
        tonic::include_proto!("pricing.v1");
    }
}

/// `package causeway.broker.v1;` from `proto/broker/v1/broker.proto`: the embedded message broker.
pub mod broker {
    pub mod v1 {
        tonic::include_proto!("causeway.broker.v1");
    }
}

/// `package causeway.mesh.v1;` from `proto/mesh/v1/mesh.proto`: the mesh control plane.
pub mod mesh {
    pub mod v1 {
        tonic::include_proto!("causeway.mesh.v1");
    }
}

/// The encoded `google.protobuf.FileDescriptorSet` of `pricing.v1` (with its imports and
/// comments), for `tonic_reflection::server::Builder::register_encoded_file_descriptor_set`.
pub const PRICING_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/pricing_descriptor.bin"));

/// The encoded `google.protobuf.FileDescriptorSet` of `causeway.broker.v1`.
pub const BROKER_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/broker_descriptor.bin"));

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::pricing::v1::Price;
    use super::pricing::v1::pricing_service_server::SERVICE_NAME;

    #[test]
    fn descriptor_set_describes_the_pricing_service() {
        let text = String::from_utf8_lossy(super::PRICING_DESCRIPTOR_SET);
        assert!(text.contains("pricing/v1/pricing.proto"));
        assert!(text.contains("PricingService"));
        assert!(text.contains("StreamPrices"));
        assert!(!text.contains("causeway.broker"), "only pricing.v1");
        let broker = String::from_utf8_lossy(super::BROKER_DESCRIPTOR_SET);
        assert!(broker.contains("causeway.broker.v1") && !broker.contains("PricingService"));
        assert_eq!(SERVICE_NAME, "pricing.v1.PricingService");
    }

    #[test]
    fn messages_round_trip_on_the_wire() {
        let price = Price {
            sku: "SKU-0001".into(),
            currency: "USD".into(),
            unit_price_cents: 12_999,
            updated_at: 1_700_000_000_000,
            served_by: "pricing-service-1".into(),
        };
        let bytes = price.encode_to_vec();
        assert_eq!(Price::decode(bytes.as_slice()).unwrap(), price);
    }
}
