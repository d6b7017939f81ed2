//! The short in-suite run of the fuzz targets (`crates/vexil-server/src/fuzzing.rs`; the long,
//! coverage-guided runs are `tools/fuzz`): every target over the committed seed corpus
//! (`fuzz/corpus/<target>/`), mutations of every seed (truncations, byte flips, insertions), hostile
//! inputs (100k-deep nesting, huge numbers, invalid UTF-8, `$ref` and YAML alias bombs) and a few
//! thousand structured random inputs from a fixed seed. Each target asserts its own contract
//! (no panic; every rejection has a message); this test reports the input that broke it.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use vexil_server::fuzzing;

/// A small deterministic PRNG (xorshift64*), so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn run(name: &str, target: fn(&[u8]), input: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| target(input))).is_err() {
        let shown = String::from_utf8_lossy(&input[..input.len().min(2000)]).into_owned();
        panic!("fuzz target `{name}` panicked on {} bytes: {shown:?}", input.len());
    }
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files.into_iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// Mutations of one seed: truncations, byte flips, interesting bytes, a duplicated slice.
fn mutations(seed: &[u8], rng: &mut Rng, count: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(count + 4);
    if !seed.is_empty() {
        out.push(seed[..seed.len() / 2].to_vec());
        out.push(seed[..seed.len() - 1].to_vec());
        out.push(seed[1..].to_vec());
    }
    const INTERESTING: &[u8] = b"\x00\x01\x7f\x80\xff\"\\{}[]:,=\n-e9";
    for _ in 0..count {
        let mut m = seed.to_vec();
        for _ in 0..=rng.below(3) {
            let at = rng.below(m.len() + 1);
            match rng.below(5) {
                0 if !m.is_empty() => m.truncate(at),
                1 if at < m.len() => m[at] ^= 1 << rng.below(8),
                2 if at < m.len() => m[at] = *rng.pick(INTERESTING),
                3 => m.insert(at, *rng.pick(INTERESTING)),
                _ if at < m.len() => {
                    let end = (at + rng.below(16)).min(m.len());
                    let slice = m[at..end].to_vec();
                    m.splice(at..at, slice);
                }
                _ => m.push(*rng.pick(INTERESTING)),
            }
        }
        out.push(m);
    }
    out
}

/// A random JSON value from flagd's vocabulary (operators, context keys, odd numbers).
fn json(rng: &mut Rng, depth: usize) -> String {
    const WORDS: &[&str] = &[
        "if",
        "in",
        "var",
        "==",
        "<",
        ">=",
        "and",
        "or",
        "!",
        "+",
        "*",
        "cat",
        "substr",
        "map",
        "some",
        "all",
        "merge",
        "missing",
        "fractional",
        "sem_ver",
        "starts_with",
        "ends_with",
        "$ref",
        "targetingKey",
        "$flagd.flagKey",
        "$flagd.timestamp",
        "email",
        "version",
        "user.id",
        "on",
        "off",
        "1.2.3",
        "^",
        "~",
        "",
    ];
    const ATOMS: &[&str] = &[
        "null",
        "true",
        "false",
        "0",
        "-1",
        "1.5",
        "1e308",
        "-1e308",
        "18446744073709551616",
        "9007199254740993",
        "5e-324",
        "\"\\ud83d\\ude00\"",
        "\"\\u0000\"",
        "[]",
        "{}",
    ];
    if depth == 0 || rng.below(4) == 0 {
        return if rng.below(2) == 0 {
            (*rng.pick(ATOMS)).to_owned()
        } else {
            format!("{:?}", rng.pick(WORDS))
        };
    }
    match rng.below(3) {
        0 => {
            let items: Vec<String> = (0..rng.below(4)).map(|_| json(rng, depth - 1)).collect();
            format!("[{}]", items.join(","))
        }
        1 => format!("{{{:?}:{}}}", rng.pick(WORDS), json(rng, depth - 1)),
        _ => {
            let items: Vec<String> = (0..rng.below(4))
                .map(|_| format!("{:?}:{}", rng.pick(WORDS), json(rng, depth - 1)))
                .collect();
            format!("{{{}}}", items.join(","))
        }
    }
}

