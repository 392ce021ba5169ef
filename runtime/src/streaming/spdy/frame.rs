//! SPDY/3.1 frames: parsing and encoding, no I/O.
//!
//! ```text
//! control frame:  |1| version(15) | type(16) | flags(8) | length(24) | payload
//! data frame:     |0| stream id(31)          | flags(8) | length(24) | payload
//! ```
//!
//! Every length is checked against the payload and against the bounds
//! below before anything is allocated; a frame that breaks a rule is a
//! [`FrameError`], which closes the connection it came on.

/// The SPDY version in every control frame.
pub const VERSION: u16 = 3;
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 8;
/// The largest DATA payload accepted (clients send 32 KiB).
pub const MAX_DATA_LEN: usize = 1 << 20;
/// The largest control frame payload accepted (header blocks are small).
pub const MAX_CONTROL_LEN: usize = 64 * 1024;
/// The most SETTINGS entries in one frame.
pub const MAX_SETTINGS: usize = 64;

/// FLAG_FIN: the sender's last frame on the stream.
pub const FLAG_FIN: u8 = 0x01;
/// FLAG_UNIDIRECTIONAL (SYN_STREAM): the receiver may not send on it.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

/// RST_STREAM status codes used here.
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
}

/// GOAWAY status codes.
pub mod goaway {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
}

/// One frame. Header blocks stay compressed here ([`super::headers`]
/// inflates them, in order, with the connection's shared zlib stream).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        header_block: Vec<u8>,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        header_block: Vec<u8>,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    /// (flags, id, value) entries.
    Settings {
        entries: Vec<(u8, u32, u32)>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        header_block: Vec<u8>,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        flags: u8,
        data: Vec<u8>,
    },
    /// A control frame type this version does not know: ignored, as the
    /// spec asks.
    Unknown {
        frame_type: u16,
    },
}

/// What is wrong with a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("unsupported SPDY version {0}")]
    Version(u16),
    #[error("{kind} frame of {len} bytes is larger than {max}")]
    TooLarge {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    #[error("stream id 0 in a {0} frame")]
    ZeroStreamId(&'static str),
}

/// A parsed frame header: whether it is a control frame, and how long its
/// payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    raw: [u8; HEADER_LEN],
    /// Payload bytes that follow.
    pub len: usize,
}

impl FrameHeader {
    /// Checks the header's version and length bound.
    pub fn parse(raw: [u8; HEADER_LEN]) -> Result<FrameHeader, FrameError> {
        let len = usize::from(raw[5]) << 16 | usize::from(raw[6]) << 8 | usize::from(raw[7]);
        let control = raw[0] & 0x80 != 0;
        if control {
            let version = u16::from_be_bytes([raw[0] & 0x7f, raw[1]]);
            if version != VERSION {
                return Err(FrameError::Version(version));
            }
            if len > MAX_CONTROL_LEN {
                return Err(FrameError::TooLarge {
                    kind: "control",
                    len,
                    max: MAX_CONTROL_LEN,
                });
            }
        } else if len > MAX_DATA_LEN {
            return Err(FrameError::TooLarge {
                kind: "DATA",
                len,
                max: MAX_DATA_LEN,
            });
        }
        Ok(FrameHeader { raw, len })
    }

    fn flags(&self) -> u8 {
        self.raw[4]
    }

