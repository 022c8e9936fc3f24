//! The client library in the test's own process, for what the `pleiades` binary cannot be told
//! in the middle of a run (unplug this USB device now). Included by the tests and benchmarks
//! that need it (`#[path]`): the library is only a dev-dependency of the kit.

use pleiades_client::session::{Session, SessionHandle, SessionOptions};
use pleiades_protocol::connfile::Connection;

/// A session on its own runtime; its events are read (and dropped) so that no stream waits.
pub struct LibrarySession {
    pub runtime: tokio::runtime::Runtime,
    pub handle: SessionHandle,
}

impl LibrarySession {
    /// Connects with `connection`'s one-time ticket.
    pub fn start(connection: &Connection) -> Self {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let handle = runtime.block_on(async {
            let connected = pleiades_client::connect::connect(connection).await.expect("connects");
            let mut session = Session::start(connected, &connection.ticket, SessionOptions::default())
                .await
                .expect("session");
            let handle = session.handle.clone();
            tokio::spawn(async move { while session.next_event().await.is_some() {} });
            handle
        });
        Self { runtime, handle }
    }

    /// Ends the session from this side.
    pub fn disconnect(self) {
        self.runtime.block_on(self.handle.disconnect("done"));
    }
}