/// A random flag document: valid-looking structure, random rules, values and evaluators.
fn flag_document(rng: &mut Rng) -> String {
    let mut flags = Vec::new();
    for i in 0..rng.below(4) {
        let variants = match rng.below(3) {
            0 => r#"{"on": true, "off": false}"#.to_owned(),
            1 => format!(r#"{{"a": {}, "b": {}}}"#, json(rng, 1), json(rng, 2)),
            _ => json(rng, 2),
        };
        let default = *rng.pick(&["\"on\"", "\"a\"", "null", "\"zz\"", "1"]);
        flags.push(format!(
            r#""f{i}": {{"state": {}, "variants": {variants}, "defaultVariant": {default}, "targeting": {}, "metadata": {}}}"#,
            rng.pick(&["\"ENABLED\"", "\"DISABLED\"", "\"ON\"", "3"]),
            json(rng, 5),
            json(rng, 2),
        ));
    }
    format!(
        r#"{{"metadata": {}, "$evaluators": {{"e": {}, "r": {{"$ref": "e"}}}}, "flags": {{{}}}}}"#,
        json(rng, 2),
        json(rng, 4),
        flags.join(",")
    )
}

fn request(rng: &mut Rng) -> Vec<u8> {
    let mut out = vec![rng.next() as u8, rng.next() as u8];
    if out[0] & 0x80 != 0 {
        let headers: [&[u8]; 5] = [b"flagSetId=fuzz", b"source=x", b"=", b"\xff", b"*"];
        let header = *rng.pick::<&[u8]>(&headers);
        out.extend_from_slice(header);
        out.push(b'\n');
    }
    out.extend_from_slice(format!(r#"{{"context": {}, "flagKey": "bool-flag"}}"#, json(rng, 4)).as_bytes());
    out
}

fn args(rng: &mut Rng) -> Vec<u8> {
    const ARGS: &[&str] = &[
        "start",
        "serve",
        "validate",
        "--uri",
        "-f",
        "file:a.json",
        "grpc://x",
        "",
        "--sources",
        r#"[{"uri":"a","provider":"file"}]"#,
        "[1]",
        "-p",
        "99999",
        "8013",
        "-X",
        "a=b",
        "novalue",
        "-H",
        "H=k",
        "-C",
        "*",
        "-c",
        "-k",
        "--stream-deadline",
        "-1",
        "1e400",
        "NaN",
        "inf",
        "--fractional",
        "v4",
        "--stale-after",
        "--bind",
        "::1",
        "-B",
        "--help",
        "--version",
        "=",
    ];
    let mut parts: Vec<Vec<u8>> = (0..rng.below(8)).map(|_| rng.pick(ARGS).as_bytes().to_vec()).collect();
    if rng.below(3) == 0 {
        parts.push(vec![0xff, b'x']);
    }
    let mut out = parts.join(&0u8);
    if rng.below(2) == 0 {
        out.push(1);
        out.push(rng.below(8) as u8);
        out.extend_from_slice(rng.pick(ARGS).as_bytes());
    }
    out
}

fn nested(open: &str, close: &str, depth: usize) -> Vec<u8> {
    let mut s = open.repeat(depth);
    s.push_str(&close.repeat(depth));
    s.into_bytes()
}

/// Inputs every target gets: the hostile ones.
fn hostile() -> Vec<Vec<u8>> {
    let mut out = vec![
        Vec::new(),
        b"\xff\xfe\x00".to_vec(),
        b"{\"context\": \"\xff\"}".to_vec(),
        nested("[", "]", 100_000),
        nested("{\"a\":", "}", 100_000),
        nested("- ", "", 100_000),
        nested("[", "]", 127),
        format!("{{\"context\": {{\"n\": 1{}}}}}", "0".repeat(100_000)).into_bytes(),
        b"{\"context\": {\"n\": 1e999999999, \"m\": -0.0, \"k\": 18446744073709551616}}".to_vec(),
        format!("{{\"context\": {}}}", String::from_utf8(nested("[", "]", 126)).unwrap()).into_bytes(),
    ];
    // Every prefix of a request that ends in deep nesting, for the request targets' layouts.
    for control in [0x00u8, 0x01, 0x02, 0x03, 0x83] {
        let mut r = vec![control, 0];
        r.extend_from_slice(&nested("[", "]", 100_000));
        out.push(r);
    }
    out
}

fn smoke(name: &str, target: fn(&[u8]), extra: impl Fn(&mut Rng) -> Vec<u8>, random: usize) {
    let mut rng = Rng(0x5eed_0000 ^ (name.len() as u64 * 0x9e37_79b9));
    for seed in seeds(name) {
        run(name, target, &seed);
        for m in mutations(&seed, &mut rng, 12) {
            run(name, target, &m);
        }
    }
    for input in hostile() {
        run(name, target, &input);
    }
    for _ in 0..random {
        let input = extra(&mut rng);
        run(name, target, &input);
        for m in mutations(&input, &mut rng, 1) {
            run(name, target, &m);
        }
    }
}

#[test]
fn flag_document_json() {
    smoke(
        "flag_document_json",
        fuzzing::flag_document_json,
        |rng| flag_document(rng).into_bytes(),
        600,
    );
    // (`$ref` bombs, which inline up to the parser's budget of 250,000 values, are checked in
    // vexil-core's `tests/parse.rs`: too slow for this run in debug builds.)
    run(
        "flag_document_json",
        fuzzing::flag_document_json,
        fuzzing::RICH_FLAGS.as_bytes(),
    );
}

#[test]
fn flag_document_yaml() {
    smoke(
        "flag_document_yaml",
        fuzzing::flag_document_yaml,
        |rng| flag_document(rng).into_bytes(),
        300,
    );
    // Billion laughs: aliases that expand exponentially.
    let mut bomb = String::from("a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
        .windows(2)
        .map(|w| (w[0], w[1]))
    {
        bomb.push_str(&format!(
            "{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
        ));
    }
    bomb.push_str("flags: *h\n");
    run("flag_document_yaml", fuzzing::flag_document_yaml, bomb.as_bytes());
}

#[test]
fn evaluation_context() {
    smoke(
        "evaluation_context",
        fuzzing::evaluation_context,
        |rng| json(rng, 6).into_bytes(),
        1500,
    );
}

#[test]
fn ofrep() {
    smoke("ofrep", fuzzing::ofrep, request, 1000);
}

#[test]
fn connect() {
    smoke("connect", fuzzing::connect, request, 1000);
}

#[test]
fn protobuf() {
    smoke(
        "protobuf",
        fuzzing::protobuf,
        |rng| (0..rng.below(64)).map(|_| rng.next() as u8).collect(),
        1500,
    );
    // A Struct nested past prost's recursion limit, as a v1 ResolveBoolean context.
    let mut value: Vec<u8> = Vec::new();
    for _ in 0..200 {
        // Value{struct_value: Struct{fields: {"a": value}}}
        let mut entry = vec![0x0a, 1, b'a', 0x12];
        push_len(&mut entry, value.len());
        entry.extend_from_slice(&value);
        let mut st = vec![0x0a];
        push_len(&mut st, entry.len());
        st.extend_from_slice(&entry);
        value = vec![0x2a];
        push_len(&mut value, st.len());
        value.extend_from_slice(&st);
    }
    let mut input = vec![0, 0, 0x12];
    push_len(&mut input, value.len());
    input.extend_from_slice(&value);
    run("protobuf", fuzzing::protobuf, &input);
    // A length prefix far beyond the input.
    run(
        "protobuf",
        fuzzing::protobuf,
        &[0, 0, 0x12, 0xff, 0xff, 0xff, 0xff, 0x0f],
    );
}

fn push_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

#[test]
fn selector() {
    smoke(
        "selector",
        fuzzing::selector,
        |rng| {
            let parts = ["flagSetId", "source", "=", "", "x", "a=b", "\u{2713}", " "];
            (0..rng.below(4))
                .map(|_| *rng.pick(&parts))
                .collect::<String>()
                .into_bytes()
        },
        2000,
    );
}

#[test]
fn config() {
    smoke("config", fuzzing::config, args, 400);
}

#[test]
fn every_target_has_seeds() {
    for (name, _) in fuzzing::TARGETS {
        assert!(!seeds(name).is_empty());
    }
}

/// Found by fuzzing (`config`): `--stream-deadline 0555…5.5s` (any number of seconds past
/// `Duration::MAX`) panicked in `Duration::from_secs_f64`; durations are now limited to flagd's
/// (Go's) longest, about 292 years, and a longer one is a clear error.
#[test]
fn regression_huge_durations_are_rejected_with_a_message() {
    use clap::Parser as _;
    use vexil_server::config::Cli;
    for value in [
        "1e20",
        "05555555555555555555555555555555555555.5s",
        "9223372037",
        "1e300",
    ] {
        for option in ["--stream-deadline", "--stale-after"] {
            let err = Cli::try_parse_from(["vexil", "start", option, value]).expect_err(value);
            assert!(err.to_string().contains("too long"), "{option} {value}: {err}");
        }
    }
    assert!(Cli::try_parse_from(["vexil", "start", "--stream-deadline", "9223372036"]).is_ok());
    let crash = b"serve\0-fail\0-C\0*\0--stream-deadline\x000555555555555555555555555555555555555.5s";
    run("config", fuzzing::config, crash);
}
