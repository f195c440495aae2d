//! The discovery DNS server's handling of one message: parse, answer every question, encode.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    causeway_discovery::fuzzing::dns_message(data);
});
