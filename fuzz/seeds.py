#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (fuzz/corpus/<target>/): small valid inputs and near
misses that lead libFuzzer into the interesting branches quickly. Run from anywhere; the files
are committed, so this only needs running again when a seed is added."""
import base64, hashlib, hmac, json, os, struct, time

ROOT = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(ROOT)


def write(target, name, data):
    folder = os.path.join(ROOT, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def dns_query(name, qtype, edns=False, qid=0x1234):
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.strip(".").split("."))
    question = labels + b"\x00" + struct.pack(">HH", qtype, 1)
    additional = b"\x00" + struct.pack(">HHIH", 41, 1232, 0, 0) if edns else b""
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 1 if edns else 0)
    return header + question + additional


for i, (name, qtype, edns) in enumerate([
    ("order-service.internal", 1, False),
    ("order-service.internal", 28, True),
    ("_https._tcp.order-service.internal", 33, False),
    ("_admin._tcp.order-service.internal", 33, True),
    ("order-service-1.order-service.internal", 1, False),
    ("internal", 6, False),
    ("internal", 2, False),
    ("ns.internal", 1, False),
    ("missing.internal", 255, False),
    ("example.com", 1, False),
]):
    write("dns_message", f"query-{i}", dns_query(name, qtype, edns))

SIZES = b"\x10\x03\xff\x01"
for i, request in enumerate([
    b"GET /api/users/123/orders HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"POST /emails HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nTrailer: x\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 40 + b"\r\n",
]):
    write("http_front_guard", f"request-{i}", SIZES + request)

KEY = b"causeway-fuzz-signing-key-32-bytes!!"


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def jwt(claims, alg="HS256", key=KEY):
    head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    signing = head + b"." + body
    signature = b64(hmac.new(key, signing, hashlib.sha256).digest()) if alg == "HS256" else b""
    return b"Bearer " + signing + b"." + signature


now = int(time.time())
claims = {"sub": "123", "iss": "causeway", "aud": "causeway-services", "iat": now, "exp": 4102444800}
write("jwt_verify", "valid", jwt(claims))
write("jwt_verify", "scoped", jwt(dict(claims, scope="admin debug")))
write("jwt_verify", "expired", jwt(dict(claims, exp=1)))
write("jwt_verify", "alg-none", jwt(claims, alg="none"))
write("jwt_verify", "other-key", jwt(claims, key=b"x" * 32))
write("jwt_verify", "not-bearer", b"Basic dXNlcjpwYXNz")
write("jwt_verify", "three-dots", b"Bearer a.b.c")

readme = open(os.path.join(REPO, "README.md")).read()
example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
write("config_yaml", "readme-topology.toml", example)
write("config_yaml", "empty", "")
write("config_yaml", "ingress.yaml", open(os.path.join(REPO, "deploy", "k8s", "ingress.yaml")).read())


def varint(n):
    out = b""
    while True:
        byte = n & 0x7F
        n >>= 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def field(number, wire, value):
    key = varint(number << 3 | wire)
    if wire == 0:
        return key + varint(value)
    return key + varint(len(value)) + value


entry = field(1, 2, b"traceparent") + field(2, 2, b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
payload = b'{"emailId":123,"status":"sent"}'
publish = field(1, 0, 7) + field(2, 2, b"notification-queue") + field(3, 2, b"m-1") + field(4, 2, entry) + field(5, 2, payload)
write("broker_decode", "publish", publish)
write("broker_decode", "publish-no-id", field(2, 2, b"notification-queue") + field(5, 2, payload))
stored = field(1, 2, b"m-1") + field(2, 2, entry) + field(3, 2, payload) + field(4, 0, 2) + field(5, 0, 42) + field(6, 0, 1733000000000)
write("broker_decode", "stored", stored)
write("broker_decode", "consume-subscribe", field(1, 2, field(1, 2, b"notification-queue") + field(2, 0, 16)))
write("broker_decode", "policy.json", json.dumps({"max_attempts": 5, "initial_backoff_ms": 500}))
