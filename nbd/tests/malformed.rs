//! A scripted NBD server on a unix socket that misbehaves in one way per test: the client must return a
//! typed error, never panic or hang. Also covers paths qemu-nbd never takes (simple replies, error chunks,
//! short block status answers).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use backflow_nbd::proto::*;
use backflow_nbd::{Client, Extent, NbdError, Transport};

const SIZE: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);

/// Starts a server thread that accepts one connection and runs `script` on it.
fn serve(script: impl FnOnce(UnixStream) + Send + 'static) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            script(stream);
        }
    });
    (dir, path)
}

fn connect(path: &Path, contexts: &[&str]) -> backflow_nbd::Result<Client> {
    Client::connect(Transport::unix(path, TIMEOUT)?, "", contexts)
}

fn greet(s: &mut UnixStream) {
    s.write_all(&NBDMAGIC.to_be_bytes()).unwrap();
    s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    s.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut flags = [0; 4];
    s.read_exact(&mut flags).unwrap();
}

fn read_option(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut head = [0; 16];
    s.read_exact(&mut head).unwrap();
    assert_eq!(u64::from_be_bytes(head[..8].try_into().unwrap()), IHAVEOPT);
    let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
    let mut data = vec![0; u32::from_be_bytes(head[12..].try_into().unwrap()) as usize];
    s.read_exact(&mut data).unwrap();
    (option, data)
}

fn option_reply(s: &mut UnixStream, option: u32, kind: u32, data: &[u8]) {
    let mut msg = REP_MAGIC.to_be_bytes().to_vec();
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&kind.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg).unwrap();
}

/// A well-behaved handshake: each requested meta context gets id 7, 8, ...; the export is [`SIZE`] bytes.
fn negotiate(s: &mut UnixStream, structured: bool) {
    greet(s);
    loop {
        let (option, data) = read_option(s);
        match option {
            OPT_STRUCTURED_REPLY if structured => option_reply(s, option, REP_ACK, &[]),
            OPT_STRUCTURED_REPLY => option_reply(s, option, REP_ERR_UNSUP, b"not here"),
            OPT_SET_META_CONTEXT => {
                let name_len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
                let mut at = 4 + name_len;
                let count = u32::from_be_bytes(data[at..at + 4].try_into().unwrap());
                at += 4;
                for id in 0..count {
                    let len = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
                    let mut reply = (7 + id).to_be_bytes().to_vec();
                    reply.extend_from_slice(&data[at + 4..at + 4 + len]);
                    option_reply(s, option, REP_META_CONTEXT, &reply);
                    at += 4 + len;
                }
                option_reply(s, option, REP_ACK, &[]);
            }
            OPT_GO => {
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&SIZE.to_be_bytes());
                info.extend_from_slice(
                    &(FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN).to_be_bytes(),
                );
                option_reply(s, option, REP_INFO, &info);
                option_reply(s, option, REP_ACK, &[]);
                return;
            }
            _ => option_reply(s, option, REP_ERR_UNSUP, &[]),
        }
    }
}

