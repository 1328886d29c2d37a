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

fn option_reply(s: &mut impl Write, option: u32, kind: u32, data: &[u8]) {
    let mut msg = REP_MAGIC.to_be_bytes().to_vec();
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&kind.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg).unwrap();
}

/// A well-behaved handshake: each requested meta context gets id 7, 8, ...; the export is [`SIZE`] bytes,
/// read-only.
fn negotiate(s: &mut UnixStream, structured: bool) {
    negotiate_with(
        s,
        structured,
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN,
        None,
    );
}

/// [`negotiate`] with other transmission flags and, when given, `NBD_INFO_BLOCK_SIZE` with this maximum.
fn negotiate_with(s: &mut UnixStream, structured: bool, flags: u16, max_block: Option<u32>) {
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
                info.extend_from_slice(&flags.to_be_bytes());
                option_reply(s, option, REP_INFO, &info);
                if let Some(max) = max_block {
                    let mut info = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    for word in [1u32, 4096, max] {
                        info.extend_from_slice(&word.to_be_bytes());
                    }
                    option_reply(s, option, REP_INFO, &info);
                }
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
fn chunk(s: &mut impl Write, flags: u16, kind: u16, cookie: u64, len: u32, payload: &[u8]) {
    let mut msg = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    msg.extend_from_slice(&flags.to_be_bytes());
    msg.extend_from_slice(&kind.to_be_bytes());
    msg.extend_from_slice(&cookie.to_be_bytes());
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(payload);
    let _ = s.write_all(&msg);
}

fn data_chunk(s: &mut impl Write, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
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

fn simple_reply(s: &mut impl Write, error: u32, cookie: u64, data: &[u8]) {
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

// ---- Writes ---------------------------------------------------------------------------------------------

fn read_payload(s: &mut UnixStream, req: &Request) -> Vec<u8> {
    let mut data = vec![0; req.len as usize];
    s.read_exact(&mut data).unwrap();
    data
}

fn error_chunk(s: &mut UnixStream, flags: u16, cookie: u64, errno: u32, message: &str) {
    let mut payload = errno.to_be_bytes().to_vec();
    payload.extend_from_slice(&(message.len() as u16).to_be_bytes());
    payload.extend_from_slice(message.as_bytes());
    chunk(
        s,
        flags,
        REPLY_TYPE_ERROR,
        cookie,
        payload.len() as u32,
        &payload,
    );
}

#[test]
fn writes_accept_simple_and_structured_acks_and_zeroes_fall_back_to_writes() {
    let (_dir, path) = serve(|mut s| {
        // Writable, with flush but without write zeroes.
        negotiate_with(&mut s, true, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH, None);
        let req = read_request(&mut s);
        assert_eq!((req.command, req.offset, req.len), (CMD_WRITE, 0, 4096));
        assert!(read_payload(&mut s, &req).iter().all(|&b| b == 1));
        simple_reply(&mut s, 0, req.cookie, &[]);

        let req = read_request(&mut s);
        assert_eq!((req.command, req.offset, req.len), (CMD_WRITE, 4096, 100));
        assert!(read_payload(&mut s, &req).iter().all(|&b| b == 2));
        chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0, &[]);

        let req = read_request(&mut s);
        read_payload(&mut s, &req);
        error_chunk(&mut s, 0, req.cookie, 28, "disk full");
        chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0, &[]);

        // Zeroes without NBD_FLAG_SEND_WRITE_ZEROES arrive as a write of zeros.
        let req = read_request(&mut s);
        assert_eq!((req.command, req.offset, req.len), (CMD_WRITE, 8192, 3000));
        assert!(read_payload(&mut s, &req).iter().all(|&b| b == 0));
        simple_reply(&mut s, 0, req.cookie, &[]);

        let req = read_request(&mut s);
        assert_eq!((req.command, req.offset, req.len), (CMD_FLUSH, 0, 0));
        chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0, &[]);

        // A data chunk is no answer to a write.
        let req = read_request(&mut s);
        read_payload(&mut s, &req);
        data_chunk(&mut s, REPLY_FLAG_DONE, req.cookie, req.offset, &[0; 10]);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let mut client = connect(&path, &[]).unwrap();
    assert!(!client.is_read_only());
    client.write_at(0, &[1; 4096]).unwrap();
    client.write_at(4096, &[2; 100]).unwrap();
    match client.write_at(0, &[3; 512]) {
        Err(NbdError::Command {
            errno: 28,
            command: "NBD_CMD_WRITE",
            message,
            ..
        }) => assert!(message.contains("disk full"), "{message}"),
        other => panic!("expected ENOSPC, got {other:?}"),
    }
    client.write_zeroes(8192, 3000).unwrap();
    client.flush().unwrap();
    assert_protocol(
        client.write_at(0, &[4; 10]).unwrap_err(),
        "not valid for NBD_CMD_WRITE",
    );
    assert!(matches!(client.flush(), Err(NbdError::Broken { .. })));
}

// ---- Pipelining -----------------------------------------------------------------------------------------

/// The byte a test server serves at `offset`.
fn byte_at(offset: u64) -> u8 {
    (offset % 251) as u8
}

fn bytes_at(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(byte_at).collect()
}

/// Answers a read completely with one data chunk.
fn answer(s: &mut UnixStream, req: &Request) {
    data_chunk(
        s,
        REPLY_FLAG_DONE,
        req.cookie,
        req.offset,
        &bytes_at(req.offset, u64::from(req.len)),
    );
}

/// Whether the client sent anything more within 200 ms.
fn client_sent_more(s: &mut UnixStream) -> bool {
    thread::sleep(Duration::from_millis(200));
    s.set_nonblocking(true).unwrap();
    let mut byte = [0; 1];
    // Anything read here fails the test anyway, so consuming it is fine.
    let more = match s.read(&mut byte) {
        Ok(n) => n > 0,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("peek: {e}"),
    };
    s.set_nonblocking(false).unwrap();
    more
}

#[test]
fn pipelined_reads_accept_out_of_order_interleaved_chunks() {
    let (_dir, path) = serve(|mut s| {
        negotiate_with(&mut s, true, FLAG_HAS_FLAGS | FLAG_READ_ONLY, Some(4096));
        // Three buffers of 8 KiB at 1000, split at the 4 KiB maximum block: six requests, all sent
        // before any reply because the window is eight.
        let reqs: Vec<Request> = (0..6).map(|_| read_request(&mut s)).collect();
        for (i, req) in reqs.iter().enumerate() {
            assert_eq!(
                (req.command, req.offset, req.len),
                (CMD_READ, 1000 + 4096 * i as u64, 4096)
            );
        }
        // Last request first; then the chunks of requests 0 and 1 interleaved, each in pieces and one
        // with a hole; then the rest in reverse.
        answer(&mut s, &reqs[5]);
        let (a, b) = (&reqs[0], &reqs[1]);
        data_chunk(
            &mut s,
            0,
            b.cookie,
            b.offset + 2048,
            &bytes_at(b.offset + 2048, 2048),
        );
        data_chunk(&mut s, 0, a.cookie, a.offset, &bytes_at(a.offset, 1000));
        data_chunk(
            &mut s,
            REPLY_FLAG_DONE,
            b.cookie,
            b.offset,
            &bytes_at(b.offset, 2048),
        );
        data_chunk(
            &mut s,
            0,
            a.cookie,
            a.offset + 1000,
            &bytes_at(a.offset + 1000, 3096),
        );
        chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, a.cookie, 0, &[]);
        for req in reqs[2..5].iter().rev() {
            answer(&mut s, req);
        }

        // Second call with a window of two: exactly two requests arrive until one is answered.
        let first = read_request(&mut s);
        let second = read_request(&mut s);
        assert!(
            !client_sent_more(&mut s),
            "a third request was sent past the window of two"
        );
        answer(&mut s, &second);
        let third = read_request(&mut s);
        assert!(!client_sent_more(&mut s));
        answer(&mut s, &third);
        answer(&mut s, &first);
        let req = read_request(&mut s);
        assert_eq!(req.command, CMD_DISC);
    });
    let mut client = connect(&path, &[]).unwrap();
    assert_eq!(client.max_block(), 4096);
    assert_eq!(client.max_in_flight(), backflow_nbd::DEFAULT_MAX_IN_FLIGHT);
    let mut bufs = [[0x5au8; 8192]; 3];
    let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
    client.read_vectored_at(1000, &mut slices).unwrap();
    for (i, buf) in bufs.iter().enumerate() {
        assert!(
            buf[..] == bytes_at(1000 + 8192 * i as u64, 8192)[..],
            "buffer {i}"
        );
    }

    client.set_max_in_flight(2);
    assert_eq!(client.max_in_flight(), 2);
    let mut buf = vec![0; 3 * 4096];
    client.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, bytes_at(0, 3 * 4096));
    client.close().unwrap();
}

