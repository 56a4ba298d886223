//! The shortest end-to-end path: a client joins a room and another member
//! receives its message.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn two_clients_chat_in_a_room() {
    let gw = TestGateway::start(test_config()).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("general").await;
    b.join("general").await;
    a.send(json!({"type": "message", "room": "general", "content": "Hello!", "id": "m1"}))
        .await;
    assert_eq!(a.recv().await, json!({"type": "ack", "id": "m1"}));
    assert_eq!(
        b.recv().await,
        json!({"type": "message", "room": "general", "content": "Hello!", "from": a.id})
    );
    gw.stop().await;
}
