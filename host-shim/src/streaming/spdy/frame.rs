//! SPDY/3.1 frames: parsing and encoding of the frame layer, and the
//! name/value header blocks (zlib with the SPDY dictionary, one compression
//! context per direction of a connection).
//!
//! Bounds: a frame's payload is at most [`MAX_FRAME`], a decompressed header
//! block at most [`MAX_HEADER_BLOCK`] with at most [`MAX_HEADERS`] pairs.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

pub const VERSION: u16 = 3;
/// Largest frame payload accepted (data or control). Clients write 32 KiB.
pub const MAX_FRAME: usize = 1 << 20;
/// Largest decompressed header block.
pub const MAX_HEADER_BLOCK: usize = 64 << 10;
/// Most name/value pairs in one block.
pub const MAX_HEADERS: usize = 256;

pub const FLAG_FIN: u8 = 0x01;
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;

/// RST_STREAM status codes.
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
    pub const STREAM_IN_USE: u32 = 8;
    pub const FRAME_TOO_LARGE: u32 = 11;
}

/// GOAWAY status codes.
pub mod goaway {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INTERNAL_ERROR: u32 = 2;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("unsupported spdy version {0}")]
    Version(u16),
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    #[error("header block: {0}")]
    Headers(String),
}

/// Header name/value pairs as they travel (names lowercase; one entry per name).
pub type Headers = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream: u32,
        flags: u8,
        data: Bytes,
    },
    SynStream {
        stream: u32,
        associated: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream: u32,
        status: u32,
    },
    Settings {
        flags: u8,
        entries: Vec<(u8, u32, u32)>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_stream: u32,
        status: u32,
    },
    Headers {
        stream: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream: u32,
        delta: u32,
    },
    /// A control frame of a type this implementation does not know: ignored (spec).
    Unknown {
        kind: u16,
    },
}

