//! Arbitrary bytes as everything a server says to the NBD client: the handshake's option replies, then
//! the replies to a read, a pipelined vectored read, a block status, a write, a write zeroes and a flush.
//! Errors are expected; a panic, a hang or an allocation the input did not pay for is a bug.
//!
//! Input layout: byte 0 chooses the client's settings (bit 0: ask for `base:allocation`; bit 1: also ask
//! for `qemu:dirty-bitmap:b0`; bits 2-4: requests in flight minus one); the rest is the server's stream.
//! The stream ends where the input does, and reading past it is an error (`UnexpectedEof`), so no input
//! can make the client wait. `fuzz/make_seeds.py` writes well-formed conversations as seeds.

#![no_main]

use std::io::{self, Cursor, Read, Write};

use backflow_nbd::{Client, Transport};
use libfuzzer_sys::fuzz_target;

/// A server that says its script whatever it is sent, and swallows the requests.
struct Script(Cursor<Vec<u8>>);

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Script {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&settings, server)) = data.split_first() else {
        return;
    };
    let mut contexts = Vec::new();
    if settings & 1 != 0 {
        contexts.push("base:allocation");
        if settings & 2 != 0 {
            contexts.push("qemu:dirty-bitmap:b0");
        }
    }
    let transport = Transport::from_stream(Script(Cursor::new(server.to_vec())), "fuzz");
    let Ok(mut client) = Client::connect(transport, "", &contexts) else {
        return;
    };
    client.set_max_in_flight(usize::from((settings >> 2) & 7) + 1);
    let size = client.size();

    let mut buf = vec![0u8; size.min(8192) as usize];
    let _ = client.read_at(0, &mut buf);

    if size >= 6000 {
        let (mut a, mut b, mut c) = (vec![0u8; 1000], Vec::new(), vec![0u8; 5000]);
        let _ = client.read_vectored_at(0, &mut [&mut a, &mut b, &mut c]);
    }

    for context in &contexts {
        if let Ok(extents) = client.block_status(0, size.min(1 << 20), context) {
            // The client promises an exact cover of the range.
            let mut pos = 0;
            for e in &extents {
                assert_eq!(e.offset, pos);
                assert!(e.len > 0);
                pos += e.len;
            }
            assert_eq!(pos, size.min(1 << 20));
        }
    }

    let _ = client.write_at(0, &vec![1u8; size.min(4096) as usize]);
    let _ = client.write_zeroes(0, size.min(8192));
    let _ = client.flush();
    let _ = client.close();
});
