//! SPDY/3 header blocks: name/value pairs, zlib-compressed with the SPDY/3
//! dictionary. Each direction of a connection is one zlib stream across all
//! its header blocks (each block ends with a sync flush), so a connection
//! keeps one [`HeaderCodec`] and feeds it every block in order.
//!
//! ```text
//! u32 count, then count × (u32 name length, name, u32 value length, value)
//! ```

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The largest inflated header block accepted.
pub const MAX_BLOCK: usize = 64 * 1024;
/// The most name/value pairs in one block.
pub const MAX_PAIRS: usize = 128;

/// Names and values of one header block; names lowercase.
pub type Headers = Vec<(String, String)>;

/// What is wrong with a header block.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("header block does not inflate: {0}")]
    Inflate(String),
    #[error("header block inflates to more than {MAX_BLOCK} bytes")]
    TooLarge,
    #[error("header block has more than {MAX_PAIRS} pairs")]
    TooManyPairs,
    #[error("malformed header block")]
    Malformed,
}

/// The SPDY/3 zlib dictionary (draft 3, section 2.6.10.1): 65 length-
/// prefixed words, then a tail.
const DICT_WORDS: [&str; 65] = [
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

const DICT_TAIL: &str = "100101201202205206300302303304305306307402405406407408409410411412\
413414415416417502504505203 Non-Authoritative Information204 No Content301 Moved \
Permanently400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server \
Error501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct \
Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,\
image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,\
publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.";

/// The dictionary's bytes (1423 of them, Adler-32 0xe3c6a7c2).
pub fn dictionary() -> Vec<u8> {
    let mut d = Vec::with_capacity(1423);
    for w in DICT_WORDS {
        d.extend_from_slice(&(w.len() as u32).to_be_bytes());
        d.extend_from_slice(w.as_bytes());
    }
    d.extend_from_slice(DICT_TAIL.as_bytes());
    d
}

/// One connection's header compression state, both directions.
pub struct HeaderCodec {
    inflate: Decompress,
    deflate: Compress,
    dict: Vec<u8>,
}

impl std::fmt::Debug for HeaderCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderCodec").finish_non_exhaustive()
    }
}

impl Default for HeaderCodec {
    fn default() -> Self {
        HeaderCodec::new()
    }
}

impl HeaderCodec {
    pub fn new() -> HeaderCodec {
        let dict = dictionary();
        let mut deflate = Compress::new(Compression::default(), true);
        // A fresh stream accepts a dictionary; this cannot fail.
        let _ = deflate.set_dictionary(&dict);
        HeaderCodec {
            inflate: Decompress::new(true),
            deflate,
            dict,
        }
    }

    /// Inflates and parses one header block (the next in this direction).
    /// An error leaves the zlib stream unusable: the connection must end.
    pub fn decode(&mut self, block: &[u8]) -> Result<Headers, HeaderError> {
        let raw = self.inflate_block(block)?;
        parse_block(&raw)
    }

    fn inflate_block(&mut self, mut input: &[u8]) -> Result<Vec<u8>, HeaderError> {
        if input.is_empty() {
            return Err(HeaderError::Malformed);
        }
        let mut out: Vec<u8> = Vec::with_capacity(1024);
        loop {
            if out.capacity() - out.len() < 256 {
                if out.len() >= MAX_BLOCK {
                    return Err(HeaderError::TooLarge);
                }
                out.reserve(4096);
            }
            let (in_before, out_before) = (self.inflate.total_in(), self.inflate.total_out());
            let result = self
                .inflate
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            let consumed = (self.inflate.total_in() - in_before) as usize;
            let produced = self.inflate.total_out() - out_before;
            input = input.get(consumed..).ok_or(HeaderError::Malformed)?;
            match result {
                Ok(Status::StreamEnd) => return Err(HeaderError::Malformed),
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(&self.dict)
                        .map_err(|e| HeaderError::Inflate(e.to_string()))?;
                    continue;
                }
                Err(e) => return Err(HeaderError::Inflate(e.to_string())),
            }
            if out.len() > MAX_BLOCK {
                return Err(HeaderError::TooLarge);
            }
            if input.is_empty() && out.len() < out.capacity() {
                return Ok(out);
            }
            if consumed == 0 && produced == 0 && out.len() < out.capacity() {
                // No progress with room to write: the input is cut short.
                return Err(HeaderError::Malformed);
            }
        }
    }

    /// Builds and compresses one header block (the next in this direction).
    pub fn encode(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = (headers.len() as u32).to_be_bytes().to_vec();
        for (name, value) in headers {
            raw.extend_from_slice(&(name.len() as u32).to_be_bytes());
            raw.extend_from_slice(name.as_bytes());
            raw.extend_from_slice(&(value.len() as u32).to_be_bytes());
            raw.extend_from_slice(value.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input = &raw[..];
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(1024);
            }
            let before = self.deflate.total_in();
            // Compressing into a buffer with room does not fail.
            let _ = self
                .deflate
                .compress_vec(input, &mut out, FlushCompress::Sync);
            input = &input[(self.deflate.total_in() - before) as usize..];
            if input.is_empty() && out.len() < out.capacity() {
                return out;
            }
        }
    }
}

