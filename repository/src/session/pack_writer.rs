//! The pack writer of a backup session (and of a gc's rewrites): streams encoded chunks into pack files
//! in the session's scratch directory and publishes each one durably. The pack format itself is
//! `pack.rs`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

use tracing::debug;

use super::SessionShared;
use crate::config::{MAX_CHUNK_SIZE, MAX_STORED_LEN};
use crate::error::{IoContext, RepoError, Result};
use crate::format::{FORMAT_VERSION, FieldWriter};
use crate::pack::{
    FOOTER_HASHED, PACK_ENTRY_SIZE, PACK_FOOTER_MAGIC, PACK_FOOTER_SIZE, PACK_HEADER_SIZE,
    PackEntry, encode_header, pack_key,
};
use crate::store::PutMode;
use crate::{Codec, Digest, PackId};

/// Write buffer of a pack writer: large enough that a 64 KiB chunk is one `write` syscall or less, small
/// enough that eight writer threads hold a few MiB, never a whole pack.
const PACK_WRITE_BUFFER: usize = 1024 * 1024;

/// A pack being written in the session's scratch directory.
struct OpenPack {
    id: PackId,
    tmp: PathBuf,
    out: BufWriter<File>,
    offset: u64,
    entries: Vec<PackEntry>,
}

/// Streams encoded chunks into pack files, one pack at a time, for one writer thread.
///
/// A pack is closed when it reaches the repository's pack target size (it may exceed it by one blob), and on
/// [`PackWriter::finish`]. Closing writes the trailer and footer and publishes the file from the session's
/// scratch directory as `packs/XX/ID.pack`, durably; only then are its entries handed to the
/// session for the index, so the index never names a pack that is not durable.
///
/// The writer does not deduplicate: the caller looks chunks up before encoding them and remembers what it
/// already wrote in this session. Dropping a writer whose open pack holds chunks makes the session refuse to
/// commit, since the manifest could reference chunks that were never stored.
pub struct PackWriter {
    session: Arc<SessionShared>,
    current: Option<OpenPack>,
    bytes_written: u64,
    /// Set by a simulated crash in tests: leave the temporary pack behind like a killed process would.
    leave_scratch: bool,
    /// The thread that makes closed packs durable, started with the first full pack.
    publisher: Option<(
        std::sync::mpsc::SyncSender<ClosedPack>,
        std::thread::JoinHandle<Result<()>>,
    )>,
}

impl PackWriter {
    pub(crate) fn new(session: Arc<SessionShared>) -> PackWriter {
        session.writer_opened();
        PackWriter {
            session,
            current: None,
            bytes_written: 0,
            leave_scratch: false,
            publisher: None,
        }
    }

    /// Appends one encoded chunk. `data` is what `decode(codec, data, raw_len)` turns back into the plaintext
    /// whose BLAKE3 is `digest`.
    pub fn add(&mut self, digest: Digest, codec: Codec, raw_len: u32, data: &[u8]) -> Result<()> {
        let stored_len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        if raw_len > MAX_CHUNK_SIZE
            || stored_len > MAX_STORED_LEN
            || (codec == Codec::None && stored_len != raw_len)
        {
            return Err(RepoError::InvalidArgument(format!(
                "chunk {digest}: impossible lengths (stored {}, raw {raw_len}, codec {codec:?})",
                data.len()
            )));
        }
        self.append(digest, codec, raw_len, stored_len, data)
            .inspect_err(|e| self.abandon(e))
    }

    fn append(
        &mut self,
        digest: Digest,
        codec: Codec,
        raw_len: u32,
        stored_len: u32,
        data: &[u8],
    ) -> Result<()> {
        if self.current.is_none() {
            self.current = Some(self.start_pack()?);
        }
        let pack = self.current.as_mut().expect("just opened");
        pack.out.write_all(data).ctx("write pack", &pack.tmp)?;
        pack.entries.push(PackEntry {
            digest,
            offset: pack.offset,
            stored_len,
            raw_len,
            codec,
        });
        pack.offset += u64::from(stored_len);
        self.bytes_written += u64::from(stored_len);
        if pack.offset >= self.session.pack_target_size {
            self.seal()?;
        }
        Ok(())
    }

    /// Closes the last pack and hands its entries to the session. Must be called before `commit`.
    pub fn finish(mut self) -> Result<()> {
        let sealed = self.seal();
        let drained = self.drain_publisher();
        sealed.and(drained).inspect_err(|e| self.abandon(e))
    }

    /// After a failed write the open pack's contents no longer match its entries (part of a blob may be in
    /// the file), so it is discarded, and the session, whose manifest may already reference its chunks, can
    /// no longer commit.
    fn abandon(&mut self, e: &RepoError) {
        if let Some(pack) = self.current.take() {
            drop(pack.out);
            let _ = std::fs::remove_file(&pack.tmp);
        }
        self.session.poison(format!("a pack write failed: {e}"));
    }

