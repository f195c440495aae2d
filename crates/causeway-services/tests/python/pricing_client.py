"""A Pricing Service client written with the official Python gRPC library (grpcio), from stubs
generated out of proto/pricing/v1/pricing.proto by grpc_tools.protoc. The Rust test
`python_client_speaks_to_pricing` generates the stubs and runs this against a live server over TLS.

It checks all four methods, the error statuses, an expiring deadline and the health check, prints
each check, and exits non-zero if any fails.

    python3 pricing_client.py --target 127.0.0.1:PORT --ca ca.pem --stubs DIR \
        [--server-name pricing-service.internal]
"""

import argparse
import queue
import sys
import time

FAILURES = []


def check(condition, what):
    print(("ok   " if condition else "FAIL ") + what, flush=True)
    if not condition:
        FAILURES.append(what)
    return condition


def expect_status(grpc, call, code, fragment, what):
    try:
        call()
    except grpc.RpcError as err:
        return check(
            err.code() == code and fragment in (err.details() or ""),
            f"{what} -> {err.code().name}: {err.details()!r} (want {code.name}, {fragment!r})",
        )
    return check(False, f"{what} -> succeeded (want {code.name})")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--stubs", required=True)
    parser.add_argument("--server-name", default="pricing-service.internal")
    args = parser.parse_args()

    sys.path.insert(0, args.stubs)
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from pricing.v1 import pricing_pb2 as pb
    from pricing.v1 import pricing_pb2_grpc as pb_grpc

    with open(args.ca, "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    channel = grpc.secure_channel(
        args.target,
        credentials,
        options=[("grpc.ssl_target_name_override", args.server_name)],
    )
    grpc.channel_ready_future(channel).result(timeout=10)
    stub = pb_grpc.PricingServiceStub(channel)
    print(f"connected to {args.target} over TLS as {args.server_name}", flush=True)

    # Unary, with trace context in and out.
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    metadata = [
        ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),
        ("x-request-id", "python-req-1"),
        # Pricing answers Server-Timing only when asked (any value).
        ("causeway-server-timing", "1"),
    ]
    price, call = stub.GetPrice.with_call(
        pb.GetPriceRequest(sku="SKU-0001"), metadata=metadata, timeout=5
    )
    check(
        (price.sku, price.currency, price.unit_price_cents, price.updated_at)
        == ("SKU-0001", "USD", 12999, 1735689600000),
        f"GetPrice SKU-0001 -> {price.unit_price_cents} {price.currency}, updated_at {price.updated_at}",
    )
    check(price.served_by.startswith("pricing-service-"), f"served_by {price.served_by!r}")
    answered = dict(call.initial_metadata())
    timings = ", ".join(v for k, v in call.initial_metadata() if k == "server-timing")
    check(
        answered.get("traceresponse", "").startswith(f"00-{trace_id}-")
        and "00f067aa0ba902b7" not in answered.get("traceresponse", ""),
        f"traceresponse {answered.get('traceresponse')!r} continues trace {trace_id} with a new span",
    )
    check(answered.get("x-request-id") == "python-req-1", "x-request-id echoed")
    check(
        "pricing-db;" in timings and "pricing-service;" in timings,
        f"server-timing {timings!r} names pricing-db and pricing-service",
    )

    expect_status(
        grpc,
        lambda: stub.GetPrice(pb.GetPriceRequest(sku="sku-1"), timeout=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        '"SKU-" followed by 4 digits',
        "GetPrice 'sku-1'",
    )
    expect_status(
        grpc,
        lambda: stub.GetPrice(pb.GetPriceRequest(sku="SKU-0999"), timeout=5),
        grpc.StatusCode.NOT_FOUND,
        "no price for SKU-0999",
        "GetPrice SKU-0999",
    )

    # Server streaming: 3 rounds of 2 SKUs, in order; round 0 is the list price.
    updates = list(
        stub.StreamPrices(
            pb.StreamPricesRequest(skus=["SKU-0001", "SKU-0002"], interval_ms=20, max_updates=3),
            timeout=10,
        )
    )
    check(
        [(u.price.sku, u.sequence) for u in updates]
        == [("SKU-0001", 0), ("SKU-0002", 0), ("SKU-0001", 1), ("SKU-0002", 1),
            ("SKU-0001", 2), ("SKU-0002", 2)],
        f"StreamPrices -> {len(updates)} updates in round/SKU order",
    )
    check(
        [u.price.unit_price_cents for u in updates[:2]] == [12999, 4999]
        and all(u.change_cents == 0 for u in updates[:2]),
        "round 0 holds the list prices",
    )
    drift_ok = all(
        abs(u.change_cents) == max(1, (u.price.unit_price_cents - u.change_cents) // 100)
        for u in updates[2:]
    )
    check(drift_ok, f"later rounds drift 1%: {[u.change_cents for u in updates[2:]]}")
    expect_status(
        grpc,
        lambda: list(stub.StreamPrices(
            pb.StreamPricesRequest(skus=["SKU-0001"], interval_ms=1, max_updates=3), timeout=5)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "interval_ms",
        "StreamPrices interval_ms=1",
    )

    # Client streaming: items of one SKU add up; 10+ units get 5% off.
    items = [("SKU-0001", 2), ("SKU-0008", 5), ("SKU-0001", 8)]
    quote = stub.QuoteBasket(
        iter([pb.BasketItem(sku=s, quantity=q) for s, q in items]), timeout=5
    )
    lines = [(l.sku, l.quantity, l.discount_cents, l.line_total_cents) for l in quote.lines]
    check(
        lines == [("SKU-0001", 10, 6499, 123491), ("SKU-0008", 5, 0, 6495)],
        f"QuoteBasket lines {lines}",
    )
    check(
        (quote.total_cents, quote.currency, quote.items, quote.units) == (129986, "USD", 3, 15),
        f"QuoteBasket total {quote.total_cents} {quote.currency}, {quote.items} items, {quote.units} units",
    )
    expect_status(
        grpc,
        lambda: stub.QuoteBasket(iter([pb.BasketItem(sku="SKU-0001", quantity=0)]), timeout=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "quantity",
        "QuoteBasket quantity 0",
    )

    # Bidirectional: each offer depends on the previous counter.
    offers = queue.Queue()
    offers.put(pb.Offer(sku="SKU-0002", quantity=10, offered_unit_price_cents=4000))

    def outgoing():
        while True:
            offer = offers.get()
            if offer is None:
                return
            yield offer

    counters = []
    for counter in stub.LivePricing(outgoing(), timeout=10):
        counters.append(counter)
        if len(counters) == 1:
            # Take the counter-offer as it stands.
            offers.put(pb.Offer(sku="SKU-0002", quantity=10,
                                offered_unit_price_cents=counter.unit_price_cents))
        elif len(counters) == 2:
            offers.put(pb.Offer(sku="SKU-0002", quantity=1, offered_unit_price_cents=99999))
        else:
            offers.put(None)
    summary = [(c.round, c.accepted, c.unit_price_cents) for c in counters]
    check(
        summary == [(1, False, 4750), (2, True, 4750), (3, True, 4999)],
        f"LivePricing session {summary}",
    )

    # Deadlines: the call ends with DEADLINE_EXCEEDED, on time.
    started = time.monotonic()
    expect_status(
        grpc,
        lambda: stub.GetPrice(pb.GetPriceRequest(sku="SKU-0001"),
                              metadata=[("causeway-debug-delay-ms", "3000")], timeout=0.3),
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "",
        "GetPrice delayed 3 s with a 300 ms deadline",
    )
    elapsed = time.monotonic() - started
    check(elapsed < 1.5, f"... gave up after {elapsed:.3f} s")
    received = []
    started = time.monotonic()

    def slow_stream():
        for update in stub.StreamPrices(
            pb.StreamPricesRequest(skus=["SKU-0003"], interval_ms=2000, max_updates=5),
            timeout=0.3,
        ):
            received.append(update)

    expect_status(grpc, slow_stream, grpc.StatusCode.DEADLINE_EXCEEDED, "",
                  "StreamPrices every 2 s with a 300 ms deadline")
    check(len(received) == 1 and time.monotonic() - started < 1.5,
          f"... after {len(received)} update(s), in {time.monotonic() - started:.3f} s")

    # Health.
    health = health_pb2_grpc.HealthStub(channel)
    for service in ["", "pricing.v1.PricingService"]:
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        check(status == health_pb2.HealthCheckResponse.SERVING,
              f"health {service or '(server)'!s} -> {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")

    channel.close()
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed", flush=True)
        sys.exit(1)
    print("all checks passed", flush=True)


if __name__ == "__main__":
    main()