fn parse_block(raw: &[u8]) -> Result<Headers, HeaderError> {
    let mut pos = 0usize;
    let next_u32 = |pos: &mut usize| -> Result<usize, HeaderError> {
        let b = raw.get(*pos..*pos + 4).ok_or(HeaderError::Malformed)?;
        *pos += 4;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let count = next_u32(&mut pos)?;
    if count > MAX_PAIRS {
        return Err(HeaderError::TooManyPairs);
    }
    let string = |pos: &mut usize| -> Result<String, HeaderError> {
        let len = next_u32(pos)?;
        let end = pos.checked_add(len).ok_or(HeaderError::Malformed)?;
        let bytes = raw.get(*pos..end).ok_or(HeaderError::Malformed)?;
        *pos = end;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    };
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let name = string(&mut pos)?.to_ascii_lowercase();
        let value = string(&mut pos)?;
        if name.is_empty() {
            return Err(HeaderError::Malformed);
        }
        headers.push((name, value));
    }
    Ok(headers)
}

/// The first value of `name` (lowercase) in `headers`.
pub fn get<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.split('\0').next().unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_the_specs() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        // Adler-32, computed here so the test needs nothing else.
        let (mut a, mut b) = (1u32, 0u32);
        for byte in &d {
            a = (a + u32::from(*byte)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!(b << 16 | a, 0xe3c6_a7c2);
    }

    #[test]
    fn blocks_round_trip_across_one_stream() {
        let mut sender = HeaderCodec::new();
        let mut receiver = HeaderCodec::new();
        for i in 0..5 {
            let port = i.to_string();
            let block = sender.encode(&[("streamtype", "data"), ("port", &port)]);
            let headers = receiver.decode(&block).expect("decodes");
            assert_eq!(get(&headers, "streamtype"), Some("data"));
            assert_eq!(get(&headers, "port"), Some(port.as_str()));
        }
        let empty = sender.encode(&[]);
        assert_eq!(receiver.decode(&empty).expect("empty block"), vec![]);
    }

    #[test]
    fn a_block_compressed_by_plain_zlib_with_the_dictionary_decodes() {
        // As Go's compress/zlib writes it (the client side of kubectl).
        let mut c = Compress::new(Compression::best(), true);
        c.set_dictionary(&dictionary()).unwrap();
        let mut raw = 1u32.to_be_bytes().to_vec();
        raw.extend_from_slice(&10u32.to_be_bytes());
        raw.extend_from_slice(b"StreamType");
        raw.extend_from_slice(&5u32.to_be_bytes());
        raw.extend_from_slice(b"error");
        let mut out = Vec::with_capacity(256);
        c.compress_vec(&raw, &mut out, FlushCompress::Sync).unwrap();
        let headers = HeaderCodec::new().decode(&out).expect("decodes");
        assert_eq!(headers, vec![("streamtype".into(), "error".into())]);
    }

    #[test]
    fn hostile_blocks_are_errors() {
        assert_eq!(HeaderCodec::new().decode(&[]), Err(HeaderError::Malformed));
        assert!(HeaderCodec::new().decode(b"not zlib at all").is_err());
        // Pair count over the bound.
        let mut c = HeaderCodec::new();
        let mut raw = 1000u32.to_be_bytes().to_vec();
        raw.extend_from_slice(&[0; 16]);
        let mut out = Vec::with_capacity(256);
        c.deflate
            .compress_vec(&raw, &mut out, FlushCompress::Sync)
            .unwrap();
        assert_eq!(
            HeaderCodec::new().decode(&out),
            Err(HeaderError::TooManyPairs)
        );
        // A length that points past the block.
        let mut c = HeaderCodec::new();
        let mut raw = 1u32.to_be_bytes().to_vec();
        raw.extend_from_slice(&u32::MAX.to_be_bytes());
        let mut out = Vec::with_capacity(256);
        c.deflate
            .compress_vec(&raw, &mut out, FlushCompress::Sync)
            .unwrap();
        assert_eq!(HeaderCodec::new().decode(&out), Err(HeaderError::Malformed));
        // A zlib bomb: a megabyte of zeros.
        let mut c = HeaderCodec::new();
        let raw = vec![0u8; 1 << 20];
        let mut out = Vec::with_capacity(1 << 16);
        c.deflate
            .compress_vec(&raw, &mut out, FlushCompress::Sync)
            .unwrap();
        assert_eq!(HeaderCodec::new().decode(&out), Err(HeaderError::TooLarge));
    }
}