    /// Decodes the frame from its payload (exactly `self.len` bytes).
    pub fn decode(&self, payload: Vec<u8>) -> Result<Frame, FrameError> {
        if payload.len() != self.len {
            return Err(FrameError::Malformed("truncated"));
        }
        let flags = self.flags();
        if self.raw[0] & 0x80 == 0 {
            let stream_id = u32_at(&self.raw, 0) & 0x7fff_ffff;
            if stream_id == 0 {
                return Err(FrameError::ZeroStreamId("DATA"));
            }
            return Ok(Frame::Data {
                stream_id,
                flags,
                data: payload,
            });
        }
        let p = &payload;
        let frame_type = u16::from_be_bytes([self.raw[2], self.raw[3]]);
        Ok(match frame_type {
            TYPE_SYN_STREAM => {
                if p.len() < 10 {
                    return Err(FrameError::Malformed("SYN_STREAM"));
                }
                let stream_id = stream_id_at(p, 0, "SYN_STREAM")?;
                Frame::SynStream {
                    stream_id,
                    associated_to: u32_at(p, 4) & 0x7fff_ffff,
                    priority: p[8] >> 5,
                    flags,
                    header_block: p[10..].to_vec(),
                }
            }
            TYPE_SYN_REPLY => {
                if p.len() < 4 {
                    return Err(FrameError::Malformed("SYN_REPLY"));
                }
                Frame::SynReply {
                    stream_id: stream_id_at(p, 0, "SYN_REPLY")?,
                    flags,
                    header_block: p[4..].to_vec(),
                }
            }
            TYPE_RST_STREAM => {
                if p.len() != 8 {
                    return Err(FrameError::Malformed("RST_STREAM"));
                }
                Frame::RstStream {
                    stream_id: stream_id_at(p, 0, "RST_STREAM")?,
                    status: u32_at(p, 4),
                }
            }
            TYPE_SETTINGS => {
                if p.len() < 4 {
                    return Err(FrameError::Malformed("SETTINGS"));
                }
                let n = u32_at(p, 0) as usize;
                if n > MAX_SETTINGS {
                    return Err(FrameError::TooLarge {
                        kind: "SETTINGS",
                        len: n,
                        max: MAX_SETTINGS,
                    });
                }
                if p.len() != 4 + 8 * n {
                    return Err(FrameError::Malformed("SETTINGS"));
                }
                let entries = (0..n)
                    .map(|i| {
                        let at = 4 + 8 * i;
                        let id_flags = u32_at(p, at);
                        (
                            (id_flags >> 24) as u8,
                            id_flags & 0xff_ffff,
                            u32_at(p, at + 4),
                        )
                    })
                    .collect();
                Frame::Settings { entries }
            }
            TYPE_PING => {
                if p.len() != 4 {
                    return Err(FrameError::Malformed("PING"));
                }
                Frame::Ping { id: u32_at(p, 0) }
            }
            TYPE_GOAWAY => {
                if p.len() != 8 {
                    return Err(FrameError::Malformed("GOAWAY"));
                }
                Frame::GoAway {
                    last_good_stream_id: u32_at(p, 0) & 0x7fff_ffff,
                    status: u32_at(p, 4),
                }
            }
            TYPE_HEADERS => {
                if p.len() < 4 {
                    return Err(FrameError::Malformed("HEADERS"));
                }
                Frame::Headers {
                    stream_id: stream_id_at(p, 0, "HEADERS")?,
                    flags,
                    header_block: p[4..].to_vec(),
                }
            }
            TYPE_WINDOW_UPDATE => {
                if p.len() != 8 {
                    return Err(FrameError::Malformed("WINDOW_UPDATE"));
                }
                Frame::WindowUpdate {
                    stream_id: u32_at(p, 0) & 0x7fff_ffff,
                    delta: u32_at(p, 4) & 0x7fff_ffff,
                }
            }
            other => Frame::Unknown { frame_type: other },
        })
    }
}

fn u32_at(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

fn stream_id_at(p: &[u8], at: usize, kind: &'static str) -> Result<u32, FrameError> {
    let id = u32_at(p, at) & 0x7fff_ffff;
    if id == 0 {
        return Err(FrameError::ZeroStreamId(kind));
    }
    Ok(id)
}

/// Parses one frame from the start of `buf`: `None` while `buf` holds less
/// than a whole frame, else the frame and the bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(raw) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let mut head = [0u8; HEADER_LEN];
    head.copy_from_slice(raw);
    let header = FrameHeader::parse(head)?;
    let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + header.len) else {
        return Ok(None);
    };
    Ok(Some((
        header.decode(payload.to_vec())?,
        HEADER_LEN + header.len,
    )))
}

fn control(out: &mut Vec<u8>, frame_type: u16, flags: u8, payload: &[u8]) {
    out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    out.extend_from_slice(&frame_type.to_be_bytes());
    push_flags_len(out, flags, payload.len());
    out.extend_from_slice(payload);
}

fn push_flags_len(out: &mut Vec<u8>, flags: u8, len: usize) {
    // Every frame built here is far below 2^24 bytes (see the callers).
    debug_assert!(len < 1 << 24);
    let len = (len as u32).to_be_bytes();
    out.extend_from_slice(&[flags, len[1], len[2], len[3]]);
}