/// The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00
/// §2.6.10.1): length-prefixed header words, then a text tail.
pub fn dictionary() -> &'static [u8] {
    static DICT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    DICT.get_or_init(|| {
        const WORDS: &[&str] = &[
            "options",
            "head",
            "post",
            "put",
            "delete",
            "trace",
            "accept",
            "accept-charset",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "connection",
            "content-base",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-md5",
            "content-range",
            "content-type",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "location",
            "max-forwards",
            "pragma",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "retry-after",
            "server",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "user-agent",
            "vary",
            "via",
            "warning",
            "www-authenticate",
            "method",
            "get",
            "status",
            "200 OK",
            "version",
            "HTTP/1.1",
            "url",
            "public",
            "set-cookie",
            "keep-alive",
            "origin",
        ];
        const TAIL: &str = concat!(
            "100101201202205206300302303304305306307402405406407408409410411412413414415416417",
            "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently",
            "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error",
            "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct ",
            "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,",
            "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,",
            "publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
        );
        let mut d = Vec::new();
        for w in WORDS {
            d.extend_from_slice(&(w.len() as u32).to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        d.extend_from_slice(TAIL.as_bytes());
        d
    })
}

/// The compressing side of one direction of a connection.
pub struct HeaderEncoder {
    z: Compress,
}

impl Default for HeaderEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderEncoder {
    pub fn new() -> Self {
        let mut z = Compress::new(Compression::default(), true);
        // The dictionary is a constant: setting it cannot fail.
        let _ = z.set_dictionary(dictionary());
        Self { z }
    }

    /// Encodes and compresses one header block (sync flush: self-contained
    /// for the reader, sharing the window with earlier blocks).
    pub fn encode(&mut self, headers: &[(String, String)]) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.put_u32(headers.len() as u32);
        for (k, v) in headers {
            raw.put_u32(k.len() as u32);
            raw.put_slice(k.to_ascii_lowercase().as_bytes());
            raw.put_u32(v.len() as u32);
            raw.put_slice(v.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input = &raw[..];
        loop {
            out.reserve(256);
            let before_in = self.z.total_in();
            let r = self.z.compress_vec(input, &mut out, FlushCompress::Sync);
            let used = (self.z.total_in() - before_in) as usize;
            input = &input[used..];
            // Done once all input is in and the flush left spare room.
            if r.is_err() || (input.is_empty() && out.len() < out.capacity()) {
                break;
            }
        }
        out
    }
}

/// The decompressing side of one direction of a connection.
pub struct HeaderDecoder {
    z: Decompress,
}

impl Default for HeaderDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderDecoder {
    pub fn new() -> Self {
        Self {
            z: Decompress::new(true),
        }
    }

    fn inflate(&mut self, mut input: &[u8]) -> Result<Vec<u8>, FrameError> {
        let mut out: Vec<u8> = Vec::with_capacity(1024);
        loop {
            if out.len() >= MAX_HEADER_BLOCK {
                return Err(FrameError::Headers("decompressed block too large".into()));
            }
            out.reserve((MAX_HEADER_BLOCK + 1 - out.len()).min(4096));
            let before_in = self.z.total_in();
            let before_out = out.len();
            let r = self
                .z
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            let used = (self.z.total_in() - before_in) as usize;
            input = &input[used..];
            match r {
                Ok(Status::StreamEnd) => break,
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(dictionary())
                        .map_err(|e| FrameError::Headers(format!("dictionary: {e}")))?;
                    continue;
                }
                Err(e) => return Err(FrameError::Headers(format!("inflate: {e}"))),
            }
            let progressed = used > 0 || out.len() > before_out;
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
            if !progressed {
                break;
            }
        }
        if out.len() > MAX_HEADER_BLOCK {
            return Err(FrameError::Headers("decompressed block too large".into()));
        }
        Ok(out)
    }

    /// Decompresses and parses one header block.
    pub fn decode(&mut self, block: &[u8]) -> Result<Headers, FrameError> {
        let raw = self.inflate(block)?;
        parse_block(&raw)
    }
}

fn parse_block(mut b: &[u8]) -> Result<Headers, FrameError> {
    let bad = |m: &str| FrameError::Headers(m.to_string());
    if b.len() < 4 {
        return Err(bad("truncated count"));
    }
    let n = b.get_u32() as usize;
    if n > MAX_HEADERS {
        return Err(bad("too many headers"));
    }
    let mut out: Headers = Vec::with_capacity(n);
    let take = |b: &mut &[u8]| -> Result<String, FrameError> {
        if b.len() < 4 {
            return Err(bad("truncated length"));
        }
        let len = b.get_u32() as usize;
        if len > b.len() {
            return Err(bad("truncated string"));
        }
        let s = String::from_utf8(b[..len].to_vec()).map_err(|_| bad("not utf-8"))?;
        b.advance(len);
        Ok(s)
    };
    for _ in 0..n {
        let k = take(&mut b)?;
        let v = take(&mut b)?;
        if k.is_empty() {
            return Err(bad("empty header name"));
        }
        if out.iter().any(|(n, _)| n.eq_ignore_ascii_case(&k)) {
            return Err(bad("duplicate header name"));
        }
        out.push((k.to_ascii_lowercase(), v));
    }
    if !b.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(out)
}

/// Values of header `name` (case-insensitive; NUL separates several values).
pub fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Parses one frame from the front of `buf`: `Ok(None)` when more bytes are
/// needed; on success the frame's bytes are consumed.
pub fn parse(buf: &mut BytesMut, dec: &mut HeaderDecoder) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    if buf.len() < 8 + len {
        return Ok(None);
    }
    let head = buf.split_to(8);
    let mut p = buf.split_to(len).freeze();
    let flags = head[4];
    if head[0] & 0x80 == 0 {
        let stream = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & 0x7fff_ffff;
        if stream == 0 {
            return Err(FrameError::Malformed("data (stream 0)"));
        }
        return Ok(Some(Frame::Data {
            stream,
            flags,
            data: p,
        }));
    }
    let version = u16::from_be_bytes([head[0], head[1]]) & 0x7fff;
    if version != VERSION {
        return Err(FrameError::Version(version));
    }
    let kind = u16::from_be_bytes([head[2], head[3]]);
    let need = |p: &Bytes, n: usize, what: &'static str| {
        if p.len() < n {
            Err(FrameError::Malformed(what))
        } else {
            Ok(())
        }
    };
    let frame = match kind {
        1 => {
            need(&p, 10, "syn_stream")?;
            let stream = p.get_u32() & 0x7fff_ffff;
            let associated = p.get_u32() & 0x7fff_ffff;
            let priority = p.get_u8() >> 5;
            let _slot = p.get_u8();
            if stream == 0 {
                return Err(FrameError::Malformed("syn_stream (stream 0)"));
            }
            Frame::SynStream {
                stream,
                associated,
                priority,
                flags,
                headers: dec.decode(&p)?,
            }
        }
        2 | 8 => {
            need(&p, 4, "syn_reply")?;
            let stream = p.get_u32() & 0x7fff_ffff;
            let headers = dec.decode(&p)?;
            if kind == 2 {
                Frame::SynReply {
                    stream,
                    flags,
                    headers,
                }
            } else {
                Frame::Headers {
                    stream,
                    flags,
                    headers,
                }
            }
        }
        3 => {
            if p.len() != 8 {
                return Err(FrameError::Malformed("rst_stream"));
            }
            Frame::RstStream {
                stream: p.get_u32() & 0x7fff_ffff,
                status: p.get_u32(),
            }
        }
        4 => {
            need(&p, 4, "settings")?;
            let n = p.get_u32() as usize;
            if p.len() != n.saturating_mul(8) {
                return Err(FrameError::Malformed("settings"));
            }
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let fid = p.get_u32();
                entries.push(((fid >> 24) as u8, fid & 0x00ff_ffff, p.get_u32()));
            }
            Frame::Settings { flags, entries }
        }
        6 => {
            if p.len() != 4 {
                return Err(FrameError::Malformed("ping"));
            }
            Frame::Ping { id: p.get_u32() }
        }
        7 => {
            // SPDY/3 has a status; tolerate the 4-byte SPDY/2 form.
            need(&p, 4, "goaway")?;
            let last_stream = p.get_u32() & 0x7fff_ffff;
            let status = if p.len() >= 4 { p.get_u32() } else { 0 };
            Frame::GoAway {
                last_stream,
                status,
            }
        }
        9 => {
            if p.len() != 8 {
                return Err(FrameError::Malformed("window_update"));
            }
            Frame::WindowUpdate {
                stream: p.get_u32() & 0x7fff_ffff,
                delta: p.get_u32() & 0x7fff_ffff,
            }
        }
        other => Frame::Unknown { kind: other },
    };
    Ok(Some(frame))
}

