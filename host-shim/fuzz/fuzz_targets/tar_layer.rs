#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_host::fuzzing::tar_layer(data));
