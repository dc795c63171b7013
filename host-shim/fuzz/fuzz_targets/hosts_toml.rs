#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_host::fuzzing::hosts_toml(data));