    /// Bytes written to pack files so far, headers and trailers included.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    fn start_pack(&mut self) -> Result<OpenPack> {
        let id = PackId::random();
        let tmp = self
            .session
            .scratch
            .join(format!("{}.pack.tmp", id.to_hex()));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .ctx("create pack", &tmp)?;
        let mut out = BufWriter::with_capacity(PACK_WRITE_BUFFER, file);
        out.write_all(&encode_header(id)).ctx("write pack", &tmp)?;
        self.bytes_written += PACK_HEADER_SIZE as u64;
        Ok(OpenPack {
            id,
            tmp,
            out,
            offset: PACK_HEADER_SIZE as u64,
            entries: Vec::new(),
        })
    }

    /// Closes the open pack (trailer and footer) and has it published: in the background when the pack
    /// filled up, so that the writer thread goes on encoding while the kernel flushes the pack, and in the
    /// foreground on `finish`, after which every pack of this writer is published.
    fn seal(&mut self) -> Result<()> {
        let Some(pack) = self.current.take() else {
            return Ok(());
        };
        let closed = self.close(pack)?;
        let sender = match &self.publisher {
            Some(p) => p.0.clone(),
            None => {
                let (tx, rx) = std::sync::mpsc::sync_channel::<ClosedPack>(PUBLISH_QUEUE);
                let session = self.session.clone();
                let handle = std::thread::Builder::new()
                    .name("pack-publisher".into())
                    .spawn(move || -> Result<()> {
                        let mut first_error = None;
                        for closed in rx {
                            if first_error.is_some() {
                                let _ = std::fs::remove_file(&closed.tmp);
                                continue;
                            }
                            if let Err(e) = publish(&session, closed) {
                                session.poison(format!("publishing a pack failed: {e}"));
                                first_error = Some(e);
                            }
                        }
                        first_error.map_or(Ok(()), Err)
                    })
                    .map_err(|e| RepoError::io("start pack publisher", &self.session.scratch, e))?;
                self.publisher = Some((tx.clone(), handle));
                tx
            }
        };
        sender.send(closed).map_err(|_| RepoError::SessionFailed {
            session: self.session.id.clone(),
            reason: "the pack publisher stopped".into(),
        })
    }

    /// Waits until every pack handed to the publisher is durable and in the session.
    fn drain_publisher(&mut self) -> Result<()> {
        let Some((tx, handle)) = self.publisher.take() else {
            return Ok(());
        };
        drop(tx);
        handle.join().map_err(|_| RepoError::SessionFailed {
            session: self.session.id.clone(),
            reason: "the pack publisher panicked".into(),
        })?
    }

    fn close(&mut self, mut pack: OpenPack) -> Result<ClosedPack> {
        let header = encode_header(pack.id);
        let mut hasher = blake3::Hasher::new();
        hasher.update(&header);
        for e in &pack.entries {
            let b = e.encode();
            hasher.update(&b);
            pack.out.write_all(&b).ctx("write pack", &pack.tmp)?;
        }
        let mut footer = [0u8; PACK_FOOTER_SIZE];
        FieldWriter::new(&mut footer[..FOOTER_HASHED])
            .u64(pack.offset)
            .u64(pack.entries.len() as u64)
            .u32(FORMAT_VERSION)
            .u32(0)
            .finish();
        hasher.update(&footer[..FOOTER_HASHED]);
        FieldWriter::new(&mut footer[FOOTER_HASHED..])
            .bytes(hasher.finalize().as_bytes())
            .bytes(&PACK_FOOTER_MAGIC)
            .finish();
        pack.out.write_all(&footer).ctx("write pack", &pack.tmp)?;
        let file = pack
            .out
            .into_inner()
            .map_err(|e| RepoError::io("write pack", &pack.tmp, e.into_error()))?;
        self.bytes_written += (pack.entries.len() * PACK_ENTRY_SIZE + PACK_FOOTER_SIZE) as u64;
        Ok(ClosedPack {
            id: pack.id,
            tmp: pack.tmp,
            file,
            offset: pack.offset,
            entries: pack.entries,
        })
    }

    #[cfg(test)]
    pub(crate) fn crash(mut self) {
        self.leave_scratch = true;
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        if let Some(pack) = self.current.take() {
            if !pack.entries.is_empty() {
                self.session.poison(format!(
                    "a pack writer was dropped without finish(); {} chunks were lost",
                    pack.entries.len()
                ));
            }
            if !self.leave_scratch {
                drop(pack.out);
                let _ = std::fs::remove_file(&pack.tmp);
            }
        }
        let _ = self.drain_publisher();
        self.session.writer_closed();
    }
}

/// A pack whose trailer and footer are written, waiting to be made durable and published.
struct ClosedPack {
    id: PackId,
    tmp: PathBuf,
    file: File,
    offset: u64,
    entries: Vec<PackEntry>,
}

/// Packs closed but not yet published, per writer: while the publisher fsyncs one, the writer fills the
/// next; a writer that gets this far ahead waits.
const PUBLISH_QUEUE: usize = 2;

/// Publishes the pack from scratch as `packs/XX/ID.pack` (durably: [`crate::store::Store::publish`]); only
/// then are the pack's entries handed to the session for the index, so the index never names a pack that is
/// not durable.
fn publish(session: &SessionShared, pack: ClosedPack) -> Result<()> {
    drop(pack.file);
    session
        .store
        .publish(&pack.tmp, &pack_key(&pack.id), PutMode::Create)?;
    debug!(pack = %pack.id, chunks = pack.entries.len(), bytes = pack.offset, "Pack written.");
    session.add_pack(pack.id, &pack.entries)
}
