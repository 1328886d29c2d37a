//! The server (`server.rs`) against our own client and against raw bytes: handshake options,
//! reads and block status from in-memory exports, refused requests that leave the connection
//! usable, broken framing that closes only that connection, many connections at once.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use backflow_nbd::proto::*;
use backflow_nbd::server::{
    EINVAL, EIO, EPERM, Export, ExportError, Exports, MemoryExport, Piece, Server, serve_pair,
};
use backflow_nbd::{Client, Extent, NbdError, STATE_HOLE, STATE_ZERO, Transport};

/// 1 MiB: data in the first 64 KiB, zeros up to 256 KiB, a pattern to 512 KiB, zeros to the end
/// but one byte at 1 MiB - 1.
fn image() -> Vec<u8> {
    let mut v = vec![0u8; 1 << 20];
    for (i, b) in v[..64 << 10].iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    for (i, b) in v[256 << 10..512 << 10].iter_mut().enumerate() {
        *b = (i * 7 % 253) as u8;
    }
    *v.last_mut().unwrap() = 9;
    v
}

fn server_of(data: Vec<u8>) -> Arc<Server> {
    let mut exports = Exports::new();
    exports.add("disk", Arc::new(MemoryExport::new(data.clone())), true);
    exports.add("other", Arc::new(MemoryExport::new(vec![7u8; 8192])), false);
    Server::new(exports)
}

fn client(server: &Arc<Server>, export: &str, contexts: &[&str]) -> Result<Client, NbdError> {
    let (stream, _) = serve_pair(server).unwrap();
    Client::connect(Transport::from_stream(stream, "pair"), export, contexts)
}

#[test]
fn reads_return_the_bytes_and_block_status_the_zeros() {
    let data = image();
    let server = server_of(data.clone());
    let mut c = client(&server, "disk", &["base:allocation"]).unwrap();
    assert_eq!(c.size(), data.len() as u64);
    assert!(c.is_read_only() && c.can_multi_conn());
    assert!(c.transmission_flags() & FLAG_SEND_DF != 0);
    let mut all = vec![0u8; data.len()];
    c.read_at(0, &mut all).unwrap();
    assert_eq!(all, data);
    // Unaligned, across data and zeros.
    let mut part = vec![0u8; 300_001];
    c.read_at(60_000, &mut part).unwrap();
    assert_eq!(part, data[60_000..360_001]);
    let extents = c
        .block_status(0, data.len() as u64, "base:allocation")
        .unwrap();
    let zero = STATE_HOLE | STATE_ZERO;
    assert_eq!(
        extents,
        vec![
            Extent {
                offset: 0,
                len: 64 << 10,
                flags: 0
            },
            Extent {
                offset: 64 << 10,
                len: 192 << 10,
                flags: zero
            },
            Extent {
                offset: 256 << 10,
                len: 256 << 10,
                flags: 0
            },
            Extent {
                offset: 512 << 10,
                len: (512 << 10) - 4096,
                flags: zero
            },
            Extent {
                offset: (1 << 20) - 4096,
                len: 4096,
                flags: 0
            },
        ]
    );
    c.close().unwrap();
}

