//! A buffered frame connection over any byte stream (a worker's Unix socket).

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{Frame, FrameError};

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("connection closed in the middle of a frame")]
    CutFrame,
}

pub struct Connection<S> {
    stream: S,
    buffer: BytesMut,
    write_buffer: BytesMut,
    max_frame: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S, max_frame: usize) -> Self {
        Self {
            stream,
            buffer: BytesMut::with_capacity(8 * 1024),
            write_buffer: BytesMut::with_capacity(8 * 1024),
            max_frame,
        }
    }

    /// Reads the next frame. A clean end of stream between frames is `Ok(None)`; one in
    /// the middle of a frame is an error.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, ConnectionError> {
        loop {
            if let Some(n) = Frame::check(&self.buffer, self.max_frame)? {
                let frame = Frame::parse(&self.buffer[..n])?;
                self.buffer.advance(n);
                return Ok(Some(frame));
            }
            if self.stream.read_buf(&mut self.buffer).await? == 0 {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(ConnectionError::CutFrame)
                };
            }
        }
    }

    pub async fn write_frame(&mut self, frame: &Frame) -> Result<(), ConnectionError> {
        self.write_buffer.clear();
        frame.encode(&mut self.write_buffer);
        self.stream.write_all(&self.write_buffer).await?;
        self.stream.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn frames_cross_a_duplex_pipe() {
        let (a, b) = tokio::io::duplex(16);
        let mut left = Connection::new(a, 1024);
        let mut right = Connection::new(b, 1024);
        let frame = Frame::Batch {
            id: 1,
            items: vec![Bytes::from_static(b"{\"x\": 2}"), Bytes::new()],
            ids: Vec::new(),
            edges: Vec::new(),
        };
        let sent = frame.clone();
        let writer = tokio::spawn(async move {
            left.write_frame(&sent).await.unwrap();
            drop(left);
        });
        assert_eq!(right.read_frame().await.unwrap(), Some(frame));
        writer.await.unwrap();
        assert_eq!(right.read_frame().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_cut_frame_is_an_error() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut right = Connection::new(b, 1024);
        let bytes = Frame::Ready {
            pid: 9,
            reads_ids: true,
            reads_edges: true,
        }
        .to_bytes();
        a.write_all(&bytes[..bytes.len() - 1]).await.unwrap();
        drop(a);
        assert!(matches!(
            right.read_frame().await,
            Err(ConnectionError::CutFrame)
        ));
    }
}