fn control(out: &mut BytesMut, kind: u16, flags: u8, payload: &[u8]) {
    out.put_u16(0x8000 | VERSION);
    out.put_u16(kind);
    out.put_u32((u32::from(flags) << 24) | (payload.len() as u32 & 0x00ff_ffff));
    out.put_slice(payload);
}

/// Appends the wire form of `f` to `out`.
pub fn encode(f: &Frame, enc: &mut HeaderEncoder, out: &mut BytesMut) {
    match f {
        Frame::Data {
            stream,
            flags,
            data,
        } => {
            out.put_u32(stream & 0x7fff_ffff);
            out.put_u32((u32::from(*flags) << 24) | (data.len() as u32 & 0x00ff_ffff));
            out.put_slice(data);
        }
        Frame::SynStream {
            stream,
            associated,
            priority,
            flags,
            headers,
        } => {
            let mut p = Vec::new();
            p.put_u32(stream & 0x7fff_ffff);
            p.put_u32(associated & 0x7fff_ffff);
            p.put_u8((priority & 7) << 5);
            p.put_u8(0);
            p.extend(enc.encode(headers));
            control(out, 1, *flags, &p);
        }
        Frame::SynReply {
            stream,
            flags,
            headers,
        }
        | Frame::Headers {
            stream,
            flags,
            headers,
        } => {
            let kind = if matches!(f, Frame::SynReply { .. }) {
                2
            } else {
                8
            };
            let mut p = Vec::new();
            p.put_u32(stream & 0x7fff_ffff);
            p.extend(enc.encode(headers));
            control(out, kind, *flags, &p);
        }
        Frame::RstStream { stream, status } => {
            let mut p = Vec::new();
            p.put_u32(stream & 0x7fff_ffff);
            p.put_u32(*status);
            control(out, 3, 0, &p);
        }
        Frame::Settings { flags, entries } => {
            let mut p = Vec::new();
            p.put_u32(entries.len() as u32);
            for (f, id, v) in entries {
                p.put_u32((u32::from(*f) << 24) | (id & 0x00ff_ffff));
                p.put_u32(*v);
            }
            control(out, 4, *flags, &p);
        }
        Frame::Ping { id } => control(out, 6, 0, &id.to_be_bytes()),
        Frame::GoAway {
            last_stream,
            status,
        } => {
            let mut p = Vec::new();
            p.put_u32(last_stream & 0x7fff_ffff);
            p.put_u32(*status);
            control(out, 7, 0, &p);
        }
        Frame::WindowUpdate { stream, delta } => {
            let mut p = Vec::new();
            p.put_u32(stream & 0x7fff_ffff);
            p.put_u32(delta & 0x7fff_ffff);
            control(out, 9, 0, &p);
        }
        Frame::Unknown { kind } => control(out, *kind, 0, &[]),
    }
}

#[cfg(test)]
mod tests;