/// Sends three 4 KiB reads at 0, 4096, 8192 in one vectored call to a server that answers with `reply`
/// (given the three requests); returns the client's error and checks that the connection is then refused.
fn pipelined_error(reply: fn(&mut UnixStream, &[Request])) -> NbdError {
    let (_dir, path) = serve(move |mut s| {
        negotiate(&mut s, true);
        let reqs: Vec<Request> = (0..3).map(|_| read_request(&mut s)).collect();
        reply(&mut s, &reqs);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let mut client = connect(&path, &[]).unwrap();
    let mut bufs = [[0u8; 4096]; 3];
    let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
    let err = client.read_vectored_at(0, &mut slices).unwrap_err();
    if matches!(err, NbdError::Io { .. } | NbdError::Protocol { .. }) {
        let mut buf = [0; 10];
        assert!(matches!(
            client.read_at(0, &mut buf),
            Err(NbdError::Broken { .. })
        ));
    }
    err
}

#[test]
fn pipelined_reply_to_an_unknown_cookie() {
    assert_protocol(
        pipelined_error(|s, reqs| {
            answer(s, &reqs[1]);
            let cookies: Vec<u64> = reqs.iter().map(|r| r.cookie).collect();
            let stranger = (1..).find(|c| !cookies.contains(c)).unwrap();
            data_chunk(s, REPLY_FLAG_DONE, stranger, 0, &[0; 4096]);
        }),
        "matches no request in flight",
    );
}

#[test]
fn pipelined_duplicated_reply() {
    assert_protocol(
        pipelined_error(|s, reqs| {
            answer(s, &reqs[0]);
            answer(s, &reqs[0]);
            answer(s, &reqs[1]);
            answer(s, &reqs[2]);
        }),
        "matches no request in flight",
    );
}

#[test]
fn pipelined_chunk_outside_its_own_request() {
    // Valid for the neighbouring request, but not for the cookie it carries.
    assert_protocol(
        pipelined_error(|s, reqs| {
            data_chunk(
                s,
                REPLY_FLAG_DONE,
                reqs[0].cookie,
                reqs[1].offset,
                &[0; 4096],
            );
        }),
        "outside the request",
    );
}

#[test]
fn pipelined_simple_reply_after_chunks() {
    assert_protocol(
        pipelined_error(|s, reqs| {
            data_chunk(s, 0, reqs[2].cookie, reqs[2].offset, &[0; 100]);
            simple_reply(s, 0, reqs[2].cookie, &[]);
        }),
        "simple reply",
    );
}

#[test]
fn pipelined_missing_data() {
    assert_protocol(
        pipelined_error(|s, reqs| {
            answer(s, &reqs[0]);
            data_chunk(
                s,
                REPLY_FLAG_DONE,
                reqs[1].cookie,
                reqs[1].offset + 1,
                &[0; 4095],
            );
        }),
        "not sent",
    );
}

#[test]
fn pipelined_command_error_drains_the_other_replies() {
    let (_dir, path) = serve(|mut s| {
        negotiate(&mut s, true);
        let reqs: Vec<Request> = (0..3).map(|_| read_request(&mut s)).collect();
        answer(&mut s, &reqs[2]);
        error_chunk(&mut s, REPLY_FLAG_DONE, reqs[1].cookie, 5, "bad sector");
        answer(&mut s, &reqs[0]);
        // The client sent nothing more after the error, and reads on afterwards.
        let req = read_request(&mut s);
        assert_eq!((req.command, req.offset), (CMD_READ, 100));
        answer(&mut s, &req);
    });
    let mut client = connect(&path, &[]).unwrap();
    let mut bufs = [[0u8; 4096]; 3];
    let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
    match client.read_vectored_at(0, &mut slices) {
        Err(NbdError::Command {
            errno: 5,
            offset: 4096,
            ..
        }) => {}
        other => panic!("expected EIO at 4096, got {other:?}"),
    }
    let mut buf = vec![0; 50];
    client.read_at(100, &mut buf).unwrap();
    assert_eq!(buf, bytes_at(100, 50));
}

#[test]
fn pipelined_reads_time_out_on_a_silent_server() {
    let (_dir, path) = serve(|mut s| {
        negotiate(&mut s, true);
        let reqs: Vec<Request> = (0..3).map(|_| read_request(&mut s)).collect();
        answer(&mut s, &reqs[1]);
        thread::sleep(Duration::from_secs(3));
    });
    let transport = Transport::unix(&path, Duration::from_millis(200)).unwrap();
    let mut client = Client::connect(transport, "", &[]).unwrap();
    let mut bufs = [[0u8; 4096]; 3];
    let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
    let err = client.read_vectored_at(0, &mut slices).unwrap_err();
    assert!(matches!(err, NbdError::Io { .. }), "{err:?}");
    assert!(err.is_retryable(), "{err:?}");
    assert!(matches!(
        client.read_at(0, &mut [0; 10]),
        Err(NbdError::Broken { .. })
    ));
}

#[test]
fn in_memory_script_that_ends_early_fails_instead_of_waiting() {
    // A server's whole side of the conversation, as bytes: greeting, structured replies agreed, the
    // export, then a read reply cut off in the middle of its data.
    let mut script = NBDMAGIC.to_be_bytes().to_vec();
    script.extend_from_slice(&IHAVEOPT.to_be_bytes());
    script.extend_from_slice(&FLAG_FIXED_NEWSTYLE.to_be_bytes());
    option_reply(&mut script, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
    info.extend_from_slice(&SIZE.to_be_bytes());
    info.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_READ_ONLY).to_be_bytes());
    option_reply(&mut script, OPT_GO, REP_INFO, &info);
    option_reply(&mut script, OPT_GO, REP_ACK, &[]);
    data_chunk(&mut script, REPLY_FLAG_DONE, 1, 0, &[9; 100]);
    script.truncate(script.len() - 50);

    /// Replays `script` and ignores what the client sends.
    struct Replay(std::io::Cursor<Vec<u8>>);
    impl Read for Replay {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(buf)
        }
    }
    impl Write for Replay {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let transport = Transport::from_stream(Replay(std::io::Cursor::new(script)), "script");
    let mut client = Client::connect(transport, "", &[]).unwrap();
    assert_eq!(client.size(), SIZE);
    let mut buf = [0; 100];
    match client.read_at(0, &mut buf).unwrap_err() {
        NbdError::Io { source, peer, .. } => {
            assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof);
            assert_eq!(peer, "script");
        }
        other => panic!("expected end of file, got {other:?}"),
    }
    assert!(matches!(
        client.read_at(0, &mut buf),
        Err(NbdError::Broken { .. })
    ));
}