struct Request {
    command: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

fn read_request(s: &mut UnixStream) -> Request {
    let mut b = [0; 28];
    s.read_exact(&mut b).unwrap();
    assert_eq!(
        u32::from_be_bytes(b[..4].try_into().unwrap()),
        REQUEST_MAGIC
    );
    Request {
        command: u16::from_be_bytes(b[6..8].try_into().unwrap()),
        cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
        len: u32::from_be_bytes(b[24..28].try_into().unwrap()),
    }
}

/// A structured chunk header announcing `len` payload bytes, followed by `payload` (which may be shorter).
fn chunk(s: &mut UnixStream, flags: u16, kind: u16, cookie: u64, len: u32, payload: &[u8]) {
    let mut msg = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    msg.extend_from_slice(&flags.to_be_bytes());
    msg.extend_from_slice(&kind.to_be_bytes());
    msg.extend_from_slice(&cookie.to_be_bytes());
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(payload);
    let _ = s.write_all(&msg);
}

fn data_chunk(s: &mut UnixStream, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
    let mut payload = offset.to_be_bytes().to_vec();
    payload.extend_from_slice(data);
    chunk(
        s,
        flags,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        payload.len() as u32,
        &payload,
    );
}

fn simple_reply(s: &mut UnixStream, error: u32, cookie: u64, data: &[u8]) {
    let mut msg = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    msg.extend_from_slice(&error.to_be_bytes());
    msg.extend_from_slice(&cookie.to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg).unwrap();
}

/// Reads 4 KiB at offset 4096 from a server that answers the read with `reply`; returns the error.
fn read_error(reply: fn(&mut UnixStream, &Request)) -> NbdError {
    let (_dir, path) = serve(move |mut s| {
        negotiate(&mut s, true);
        let req = read_request(&mut s);
        reply(&mut s, &req);
        // Hold the connection open until the client gives up, so a hang would show as a timeout.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let mut client = connect(&path, &[]).unwrap();
    let mut buf = vec![0; 4096];
    let err = client.read_at(4096, &mut buf).unwrap_err();
    // The stream position is unknown after a malformed reply: the client must refuse to continue.
    if matches!(err, NbdError::Io { .. } | NbdError::Protocol { .. }) {
        assert!(matches!(
            client.read_at(0, &mut buf),
            Err(NbdError::Broken { .. })
        ));
    }
    err
}

fn assert_protocol(err: NbdError, needle: &str) {
    match &err {
        NbdError::Protocol { detail, .. } => {
            assert!(
                detail.contains(needle),
                "{detail:?} does not mention {needle:?}"
            );
            assert!(!err.is_retryable());
        }
        other => panic!("expected a protocol error about {needle:?}, got {other:?}"),
    }
}

#[test]
fn wrong_greeting_magic() {
    let (_dir, path) = serve(|mut s| {
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    assert_protocol(connect(&path, &[]).unwrap_err(), "NBDMAGIC");
}

#[test]
fn silent_server_times_out() {
    let (_dir, path) = serve(|s| {
        thread::sleep(Duration::from_secs(3));
        drop(s);
    });
    let transport = Transport::unix(&path, Duration::from_millis(200)).unwrap();
    let err = Client::connect(transport, "", &[]).unwrap_err();
    assert!(matches!(err, NbdError::Io { .. }), "{err:?}");
    assert!(err.is_retryable(), "{err:?}");
}

#[test]
fn server_closing_during_handshake() {
    let (_dir, path) = serve(|mut s| {
        s.write_all(&NBDMAGIC.to_be_bytes()).unwrap();
    });
    match connect(&path, &[]).unwrap_err() {
        NbdError::Io { source, .. } => assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof),
        other => panic!("expected end of file, got {other:?}"),
    }
}

#[test]
fn oversized_option_reply_is_refused_before_allocating() {
    let (_dir, path) = serve(|mut s| {
        greet(&mut s);
        let (option, _) = read_option(&mut s);
        let mut msg = REP_MAGIC.to_be_bytes().to_vec();
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&REP_ACK.to_be_bytes());
        msg.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
        s.write_all(&msg).unwrap();
    });
    assert_protocol(
        connect(&path, &[]).unwrap_err(),
        "announces 4294967280 bytes",
    );
}

#[test]
fn refused_option_names_the_option() {
    let (_dir, path) = serve(|mut s| {
        greet(&mut s);
        let (option, _) = read_option(&mut s);
        option_reply(&mut s, option, REP_ACK, &[]);
        let (option, _) = read_option(&mut s);
        option_reply(&mut s, option, REP_ERR_POLICY, b"go away");
    });
    let err = connect(&path, &[]).unwrap_err();
    assert!(matches!(
        &err,
        NbdError::OptionRefused {
            option: "NBD_OPT_GO",
            reply: "NBD_REP_ERR_POLICY",
            ..
        }
    ));
    assert!(err.to_string().contains("go away"), "{err}");
}

#[test]
fn server_closing_mid_reply() {
    let err = read_error(|s, req| {
        let mut payload = req.offset.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0xab; 100]);
        chunk(
            s,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            req.cookie,
            8 + 4096,
            &payload,
        );
        s.shutdown(std::net::Shutdown::Both).unwrap();
    });
    match &err {
        NbdError::Io { source, .. } => assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof),
        other => panic!("expected end of file, got {other:?}"),
    }
}

