#!/usr/bin/env python3
"""Writes the seed corpus fuzz/corpus/<target>/ (committed). Re-run after changing it:
`python3 fuzz/make_corpus.py`. Input layouts are those of crates/vexil-server/src/fuzzing.rs."""
import glob, json, os, struct

root = os.path.dirname(os.path.abspath(__file__))
repo = os.path.dirname(root)
corpus = os.path.join(root, "corpus")

def write(target, name, data):
    d = os.path.join(corpus, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

# --- flag documents ---------------------------------------------------------------------------
docs = [os.path.join(repo, "examples/flags.json")]
docs += sorted(glob.glob(os.path.join(repo, "tests/conformance/flagd-testbed/flags/*.json")))
docs += sorted(glob.glob(os.path.join(repo, "tests/conformance/flagd-testbed/evaluator/flags/*.json")))
for path in docs:
    text = open(path).read()
    name = os.path.basename(path)
    write("flag_document_json", name, text)
    try:
        import yaml
        write("flag_document_yaml", name.replace(".json", ".yaml"),
              yaml.safe_dump(json.loads(text), sort_keys=False))
    except ImportError:
        write("flag_document_yaml", name, text)
write("flag_document_json", "array-form.json", json.dumps({"flags": [
    {"key": "a", "state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "on"},
    {"key": "a", "state": "DISABLED", "variants": {"x": 1}, "defaultVariant": None},
]}))
write("flag_document_json", "nested-refs.json", json.dumps({
    "$evaluators": {"a": {"in": ["x", {"var": "v"}]}, "b": {"and": [{"$ref": "a"}, {"$ref": "a"}]}},
    "flags": {"f": {"state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "off",
                    "targeting": {"if": [{"$ref": "b"}, "on", "off"]}}}}))
write("flag_document_yaml", "anchors.yaml", """flags:
  f: &flag
    state: ENABLED
    variants: {on: true, off: false}
    defaultVariant: off
    targeting: {if: [{starts_with: [{var: email}, admin]}, on, off]}
  g: *flag
""")

# --- evaluation contexts -----------------------------------------------------------------------
contexts = [
    {},
    {"targetingKey": "user-1", "email": "ann@example.com", "country": "DE", "version": "2.5.1"},
    {"targetingKey": "key-flag", "suffix": "flag", "pick": "mine", "tier": "alpha"},
    {"name": "Dr. No", "tags": ["x"], "items": [5, 6], "score": 1e308, "factor": -1e308},
    {"version": "1.2.3-beta.1+build", "base": "1.2.0", "user": {"id": "abc", "name": None}},
    {"targetingKey": 12345678901234567890, "cutoff": 1.5, "enabled": "yes", "email": 7},
    {"version": "v1", "items": "not an array", "user": [1, 2]},
]
for i, c in enumerate(contexts):
    write("evaluation_context", f"context-{i}.json", json.dumps(c))

# --- OFREP: [control, key index, (header "\n")?, body] ----------------------------------------
# control: 0x01 single (else bulk), 0x02 content type, 0x80 header present, bits 2-3 which header
# (0/1 flagd-selector, 2 if-none-match, 3 x-user).
def ofrep(control, key, header, body):
    out = bytes([control, key])
    if header is not None:
        out += header.encode() + b"\n"
    return out + body.encode()

bodies = [json.dumps({"context": c}) for c in contexts[:4]] + ["", "{}", "[]", "{\"context\": 1}"]
for i, b in enumerate(bodies):
    write("ofrep", f"single-{i}", ofrep(0x03, i, None, b))
    write("ofrep", f"bulk-{i}", ofrep(0x02, 0, None, b))
write("ofrep", "selector", ofrep(0x83, 1, "flagSetId=fuzz", bodies[1]))
write("ofrep", "selector-source", ofrep(0x82, 0, "source=x", bodies[1]))
write("ofrep", "if-none-match", ofrep(0x8a, 0, "\"0123456789abcdef\", *", bodies[1]))
write("ofrep", "x-user", ofrep(0x8f, 0, "admin@example.com", "{}"))

# --- Connect: [control, path index, (header "\n")?, body] --------------------------------------
# control low nibble: content type (0 json, 1 proto, 2 connect+json, 3 connect+proto, 4 json with
# parameters); 0x80 header present, 0x10 x-user (else flagd-selector). Path indices as in
# CONNECT_PATHS: v1 0-6, v2 7-12, schema.v1 13-19.
def envelope(payload, flags=0):
    return bytes([flags]) + struct.pack(">I", len(payload)) + payload

def connect(control, path, header, body):
    out = bytes([control, path])
    if header is not None:
        out += header.encode() + b"\n"
    return out + body

# --- protobuf encoding of the requests ---------------------------------------------------------
def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])

def field(num, wire, payload):
    key = varint((num << 3) | wire)
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + payload

def pvalue(v):
    if v is None:
        return field(1, 0, varint(0))
    if isinstance(v, bool):
        return field(4, 0, varint(int(v)))
    if isinstance(v, (int, float)):
        return field(2, 1, struct.pack("<d", float(v)))
    if isinstance(v, str):
        return field(3, 2, v.encode())
    if isinstance(v, list):
        return field(6, 2, b"".join(field(1, 2, pvalue(x)) for x in v))
    return field(5, 2, pstruct(v))

