use super::*;
use proptest::prelude::*;

fn roundtrip(frames: &[Frame]) -> Vec<Frame> {
    let mut enc = HeaderEncoder::new();
    let mut dec = HeaderDecoder::new();
    let mut wire = BytesMut::new();
    for f in frames {
        encode(f, &mut enc, &mut wire);
    }
    let mut out = vec![];
    while let Some(f) = parse(&mut wire, &mut dec).expect("parse") {
        out.push(f);
    }
    assert!(wire.is_empty());
    out
}

#[test]
fn dictionary_is_the_spdy3_one() {
    let d = dictionary();
    assert_eq!(d.len(), 1423);
    assert!(d.starts_with(b"\0\0\0\x07options\0\0\0\x04head"));
    assert!(d.ends_with(b"utf-,*,enq=0."));
    // zlib's dictionary id (adler-32) as the SPDY/3 spec's deflate streams carry it.
    let mut a: u32 = 1;
    let mut b: u32 = 0;
    for &x in d {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    assert_eq!((b << 16) | a, 0xe3c6_a7c2);
}

#[test]
fn headers_share_one_context_across_frames() {
    let h = vec![
        ("streamtype".to_string(), "stdout".to_string()),
        (
            "x-stream-protocol-version".into(),
            "v4.channel.k8s.io".into(),
        ),
    ];
    let frames: Vec<Frame> = (1..20)
        .map(|i| Frame::SynStream {
            stream: i * 2 + 1,
            associated: 0,
            priority: 0,
            flags: 0,
            headers: h.clone(),
        })
        .collect();
    assert_eq!(roundtrip(&frames), frames);
}

#[test]
fn partial_input_waits_for_more() {
    let mut enc = HeaderEncoder::new();
    let mut dec = HeaderDecoder::new();
    let mut wire = BytesMut::new();
    encode(
        &Frame::Data {
            stream: 1,
            flags: FLAG_FIN,
            data: Bytes::from_static(b"hello"),
        },
        &mut enc,
        &mut wire,
    );
    let full = wire.clone();
    for cut in 0..full.len() {
        let mut b = BytesMut::from(&full[..cut]);
        assert_eq!(parse(&mut b, &mut dec), Ok(None), "cut {cut}");
        assert_eq!(b.len(), cut);
    }
}

#[test]
fn oversized_frames_and_versions_are_refused() {
    let mut dec = HeaderDecoder::new();
    let mut b = BytesMut::from(&[0x80, 0x03, 0x00, 0x01, 0x00, 0xff, 0xff, 0xff][..]);
    assert!(matches!(
        parse(&mut b, &mut dec),
        Err(FrameError::TooLarge(_))
    ));
    let mut b = BytesMut::from(&[0x80, 0x02, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 0, 0, 0, 1][..]);
    assert_eq!(parse(&mut b, &mut dec), Err(FrameError::Version(2)));
    let mut b = BytesMut::from(&[0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00][..]);
    assert!(matches!(
        parse(&mut b, &mut dec),
        Err(FrameError::Malformed(_))
    ));
}

#[test]
fn header_bombs_are_bounded() {
    // One header with a 1 MiB value compresses to a few KiB.
    let mut enc = HeaderEncoder::new();
    let big = vec![("a".to_string(), "x".repeat(1 << 20))];
    let block = enc.encode(&big);
    assert!(block.len() < MAX_FRAME);
    let mut dec = HeaderDecoder::new();
    assert!(matches!(dec.decode(&block), Err(FrameError::Headers(_))));
    // Too many pairs.
    let many: Headers = (0..MAX_HEADERS + 1)
        .map(|i| (format!("h{i}"), String::new()))
        .collect();
    let mut enc = HeaderEncoder::new();
    let mut dec = HeaderDecoder::new();
    assert!(dec.decode(&enc.encode(&many)).is_err());
}

#[test]
fn duplicate_and_empty_names_are_refused() {
    let mut enc = HeaderEncoder::new();
    let mut dec = HeaderDecoder::new();
    let dup = vec![("a".to_string(), "1".to_string()), ("A".into(), "2".into())];
    assert!(dec.decode(&enc.encode(&dup)).is_err());
}

fn headers() -> impl Strategy<Value = Headers> {
    proptest::collection::btree_map("[a-z][a-z0-9-]{0,20}", "[ -~]{0,40}", 0..8)
        .prop_map(|m| m.into_iter().collect())
}

fn frame() -> impl Strategy<Value = Frame> {
    let id = 1u32..0x7fff_ffff;
    prop_oneof![
        (
            id.clone(),
            0u8..2,
            proptest::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(|(stream, flags, d)| Frame::Data {
                stream,
                flags,
                data: Bytes::from(d)
            }),
        (id.clone(), 0u32..0x7fff_ffff, 0u8..8, 0u8..4, headers()).prop_map(
            |(stream, associated, priority, flags, headers)| Frame::SynStream {
                stream,
                associated,
                priority,
                flags,
                headers
            }
        ),
        (id.clone(), 0u8..2, headers()).prop_map(|(stream, flags, headers)| Frame::SynReply {
            stream,
            flags,
            headers
        }),
        (id.clone(), 0u8..2, headers()).prop_map(|(stream, flags, headers)| Frame::Headers {
            stream,
            flags,
            headers
        }),
        (id.clone(), any::<u32>()).prop_map(|(stream, status)| Frame::RstStream { stream, status }),
        (
            0u8..2,
            proptest::collection::vec((any::<u8>(), 0u32..0xff_ffff, any::<u32>()), 0..5)
        )
            .prop_map(|(flags, entries)| Frame::Settings { flags, entries }),
        any::<u32>().prop_map(|id| Frame::Ping { id }),
        (0u32..0x7fff_ffff, any::<u32>()).prop_map(|(last_stream, status)| Frame::GoAway {
            last_stream,
            status
        }),
        (0u32..0x7fff_ffff, 0u32..0x7fff_ffff)
            .prop_map(|(stream, delta)| Frame::WindowUpdate { stream, delta }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn frames_roundtrip(frames in proptest::collection::vec(frame(), 1..12)) {
        prop_assert_eq!(roundtrip(&frames), frames);
    }

    /// Arbitrary bytes never panic the parser, and it never consumes more than it has.
    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut dec = HeaderDecoder::new();
        let mut b = BytesMut::from(&data[..]);
        loop {
            let before = b.len();
            match parse(&mut b, &mut dec) {
                Ok(Some(_)) => prop_assert!(b.len() < before),
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// A control frame with a valid header but arbitrary (possibly compressed-looking) block.
    #[test]
    fn garbage_header_blocks_never_panic(
        kind in prop_oneof![Just(1u16), Just(2u16), Just(8u16)],
        body in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        let mut dec = HeaderDecoder::new();
        let mut b = BytesMut::new();
        control(&mut b, kind, 0, &body);
        let _ = parse(&mut b, &mut dec);
    }

    /// Mutating single bytes of a valid stream gives an error or a frame, never a panic.
    #[test]
    fn mutated_frames_never_panic(frames in proptest::collection::vec(frame(), 1..4), at in any::<usize>(), val in any::<u8>()) {
        let mut enc = HeaderEncoder::new();
        let mut wire = BytesMut::new();
        for f in &frames {
            encode(f, &mut enc, &mut wire);
        }
        let i = at % wire.len();
        wire[i] = val;
        let mut dec = HeaderDecoder::new();
        while let Ok(Some(_)) = parse(&mut wire, &mut dec) {}
    }
}