#[test]
fn wrong_reply_magic() {
    assert_protocol(
        read_error(|s, _| s.write_all(&[0xde; 32]).unwrap()),
        "magic",
    );
}

#[test]
fn cookie_mismatch() {
    assert_protocol(
        read_error(|s, req| data_chunk(s, REPLY_FLAG_DONE, req.cookie + 1, req.offset, &[0; 4096])),
        "cookie",
    );
}

#[test]
fn oversized_data_chunk() {
    assert_protocol(
        read_error(|s, req| {
            chunk(
                s,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                u32::MAX,
                &[],
            )
        }),
        "for a read of 4096",
    );
}

#[test]
fn data_outside_the_request() {
    assert_protocol(
        read_error(|s, req| data_chunk(s, REPLY_FLAG_DONE, req.cookie, req.offset + 1, &[0; 4096])),
        "outside the request",
    );
}

#[test]
fn hole_of_wrong_length() {
    assert_protocol(
        read_error(|s, req| {
            chunk(
                s,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_HOLE,
                req.cookie,
                16,
                &[0; 16],
            )
        }),
        "not 12",
    );
}

#[test]
fn unknown_reply_type() {
    assert_protocol(
        read_error(|s, req| chunk(s, REPLY_FLAG_DONE, 99, req.cookie, 0, &[])),
        "type 99",
    );
}

#[test]
fn chunks_that_do_not_cover_the_read() {
    assert_protocol(
        read_error(|s, req| data_chunk(s, REPLY_FLAG_DONE, req.cookie, req.offset, &[1; 2048])),
        "not sent",
    );
}

#[test]
fn overlapping_chunks() {
    assert_protocol(
        read_error(|s, req| {
            data_chunk(s, 0, req.cookie, req.offset, &[1; 2048]);
            data_chunk(
                s,
                REPLY_FLAG_DONE,
                req.cookie,
                req.offset + 1024,
                &[1; 3072],
            );
        }),
        "overlap",
    );
}

#[test]
fn error_chunk_is_a_command_error_and_keeps_the_connection() {
    let (_dir, path) = serve(|mut s| {
        negotiate(&mut s, true);
        let req = read_request(&mut s);
        let mut payload = 5u32.to_be_bytes().to_vec();
        payload.extend_from_slice(&(9u16).to_be_bytes());
        payload.extend_from_slice(b"bad block");
        payload.extend_from_slice(&(req.offset + 512).to_be_bytes());
        chunk(
            &mut s,
            0,
            REPLY_TYPE_ERROR_OFFSET,
            req.cookie,
            payload.len() as u32,
            &payload,
        );
        data_chunk(&mut s, REPLY_FLAG_DONE, req.cookie, req.offset, &[3; 4096]);
        let req = read_request(&mut s);
        // Data in two pieces, the second a hole.
        data_chunk(&mut s, 0, req.cookie, req.offset, &[7; 1024]);
        let mut hole = (req.offset + 1024).to_be_bytes().to_vec();
        hole.extend_from_slice(&3072u32.to_be_bytes());
        chunk(
            &mut s,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_HOLE,
            req.cookie,
            12,
            &hole,
        );
    });
    let mut client = connect(&path, &[]).unwrap();
    let mut buf = vec![0xee; 4096];
    let err = client.read_at(4096, &mut buf).unwrap_err();
    match &err {
        NbdError::Command {
            errno: 5,
            message,
            command: "NBD_CMD_READ",
            ..
        } => {
            assert!(
                message.contains("bad block") && message.contains("4608"),
                "{message}"
            )
        }
        other => panic!("expected EIO, got {other:?}"),
    }
    assert!(!err.is_retryable());
    client.read_at(0, &mut buf).unwrap();
    assert!(buf[..1024].iter().all(|&b| b == 7) && buf[1024..].iter().all(|&b| b == 0));
}

