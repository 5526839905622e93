//! Following the other replicas: one PostgreSQL connection that only `LISTEN`s on
//! [`CHANNEL`], turning each notification into a [`Change`] (the replica's own are skipped),
//! reconnecting when it breaks, and saying [`Followed::Resync`] after every (re)connection,
//! because whatever was sent while it was away is lost.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Config, NoTls};

use super::Change;
use super::postgres::{CHANNEL, CONNECT_TIMEOUT, STATEMENT_TIMEOUT};

/// What the follower reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Followed {
    /// (Re)connected and listening: anything may have changed meanwhile; reload it all.
    Resync,
    /// Another replica changed something.
    Change(Change),
    /// The listening connection broke; reconnecting.
    Lost(String),
}

/// Follows until the receiver of `tx` is dropped, backing off from 50 ms to 1 s between
/// connections.
pub(super) async fn run(config: Config, replica: String, tx: mpsc::Sender<Followed>) {
    let mut delay = Duration::from_millis(50);
    loop {
        let broke = listen_once(&config, &replica, &tx).await;
        if tx.is_closed() {
            return;
        }
        if tx.send(Followed::Lost(broke)).await.is_err() {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// One listening connection's life; returns why it ended.
async fn listen_once(config: &Config, replica: &str, tx: &mpsc::Sender<Followed>) -> String {
    let (client, mut connection) =
        match tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls)).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return e.to_string(),
            Err(_) => return format!("no connection within {CONNECT_TIMEOUT:?}"),
        };
    // The connection delivers notifications only while it is polled; it is polled here, and
    // the LISTEN below goes through it.
    let (note_tx, mut notes) = mpsc::unbounded_channel::<Result<String, String>>();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if note_tx.send(Ok(n.payload().to_owned())).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let _ = note_tx.send(Err(e.to_string()));
                    return;
                }
                None => {
                    let _ = note_tx.send(Err("the server closed the connection".into()));
                    return;
                }
            }
        }
    });
    let listening = tokio::time::timeout(
        STATEMENT_TIMEOUT,
        client.batch_execute(&format!("LISTEN {CHANNEL}")),
    )
    .await;
    let why = match listening {
        Ok(Ok(())) => {
            if tx.send(Followed::Resync).await.is_err() {
                driver.abort();
                return "stopped".into();
            }
            loop {
                match notes.recv().await {
                    Some(Ok(payload)) => {
                        if let Some(change) = parse_payload(&payload, replica)
                            && tx.send(Followed::Change(change)).await.is_err()
                        {
                            break "stopped".into();
                        }
                    }
                    Some(Err(e)) => break e,
                    None => break "the connection task ended".into(),
                }
            }
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("LISTEN got no answer within {STATEMENT_TIMEOUT:?}"),
    };
    driver.abort();
    drop(client);
    why
}

/// A notification's change, unless it came from `me` or is not one of ours.
fn parse_payload(payload: &str, me: &str) -> Option<Change> {
    let mut parts = payload.splitn(3, ' ');
    let kind = parts.next()?;
    let origin = parts.next()?;
    if origin == me {
        return None;
    }
    match (kind, parts.next()) {
        ("instance", Some(id)) => Some(Change::Instance(id.to_owned())),
        ("policy", _) => Some(Change::Policy),
        ("settings", _) => Some(Change::Settings),
        ("entities", _) => Some(Change::Entities),
        ("revocations", _) => Some(Change::Revocations),
        _ => {
            tracing::debug!(payload, "ignoring an unknown change notification");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_from_this_replica_are_skipped() {
        assert_eq!(parse_payload("policy r1", "r1"), None);
        assert_eq!(parse_payload("policy r2", "r1"), Some(Change::Policy));
        assert_eq!(
            parse_payload("instance r2 proxy with spaces", "r1"),
            Some(Change::Instance("proxy with spaces".into()))
        );
        assert_eq!(parse_payload("entities r2", "r1"), Some(Change::Entities));
        assert_eq!(parse_payload("settings r2", "r1"), Some(Change::Settings));
        assert_eq!(
            parse_payload("revocations r2", "r1"),
            Some(Change::Revocations)
        );
        assert_eq!(parse_payload("instance r2", "r1"), None);
        assert_eq!(parse_payload("future r2 x", "r1"), None);
        assert_eq!(parse_payload("", "r1"), None);
    }
}