impl Frame {
    /// Appends the frame's wire form to `out`. Header blocks must already be
    /// compressed; DATA payloads must be under 16 MiB.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                push_flags_len(out, *flags, data.len());
                out.extend_from_slice(data);
            }
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                flags,
                header_block,
            } => {
                let mut p = Vec::with_capacity(10 + header_block.len());
                p.extend_from_slice(&stream_id.to_be_bytes());
                p.extend_from_slice(&associated_to.to_be_bytes());
                p.extend_from_slice(&[priority << 5, 0]);
                p.extend_from_slice(header_block);
                control(out, TYPE_SYN_STREAM, *flags, &p);
            }
            Frame::SynReply {
                stream_id,
                flags,
                header_block,
            } => {
                let mut p = stream_id.to_be_bytes().to_vec();
                p.extend_from_slice(header_block);
                control(out, TYPE_SYN_REPLY, *flags, &p);
            }
            Frame::Headers {
                stream_id,
                flags,
                header_block,
            } => {
                let mut p = stream_id.to_be_bytes().to_vec();
                p.extend_from_slice(header_block);
                control(out, TYPE_HEADERS, *flags, &p);
            }
            Frame::RstStream { stream_id, status } => {
                let mut p = stream_id.to_be_bytes().to_vec();
                p.extend_from_slice(&status.to_be_bytes());
                control(out, TYPE_RST_STREAM, 0, &p);
            }
            Frame::Settings { entries } => {
                let mut p = (entries.len() as u32).to_be_bytes().to_vec();
                for (flags, id, value) in entries {
                    p.extend_from_slice(
                        &(u32::from(*flags) << 24 | (id & 0xff_ffff)).to_be_bytes(),
                    );
                    p.extend_from_slice(&value.to_be_bytes());
                }
                control(out, TYPE_SETTINGS, 0, &p);
            }
            Frame::Ping { id } => control(out, TYPE_PING, 0, &id.to_be_bytes()),
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                let mut p = last_good_stream_id.to_be_bytes().to_vec();
                p.extend_from_slice(&status.to_be_bytes());
                control(out, TYPE_GOAWAY, 0, &p);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                let mut p = stream_id.to_be_bytes().to_vec();
                p.extend_from_slice(&delta.to_be_bytes());
                control(out, TYPE_WINDOW_UPDATE, 0, &p);
            }
            Frame::Unknown { frame_type } => control(out, *frame_type, 0, &[]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frame: Frame) {
        let mut wire = Vec::new();
        frame.encode(&mut wire);
        let (back, used) = parse(&wire).expect("parses").expect("whole");
        assert_eq!(used, wire.len());
        assert_eq!(back, frame);
        // Any strict prefix is "not yet".
        for cut in 0..wire.len() {
            assert_eq!(parse(&wire[..cut]).expect("prefix"), None, "cut {cut}");
        }
    }

    #[test]
    fn every_frame_type_round_trips() {
        round_trip(Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 3,
            flags: FLAG_FIN,
            header_block: vec![1, 2, 3],
        });
        round_trip(Frame::SynReply {
            stream_id: 7,
            flags: 0,
            header_block: vec![9; 20],
        });
        round_trip(Frame::RstStream {
            stream_id: 5,
            status: rst::CANCEL,
        });
        round_trip(Frame::Settings {
            entries: vec![(1, 4, 100), (0, 7, 65536)],
        });
        round_trip(Frame::Ping { id: 1 });
        round_trip(Frame::GoAway {
            last_good_stream_id: 9,
            status: goaway::OK,
        });
        round_trip(Frame::Headers {
            stream_id: 3,
            flags: FLAG_FIN,
            header_block: vec![],
        });
        round_trip(Frame::WindowUpdate {
            stream_id: 3,
            delta: 1 << 20,
        });
        round_trip(Frame::Data {
            stream_id: 3,
            flags: FLAG_FIN,
            data: b"hello".to_vec(),
        });
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        // Wrong version.
        let wire = [0x80, 2, 0, 1, 0, 0, 0, 0];
        assert_eq!(parse(&wire), Err(FrameError::Version(2)));
        // A control frame over the bound.
        let wire = [0x80, 3, 0, 1, 0, 0x10, 0, 0];
        assert!(matches!(parse(&wire), Err(FrameError::TooLarge { .. })));
        // A DATA frame over the bound.
        let wire = [0, 0, 0, 1, 0, 0x7f, 0, 0];
        assert!(matches!(parse(&wire), Err(FrameError::TooLarge { .. })));
        // DATA on stream 0.
        let wire = [0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(parse(&wire), Err(FrameError::ZeroStreamId("DATA")));
        // A PING with a short payload.
        let wire = [0x80, 3, 0, 6, 0, 0, 0, 2, 0, 1];
        assert_eq!(parse(&wire), Err(FrameError::Malformed("PING")));
        // SETTINGS claiming more entries than it carries, or too many.
        let wire = [0x80, 3, 0, 4, 0, 0, 0, 4, 0, 0, 0, 2];
        assert_eq!(parse(&wire), Err(FrameError::Malformed("SETTINGS")));
        let wire = [0x80, 3, 0, 4, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(parse(&wire), Err(FrameError::TooLarge { .. })));
        // An unknown control type is not an error.
        let wire = [0x80, 3, 0, 0x42, 0, 0, 0, 0];
        assert_eq!(
            parse(&wire),
            Ok(Some((Frame::Unknown { frame_type: 0x42 }, 8)))
        );
    }
}
