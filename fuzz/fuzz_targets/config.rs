#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vexil_server::fuzzing::config(data));
