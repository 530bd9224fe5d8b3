//! Tier 0: framing and message decoding under malformed, truncated and
//! oversized input. Every case must end in a specific error, never a panic,
//! and never an allocation larger than the frame limit.
use std::io::Cursor;

use dough_proto::*;
use proptest::prelude::*;

fn sample_messages() -> Vec<GuestMsg> {
    vec![
        GuestMsg::Hello(Hello {
            versions: supported_versions(),
            agent_version: "0.1.0".into(),
            kernel: "6.1.0-28-cloud-amd64".into(),
            boot_ms: 1234,
        }),
        GuestMsg::Heartbeat { seq: 7 },
        GuestMsg::Started { pid: 42 },
        GuestMsg::Output {
            stream: Stream::Stderr,
            data: b"hello\n".to_vec(),
        },
        GuestMsg::Exit {
            status: ExitStatus::Signal(9),
            oom: true,
        },
        GuestMsg::SpawnFailed {
            message: "no such file".into(),
        },
        GuestMsg::Cloned {
            commit: "b".repeat(40),
        },
        GuestMsg::CloneFailed {
            message: "could not resolve host".into(),
        },
        GuestMsg::BundleData {
            data: vec![0, 1, 2, 255],
        },
        GuestMsg::Work(Work::Bundle {
            head: "c".repeat(40),
            commits: 2,
            bytes: 4,
        }),
        GuestMsg::Work(Work::NothingToDo),
        GuestMsg::Work(Work::Failed {
            stage: "commit".into(),
            message: "x".into(),
        }),
    ]
}

#[test]
fn round_trip_every_message_through_a_stream() {
    let mut wire = Vec::new();
    for m in sample_messages() {
        write_frame(&mut wire, &m).unwrap();
    }
    let repo = RepoWork {
        url: "https://git.example/o/r.git".into(),
        base_branch: "main".into(),
        base_commit: "a".repeat(40),
        branch: "dough/t1".into(),
        dir: "/home/dough/work".into(),
        credential: Some(("x-access-token".into(), "hunter2-token".into())),
        author_name: "Dough".into(),
        author_email: "dough@localhost".into(),
        commit_message: "m".into(),
        max_bundle_bytes: 1 << 20,
    };
    // A credential never reaches a log line through Debug.
    let shown = format!("{:?}", repo);
    assert!(
        !shown.contains("hunter2") && shown.contains("<redacted>"),
        "{shown}"
    );
    let host = HostMsg::Assign(Box::new(Assign {
        task_id: "t1".into(),
        command: vec!["echo".into(), "hi".into()],
        env: vec![("A".into(), "b".into())],
        root: true,
        workdir: Some("/tmp".into()),
        repo: Some(repo),
        prompt: Some("do it".into()),
    }));
    write_frame(&mut wire, &host).unwrap();

    let mut r = Cursor::new(wire);
    for want in sample_messages() {
        let p = read_frame(&mut r, MAX_FRAME).unwrap().unwrap();
        assert_eq!(decode::<GuestMsg>(&p).unwrap(), want);
    }
    let p = read_frame(&mut r, MAX_FRAME).unwrap().unwrap();
    assert_eq!(decode::<HostMsg>(&p).unwrap(), host);
    assert!(
        read_frame(&mut r, MAX_FRAME).unwrap().is_none(),
        "clean eof"
    );
}

#[test]
fn oversized_header_is_rejected_before_allocating() {
    // Announces 4 GiB - 1; must fail on the header alone.
    let mut r = Cursor::new(vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
    match read_frame(&mut r, MAX_FRAME) {
        Err(ProtoError::FrameTooLarge { len, max }) => {
            assert_eq!(len, u32::MAX as u64);
            assert_eq!(max, MAX_FRAME);
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    // A caller limit lower than MAX_FRAME is honoured.
    let mut r = Cursor::new(vec![0, 0, 1, 0]);
    assert!(matches!(
        read_frame(&mut r, 255),
        Err(ProtoError::FrameTooLarge { len: 256, max: 255 })
    ));
}

#[test]
fn encoding_a_too_large_message_fails() {
    let m = GuestMsg::Output {
        stream: Stream::Stdout,
        data: vec![0; MAX_FRAME as usize + 1],
    };
    assert!(matches!(encode(&m), Err(ProtoError::FrameTooLarge { .. })));
}

#[test]
fn truncated_header_and_payload_are_reported() {
    let mut r = Cursor::new(vec![0, 0]);
    assert!(matches!(
        read_frame(&mut r, MAX_FRAME),
        Err(ProtoError::Truncated {
            expected: 4,
            got: 2
        })
    ));
    let mut frame = encode(&GuestMsg::Heartbeat { seq: 1 }).unwrap();
    frame.pop();
    let n = frame.len();
    let mut r = Cursor::new(frame);
    match read_frame(&mut r, MAX_FRAME) {
        Err(ProtoError::Truncated { expected, got }) => assert_eq!(got + 1, expected, "{n}"),
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[test]
fn empty_frame_and_garbage_payload_are_errors() {
    let mut r = Cursor::new(vec![0, 0, 0, 0]);
    assert!(matches!(
        read_frame(&mut r, MAX_FRAME),
        Err(ProtoError::EmptyFrame)
    ));
    // Variant index 200 does not exist.
    assert!(matches!(
        decode::<GuestMsg>(&[200, 1, 2]),
        Err(ProtoError::Malformed(_))
    ));
    // A valid message followed by junk is not silently accepted.
    let mut payload = encode(&GuestMsg::Heartbeat { seq: 1 }).unwrap()[HEADER_LEN..].to_vec();
    payload.push(0);
    assert!(matches!(
        decode::<GuestMsg>(&payload),
        Err(ProtoError::TrailingBytes(1))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    /// Arbitrary bytes never panic the reader or the decoder.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut r = Cursor::new(bytes.clone());
        while let Ok(Some(p)) = read_frame(&mut r, 4096) {
            let _ = decode::<GuestMsg>(&p);
            let _ = decode::<HostMsg>(&p);
        }
        let _ = decode::<GuestMsg>(&bytes);
        let _ = decode::<HostMsg>(&bytes);
    }

    /// A length prefix claiming a huge Vec inside a small frame fails cleanly.
    #[test]
    fn hostile_inner_lengths_fail_cleanly(len in any::<u32>(), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
        // Output variant (index 3), Stdout (0), then a varint length.
        let mut p = vec![3u8, 0];
        let mut v = len as u64;
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 { p.push(b); break; }
            p.push(b | 0x80);
        }
        p.extend_from_slice(&tail);
        if (len as usize) != tail.len() {
            prop_assert!(decode::<GuestMsg>(&p).is_err());
        }
    }

    /// Output of any content round-trips byte for byte.
    #[test]
    fn output_round_trips(data in proptest::collection::vec(any::<u8>(), 0..4096), err in any::<bool>()) {
        let stream = if err { Stream::Stderr } else { Stream::Stdout };
        let m = GuestMsg::Output { stream, data };
        let f = encode(&m).unwrap();
        let p = read_frame(&mut Cursor::new(f), MAX_FRAME).unwrap().unwrap();
        prop_assert_eq!(decode::<GuestMsg>(&p).unwrap(), m);
    }
}