#[test]
fn simple_replies_when_structured_replies_are_refused() {
    let (_dir, path) = serve(|mut s| {
        negotiate(&mut s, false);
        let req = read_request(&mut s);
        simple_reply(&mut s, 22, req.cookie, &[]);
        let req = read_request(&mut s);
        assert_eq!(req.command, CMD_READ);
        let data: Vec<u8> = (0..req.len)
            .map(|i| (req.offset as u32 + i) as u8)
            .collect();
        simple_reply(&mut s, 0, req.cookie, &data);
        let req = read_request(&mut s);
        assert_eq!(req.command, CMD_DISC);
    });
    let mut client = connect(&path, &[]).unwrap();
    assert!(!client.structured_replies());
    assert!(client.can_multi_conn());
    let mut buf = vec![0; 300];
    assert!(matches!(
        client.read_at(0, &mut buf),
        Err(NbdError::Command { errno: 22, .. })
    ));
    client.read_at(1000, &mut buf).unwrap();
    assert!(
        buf.iter()
            .enumerate()
            .all(|(i, &b)| b == (1000 + i as u32) as u8)
    );
    client.close().unwrap();
}

#[test]
fn meta_contexts_need_structured_replies() {
    let (_dir, path) = serve(|mut s| negotiate(&mut s, false));
    assert!(matches!(
        connect(&path, &["base:allocation"]),
        Err(NbdError::MetaContextUnavailable { .. })
    ));
}

#[test]
fn block_status_loops_over_short_answers_and_clips() {
    let (_dir, path) = serve(|mut s| {
        negotiate(&mut s, true);
        // First answer covers only 64 KiB of the request, in two extents, for both contexts.
        let req = read_request(&mut s);
        assert_eq!(
            (req.command, req.offset, req.len),
            (CMD_BLOCK_STATUS, 0, SIZE as u32)
        );
        for (id, flags) in [(8u32, [1u32, 1]), (7, [0, 3])] {
            let mut payload = id.to_be_bytes().to_vec();
            for f in flags {
                payload.extend_from_slice(&(32u32 << 10).to_be_bytes());
                payload.extend_from_slice(&f.to_be_bytes());
            }
            chunk(
                &mut s,
                0,
                REPLY_TYPE_BLOCK_STATUS,
                req.cookie,
                payload.len() as u32,
                &payload,
            );
        }
        chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0, &[]);
        // Second answer describes more than asked; the client must clip it.
        let req = read_request(&mut s);
        assert_eq!((req.offset, req.len), (64 << 10, SIZE as u32 - (64 << 10)));
        let mut payload = 8u32.to_be_bytes().to_vec();
        payload.extend_from_slice(&(SIZE as u32).to_be_bytes());
        payload.extend_from_slice(&1u32.to_be_bytes());
        chunk(
            &mut s,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            req.cookie,
            payload.len() as u32,
            &payload,
        );
        // Third: a descriptor table whose length is not a whole number of descriptors.
        let req = read_request(&mut s);
        chunk(
            &mut s,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            req.cookie,
            4 + 7,
            &[0; 11],
        );
    });
    let mut client = connect(&path, &["base:allocation", "qemu:dirty-bitmap:b0"]).unwrap();
    let extents = client
        .block_status(0, SIZE, "qemu:dirty-bitmap:b0")
        .unwrap();
    assert_eq!(
        extents,
        vec![Extent {
            offset: 0,
            len: SIZE,
            flags: 1
        }]
    );
    assert_protocol(
        client.block_status(0, 4096, "base:allocation").unwrap_err(),
        "4 + 8n",
    );
}