def pstruct(d):
    return b"".join(field(1, 2, field(1, 2, k.encode()) + field(2, 2, pvalue(v))) for k, v in d.items())

def resolve(key, ctx):
    return field(1, 2, key.encode()) + field(2, 2, pstruct(ctx))

keys = ["bool-flag", "string-flag", "float-flag", "int-flag", "object-flag"]
for i, ctx in enumerate(contexts[:5]):
    ctx = {k: v for k, v in ctx.items() if not (isinstance(v, int) and v > 2**53)}
    # JSON unary, v1/v2/schema.v1 Resolve*
    for base in (0, 7, 13):
        key = keys[i % 5]
        body = json.dumps({"flagKey": key, "context": ctx}).encode()
        write("connect", f"json-{base}-{i}", connect(0x00, base + i % 5, None, body))
        write("connect", f"proto-{base}-{i}", connect(0x01, base + i % 5, None, resolve(key, ctx)))
    write("connect", f"resolve-all-{i}", connect(0x00, 5, None, json.dumps({"context": ctx}).encode()))
    write("protobuf", f"resolve-all-{i}", bytes([0, 5]) + field(1, 2, pstruct(ctx)))
    for choice in range(5):
        write("protobuf", f"v1-{choice}-{i}", bytes([0, choice]) + resolve(keys[choice], ctx))
        write("protobuf", f"v2-{choice}-{i}", bytes([0, 7 + choice]) + resolve(keys[choice], ctx))
        write("protobuf", f"schema-{choice}-{i}", bytes([0, 13 + choice]) + resolve(keys[choice], ctx))
    write("protobuf", f"struct-{i}", bytes([0, 23]) + pstruct(ctx))
write("connect", "selector", connect(0x80, 5, "flagSetId=fuzz", b"{}"))
write("connect", "x-user", connect(0x90, 1, "ann@example.com", b'{"flagKey":"bool-flag"}'))
write("connect", "stream-json", connect(0x02, 6, None, envelope(b"{}")))
write("connect", "stream-proto", connect(0x03, 12, None, envelope(b"")))
write("connect", "stream-empty", connect(0x02, 19, None, b""))
write("connect", "stream-compressed", connect(0x02, 6, None, envelope(b"{}", 1)))
write("connect", "unknown-method", connect(0x00, 20, None, b"{}"))
write("protobuf", "event-stream", bytes([0, 6]))
write("protobuf", "sync-flags", bytes([0x80, 20]) + b"flagSetId=fuzz\n" + field(1, 2, b"p") + field(2, 2, b"source=x"))
write("protobuf", "fetch-all", bytes([0, 21]) + field(2, 2, b"flagSetId="))
write("protobuf", "metadata", bytes([0, 22]))
write("protobuf", "selector-header", bytes([0x80, 0]) + b"flagSetId=fuzz\n" + resolve("bool-flag", {}))

# --- selectors ---------------------------------------------------------------------------------
for i, s in enumerate(["", "flagSetId=fuzz", "flagSetId=", "source=flags/a.json", "flags.json",
                       "source=", "other=x", "source=a=b", "=x"]):
    write("selector", f"selector-{i}", s)

# --- CLI/env: NUL-separated args after `vexil`; after \x01, NUL-separated FLAGD_* entries whose
# first byte picks the variable (0 URI, 1 SOURCES, 2 PORT, 3 CONTEXT_VALUE, 4 CONTEXT_FROM_HEADER,
# 5 STREAM_DEADLINE, 6 MAX_REQUEST_BODY, 7 DISABLE_SYNC_METADATA).
def cli(args, env=()):
    out = b"\0".join(a.encode() for a in args)
    if env:
        out += b"\x01" + b"\0".join(bytes([k]) + v.encode() for k, v in env)
    return out

write("config", "start", cli(["start", "--uri", "file:examples/flags.json"]))
write("config", "serve-all", cli(["serve", "-f", "file:a.json", "-f", "b.yaml", "-p", "9013", "-m", "9014",
                                  "-g", "9015", "-r", "9016", "-X", "env=prod", "-H", "X-User=email",
                                  "-C", "*", "--stream-deadline", "1.5s", "-B", "1024", "-R", "2048",
                                  "--fractional", "v2", "--stale-after", "0", "--poll-interval-ms", "10",
                                  "--disable-sync-metadata", "--log-json", "--bind", "::1"]))
write("config", "sources", cli(["start", "--sources", '[{"uri":"a.json","provider":"file"},{"uri":"b"}]']))
write("config", "bad-sources", cli(["start", "--sources", '[{"uri":"x","provider":"kubernetes"}]']))
write("config", "tls", cli(["start", "-c", "cert.pem", "-k", "key.pem"]))
write("config", "validate", cli(["validate", "a.json", "b.yaml"]))
write("config", "help", cli(["start", "--help"]))
write("config", "env", cli(["start"], [(0, "file:x.json,file:y.json"), (2, "7013"), (3, "a=b"),
                                       (7, "true"), (5, "3"), (1, '[{"uri":"z.json"}]')]))
write("config", "bad-context", cli(["start", "-X", "novalue", "-H", "noheader"]))
write("config", "grpc-uri", cli(["start", "-f", "grpc://host:8013"]))
