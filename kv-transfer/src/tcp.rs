//! KV frames over TCP: one connection per destination, reused by every transfer to it, and a
//! listener that hands decoded frames to a bounded channel (a slow receiver slows senders
//! through TCP flow control rather than buffering without bound).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tandem_common::tls::Tls;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::error::TransferError;
use crate::frame::{Frame, FrameCodec, Received};

/// Frames waiting for one connection's writer before senders wait.
const CONNECTION_QUEUE: usize = 64;

/// Sends frames to decode workers' KV listeners.
#[derive(Debug, Clone)]
pub struct TcpKvSender {
    connections: Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Outgoing>>>>,
    codec: FrameCodec,
    tls: Option<Tls>,
}

/// Accepts KV connections and decodes their frames.
#[derive(Debug)]
pub struct KvListener {
    listener: TcpListener,
    codec: FrameCodec,
    tls: Option<Tls>,
}

#[derive(Debug)]
struct Outgoing {
    frame: Frame,
    sent: oneshot::Sender<Result<(), TransferError>>,
}

impl TcpKvSender {
    /// Frames up to `max_frame_bytes`, over TLS to listeners that have it when `tls` is set.
    pub fn new(max_frame_bytes: usize, tls: Option<Tls>) -> Self {
        Self {
            connections: Arc::default(),
            codec: FrameCodec::new(max_frame_bytes),
            tls,
        }
    }

    /// Sends `frame` to `endpoint` and returns once it is written to the socket. Frames sent
    /// to one endpoint arrive in the order their `send` calls began.
    pub async fn send(&self, endpoint: SocketAddr, frame: Frame) -> Result<(), TransferError> {
        let (sent, written) = oneshot::channel();
        let mut outgoing = Outgoing { frame, sent };
        // A writer that died (peer gone) is replaced once; a second failure is real.
        for _ in 0..2 {
            let writer = self.writer(endpoint);
            match writer.send(outgoing).await {
                Ok(()) => {
                    return written
                        .await
                        .unwrap_or(Err(TransferError::Closed(endpoint)));
                }
                Err(mpsc::error::SendError(back)) => {
                    outgoing = back;
                    self.forget(endpoint, &writer);
                }
            }
        }
        Err(TransferError::Closed(endpoint))
    }

    fn writer(&self, endpoint: SocketAddr) -> mpsc::Sender<Outgoing> {
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        connections
            .entry(endpoint)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(CONNECTION_QUEUE);
                tokio::spawn(write_connection(endpoint, self.codec, self.tls.clone(), rx));
                tx
            })
            .clone()
    }

    fn forget(&self, endpoint: SocketAddr, dead: &mpsc::Sender<Outgoing>) {
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if connections
            .get(&endpoint)
            .is_some_and(|tx| tx.same_channel(dead))
        {
            connections.remove(&endpoint);
        }
    }
}

/// Owns one connection: connects, then writes queued frames until the queue closes or a write
/// fails (which fails that frame and ends the connection; queued frames fail with it).
async fn write_connection(
    endpoint: SocketAddr,
    codec: FrameCodec,
    tls: Option<Tls>,
    mut queue: mpsc::Receiver<Outgoing>,
) {
    let stream = match tandem_common::tls::connect(&endpoint.to_string(), tls.as_ref()).await {
        Ok(stream) => stream,
        Err(source) => {
            let message = source.to_string();
            if let Some(first) = queue.recv().await {
                let _ = first
                    .sent
                    .send(Err(TransferError::Connect { endpoint, source }));
            }
            queue.close();
            while let Some(next) = queue.recv().await {
                let _ = next.sent.send(Err(TransferError::Connect {
                    endpoint,
                    source: std::io::Error::other(message.clone()),
                }));
            }
            return;
        }
    };
    let mut sink = FramedWrite::new(stream, codec);
    while let Some(Outgoing { frame, sent }) = queue.recv().await {
        let result = sink.send(frame).await.map_err(|e| match e {
            TransferError::Stream(source) => TransferError::Io { endpoint, source },
            other => other,
        });
        let failed = result.is_err();
        let _ = sent.send(result);
        if failed {
            return;
        }
    }
}

impl KvListener {
    /// Binds `addr` for frames up to `max_frame_bytes`; with `tls`, senders need a
    /// certificate from its CA.
    pub async fn bind(
        addr: SocketAddr,
        max_frame_bytes: usize,
        tls: Option<Tls>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(addr).await?,
            codec: FrameCodec::new(max_frame_bytes),
            tls,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until `frames` closes, sending every decoded envelope to it. A
    /// corrupt stream (bad magic, oversize frame) closes that connection only.
    pub async fn run(self, frames: mpsc::Sender<Received>) {
        let mut incoming = tandem_common::tls::incoming(self.listener, self.tls.as_ref());
        loop {
            let stream = tokio::select! {
                accepted = incoming.accept() => match accepted {
                    Some(stream) => stream,
                    None => return,
                },
                () = frames.closed() => return,
            };
            let Ok(peer) = stream.peer_addr() else {
                continue;
            };
            let frames = frames.clone();
            let mut reader = FramedRead::new(stream, self.codec);
            tokio::spawn(async move {
                while let Some(item) = reader.next().await {
                    match item {
                        Ok(received) => {
                            if frames.send(received).await.is_err() {
                                return;
                            }
                        }
                        Err(error) => {
                            tracing::warn!(%peer, %error, "closing a corrupt kv connection");
                            return;
                        }
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use tandem_common::ids::{KvBlockId, TransferId};

    use super::*;
    use crate::frame::{DoneFrame, KvShape, LayerFrame};

    #[tokio::test]
    async fn frames_to_one_endpoint_arrive_in_order_over_one_connection() {
        let listener = KvListener::bind("127.0.0.1:0".parse().expect("addr"), 1 << 20, None)
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(listener.run(tx));
        let sender = TcpKvSender::new(1 << 20, None);
        let shape = KvShape {
            num_tokens: 2,
            kv_heads: 1,
            head_dim: 2,
        };
        for layer in 0..3 {
            let frame = LayerFrame::from_f32(
                TransferId(1),
                layer,
                shape,
                vec![KvBlockId(4)],
                &[layer as f32; 4],
                &[0.5; 4],
            );
            sender.send(addr, Frame::Layer(frame)).await.expect("sent");
        }
        let done = Frame::Done(DoneFrame {
            transfer: TransferId(1),
            first_token: 9,
            logprob: -1.0,
            top: Vec::new(),
            kv_in_place: false,
        });
        sender.send(addr, done.clone()).await.expect("sent");
        for layer in 0..3 {
            let Some(Ok(Frame::Layer(f))) = rx.recv().await else {
                panic!("expected layer {layer}")
            };
            assert_eq!(f.layer, layer);
            assert_eq!(f.to_f32().expect("f32").0, vec![layer as f32; 4]);
        }
        assert_eq!(rx.recv().await, Some(Ok(done)));
    }

    #[tokio::test]
    async fn sending_to_a_closed_port_fails_with_the_endpoint() {
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = closed.local_addr().expect("addr");
        drop(closed);
        let sender = TcpKvSender::new(1024, None);
        let frame = Frame::Done(DoneFrame {
            transfer: TransferId(1),
            first_token: 1,
            logprob: 0.0,
            top: Vec::new(),
            kv_in_place: false,
        });
        let err = sender.send(addr, frame).await.unwrap_err();
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