#[test]
fn the_default_export_is_the_empty_name_and_unknown_names_are_refused() {
    let server = server_of(image());
    let c = client(&server, "", &[]).unwrap();
    assert_eq!(c.size(), 1 << 20);
    let c = client(&server, "other", &[]).unwrap();
    assert_eq!(c.size(), 8192);
    match client(&server, "nope", &[]) {
        Err(NbdError::OptionRefused { code, message, .. }) => {
            assert_eq!(code, REP_ERR_UNKNOWN);
            assert!(message.contains("disk, other"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

/// An export whose reads fail past 4 KiB: a damaged chunk.
struct Damaged;

impl Export for Damaged {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read(&self, offset: u64, len: u32) -> Result<Vec<Piece>, ExportError> {
        if offset + u64::from(len) > 4096 {
            return Err(ExportError::io("chunk 0123 at offset 4096 is damaged"));
        }
        Ok(vec![Piece::Data(vec![1u8; len as usize].into())])
    }
    fn extents(&self, offset: u64, len: u32) -> Result<Vec<Extent>, ExportError> {
        Ok(vec![Extent {
            offset,
            len: u64::from(len),
            flags: 0,
        }])
    }
}

#[test]
fn a_failed_read_is_eio_and_the_connection_stays_usable() {
    let mut exports = Exports::new();
    exports.add("d", Arc::new(Damaged), true);
    let server = Server::new(exports);
    let mut c = client(&server, "d", &[]).unwrap();
    let mut buf = vec![0u8; 8192];
    match c.read_at(0, &mut buf) {
        Err(NbdError::Command { errno, message, .. }) => {
            assert_eq!(errno, EIO);
            assert!(message.contains("damaged"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let mut ok = vec![0u8; 4096];
    c.read_at(0, &mut ok).unwrap();
    assert_eq!(ok, vec![1u8; 4096]);
}

#[test]
fn many_connections_read_at_once() {
    let data = image();
    let server = server_of(data.clone());
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let (server, data) = (server.clone(), data.clone());
            std::thread::spawn(move || {
                let mut c = client(&server, "disk", &[]).unwrap();
                for round in 0..20u64 {
                    let offset = (i * 37_000 + round * 13_000) % (900 << 10);
                    let mut buf = vec![0u8; 100_000];
                    c.read_at(offset, &mut buf).unwrap();
                    assert_eq!(buf, data[offset as usize..offset as usize + 100_000]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// A raw fixed newstyle client, for what our client never sends.
struct Raw(UnixStream);

impl Raw {
    fn open(server: &Arc<Server>) -> Raw {
        let (s, _) = serve_pair(server).unwrap();
        let mut raw = Raw(s);
        assert_eq!(raw.u64(), NBDMAGIC);
        assert_eq!(raw.u64(), IHAVEOPT);
        let flags = raw.u16();
        assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        raw.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        raw
    }
    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).unwrap();
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.0.read_exact(&mut b).unwrap();
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().unwrap())
    }
    fn option(&mut self, option: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }
    /// One option reply: (type, data).
    fn reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.u64(), REP_MAGIC);
        assert_eq!(self.u32(), option);
        let kind = self.u32();
        let len = self.u32() as usize;
        (kind, self.bytes(len))
    }
    /// `NBD_OPT_EXPORT_NAME`: (size, flags).
    fn export_name(&mut self, name: &str) -> (u64, u16) {
        self.option(OPT_EXPORT_NAME, name.as_bytes());
        (self.u64(), self.u16())
    }
    fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        self.send(&m);
    }
    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC);
        (self.u32(), self.u64())
    }
    /// A structured chunk: (flags, type, cookie, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(self.u32(), STRUCTURED_REPLY_MAGIC);
        let flags = self.u16();
        let kind = self.u16();
        let cookie = self.u64();
        let len = self.u32() as usize;
        (flags, kind, cookie, self.bytes(len))
    }
}

fn name_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

#[test]
fn list_shows_the_exports_and_unknown_options_are_unsupported() {
    let server = server_of(image());
    let mut raw = Raw::open(&server);
    raw.option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        match raw.reply(OPT_LIST) {
            (REP_SERVER, d) => {
                let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8(d[4..4 + n].to_vec()).unwrap());
            }
            (REP_ACK, _) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(names, ["disk", "other"]);
    raw.option(OPT_STARTTLS, &[]);
    assert_eq!(raw.reply(OPT_STARTTLS).0, REP_ERR_UNSUP);
    raw.option(99, b"whatever");
    assert_eq!(raw.reply(99).0, REP_ERR_UNSUP);
    // Meta contexts before structured replies: invalid.
    let mut q = name_data("disk");
    q.extend_from_slice(&1u32.to_be_bytes());
    q.extend_from_slice(&name_data("base:allocation"));
    raw.option(OPT_SET_META_CONTEXT, &q);
    assert_eq!(raw.reply(OPT_SET_META_CONTEXT).0, REP_ERR_INVALID);
    raw.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(raw.reply(OPT_STRUCTURED_REPLY).0, REP_ACK);
    // Listing with no query lists base:allocation.
    let mut all = name_data("disk");
    all.extend_from_slice(&0u32.to_be_bytes());
    raw.option(OPT_LIST_META_CONTEXT, &all);
    let (kind, d) = raw.reply(OPT_LIST_META_CONTEXT);
    assert_eq!((kind, &d[4..]), (REP_META_CONTEXT, &b"base:allocation"[..]));
    assert_eq!(raw.reply(OPT_LIST_META_CONTEXT).0, REP_ACK);
    // NBD_OPT_INFO with the name asked for, then abort.
    let mut info = name_data("");
    info.extend_from_slice(&1u16.to_be_bytes());
    info.extend_from_slice(&INFO_NAME.to_be_bytes());
    raw.option(OPT_INFO, &info);
    let mut got = Vec::new();
    loop {
        match raw.reply(OPT_INFO) {
            (REP_INFO, d) => got.push(d),
            (REP_ACK, _) => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        got.iter()
            .any(|d| d[..2] == INFO_NAME.to_be_bytes() && &d[2..] == b"disk")
    );
    let export = got
        .iter()
        .find(|d| d[..2] == INFO_EXPORT.to_be_bytes())
        .unwrap();
    assert_eq!(
        u64::from_be_bytes(export[2..10].try_into().unwrap()),
        1 << 20
    );
    raw.option(OPT_ABORT, &[]);
    assert_eq!(raw.reply(OPT_ABORT).0, REP_ACK);
}

#[test]
fn simple_replies_and_refused_requests_keep_the_connection() {
    let data = image();
    let server = server_of(data.clone());
    let mut raw = Raw::open(&server);
    let (size, flags) = raw.export_name("disk");
    assert_eq!(size, 1 << 20);
    assert!(flags & FLAG_READ_ONLY != 0 && flags & FLAG_SEND_DF == 0);
    // A read with a simple reply: header, then the bytes.
    raw.request(0, CMD_READ, 1, 1000, 70_000);
    assert_eq!(raw.simple(), (0, 1));
    assert_eq!(raw.bytes(70_000), data[1000..71_000]);
    // Out of range, too large, a write (its payload dropped), a trim, an unknown command, DF
    // without structured replies, block status without a context: errors, no payload.
    raw.request(0, CMD_READ, 2, (1 << 20) - 10, 11);
    assert_eq!(raw.simple(), (EINVAL, 2));
    raw.request(0, CMD_READ, 3, 0, 64 << 20);
    assert_eq!(raw.simple(), (EINVAL, 3));
    raw.request(0, CMD_WRITE, 4, 0, 5);
    raw.send(b"hello");
    assert_eq!(raw.simple(), (EPERM, 4));
    raw.request(0, CMD_TRIM, 5, 0, 4096);
    assert_eq!(raw.simple(), (EPERM, 5));
    raw.request(0, 42, 6, 0, 0);
    assert_eq!(raw.simple(), (EINVAL, 6));
    raw.request(CMD_FLAG_DF, CMD_READ, 7, 0, 10);
    assert_eq!(raw.simple(), (EINVAL, 7));
    raw.request(0, CMD_BLOCK_STATUS, 8, 0, 4096);
    assert_eq!(raw.simple(), (EINVAL, 8));
    raw.request(0, CMD_FLUSH, 9, 0, 0);
    assert_eq!(raw.simple(), (0, 9));
    // Still usable.
    raw.request(0, CMD_READ, 10, 0, 16);
    assert_eq!(raw.simple(), (0, 10));
    assert_eq!(raw.bytes(16), data[..16]);
    // A wrong magic closes this connection.
    raw.send(&[0u8; 28]);
    let mut rest = Vec::new();
    raw.0.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // The server still serves others.
    let mut c = client(&server, "disk", &[]).unwrap();
    let mut b = [0u8; 4];
    c.read_at(0, &mut b).unwrap();
}

#[test]
fn structured_reads_use_holes_and_df_gives_one_data_chunk() {
    let data = image();
    let server = server_of(data.clone());
    let mut raw = Raw::open(&server);
    raw.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(raw.reply(OPT_STRUCTURED_REPLY).0, REP_ACK);
    let (_, flags) = raw.export_name("disk");
    assert!(flags & FLAG_SEND_DF != 0);
    // 0..300K: data 64K, hole 192K, data 44K.
    raw.request(0, CMD_READ, 1, 0, 300 << 10);
    let mut chunks = Vec::new();
    loop {
        let (f, kind, cookie, payload) = raw.chunk();
        assert_eq!(cookie, 1);
        let offset = u64::from_be_bytes(payload[..8].try_into().unwrap());
        let len = if kind == REPLY_TYPE_OFFSET_HOLE {
            u64::from(u32::from_be_bytes(payload[8..12].try_into().unwrap()))
        } else {
            assert_eq!(
                payload[8..],
                data[offset as usize..offset as usize + payload.len() - 8]
            );
            payload.len() as u64 - 8
        };
        chunks.push((kind, offset, len));
        if f & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(
        chunks,
        vec![
            (REPLY_TYPE_OFFSET_DATA, 0, 64 << 10),
            (REPLY_TYPE_OFFSET_HOLE, 64 << 10, 192 << 10),
            (REPLY_TYPE_OFFSET_DATA, 256 << 10, 44 << 10),
        ]
    );
    raw.request(CMD_FLAG_DF, CMD_READ, 2, 0, 300 << 10);
    let (f, kind, cookie, payload) = raw.chunk();
    assert_eq!(
        (f & REPLY_FLAG_DONE, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 2)
    );
    assert_eq!(payload[8..], data[..300 << 10]);
    // Errors are error chunks.
    raw.request(0, CMD_READ, 3, 1 << 20, 1);
    let (f, kind, _, payload) = raw.chunk();
    assert_eq!((f, kind), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR));
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), EINVAL);
    raw.request(0, CMD_DISC, 4, 0, 0);
    let mut rest = Vec::new();
    raw.0.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn block_status_req_one_gives_one_extent() {
    let server = server_of(image());
    let mut c = client(&server, "disk", &["base:allocation"]).unwrap();
    // Our client loops until the range is covered; a raw request checks REQ_ONE.
    let e = c.block_status(64 << 10, 4096, "base:allocation").unwrap();
    assert_eq!(
        e,
        vec![Extent {
            offset: 64 << 10,
            len: 4096,
            flags: STATE_HOLE | STATE_ZERO
        }]
    );
    let mut raw = Raw::open(&server);
    raw.option(OPT_STRUCTURED_REPLY, &[]);
    raw.reply(OPT_STRUCTURED_REPLY);
    let mut q = name_data("disk");
    q.extend_from_slice(&1u32.to_be_bytes());
    q.extend_from_slice(&name_data("base:allocation"));
    raw.option(OPT_SET_META_CONTEXT, &q);
    let (kind, d) = raw.reply(OPT_SET_META_CONTEXT);
    assert_eq!(kind, REP_META_CONTEXT);
    let id = u32::from_be_bytes(d[..4].try_into().unwrap());
    assert_eq!(raw.reply(OPT_SET_META_CONTEXT).0, REP_ACK);
    raw.export_name("disk");
    raw.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 1, 0, 1 << 20);
    let (f, kind, _, payload) = raw.chunk();
    assert_eq!((f, kind), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS));
    assert_eq!(payload.len(), 12);
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), id);
    assert_eq!(
        u32::from_be_bytes(payload[4..8].try_into().unwrap()),
        64 << 10
    );
    assert_eq!(u32::from_be_bytes(payload[8..12].try_into().unwrap()), 0);
}
