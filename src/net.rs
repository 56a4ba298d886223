//! What an I/O error says about the other end of a connection.

/// Whether `kind` means the peer closed or reset the connection: it went
/// away, which is not a fault of this side's. Client connections count
/// it as the client's close; upstream connections as a connection the
/// upstream ended, which a request may be sent again after.
pub fn peer_gone(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    matches!(kind, ConnectionReset | ConnectionAborted | BrokenPipe)
}
